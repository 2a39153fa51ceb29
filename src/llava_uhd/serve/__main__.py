"""``python -m llava_uhd.serve FOLDER [vLLM options]``: the OpenAI-compatible server for a model folder.

Checks the folder first (one clear message, exit 2), then starts vLLM's API server with the defaults this model
needs unless given: ``--dtype`` the folder's LLM dtype (what ``LlavaUHD.from_pretrained`` computes in),
``--served-model-name`` the folder's name, ``--max-image-pixels`` (decoded-image limit, 40 MP; sets
``VLLM_MAX_IMAGE_PIXELS``), ``--limit-mm-per-prompt '{"image": 8}'``, and on a machine without a GPU
``--enforce-eager`` and ``--gpu-memory-utilization 0.1`` (there: the share of RAM vLLM reserves). Every other
option is vLLM's own (``--tensor-parallel-size``, ``--pipeline-parallel-size``, ``--max-model-len``, ...;
docs/serving.md). Runs in the serving environment (``make serve-env``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
CPU_MEMORY_SHARE = 0.1
DEFAULT_IMAGES_PER_REQUEST = 8


def _has_option(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def _pop_option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if a.startswith(name + "="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def build_argv(folder: Path, rest: list[str], has_gpu: bool) -> tuple[list[str], dict[str, str]]:
    """vLLM's API server arguments and environment for ``folder`` (the spec checked), ``rest`` passed through."""
    from llava_uhd.serve.spec import load_spec

    spec = load_spec(folder)
    rest = list(rest)
    env: dict[str, str] = {}
    pixels = _pop_option(rest, "--max-image-pixels")
    try:
        limit = int(pixels) if pixels is not None else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        raise ValueError(f"--max-image-pixels must be an integer, got {pixels!r}") from None
    if limit <= 0:
        raise ValueError(f"--max-image-pixels must be positive, got {limit}")
    env["VLLM_MAX_IMAGE_PIXELS"] = str(limit)
    argv = ["--model", spec.folder]
    if not _has_option(rest, "--dtype"):
        argv += ["--dtype", spec.llm_dtype]
    if not _has_option(rest, "--served-model-name"):
        argv += ["--served-model-name", folder.name]
    if not _has_option(rest, "--limit-mm-per-prompt"):
        argv += ["--limit-mm-per-prompt", json.dumps({"image": DEFAULT_IMAGES_PER_REQUEST})]
    if not has_gpu and not _has_option(rest, "--enforce-eager"):
        argv.append("--enforce-eager")
    if not has_gpu and not _has_option(rest, "--gpu-memory-utilization"):  # on the CPU: the share of RAM reserved
        argv += ["--gpu-memory-utilization", str(CPU_MEMORY_SHARE)]
    return argv + rest, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_uhd.serve", description=__doc__.split("\n\n")[0],
                                     epilog="Any other option is passed to vLLM's server (see docs/serving.md).")
    parser.add_argument("folder", help="a save_pretrained / export folder, or the released LLaVA-format folder")
    args, rest = parser.parse_known_args(argv)
    folder = Path(args.folder)
    if importlib.util.find_spec("vllm") is None:
        print("error: vLLM is not installed in this environment; run `make serve-env` and use .venv-serve "
              "(or `make serve MODEL=DIR`)", file=sys.stderr)
        return 2
    from llava_uhd.serve.spec import NotServableError

    try:
        server_args, env = build_argv(folder, rest, has_gpu=shutil.which("nvidia-smi") is not None)
    except (NotServableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.update(env)
    sys.argv = ["llava_uhd.serve", *server_args]
    from vllm.entrypoints.launchers.api_server.entry import main as serve

    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
