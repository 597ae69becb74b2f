"""What every script shares: the ``--params`` argument, the checks run before any work, and loading the
model at its hook (config and hook name are checked before the weights load)."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

from dictlearn.activations.store import store_folder
from dictlearn.errors import UserError
from dictlearn.lm.models import HookPoint, LanguageModel, load_config, load_language_model, resolve_hooks
from dictlearn.lm.text import check_source
from dictlearn.params import DEFAULT_PARAMS_PATH, Params, load_params


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one ``error: ...`` line and exit code 2, like every other user
    error (argparse's own report adds the usage block above it). Subcommands' parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type for counts: ``--tokens 0`` or ``-5`` is refused instead of meaning 'the default'."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return value


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(description=description)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS_PATH), help="params file (default: params.json)")
    return parser


def threads_from_env() -> None:
    """Respect DICTLEARN_THREADS (torch otherwise takes every core it sees)."""
    if threads := os.environ.get("DICTLEARN_THREADS"):
        import torch

        torch.set_num_threads(int(threads))


def only_first_rank_prints(distributed) -> None:
    """Under torchrun, ranks other than 0 send their stdout to /dev/null: N copies of every line say nothing more
    (their errors, on stderr, still show). Progress bars take ``disable=not distributed.is_first``."""
    if not distributed.is_first:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Make glibc keep freed blocks for reuse instead of returning them to the kernel.

    By default every block above 32 MiB is a fresh mmap, so the SAE's (B, F) pre-activation matrix (128 MiB
    for batch 4096 x 8192 latents) page-faults in every step: about 30 ms a step on a 2-core machine
    (bench/train_speed.py --default-malloc shows it). Does nothing where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def quiet_transformers() -> None:
    """Scripts print their own progress; transformers' warnings and loading bars would bury it."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def prepare_hooks(params_path: str | Path, *, needs_text: bool = True) -> tuple[Params, LanguageModel, list[HookPoint]]:
    """Load params, check the text source and every hook (names, lists, patterns) against the model's config,
    then load the model."""
    quiet_transformers()
    params = load_params(params_path)
    if needs_text:
        check_source(params.data)
    config = load_config(params.model)
    hooks = resolve_hooks(config, params.hook)
    lm = load_language_model(params.model)
    return params, lm, hooks


def prepare(params_path: str | Path, *, needs_text: bool = True) -> tuple[Params, LanguageModel, HookPoint]:
    """``prepare_hooks`` for a script that reads one hook: several are refused in one line."""
    params, lm, hooks = prepare_hooks(params_path, needs_text=needs_text)
    if len(hooks) > 1:
        raise UserError(
            f"hook: {params.hook!r} names {len(hooks)} hooks and this script reads one; name one hook "
            "(training_script.py and get_activations.py take several)"
        )
    return params, lm, hooks[0]


def store_path(params: Params, lm: LanguageModel, hook: HookPoint) -> Path:
    return store_folder(params, lm.short_name, hook.name)
