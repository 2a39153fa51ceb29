"""``python -m llava_uhd.generate``: ask a model folder (ours or the LLaVA-format release) about images.

::

    python -m llava_uhd.generate --model DIR [--adapter DIR] --image photo.jpg [--image ...] \\
        --prompt "What is this?" [--num-beams 3] [--max-new-tokens 512] [--json]

Prints the answer, then the timings ``LlavaUHD.generate`` measures (encoder ms, LLM prefill ms, time to
first token, decoding tokens/s). On a terminal, greedy answers stream token by token as they come
(transformers' ``TextStreamer``); ``--json`` prints one JSON object instead. The release evaluates with
``--num-beams 3 --max-new-tokens 512``. Bad input (a missing or unreadable image or folder, a folder that is
not a model, a bad option) gives one message on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from llava_uhd.arguments import positive_int
from llava_uhd.errors import ReleaseError, SettingsError, UsageError
from llava_uhd.vision.resize import POLICIES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m llava_uhd.generate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder: save_pretrained / convert output, or a release")
    p.add_argument("--adapter", default=None, help="a LoRA run's adapter folder, put on --model without merging")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--prompt", required=True, help="the question; '<image>' marks where each image goes")
    p.add_argument("--num-beams", type=positive_int, default=1, help="beam search width (1: greedy; release: 3)")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="cap on the answer's tokens")
    p.add_argument("--resize-policy", choices=POLICIES, default=None,
                   help="resize rule (default: the folder's; a release: release)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def open_images(paths: list[str]) -> list:
    """Decode every image fully now (EXIF orientation applied), so a damaged file is reported before loading."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"--image: no image file at {path}")
        try:
            with Image.open(path) as image:
                image.load()
                images.append(ImageOps.exif_transpose(image))  # a phone photo upright, as it is shown
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
            raise UsageError(f"--image: cannot read {path} as an image ({err})") from err
    return images


def load_model(path: str, resize_policy: str | None, adapter: str | None = None):
    from llava_uhd.mllm import LlavaUHD

    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"--model: no model folder at {path}")
    if adapter is not None and not Path(adapter).is_dir():
        raise UsageError(f"--adapter: no adapter folder at {adapter}")
    try:
        return LlavaUHD.from_pretrained(folder, resize_policy=resize_policy, adapter=adapter)
    except SettingsError as err:  # the adapter's: not one, or made for another base
        raise UsageError(f"--adapter: {str(err).removeprefix('adapter: ')}") from err
    except (ReleaseError, ValueError, OSError, KeyError, TypeError) as err:
        raise UsageError(f"--model: cannot load {path}: {err}") from err


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import TextStreamer

    from llava_uhd.profiling import pick_device

    if not args.prompt.strip():
        raise UsageError("--prompt: empty; ask a question")
    images = open_images(args.image)
    device, _ = pick_device(args.device)
    model = load_model(args.model, args.resize_policy, args.adapter).to(device).eval()
    stream = sys.stdout.isatty() and not args.json and args.num_beams == 1
    extra = {"streamer": TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)} if stream else {}
    try:
        result = model.generate(images, args.prompt, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                **extra)
    except ValueError as err:  # e.g. more <image> marks than images
        raise UsageError(f"--prompt: {err}") from err
    record = {
        "model": args.model, "images": args.image, "prompt": args.prompt, "answer": result.text,
        "encoder_ms": round(result.encoder_ms, 3), "prefill_ms": round(result.prefill_ms, 3),
        "ttft_ms": round(result.ttft_ms, 3), "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
        "new_tokens": len(result.token_ids), "image_tokens": result.num_image_tokens,
        "prompt_tokens": result.num_prompt_tokens, "num_beams": args.num_beams, "device": str(device),
        "resize_policy": model.config.resize_policy, "adapter": args.adapter,
    }
    if args.json:
        print(json.dumps(record))
    else:
        if not stream:
            print(result.text)
        print(f"encoder {record['encoder_ms']:.1f} ms | prefill {record['prefill_ms']:.1f} ms | "
              f"TTFT {record['ttft_ms']:.1f} ms | {record['decode_tokens_per_s']:.1f} tokens/s | "
              f"{record['image_tokens']} image tokens, {record['prompt_tokens']} prompt tokens", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except SettingsError as err:  # UsageError and the --device check's own SettingsError
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
