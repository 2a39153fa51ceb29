import io
import json
import os

import pytest
import torch
from PIL import Image

from datamodules.batching import Bucketer, collate
from datamodules.datamodule import UHDDataModule
from datamodules.stream import equalize
from datamodules.synthetic import write_synthetic
from llava_uhd.conversation import IGNORE_INDEX, IMAGE_PAD

from .conftest import SMALL, bomb_png, conversation, good_samples, image_bytes, write_shards


def _run(dm, split="train"):
    batches = list(getattr(dm, f"{split}_dataloader")())
    return batches, [k for b in batches for k in b["keys"]]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapegrid")
    write_synthetic("shapegrid", 48, str(out), seed=0, min_side=64, max_side=256, shard_size=12)
    return out


def test_buckets_token_budget_and_no_sample_lost(synthetic_dir, tokenizer):
    budget = 256
    dm = UHDDataModule(train_shards=str(synthetic_dir), tokenizer=tokenizer, batch_token_budget=budget,
                       max_batch_size=6, **{**SMALL, "sample_shuffle": 16})
    loader = dm.train_dataloader()
    batches, keys = _run(dm)
    assert sorted(keys) == [f"shapegrid{i:08d}" for i in range(48)] and len(batches) == len(loader)
    sizes_seen = set()
    for b in batches:
        assert isinstance(b["pixel_values"], torch.Tensor) and b["pixel_values"].ndim == 4
        h, w = b["pixel_values"].shape[-2:]
        assert all(tuple(s) == (h, w) for s in b["image_sizes"])
        tokens = (h // 16) * (w // 16)
        assert len(b["keys"]) * tokens <= max(budget, tokens) and len(b["keys"]) <= 6
        assert h % 16 == 0 and w % 16 == 0 and 64 * 64 <= h * w <= 128 * 128
        pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        assert ((b["input_ids"] == pad).sum(1) == tokens).all()
        sizes_seen.add((h, w))
    assert len(sizes_seen) > 5  # many aspect-ratio buckets
    big = UHDDataModule(train_shards=str(synthetic_dir), tokenizer=tokenizer, batch_token_budget=budget,
                        max_batch_size=6, **{**SMALL, "min_pixels": 128 * 128, "max_pixels": 256 * 256})
    assert len(_run(big)[0]) > len(batches)  # bigger images, same budget: smaller batches


def test_packed_mode_mixes_sizes_under_budget(synthetic_dir, tokenizer):
    dm = UHDDataModule(train_shards=str(synthetic_dir), tokenizer=tokenizer, batch_token_budget=200,
                       max_batch_size=8, packed=True, **SMALL)
    batches, keys = _run(dm)
    assert sorted(keys) == [f"shapegrid{i:08d}" for i in range(48)]
    assert any(isinstance(b["pixel_values"], list) for b in batches)
    for b in batches:
        images = b["pixel_values"] if isinstance(b["pixel_values"], list) else list(b["pixel_values"])
        tokens = [(p.shape[-2] // 16) * (p.shape[-1] // 16) for p in images]
        assert sum(tokens) <= 200 or len(tokens) == 1


def test_collate_and_batch_format(tokenizer):
    bucketer = Bucketer(lambda h, w: (h // 16) * (w // 16), 10_000, 8)
    from datamodules.samples import Sample

    s1 = Sample("a", [torch.zeros(3, 32, 48)], [(60, 90)], [1, 2, 3], [IGNORE_INDEX, 2, 3], {"answer": "x"})
    s2 = Sample("b", [torch.zeros(3, 32, 48), torch.zeros(3, 32, 48)], [(30, 45), (31, 46)], [4, 5], [4, 5], {})
    s3 = Sample("c", [], [], [6], [IGNORE_INDEX], {})
    assert bucketer.key(s1.image_sizes) == (1, 32, 48) and bucketer.key(s2.image_sizes) == (2, 32, 48)
    batch = collate([s1, s2, s3], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0], [6, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, 5, -100], [-100, -100, -100]]
    assert batch["pixel_values"].shape == (3, 3, 32, 48) and batch["images_per_sample"] == [1, 2, 0]
    assert batch["image_sizes"] == [(32, 48)] * 3 and batch["orig_sizes"] == [(60, 90), (30, 45), (31, 46)]
    assert batch["keys"] == ["a", "b", "c"] and batch["meta"][0] == {"answer": "x"}


def test_sample_formats_multi_image_caption_and_text_only(tmp_path, tokenizer):
    samples = [
        {"__key__": "multi", "0.jpg": image_bytes(64, 64), "1.png": image_bytes(64, 128, fmt="PNG"),
         "json": conversation("Compare <image> with <image>.", "Same.")},
        {"__key__": "cap", "webp": image_bytes(64, 64, fmt="WEBP"), "txt": b"a noisy square"},
        {"__key__": "text", "json": json.dumps([{"from": "human", "value": "Hi"},
                                                {"from": "gpt", "value": "Hello."}]).encode()},
        {"__key__": "meta", "jpg": image_bytes(64, 64),
         "json": conversation(meta={"task": "shapegrid", "row": 2, "col": 3})},
    ]
    write_shards(tmp_path, samples)
    dm = UHDDataModule(train_shards=str(tmp_path / "shard-000000.tar"), tokenizer=tokenizer,
                       caption_prompt="Caption this.", **SMALL)
    batches, _ = _run(dm)
    by_key = {k: (b, i) for b in batches for i, k in enumerate(b["keys"])}
    b, i = by_key["multi"]
    assert b["images_per_sample"][i] == 2 and isinstance(b["pixel_values"], list)
    assert [tuple(s) for s in b["image_sizes"]] == [(64, 64), (64, 128)]  # sample order, then image order
    b, i = by_key["cap"]
    text = tokenizer.decode(b["input_ids"][i][b["attention_mask"][i].bool()])
    assert "Caption this.<|im_end|>" in text and "assistant\na noisy square<|im_end|>" in text
    assert b["meta"][i]["answer"] == "a noisy square"
    b, i = by_key["text"]
    assert b["images_per_sample"] == [0] and b["pixel_values"].shape[0] == 0
    b, i = by_key["meta"]
    assert b["meta"][i] == {"task": "shapegrid", "row": 2, "col": 3, "question": "What is this?", "answer": "A test."}


BAD_CASES = {
    "corrupt_image": {"jpg": b"\xff\xd8\xff garbage"},
    "truncated_image": {"jpg": image_bytes(64, 64)[:300]},
    "missing_image": {"json": conversation()},
    "bad_json": {"jpg": image_bytes(), "json": b"{not json"},
    "empty": {"jpg": image_bytes(), "json": json.dumps({"conversations": []}).encode()},
    "malformed": {"jpg": image_bytes(), "json": json.dumps([{"from": "gpt", "value": "x"}]).encode()},
    "strip": {"png": image_bytes(1, 5000, fmt="PNG")},
    "bomb": {"png": bomb_png()},
}
CONVERTED_MODES = [("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("P", "PNG")]


def test_every_bad_input_is_counted_never_fatal(tmp_path, tokenizer):
    samples = good_samples(3)
    for name, members in BAD_CASES.items():
        sample = {"__key__": f"bad_{name}", **members}
        sample.setdefault("json", conversation())
        samples.append(sample)
    for mode, fmt in CONVERTED_MODES:
        samples.append({"__key__": f"mode_{mode.replace(';', '_')}", fmt.lower().replace("jpeg", "jpg"):
                        image_bytes(64, 80, mode=mode, fmt=fmt), "json": conversation()})
    write_shards(tmp_path / "ok", samples, shard_size=64)
    # a truncated shard: 5 good samples, cut in the middle of the fourth one's image
    write_shards(tmp_path / "trunc", good_samples(5, prefix="t"), shard_size=64)
    path = tmp_path / "trunc" / "shard-000000.tar"
    data = path.read_bytes()
    cut = data.index(b"t0003.jpg") + 2000
    path.write_bytes(data[:cut])
    specs = [str(tmp_path / "ok" / "shard-000000.tar"), str(path), str(tmp_path / "missing" / "shard-000000.tar")]
    dm = UHDDataModule(train_shards=specs, tokenizer=tokenizer, **SMALL)
    batches, keys = _run(dm)
    expected = {"s0000", "s0001", "s0002", "t0000", "t0001", "t0002"}
    expected |= {f"mode_{m.replace(';', '_')}" for m, _ in CONVERTED_MODES}
    assert set(keys) == expected and len(keys) == len(expected)
    assert dm.skip_counts == {
        "corrupt_image": 2, "missing_image": 1, "bad_json": 1, "empty": 1, "malformed": 1, "extreme_aspect": 1,
        "decompression_bomb": 1, "truncated_shard": 1, "missing_shard": 1,
    }
    # the counts travel with the batches (that is how the LightningModule sees them)
    total = {}
    for b in batches:
        for k, v in b["skips"].items():
            total[k] = total.get(k, 0) + v
    assert total == dm.skip_counts
    # the converted modes give RGB pixels of the policy size
    for b in batches:
        for k, size in zip(b["keys"], b["image_sizes"]):
            if k.startswith("mode_"):
                assert len(size) == 2 and b["pixel_values"].shape[1] == 3


def test_too_long_and_mismatch_are_counted(tmp_path, tokenizer):
    samples = [
        {"__key__": "long", "jpg": image_bytes(), "json": conversation(answer="word " * 600)},
        {"__key__": "two", "0.jpg": image_bytes(), "1.jpg": image_bytes(), "json": conversation("<image> x")},
        {"__key__": "few", "jpg": image_bytes(), "json": conversation("<image><image>")},
        *good_samples(1),
    ]
    write_shards(tmp_path, samples)
    dm = UHDDataModule(train_shards=str(tmp_path), tokenizer=tokenizer, **SMALL)
    _, keys = _run(dm)
    assert keys == ["s0000"] and dm.skip_counts == {"too_long": 1, "image_count_mismatch": 1, "missing_image": 1}


def test_two_workers_every_sample_once_and_skips_reach_main(synthetic_dir, tokenizer, tmp_path):
    write_shards(tmp_path, [{"__key__": "junk", "jpg": b"junk", "json": conversation()}], sizes=[[(64, 64)]])
    specs = [str(synthetic_dir), str(tmp_path / "shard-000000.tar")]
    dm = UHDDataModule(train_shards=specs, tokenizer=tokenizer, batch_token_budget=256, max_batch_size=4,
                       **{**SMALL, "num_workers": 2, "persistent_workers": True})
    loader = dm.train_dataloader()
    for _ in range(2):
        keys = [k for b in loader for k in b["keys"]]
        assert sorted(keys) == [f"shapegrid{i:08d}" for i in range(48)]
    assert dm.skip_counts == {"corrupt_image": 2}  # once per epoch
    assert len(list(loader)) == len(loader) - 1  # one rank: len is exact until a sample is skipped


def test_resampled_mode_has_fixed_epoch(synthetic_dir, tokenizer):
    dm = UHDDataModule(train_shards=str(synthetic_dir), tokenizer=tokenizer, resampled=True, batches_per_epoch=7,
                       batch_token_budget=256, **{**SMALL, "sample_shuffle": 8})
    loader = dm.train_dataloader()
    assert len(loader) == 7 and len(list(loader)) == 7 and len(list(loader)) == 7


def test_shard_spec_forms(synthetic_dir, tokenizer):
    brace = os.path.join(str(synthetic_dir), "shapegrid-{000000..000003}.tar")
    url = "file://" + os.path.join(str(synthetic_dir), "shapegrid-000000.tar")
    for spec, n in ((brace, 48), ([url], 12)):
        dm = UHDDataModule(val_shards=spec, tokenizer=tokenizer, **SMALL)
        assert len(_run(dm, "val")[1]) == n


def test_policy_is_the_shared_preprocess(tmp_path, tokenizer):
    from llava_uhd.vision.resize import normalize, preprocess

    data = image_bytes(70, 150)
    write_shards(tmp_path, [{"__key__": "x", "jpg": data, "json": conversation()}])
    dm = UHDDataModule(test_shards=str(tmp_path), tokenizer=tokenizer, **SMALL)
    (batch,), _ = _run(dm, "test")
    pixels = batch["pixel_values"][0]
    assert pixels.dtype == torch.uint8  # shipped compact; the model normalises on its device
    assert torch.equal(normalize(pixels), preprocess(Image.open(io.BytesIO(data)), dm.policy))
    assert batch["orig_sizes"] == [(70, 150)]


def test_equalize_tops_up_short_ranks_and_trims_long_ones():
    """Every rank gets the same number of batches: short rows are padded worker by worker, long ones trimmed
    from their largest worker."""
    assert equalize([[3, 1], [1, 1]], 4) == [[3, 1], [2, 2]]
    assert equalize([[2, 2, 1]], 8) == [[3, 3, 2]]
    assert equalize([[5, 1]], 3) == [[2, 1]]

