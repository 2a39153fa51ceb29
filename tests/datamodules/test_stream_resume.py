"""The training stream's position survives a checkpoint: a loader given ``stream_state()`` yields exactly the
batches an uninterrupted epoch would have yielded after the cut (same samples, same buckets), in-flight batches
included, and nothing before it. Settings that would change the order are refused by name."""

from __future__ import annotations

import pytest
import torch

from datamodules.datamodule import UHDDataModule
from datamodules.stream_state import mismatches, shard_differences
from datamodules.synthetic import write_synthetic
from llava_uhd.errors import SettingsError

from .conftest import SMALL, conversation, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 shape grids of many sizes in 5 shards, plus one shard holding a corrupt image (a skipped sample)."""
    out = tmp_path_factory.mktemp("resume_shards")
    write_synthetic("shapegrid", 40, str(out), seed=3, min_side=32, max_side=160, shard_size=8)
    bad = tmp_path_factory.mktemp("resume_bad")
    write_shards(bad, [{"__key__": "junk", "jpg": b"\xff\xd8\xffjunk", "json": conversation()}], sizes=[[(64, 64)]])
    return [str(out), str(bad / "shard-000000.tar")]


def make(shards, tokenizer, **overrides):
    settings = {**SMALL, "sample_shuffle": 8, "batch_token_budget": 96, "max_batch_size": 3, "seed": 5, **overrides}
    return UHDDataModule(train_shards=shards, tokenizer=tokenizer, **settings).train_dataloader()


def consume(loader, n: int | None = None, fetch_ahead: int = 0) -> list[tuple]:
    """Train-like consumption: fetch ``fetch_ahead`` batches more than are consumed (Lightning's prefetch)."""
    taken, pending = [], []
    for batch in loader:
        pending.append(batch)
        if len(pending) > fetch_ahead:
            if n is not None and len(taken) == n:
                break
            first = pending.pop(0)
            loader.consume(first)
            taken.append(tuple(first["keys"]))
    if n is None:
        for batch in pending:
            loader.consume(batch)
            taken.append(tuple(batch["keys"]))
    return taken


def roundtrip(state: dict) -> dict:
    """Through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint file carries it."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


CASES = {
    "buckets": {},
    "packed": {"packed": True},
    "two_workers": {"num_workers": 2, "persistent_workers": True},
    "resampled": {"resampled": True, "batches_per_epoch": 9},
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_epoch_is_the_uninterrupted_one(shards, tokenizer, case):
    overrides = CASES[case]
    reference = consume(make(shards, tokenizer, **overrides))
    keys = [k for batch in reference for k in batch]
    if not overrides.get("resampled"):
        assert sorted(keys) == sorted(f"shapegrid{i:08d}" for i in range(40))  # every sample once
    cut = len(reference) // 2
    first = make(shards, tokenizer, **overrides)
    before = consume(first, cut, fetch_ahead=2)  # two batches in flight at the checkpoint
    state = roundtrip(first.stream_state())
    resumed = make(shards, tokenizer, **overrides)
    resumed.load_stream_state(state)
    after = consume(resumed)
    order = sorted if overrides.get("num_workers") else list  # workers may interleave differently after a restart
    assert order(before + after) == order(reference)
    assert order(consume(resumed)) == order(consume(make_epoch_two(shards, tokenizer, overrides)))  # next epoch


def make_epoch_two(shards, tokenizer, overrides):
    loader = make(shards, tokenizer, **overrides)
    consume(loader)
    return loader


def test_skips_before_the_checkpoint_are_counted_once(shards, tokenizer):
    first = make(shards, tokenizer, shard_shuffle=False)
    batches = consume(first)
    assert first.skips.as_dict() == {"corrupt_image": 1}
    first = make(shards, tokenizer, shard_shuffle=False)
    consume(first, len(batches) - 1)  # the junk shard is last: its skip came before the last batch
    resumed = make(shards, tokenizer, shard_shuffle=False)
    resumed.load_stream_state(roundtrip(first.stream_state()))
    assert resumed.skips.as_dict() == {"corrupt_image": 1}  # restored from the checkpoint
    consume(resumed)
    assert resumed.skips.as_dict() == {"corrupt_image": 1}  # and not counted again by the replay


@pytest.mark.parametrize(("change", "setting"), [
    ({"max_batch_size": 4}, "data.max_batch_size"),
    ({"seed": 6}, "data.seed"),
    ({"packed": True}, "data.packed"),
    ({"num_workers": 1}, "data.num_workers"),
])
def test_other_data_settings_are_refused_by_name(shards, tokenizer, change, setting):
    first = make(shards, tokenizer)
    consume(first, 3)
    state = first.stream_state()
    with pytest.raises(SettingsError, match=f"^{setting}: .*--data.allow_restart true"):
        make(shards, tokenizer, **change).load_stream_state(state)
    restarted = make(shards, tokenizer, **change, allow_restart=True)
    restarted.load_stream_state(state)  # a warning, and the epoch's stream starts over
    assert sorted(k for batch in consume(restarted) for k in batch) == sorted(f"shapegrid{i:08d}" for i in range(40))


def test_other_shards_are_refused(shards, tokenizer):
    first = make(shards, tokenizer)
    consume(first, 2)
    with pytest.raises(SettingsError, match=r"^data.train_shards: .*6 shards, this run has 5 shards: 1 removed "
                                            r"\(shard-000000.tar\); resume with"):
        make(shards[:1], tokenizer).load_stream_state(first.stream_state())


def test_a_refused_resume_names_what_differs_in_the_shards():
    # before: "other shard names or sizes, this run has these", naming none
    saved = [["a.tar", 8], ["b.tar", 8], ["c.tar", 8]] + [[f"old{i}.tar", 4] for i in range(7)]
    current = [["b.tar", 6], ["a.tar", 8], ["d.tar", 8], ["c.tar", 8]]
    assert shard_differences(saved, current) == (
        "1 added (d.tar), 7 removed (old0.tar, old1.tar, old2.tar, old3.tar, old4.tar and 2 more), "
        "1 changed size (b.tar: 8 -> 6 samples)")
    assert shard_differences(saved[:3], [saved[1], saved[0], saved[2]]) == "the same shards in another order"
    (message,) = mismatches({"shards": saved[:3]}, {"shards": [["a.tar", 8], ["b.tar", 7], ["c.tar", 8]]})
    assert message == ("data.train_shards: the checkpoint's stream was saved with 3 shards, this run has 3 shards: "
                       "1 changed size (b.tar: 8 -> 7 samples)")


def test_replay_decodes_no_image_before_the_cut(shards, tokenizer, monkeypatch):
    """Batches consumed before the checkpoint are replayed from image headers: the decoder runs only for samples
    trained after the resume (plus the corrupt one, if it comes after the cut)."""
    from datamodules.samples import SampleDecoder

    first = make(shards, tokenizer)
    before = consume(first, 6)
    state = first.stream_state()
    calls = []
    real = SampleDecoder.__call__
    monkeypatch.setattr(SampleDecoder, "__call__", lambda self, raw: calls.append(raw["__key__"]) or real(self, raw))
    resumed = make(shards, tokenizer)
    resumed.load_stream_state(state)
    after = [k for batch in consume(resumed) for k in batch]
    assert sorted(after + [k for batch in before for k in batch]) == sorted(f"shapegrid{i:08d}" for i in range(40))
    assert set(after) <= set(calls) <= set(after) | {"junk"} and len(calls) == len(set(calls))


def test_checkpoint_after_the_last_batch_resumes_into_the_next_epoch(shards, tokenizer):
    first = make(shards, tokenizer)
    consume(first)  # the whole epoch, then the checkpoint
    resumed = make(shards, tokenizer)
    resumed.load_stream_state(roundtrip(first.stream_state()))
    assert consume(resumed) == consume(make_epoch_two(shards, tokenizer, {}))  # not an empty epoch


def _rotated_photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG stored turned by 90 degrees with EXIF orientation 6, as a camera held sideways writes it: shown
    ``width x height``, stored ``height x width``."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    stored = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def test_exif_rotated_photos_resume_exactly(tmp_path, tokenizer):
    """Resume replays buckets from image headers: a rotated photo's header size must be the shown one, or the
    replayed buckets (and so the batches) differ from the live run's."""
    shapes = [(64, 128), (128, 64), (96, 96), (64, 128)] * 4
    samples = [{"__key__": f"photo{i:02d}", "jpg": _rotated_photo(w, h, i), "json": conversation()}
               for i, (w, h) in enumerate(shapes)]
    write_shards(tmp_path, samples, sizes=[[(h, w)] for w, h in shapes])
    spec = [str(tmp_path)]
    reference = consume(make(spec, tokenizer))
    first = make(spec, tokenizer)
    before = consume(first, len(reference) // 2)
    resumed = make(spec, tokenizer)
    resumed.load_stream_state(roundtrip(first.stream_state()))
    assert before + consume(resumed) == reference
    shown = {f"photo{i:02d}": (h, w) for i, (w, h) in enumerate(shapes)}
    for batch in make(spec, tokenizer):
        for key, (h, w) in zip(batch["keys"], batch["image_sizes"], strict=True):
            sh, sw = shown[key]
            assert (h > w, h < w) == (sh > sw, sh < sw), (key, (h, w), (sh, sw))  # encoded upright, as shown
