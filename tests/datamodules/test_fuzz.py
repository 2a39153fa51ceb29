"""Seeded fuzzing of converter and loader: corrupted images, JSON records, samples and shards never crash
either; every sample is used or skipped with a known reason, and the counts add up."""

import json
import random

from datamodules import convert
from datamodules.datamodule import UHDDataModule
from datamodules.samples import SKIP_REASONS
from datamodules.writer import SKIPPED_NAME, ShardSetWriter

from .conftest import SMALL, bomb_png, image_bytes

N = 300
ASK = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A thing."}]
WEIRD = [None, 7, -1e308, True, "", "text", [], [1, "a"], {}, {"from": 3}, "x" * 5000]


def flip(rng: random.Random, data: bytes, n: int = 4) -> bytes:
    data = bytearray(data)
    for _ in range(n):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def cut(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def bad_image(rng: random.Random) -> bytes:
    good = image_bytes(rng.randrange(32, 96), rng.randrange(32, 96), fmt=rng.choice(["JPEG", "PNG"]),
                       seed=rng.randrange(1000))
    kind = rng.randrange(6)
    if kind == 0:
        return good
    if kind == 1:
        return cut(rng, good)
    if kind == 2:
        return flip(rng, good, rng.randrange(1, 20))
    if kind == 3:
        return bomb_png(rng.choice([100_000, 1]), rng.choice([100_000, 5000]))  # huge or an extreme strip
    if kind == 4:
        return rng.randbytes(rng.randrange(0, 200))
    return good[:20] + flip(rng, good[20:], 50)


def bad_turns(rng: random.Random) -> object:
    kind = rng.randrange(7)
    if kind == 0:
        return ASK
    if kind == 1:
        return rng.choice(WEIRD)
    if kind == 2:
        return [ASK[0]]  # unanswered
    if kind == 3:
        return [dict(ASK[0], value=rng.choice(WEIRD)), ASK[1]]
    if kind == 4:
        return [{"from": rng.choice(["gpt", "human", "dog", 5]), "value": "hi"} for _ in range(rng.randrange(4))]
    if kind == 5:
        return [ASK[0], dict(ASK[1], value="word " * rng.choice([3, 20_000]))]  # huge values
    return [dict(ASK[0], value="<image>" * rng.randrange(4)), ASK[1]]


def test_fuzzed_json_records_through_the_converter_then_the_loader(tmp_path, tokenizer):
    rng = random.Random(1234)
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(N):
        record = {"id": rng.choice([f"r{i}", i, None, ["x"], "y" * 300]), "conversations": bad_turns(rng)}
        choice = rng.randrange(5)
        if choice < 3:
            (images / f"{i}.png").write_bytes(bad_image(rng))
            record["image"] = f"{i}.png"
        elif choice == 3:
            record["image"] = rng.choice(WEIRD + ["missing.jpg", "../outside.png", f"{i}.gif"])
        text = json.dumps(record)
        if rng.random() < 0.1:
            text = cut(rng, text) if rng.random() < 0.5 else text.replace('"', "'", 1)  # broken JSON lines
        lines.append(text.replace("\n", " ") or "{")
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    writer = convert.convert_llava(str(tmp_path / "data.jsonl"), str(images), str(tmp_path / "out"), shard_size=37)
    skipped = [json.loads(line) for line in (tmp_path / "out" / SKIPPED_NAME).read_text().splitlines()]
    assert writer.written + len(skipped) == N
    assert {s["reason"] for s in skipped} <= set(SKIP_REASONS)
    assert len({s["reason"] for s in skipped}) >= 6  # the fuzzing reached many kinds of fault
    assert writer.written > 10

    # what the converter wrote, the loader reads without a skip, except text too long for max_length
    dm = UHDDataModule(train_shards=str(tmp_path / "out"), tokenizer=tokenizer, **SMALL)
    used = sum(len(batch["keys"]) for batch in dm.train_dataloader())
    assert set(dm.skip_counts) <= {"too_long"}
    assert used + sum(dm.skip_counts.values()) == writer.written


def _bad_raw_sample(rng: random.Random, i: int) -> dict:
    sample = {"__key__": f"s{i:04d}"}
    kind = rng.randrange(4)
    if kind < 3:
        sample[rng.choice(["jpg", "png", "0.jpg", "webp"])] = bad_image(rng)
    body = json.dumps({"conversations": bad_turns(rng)}).encode()
    member = rng.randrange(6)
    if member == 0:
        sample["txt"] = rng.choice([b"a caption", b"\xff\xfe\x00", b"  "])
    elif member == 1:
        sample["json"] = cut(rng, body)
    elif member == 2:
        sample["json"] = flip(rng, body, 3)
    elif member == 3:
        sample["json"] = rng.randbytes(30)
    elif member == 4:
        sample["cls"] = b"3"  # no text at all
    else:
        sample["json"] = body
    return sample


def test_fuzzed_samples_and_shards_through_the_loader(tmp_path, tokenizer):
    rng = random.Random(99)
    writer = ShardSetWriter(str(tmp_path / "samples"), 25)
    for i in range(N):
        writer.write(_bad_raw_sample(rng, i), [(64, 64)])
    writer.close()
    dm = UHDDataModule(train_shards=str(tmp_path / "samples"), tokenizer=tokenizer, **SMALL)
    keys = [key for batch in dm.train_dataloader() for key in batch["keys"]]
    assert len(keys) == len(set(keys))
    assert set(dm.skip_counts) <= set(SKIP_REASONS)
    assert len(keys) + sum(dm.skip_counts.values()) == N  # every sample used or skipped, once
    assert keys and dm.skip_counts

    # whole shards cut short or bit-flipped: no crash, only known reasons
    small = ShardSetWriter(str(tmp_path / "small"), 2)
    for i in range(40):
        small.write({"__key__": f"g{i:03d}", "jpg": image_bytes(40, 40, seed=i), "json": json.dumps(
            {"conversations": ASK}).encode()}, [(40, 40)])
    small.close()
    shards = sorted((tmp_path / "small").glob("*.tar")) + sorted((tmp_path / "samples").glob("*.tar"))[:2]
    broken = tmp_path / "broken"
    broken.mkdir()
    for j in range(200):
        data = rng.choice(shards).read_bytes()
        data = cut(rng, data) if j % 2 else flip(rng, data, rng.randrange(1, 200))
        (broken / f"shard-{j:06d}.tar").write_bytes(data)
    dm = UHDDataModule(train_shards=str(broken), tokenizer=tokenizer, **SMALL)
    for _ in dm.train_dataloader():
        pass
    assert set(dm.skip_counts) <= set(SKIP_REASONS) and dm.skip_counts
