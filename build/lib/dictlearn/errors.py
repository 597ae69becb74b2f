"""User errors: one exception type, and the wrapper that turns it into one line and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (params, files, a mismatched dictionary): say what and how to fix it."""


def run_script(main: Callable[[], object]) -> None:
    """Run a script's ``main``; a ``UserError`` becomes ``error: <message>`` on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
