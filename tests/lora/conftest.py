"""Fixtures of the LoRA tests: a tiny release-format base folder (the released layout, random weights) and shards
of real photos (scikit-learn's sample images, cut into small captioned crops)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from datamodules.convert import convert_folder

from ..release.conftest import write_release

CAPTIONS = {"china.jpg": "a temple roof among green trees", "flower.jpg": "a pink flower in the sun"}


def write_photo_shards(out: Path, per_photo: int = 6) -> Path:
    """``per_photo`` crops of each sample photo (60-120 px sides), each with its photo's caption, as shards."""
    from sklearn.datasets import load_sample_image

    images = out.parent / f"{out.name}_images"
    images.mkdir(parents=True)
    for name, caption in CAPTIONS.items():
        photo = Image.fromarray(load_sample_image(name))
        for i in range(per_photo):
            left, top = 40 * i, 25 * i
            crop = photo.crop((left, top, left + 320, top + 240)).resize((80 + 8 * i, 60 + 6 * i))
            crop.save(images / f"{name[:-4]}{i}.jpg", quality=90)
            (images / f"{name[:-4]}{i}.txt").write_text(caption)
    convert_folder(str(images), str(out), shard_size=per_photo)
    return out


@pytest.fixture(scope="session")
def lora_base(tmp_path_factory) -> Path:
    """The base the adapters are trained on: a tiny release folder."""
    root = tmp_path_factory.mktemp("lora_base")
    return write_release(root / "release", root / "tokenizer")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """A release folder of the same shapes with other weights: an adapter of ``lora_base`` must not go on it."""
    root = tmp_path_factory.mktemp("other_base")
    return write_release(root / "release", root / "tokenizer", seed=7)


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> Path:
    return write_photo_shards(tmp_path_factory.mktemp("photos") / "train")
