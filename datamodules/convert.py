"""Converters to webdataset shards (+ ``index.json``), reporting converted and skipped samples with reasons.

    python -m datamodules.convert llava --json data.json --images DIR --out DIR --shard-size N
    python -m datamodules.convert folder --images DIR --out DIR

``llava``: LLaVA / ShareGPT4V JSON, a list of ``{"id", "image": "rel/path.jpg" (or "images": [...]),
"conversations": [{"from": "human"|"gpt", "value"}]}``; text-only records (no image) are kept. Image
bytes are copied as they are (no re-encoding); only the header is read, for the index's sizes and to
reject unreadable files and decompression bombs early. The loader checks everything again.
``folder``: ``x.jpg`` + ``x.txt`` caption pairs anywhere under ``--images``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator

from datamodules.samples import IMAGE_EXTENSIONS, SampleError, open_image
from datamodules.shards import ShardSetWriter
from llava_uhd.conversation import IMAGE_PLACEHOLDER, ConversationError, normalize_turns

MAX_IMAGE_PIXELS = 178_956_970
MAX_ASPECT_RATIO = 50.0


def _key(index: int, name: str) -> str:
    return f"{index:09d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", str(name))[:80]


def _image(path: str) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, extension, (h, w)) of an image file; raises SampleError with the skip reason."""
    if not os.path.isfile(path):
        raise SampleError("missing_image", path)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise SampleError("corrupt_image", f"unsupported extension {path}")
    with open(path, "rb") as f:
        data = f.read()
    image = open_image(data, MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO)
    try:
        image.verify()  # structural check without decoding every pixel
    except Exception as exn:
        raise SampleError("corrupt_image", f"{path}: {exn}") from exn
    return data, ("jpg" if ext == "jpeg" else ext), (image.height, image.width)


def _llava_records(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def convert_llava(json_path: str, images: str, out: str, shard_size: int = 1000) -> ShardSetWriter:
    writer = ShardSetWriter(out, shard_size)
    for i, record in enumerate(_llava_records(json_path)):
        try:
            if not isinstance(record, dict):
                raise SampleError("malformed", "record is not an object")
            turns = normalize_turns(record.get("conversations"))
            names = record.get("images", record.get("image"))
            names = [] if names is None else [names] if isinstance(names, str) else list(names)
            placeholders = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns)
            if placeholders not in (0, len(names)) or (placeholders == 0 and len(names) > 1):
                raise SampleError("image_count_mismatch", f"{placeholders} placeholders, {len(names)} images")
            sample = {"__key__": _key(i, record.get("id", i))}
            sizes = []
            for j, name in enumerate(names):
                data, ext, size = _image(os.path.join(images, name))
                sample[f"{j}.{ext}" if len(names) > 1 else ext] = data
                sizes.append(size)
            meta = {"id": record.get("id"), "source_images": names}
            body = {"conversations": record["conversations"], "meta": meta}
            if names:
                body["images"] = names
            sample["json"] = json.dumps(body, ensure_ascii=False).encode("utf-8")
            writer.write(sample, sizes)
        except (SampleError, ConversationError) as exn:
            writer.skip(exn.reason)
    writer.close(source=os.path.abspath(json_path))
    return writer


def _pairs(images: str) -> Iterator[tuple[str, str | None, str | None]]:
    """(stem, image path or None, caption path or None) for every stem under ``images``, sorted."""
    found: dict[str, dict[str, str]] = {}
    for root, _, files in os.walk(images):
        for name in files:
            stem, ext = os.path.splitext(os.path.join(root, name))
            ext = ext.lower().lstrip(".")
            if ext in IMAGE_EXTENSIONS:
                found.setdefault(stem, {})["image"] = stem + os.path.splitext(name)[1]
            elif ext == "txt":
                found.setdefault(stem, {})["txt"] = stem + ".txt"
    for stem in sorted(found):
        yield stem, found[stem].get("image"), found[stem].get("txt")


def convert_folder(images: str, out: str, shard_size: int = 1000) -> ShardSetWriter:
    writer = ShardSetWriter(out, shard_size)
    for i, (stem, image_path, txt_path) in enumerate(_pairs(images)):
        try:
            if image_path is None:
                raise SampleError("missing_image", f"{txt_path} has no image")
            if txt_path is None:
                raise SampleError("no_text", f"{image_path} has no caption")
            with open(txt_path, "rb") as f:
                caption = f.read()
            try:
                if not caption.decode("utf-8").strip():
                    raise SampleError("empty", txt_path)
            except UnicodeDecodeError as exn:
                raise SampleError("bad_json", f"{txt_path} is not UTF-8") from exn
            data, ext, size = _image(image_path)
            writer.write({"__key__": _key(i, os.path.relpath(stem, images)), ext: data, "txt": caption}, [size])
        except SampleError as exn:
            writer.skip(exn.reason)
    writer.close(source=os.path.abspath(images))
    return writer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert datasets to webdataset shards.")
    sub = parser.add_subparsers(dest="format", required=True)
    llava = sub.add_parser("llava", help="LLaVA / ShareGPT4V conversation JSON")
    llava.add_argument("--json", required=True)
    llava.add_argument("--images", required=True)
    llava.add_argument("--out", required=True)
    llava.add_argument("--shard-size", type=int, default=1000)
    folder = sub.add_parser("folder", help="x.jpg + x.txt caption pairs")
    folder.add_argument("--images", required=True)
    folder.add_argument("--out", required=True)
    folder.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.format == "llava":
        try:
            writer = convert_llava(args.json, args.images, args.out, args.shard_size)
        except (OSError, ValueError) as exn:
            sys.exit(f"cannot read {args.json}: {exn}")
    else:
        writer = convert_folder(args.images, args.out, args.shard_size)
    print(writer.report())


if __name__ == "__main__":
    main()
