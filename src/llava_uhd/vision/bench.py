"""Deprecated alias of the encoder benchmarks, kept for one release: they are commands of ``llava_uhd.bench``.

``python -m llava_uhd.vision.bench [...]`` is ``python -m llava_uhd.bench roofline [...]``, and
``python -m llava_uhd.vision.bench --pack [...]`` is ``python -m llava_uhd.bench pack [...]``: same options,
same files, same printed figures, plus one line on stderr naming the new command. The old module-level
names (``run``, ``run_pack``, ``write``, ...) resolve to their new homes with a ``DeprecationWarning``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Any

from llava_uhd.bench import pack, roofline
from llava_uhd.bench.options import PAIRS, add_encoder_options, encoder_names

MOVED = {
    "run": "llava_uhd.bench.roofline:measure",
    "write": "llava_uhd.bench.roofline:write",
    "print_encoders": "llava_uhd.bench.roofline:show",
    "run_pack": "llava_uhd.bench.pack:measure",
    "write_pack": "llava_uhd.bench.pack:write",
    "print_pack": "llava_uhd.bench.pack:show",
    "PACK_SIZES": "llava_uhd.bench.pack:PACK_SIZES",
    "PAIRS": "llava_uhd.bench.options:PAIRS",
    "DTYPES": "llava_uhd.profiling:DTYPES",
}


def __getattr__(name: str) -> Any:
    if name in MOVED:
        module, new = MOVED[name].split(":")
        warnings.warn(f"llava_uhd.vision.bench.{name} moved to {module}.{new}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """The old command line: ``--pack`` picks ``bench pack``, otherwise ``bench roofline``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m llava_uhd.vision.bench",
                                     description=__doc__.split("\n")[0])
    add_encoder_options(parser, out="runs/bench")
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--pack", action="store_true", help="packing benchmark: one by one vs packed vs mask")
    parser.add_argument("--sizes", type=pack.image_size, nargs="+", default=list(pack.PACK_SIZES),
                        help="--pack images, HxW")
    parser.add_argument("--model", default=None, help="--pack encoder (default: the --shape pair's ViT-UHD)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    command = "pack" if args.pack else "roofline"
    print(f"note: python -m llava_uhd.vision.bench is deprecated and goes in the next release; use "
          f"python -m llava_uhd.bench {command}", file=sys.stderr)
    args.command_line = " ".join(["python -m llava_uhd.vision.bench", *argv])
    if not args.pack:  # the old command checked --model in both modes
        model = args.model or PAIRS[args.shape][0]
        if model not in encoder_names():
            parser.error(f"--model: unknown encoder {model!r}; choose from {encoder_names()}")
    return (pack if args.pack else roofline).run(args)


if __name__ == "__main__":
    sys.exit(main())
