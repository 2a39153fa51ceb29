"""Argument types shared by the command lines: a count given on the command line is a whole number in range, or
argparse's one-line error naming the option."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(least: int) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number ``>= least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    parse.__name__ = "positive_int" if least == 1 else f"int_at_least_{least}"
    return parse


positive_int = at_least(1)
"""A whole number >= 1 (a count, a size, a number of beams)."""
non_negative_int = at_least(0)
"""A whole number >= 0 (a seed, a thread count where 0 means the default)."""
