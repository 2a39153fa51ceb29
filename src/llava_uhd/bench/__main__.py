"""``python -m llava_uhd.bench <command> ...``: the benchmark entry point.

Each command is a module of this package with ``add_arguments(parser)`` and ``run(args)``; it is imported
only when chosen. To add a command, add one line to ``COMMANDS``. ``args.command_line`` is the command as
typed, for the results files to record.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "tokens": ("llava_uhd.bench.tokens", "visual tokens reaching the LLM per encoder and resolution"),
    "ttft": ("llava_uhd.bench.ttft", "time to first token and FLOPs per encoder and resolution, same LLM"),
    "roofline": ("llava_uhd.bench.roofline", "encoder speed: ViT-UHD vs GNE, and FLOP/s per part against a GEMM"),
    "pack": ("llava_uhd.bench.pack", "packing: mixed-size images one by one vs packed vs a block-diagonal mask"),
    "pilot": ("llava_uhd.bench.pilot", "pilot experiment: GNE vs SBE vs PVC accuracy per ShapeGrid cell"),
    "ablate": ("llava_uhd.bench.ablate", "ablations: WTC pooling, WTC placement, RPE patch size vs cost"),
    "memory": ("llava_uhd.bench.memory", "per-GPU memory of a training run: full vs LoRA vs QLoRA (meta device)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m llava_uhd.bench",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    modules = {}
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, allow_abbrev=False)
        if argv and argv[0] == name:  # import only the chosen command (others may pull heavy dependencies)
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(sub)
    args = parser.parse_args(argv)
    args.command_line = " ".join(["python -m llava_uhd.bench", *argv])
    return modules[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
