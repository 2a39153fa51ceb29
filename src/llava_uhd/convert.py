"""``python -m llava_uhd.convert release|merge``: a released LLaVA-UHD v3 folder, or a base + a LoRA adapter, -> our
model folder.

``release --src DIR --out DIR``:

Reads the LLaVA-format release (:mod:`llava_uhd.release`: every tensor accounted for, image tokens added to
the tokenizer) and writes a ``save_pretrained`` folder, which every training stage takes as
``--model.init_from`` and ``LlavaUHD.from_pretrained`` / ``python -m llava_uhd.generate`` read. The folder
keeps the release's resize rule (``resize_policy: release`` in its config) unless ``--resize-policy default``.

``merge --base DIR --adapter DIR --out DIR``: a LoRA run's adapter folder (its export) merged into its base
(``peft.PeftModel.from_pretrained(...).merge_and_unload()``, with the run's trained parts), written as our model
folder, which ``from_pretrained``, generate and eval read as any other. An adapter made for another base is refused.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from llava_uhd.errors import ReleaseError
from llava_uhd.vision.resize import POLICIES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m llava_uhd.convert",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rel = sub.add_parser("release", help="a LLaVA-format release folder -> a save_pretrained folder",
                         allow_abbrev=False)
    rel.add_argument("--src", required=True, help="the release folder (config.json model_type llava_qwen)")
    rel.add_argument("--out", required=True, help="where to write our model folder (must not exist or be empty)")
    rel.add_argument("--resize-policy", choices=POLICIES, default="release",
                     help="resize rule the converted model keeps (default: release, the rule it was trained with)")
    rel.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    merge = sub.add_parser("merge", help="a base model folder + a LoRA adapter folder -> a merged model folder",
                           allow_abbrev=False)
    merge.add_argument("--base", required=True, help="the base model folder (ours or a release) the adapter names")
    merge.add_argument("--adapter", required=True, help="the LoRA run's adapter folder (its export)")
    merge.add_argument("--out", required=True, help="where to write the merged model folder (must not exist or be "
                                                     "empty)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _check_out(out: Path, inputs: dict[str, Path], overwrite: bool) -> None:
    """``--out`` free, or replaceable without deleting an input (``{option: folder}``)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ReleaseError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")
        for option, src in inputs.items():
            if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
                raise ReleaseError(f"--out: {out} holds {option} {src}; replacing it would delete it")


def _write_folder(model, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.partial")  # written beside, then swapped in: never half a folder
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False):
    """Write ``base`` with ``adapter`` merged into it as our model folder ``out``; returns the merged model."""
    from llava_uhd.errors import SettingsError
    from llava_uhd.lora import merge_adapter
    from llava_uhd.mllm import LlavaUHD

    base, adapter, out = Path(base), Path(adapter), Path(out)
    if not base.is_dir():
        raise ReleaseError(f"--base: no model folder at {base}")
    if not adapter.is_dir():
        raise ReleaseError(f"--adapter: no adapter folder at {adapter}")
    _check_out(out, {"--base": base, "--adapter": adapter}, overwrite)
    try:
        model = LlavaUHD.from_pretrained(base)
    except (ReleaseError, ValueError, OSError) as err:
        raise ReleaseError(f"--base: cannot load {base}: {err}") from err
    try:
        merge_adapter(model, adapter)
    except SettingsError as err:
        raise ReleaseError(str(err)) from err
    _write_folder(model, out)
    return model


def convert_release(src: str | Path, out: str | Path, resize_policy: str = "release", overwrite: bool = False):
    """Write ``src`` (a release folder) as our model folder ``out``; returns the model and its load report."""
    from llava_uhd.mllm import LlavaUHD
    from llava_uhd.release import is_release_folder

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ReleaseError(f"--src: no folder at {src}")
    if not is_release_folder(src):
        raise ReleaseError(f"--src: {src} is not a LLaVA-format release (its config.json needs model_type "
                           "llava_qwen or mm_vision_tower)")
    _check_out(out, {"--src": src}, overwrite)
    with tqdm(total=2, desc="convert (read release, write folder)", unit="step") as steps:
        model = LlavaUHD.from_release(src, resize_policy=resize_policy, progress=True)
        steps.update()
        _write_folder(model, out)
        steps.update()
    return model, model.load_report


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "merge":
            merge_lora(args.base, args.adapter, args.out, args.overwrite)
            print(f"wrote {args.out}: {args.base} with {args.adapter} merged")
            return 0
        _, report = convert_release(args.src, args.out, args.resize_policy, args.overwrite)
    except (ReleaseError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: encoder {report.encoder}, projector {report.projector}, LLM {report.llm} tensors; "
          f"unused: {', '.join(report.unused) or 'none'}; tokens added: {', '.join(report.added_tokens) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
