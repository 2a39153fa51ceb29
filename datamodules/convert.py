"""Converters to webdataset shards (+ ``index.json`` and ``skipped.jsonl``), checking every sample as the loader does.

    python -m datamodules.convert llava --json data.json --images DIR --out DIR [--shard-size N] [--overwrite]
    python -m datamodules.convert folder --images DIR --out DIR [--shard-size N] [--overwrite]

``llava``: LLaVA / ShareGPT4V JSON, a list of ``{"id", "image": "rel/path.jpg" (or "images": [...]),
"conversations": [{"from": "human"|"gpt", "value"}]}`` (or JSON Lines, one record a line); text-only records
(no image) are kept. ``folder``: ``x.jpg`` + ``x.txt`` caption pairs anywhere under ``--images``.

Each sample is built exactly as it will be stored and passed through :func:`datamodules.samples.check_sample`,
the loader's own validation (full image decode, conversation rules, size and aspect limits); a sample that
fails is not written but named in ``skipped.jsonl`` (``{"id", "reason", "detail"}``) and summarised on the
console. Image bytes are copied as they are (no re-encoding).

The output folder must be new or empty, or ``--overwrite`` replaces it whole: the set is written into a
temporary sibling folder that takes the output's place only when the conversion succeeded, so a crash leaves
the old set or the new one, never a mix. Mistakes in the inputs (a missing file or folder, a JSON object
instead of a list, a conversion in which every sample was skipped) end with one message and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

from datamodules.samples import IMAGE_EXTENSIONS, SampleError, check_sample
from datamodules.writer import ShardSetWriter, replacing_dir
from llava_uhd.arguments import positive_int
from llava_uhd.errors import SettingsError


def _key(index: int, name: object) -> str:
    return f"{index:09d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", str(name))[:80]


def _read_image(images: str, name: object) -> tuple[bytes, str]:
    """(bytes, member extension) of an image named by a record; raises SampleError with the skip reason."""
    if not isinstance(name, str) or not name:
        raise SampleError("malformed", f"image name {name!r:.80} is not a path")
    root = os.path.realpath(images)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise SampleError("missing_image", f"{name} is outside --images")
    if not os.path.isfile(path):
        raise SampleError("missing_image", f"no file {path}")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise SampleError("corrupt_image", f"unsupported extension {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exn:
        raise SampleError("missing_image", f"cannot read {path}: {exn}") from exn
    return data, ("jpg" if ext == "jpeg" else ext)


def _check_folder(images: str) -> None:
    if os.path.isfile(images):
        raise SettingsError(f"--images: {images} is a file; give the folder the images are in")
    if not os.path.isdir(images):
        raise SettingsError(f"--images: no such folder: {images}")
    if not os.access(images, os.R_OK | os.X_OK):
        raise SettingsError(f"--images: cannot read the folder {images}")


def _llava_records(path: str) -> Iterator[tuple[object, object]]:
    """(record, fallback id) pairs; a bad JSON Lines line is yielded as a SampleError to skip."""
    if os.path.isdir(path):
        raise SettingsError(f"--json: {path} is a folder; give the JSON (or JSON Lines) file")
    if not os.path.isfile(path):
        raise SettingsError(f"--json: no such file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                lines = f.readlines()
            else:
                records = json.load(f)
    except UnicodeDecodeError as exn:
        raise SettingsError(f"--json: {path} is not UTF-8 text ({exn})") from exn
    except json.JSONDecodeError as exn:
        raise SettingsError(f"--json: {path} is not valid JSON: {exn}") from exn
    except OSError as exn:
        raise SettingsError(f"--json: cannot read {path}: {exn}") from exn
    if path.endswith(".jsonl"):
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield json.loads(line), f"line {number}"
                except ValueError as exn:
                    yield SampleError("bad_json", f"line {number}: {exn}"), f"line {number}"
        return
    if not isinstance(records, list):
        raise SettingsError(f"--json: {path} holds a JSON {type(records).__name__}; expected a list of records "
                            '[{"id", "image", "conversations"}, ...]')
    for i, record in enumerate(records):
        yield record, i


def _llava_sample(i: int, record: object, fallback: object, images: str) -> tuple[dict, object]:
    """The raw sample exactly as it will be stored, and its id."""
    if isinstance(record, SampleError):
        raise record
    if not isinstance(record, dict):
        raise SampleError("malformed", f"record is a {type(record).__name__}, not an object")
    sample_id = record.get("id", fallback)
    names = record.get("images", record.get("image"))
    names = [] if names is None else [names] if isinstance(names, str) else names
    if not isinstance(names, list):
        raise SampleError("malformed", f"images is a {type(names).__name__}, not a list")
    sample = {"__key__": _key(i, sample_id)}
    for j, name in enumerate(names):
        data, ext = _read_image(images, name)
        sample[f"{j}.{ext}" if len(names) > 1 else ext] = data
    body = {"conversations": record.get("conversations"), "meta": {"id": sample_id, "source_images": names}}
    if names:
        body["images"] = names
    sample["json"] = json.dumps(body, ensure_ascii=False).encode("utf-8")
    return sample, sample_id


def _convert(items: list, build: Callable[[int, Any], tuple[dict, object]], identify: Callable[[int, Any], object],
             out: str, shard_size: int, overwrite: bool, source: str) -> ShardSetWriter:
    """Build, check and write every item into a fresh shard set that replaces ``out`` on success."""
    with replacing_dir(out, overwrite) as staging:
        writer = ShardSetWriter(staging, shard_size)
        for i, item in enumerate(tqdm(items, desc="converting", unit="sample", disable=None)):
            sample_id = identify(i, item)
            try:
                sample, sample_id = build(i, item)
                checked = check_sample(sample)
                writer.write(sample, checked.orig_sizes)
            except SampleError as exn:
                writer.skip(exn.reason, sample_id, exn.detail)
        writer.close(source=source)
        if writer.written == 0:
            raise SettingsError(f"nothing to write: every sample of {source} was skipped, so no shards were "
                                f"made\n{writer.report(out, listed=False)}")
    writer.out = os.path.abspath(out)
    return writer


def convert_llava(json_path: str, images: str, out: str, shard_size: int = 1000,
                  overwrite: bool = False) -> ShardSetWriter:
    """LLaVA-style JSON (or JSON Lines) + image folder -> shards in ``out``; returns the (closed) writer."""
    _check_folder(images)
    records = list(_llava_records(json_path))
    if not records:
        raise SettingsError(f"--json: {json_path} holds no records")
    return _convert(records, lambda i, item: _llava_sample(i, *item, images),
                    lambda i, item: item[0].get("id", item[1]) if isinstance(item[0], dict) else item[1],
                    out, shard_size, overwrite, os.path.abspath(json_path))


def _pairs(images: str) -> Iterator[tuple[str, str | None, str | None]]:
    """(stem, image path or None, caption path or None) for every stem under ``images``, sorted."""

    def unreadable(err: OSError) -> None:
        raise SettingsError(f"--images: cannot read {err.filename}: {err.strerror}")

    found: dict[str, dict[str, str]] = {}
    for root, _, files in os.walk(images, onerror=unreadable):
        for name in files:
            stem, ext = os.path.splitext(os.path.join(root, name))
            ext = ext.lower().lstrip(".")
            if ext in IMAGE_EXTENSIONS:
                found.setdefault(stem, {})["image"] = stem + os.path.splitext(name)[1]
            elif ext == "txt":
                found.setdefault(stem, {})["txt"] = stem + ".txt"
    for stem in sorted(found):
        yield stem, found[stem].get("image"), found[stem].get("txt")


def _folder_sample(i: int, stem: str, image_path: str | None, txt_path: str | None, images: str) -> tuple[dict, str]:
    sample_id = os.path.relpath(stem, images)
    if image_path is None:
        raise SampleError("missing_image", f"{txt_path} has no image")
    if txt_path is None:
        raise SampleError("no_text", f"{image_path} has no caption")
    try:
        with open(txt_path, "rb") as f:
            caption = f.read()
    except OSError as exn:
        raise SampleError("no_text", f"cannot read {txt_path}: {exn}") from exn
    data, ext = _read_image(images, os.path.relpath(image_path, images))
    return {"__key__": _key(i, sample_id), ext: data, "txt": caption}, sample_id


def convert_folder(images: str, out: str, shard_size: int = 1000, overwrite: bool = False) -> ShardSetWriter:
    """``x.jpg`` + ``x.txt`` caption pairs under ``images`` -> shards in ``out``; returns the (closed) writer."""
    _check_folder(images)
    pairs = list(_pairs(images))
    if not pairs:
        raise SettingsError(f"--images: no images or captions under {images}")
    return _convert(pairs, lambda i, pair: _folder_sample(i, *pair, images),
                    lambda i, pair: os.path.relpath(pair[0], images), out, shard_size, overwrite,
                    os.path.abspath(images))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m datamodules.convert",
                                     description="Convert datasets to webdataset shards.")
    sub = parser.add_subparsers(dest="format", required=True)
    llava = sub.add_parser("llava", help="LLaVA / ShareGPT4V conversation JSON", allow_abbrev=False)
    llava.add_argument("--json", required=True, help="a JSON list of records, or JSON Lines (.jsonl)")
    folder = sub.add_parser("folder", help="x.jpg + x.txt caption pairs", allow_abbrev=False)
    for command in (llava, folder):
        command.add_argument("--images", required=True, help="folder the records' image paths are relative to")
        command.add_argument("--out", required=True, help="new (or empty) folder for the shards")
        command.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
        command.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder whole")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: one message and exit status 1 (2 for a malformed command line) for every input mistake."""
    args = _parser().parse_args(argv)
    try:
        if args.format == "llava":
            writer = convert_llava(args.json, args.images, args.out, args.shard_size, args.overwrite)
        else:
            writer = convert_folder(args.images, args.out, args.shard_size, args.overwrite)
    except SettingsError as exn:
        sys.exit(f"error: {exn}")
    except OSError as exn:  # e.g. the disk filled up while writing: the old set (if any) is untouched
        sys.exit(f"error: conversion failed, {args.out} left as it was: {exn}")
    print(writer.report())


if __name__ == "__main__":
    main()
