"""Tables (tabulate) and plots (matplotlib, Agg backend) for scripts to print and save."""

from __future__ import annotations

from tabulate import tabulate


def print_table(rows, headers, floatfmt: str = ".4g") -> None:
    print(tabulate(rows, headers=headers, floatfmt=floatfmt, tablefmt="simple"))


def format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return f"{count:.1f} GiB"
