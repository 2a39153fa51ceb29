"""Streaming webdataset DataModule with aspect-ratio buckets under a visual-token budget.

Pipeline in each DataLoader worker: this worker's shards -> ``wds.WebDataset`` (tar reading, grouping by
key; shard errors go to a counting handler) -> sample shuffle buffer -> :class:`SampleDecoder` (PIL
decode, resolution policy, ChatML tokenisation) -> :class:`Bucketer` -> :func:`collate`.

**Equal batches on every rank.** DDP hangs if one rank runs out of batches before the others, and
bucketing makes the batch count depend on the data. So every rank yields exactly ``len(loader)``
batches per epoch:

* resampled mode: shards are drawn with replacement forever; ``with_epoch`` cuts each worker's infinite
  stream at its share of ``batches_per_epoch`` (required in this mode).
* otherwise: shards are split over ranks, then workers, balanced by the sample counts in ``index.json``
  (the same split on every rank, fixed for a given seed). From the index's per-sample image sizes every
  worker computes how many batches each (rank, worker) will make (bucket capacities do not depend on the
  order, so this is exact for bucket mode) and the epoch length ``N = max over ranks``. A rank with
  fewer batches keeps streaming its own shards again after its first full pass, until it reaches ``N``
  (those repeats are padding, like ``DistributedSampler``'s). So every sample is seen at least once per
  epoch, exactly once when the ranks' counts already agree, and ranks never share a sample. When counts
  cannot be predicted exactly (packed mode, mixed multi-image buckets, skipped samples) a rank may have
  more batches than ``N``: the surplus is dropped and counted as ``epoch_overflow``. An explicit
  ``batches_per_epoch`` overrides ``N``. A single rank (without ``batches_per_epoch``) just streams its
  shards once; its ``len`` is exact in bucket mode (an upper bound once samples are skipped) and
  unknown in packed mode or without an index.
  Multi-rank loading without an index needs ``batches_per_epoch``.

**Mid-epoch resume.** The DataModule's ``state_dict`` (saved in every checkpoint) holds each rank's and
worker's position as the batches training consumed; a resumed loader's workers replay up to it from image
headers and carry on (see ``datamodules.stream_state``). Other data settings on resume are an error naming
the setting unless ``allow_restart``.

**Skipped samples** are counted by reason (see ``datamodules.samples.SKIP_REASONS``); each batch carries
``batch["skips"]``, the counts its worker made since its previous batch, so the LightningModule can log
them (``self.log_dict({f"data/skipped/{k}": float(v) ...}, reduce_fx="sum")``). The loader also adds
them up in the main process: ``dm.skip_counts`` is the running total per reason.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from functools import lru_cache, partial

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.batching import Bucketer, collate
from datamodules.samples import SampleDecoder, SkipCounter
from datamodules.shards import (
    SYNTHETIC_PREFIX,
    ShardInfo,
    load_shard_infos,
    parse_synthetic,
    replacing_dir,
    resolve_shards,
    split_shards,
    synthetic_dir,
)
from datamodules.stream_state import (
    STATE_VERSION,
    STREAM_TAG,
    MutableSkips,
    Replay,
    Tally,
    gather,
    materialize,
    mismatches,
    replay_decode,
)
from llava_uhd.errors import SettingsError
from llava_uhd.vision.resize import ResolutionPolicy

SKIPS_ONLY = "skips_only"  # marks a worker's skip counts sent without a batch; the loader never yields it

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger(__name__)


class GridTokens:
    """Visual tokens of an ``h x w`` image: one per ``pixels_per_token``-sized square (picklable)."""

    def __init__(self, pixels_per_token: int) -> None:
        self.pixels_per_token = pixels_per_token

    def __call__(self, height: int, width: int) -> int:
        return (height // self.pixels_per_token) * (width // self.pixels_per_token)


def _no_worker_seed() -> int:
    """The stream's seed already names its rank, worker and epoch."""
    return 0


class ShardStream(IterableDataset):
    """Batches (collated dicts) of one rank; see the module docstring for the epoch-length contract."""

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder,
        bucketer: Bucketer,
        pad_token_id: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shard_shuffle: bool = True,
        sample_shuffle: int = 0,
        resampled: bool = False,
        batches_per_epoch: int | None = None,
    ) -> None:
        if not urls:
            raise ValueError("no shards given")
        self.urls, self.decoder, self.bucketer, self.pad_token_id = urls, decoder, bucketer, pad_token_id
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shard_shuffle, self.sample_shuffle, self.resampled = shard_shuffle, sample_shuffle, resampled
        self.infos = load_shard_infos(urls)
        self.plannable = all(s.samples is not None and len(s.image_sizes) == s.samples for s in self.infos)
        if resampled and batches_per_epoch is None:
            raise ValueError("resampled mode streams forever: set batches_per_epoch")
        if not resampled and batches_per_epoch is None and not self.plannable and world_size > 1:
            raise ValueError("shards without an index.json with image sizes: set batches_per_epoch so that "
                             "every rank gets the same number of batches")
        self.batches_per_epoch = batches_per_epoch
        # One rank needs no equalising: it streams its shards once, and the plan is only its length, exact
        # when bucket capacities do not depend on the order (bucket mode, no mixed-size multi-image sample).
        self.exact = self.plannable and not bucketer.packed and not any(
            len({tuple(size) for size in sample}) > 1 for s in self.infos for sample in s.image_sizes)
        self.fixed_length = batches_per_epoch is not None or (self.plannable and world_size > 1)
        self.num_workers = 1  # DataLoader workers; set by StreamLoader (per-worker buckets change the count)
        self.epoch = multiprocessing.get_context().Value("i", -1)  # bumped by StreamLoader each epoch
        self.skips = MutableSkips()
        # Mid-epoch resume (see datamodules.stream_state): per worker, what to replay in epoch `resume_epoch`.
        self.resume: dict[int, Replay] = {}
        self.resume_epoch = -1
        self._replay, self._skipped_ids, self._worker_id = Replay(), [], 0

    # ---- epoch plan ------------------------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _epoch(self) -> int:
        return max(self.epoch.value, 0)

    def _count(self, shards: list[ShardInfo]) -> int:
        target = lru_cache(maxsize=65536)(self.decoder.policy.target_size)
        sizes = ([target(int(h), int(w)) for h, w in sample] for s in shards for sample in s.image_sizes)
        return self.bucketer.count_batches(sizes)

    @lru_cache(maxsize=8)  # noqa: B019 - a handful of worker counts per stream
    def plan(self, num_workers: int) -> list[list[int]]:
        """Batches per (rank, worker): natural counts, topped up so that every rank has N in all."""
        if not self.plannable:  # only with an explicit batches_per_epoch: even shares
            total = self.batches_per_epoch
            return [[total // num_workers + (w < total % num_workers) for w in range(num_workers)]
                    for _ in range(self.world_size)]
        natural = [[self._count(shards) for shards in split_shards(self.infos, r, self.world_size, num_workers,
                                                                     self.seed)]
                   for r in range(self.world_size)]
        total = self.batches_per_epoch or max(sum(row) for row in natural)
        targets = []
        for row in natural:
            row = list(row)
            extra = total - sum(row)
            if extra < 0:  # explicit batches_per_epoch below the natural count: trim the largest workers
                for _ in range(-extra):
                    row[row.index(max(row))] -= 1
            else:
                for w in range(num_workers):
                    row[w] += extra // num_workers + (1 if w < extra % num_workers else 0)
            targets.append(row)
        return targets

    def settings(self) -> dict:
        """What the stream's order depends on: a resume under other values cannot find its position."""
        policy = self.decoder.policy
        return {
            "shards": [[s.url.rsplit("/", 1)[-1], s.samples] for s in self.infos], "world_size": self.world_size,
            "seed": self.seed, "batch_token_budget": self.bucketer.budget,
            "max_batch_size": self.bucketer.max_batch_size, "packed": self.bucketer.packed,
            "sample_shuffle": self.sample_shuffle, "shard_shuffle": self.shard_shuffle,
            "resampled": self.resampled, "batches_per_epoch": self.batches_per_epoch,
            "resolution": [getattr(policy, n, None) for n in ("min_pixels", "max_pixels", "max_side", "multiple")],
            "max_length": self.decoder.max_length,
        }

    def __len__(self) -> int:
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        if self.fixed_length or self.exact:
            return sum(self.plan(self.num_workers)[self.rank])
        raise TypeError("epoch length unknown (no index, or packed on one rank): the stream runs to the end")

    # ---- streaming --------------------------------------------------------------------------------------
    def _pipeline(self, urls: list[str], rng: random.Random, skips: SkipCounter, resampled: bool = False):
        """Shards -> raw samples -> shuffle buffer -> decoded samples -> bucketed lists of samples.

        While ``self._replay`` is active the decode stage yields header-only placeholders (:meth:`_resume_at`)."""
        if not urls:
            return iter(())
        dataset = wds.WebDataset(urls, resampled=resampled, shardshuffle=False, nodesplitter=None,
                                 workersplitter=None, handler=skips.handler, empty_check=False,
                                 seed=rng.randrange(2**31))
        if resampled:  # webdataset's resampler seeds from the clock; this one from the stream's rng (replayable)
            dataset.pipeline[0] = wds.ResampledShards(urls, seed=rng.randrange(2**31), worker_seed=_no_worker_seed,
                                                      deterministic=True)
        if self.sample_shuffle > 1:
            dataset = dataset.shuffle(self.sample_shuffle, rng=random.Random(rng.randrange(2**31)))
        decode = partial(replay_decode, decoder=self.decoder, skips=skips, replay=self._replay,
                         skipped_out=self._skipped_ids)
        return dataset.compose(decode, self.bucketer)

    def _resume_at(self, batches: Iterator[list]) -> Iterator[list]:
        """Drop the batches training consumed before the checkpoint (replayed cheaply), then stream on."""
        replay = self._replay
        if replay.active:
            self.skips.muted = True
            log.info("worker %d of rank %d: replaying %d consumed batches", self._worker_id, self.rank, replay.batches)
        replayed = replay.active
        for batch in batches:
            if replay.active:
                replay.batches -= 1
                self.skips.muted = replay.active
                continue
            if replayed:  # samples read while replaying may sit in later batches: decode them now
                batch = materialize(batch, self.decoder, self.skips)
                if not batch:
                    continue
            yield batch
        self.skips.muted = False

    def _emit(self, batches: Iterator[list]) -> Iterator[dict]:
        """Collate, holding one batch back so the last one carries every skip counted up to the end."""
        pending = None
        for batch in batches:
            if pending is not None:
                yield self._collate(pending)
            pending = batch
        if pending is not None:
            yield self._collate(pending)
        else:  # no batch to carry this worker's skips (every sample skipped): send them alone
            skips = self.skips.pop_new()
            if any(skips.values()):
                yield {"skips": skips, SKIPS_ONLY: True}

    def _collate(self, samples: list) -> dict:
        batch = collate(samples, self.pad_token_id)
        batch["skips"] = self.skips.pop_new()
        batch[STREAM_TAG] = {"worker": self._worker_id, "skipped": list(self._skipped_ids)}
        self._skipped_ids.clear()
        return batch

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        epoch = self._epoch()
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}")
        plan = self.resume.get(worker) if epoch == self.resume_epoch else None
        self._replay.batches, self._replay.skipped = (plan.batches, plan.skipped) if plan else (0, set())
        self._worker_id = worker
        self._skipped_ids.clear()
        if self.resampled:
            share = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
            pipeline = self._pipeline(self.urls, rng, self.skips, resampled=True).with_epoch(share)
            yield from self._emit(self._resume_at(iter(pipeline)))
            return
        shards = split_shards(self.infos, self.rank, self.world_size, num_workers, self.seed)[worker]
        position = {url: i for i, url in enumerate(self.urls)}
        urls = sorted((s.url for s in shards), key=position.__getitem__)
        if self.shard_shuffle:
            rng.shuffle(urls)
        if not self.fixed_length:
            yield from self._emit(self._resume_at(iter(self._pipeline(urls, rng, self.skips))))
            return
        target = self.plan(num_workers)[self.rank][worker]
        yield from self._emit(self._resume_at(self._fixed_length(urls, rng, target)))

    def _fixed_length(self, urls: list[str], rng: random.Random, target: int) -> Iterator[list]:
        produced = 0
        for batch in self._pipeline(urls, rng, self.skips):
            if produced < target:
                produced += 1
                yield batch
            else:
                self.skips.add("epoch_overflow", len(batch))
        if produced == 0 and target > 0:
            urls = self.urls  # nothing readable here: pad from the whole dataset rather than hang the others
            log.warning("rank %d: a worker read no samples; padding its epoch from all shards", self.rank)
        while produced < target:  # padding passes over the same shards; their skips were counted already
            before = produced
            for batch in self._pipeline(urls, rng, SkipCounter()):
                yield batch
                produced += 1
                if produced == target:
                    return
            if produced == before:
                raise RuntimeError(f"rank {self.rank}: no readable samples to fill the epoch's {target} batches")


def _as_is(batch: dict) -> dict:
    """Batches are collated in the stream; keep DataLoader's default_convert from turning tuples into lists."""
    return batch


class StreamLoader(DataLoader):
    """DataLoader over a :class:`ShardStream`: bumps the stream's epoch, adds up the batches' skips, and holds
    the stream's position for checkpoints.

    The DataModule saves :meth:`stream_state` into every checkpoint and hands it to :meth:`load_stream_state`
    when resuming, before the first batch. (Not through Lightning's own loader-state hooks, ``state_dict`` on
    the loader: the fit loop skips restoring those when the training loader was built before the loops were
    restored, which ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` does.) The position counts
    what training consumed
    (:meth:`consume`, called by the DataModule for each batch the model is about to train on), not what the
    workers or Lightning's prefetch had read, so samples in flight at the checkpoint are trained after a resume.
    """

    def __init__(self, stream: ShardStream, skips: SkipCounter, allow_restart: bool = False, **kwargs) -> None:
        super().__init__(stream, batch_size=None, collate_fn=_as_is, **kwargs)
        stream.num_workers = max(1, self.num_workers)
        self.skips = skips
        self.settings = {**stream.settings(), "num_workers": self.num_workers}
        self.allow_restart = allow_restart
        self.tally = Tally()
        self.restored = False  # a stream state from a checkpoint was applied
        self.unbatched_skips: Counter = Counter()  # this epoch's skips from workers that delivered no batch
        self.warned = False

    def __iter__(self):
        with self.dataset.epoch.get_lock():
            self.dataset.epoch.value += 1
            epoch = self.dataset.epoch.value
        if self.tally.epoch != epoch:
            self.tally = Tally(epoch)
            self.unbatched_skips = Counter()
        resuming, delivered = self.restored and epoch == self.dataset.resume_epoch, 0
        for batch in super().__iter__():
            self.skips.update(batch.get("skips", {}))
            if batch.get(SKIPS_ONLY):  # a worker that made no batch: its skips, never a training step
                self.unbatched_skips.update(batch["skips"])
                continue
            delivered += 1
            yield batch
        if resuming:
            self.dataset.resume = {}
            if delivered == 0:  # the checkpoint was taken after its epoch's last batch: this is the next epoch
                log.info("resume: epoch %d was complete at the checkpoint; starting epoch %d", epoch, epoch + 1)
                yield from self.__iter__()

    def consume(self, batch: dict) -> None:
        """Count ``batch`` as trained on: its worker's position moves one batch on."""
        tag = batch.pop(STREAM_TAG, None)
        if tag is not None:
            self.tally.consume(tag, batch.get("skips", {}))

    def stream_state(self) -> dict:
        """Every rank's position (ranks gather theirs: Lightning calls this on all ranks, rank 0 writes)."""
        return {"version": STATE_VERSION, "settings": self.settings, "ranks": gather(self.tally.as_dict())}

    def load_stream_state(self, state: dict) -> None:
        """Make the next epoch start where the checkpoint's training stopped; a settings change is an error
        naming the setting (with ``allow_restart``, a warning, and the stream restarts its epoch)."""
        problems = [] if state.get("version") == STATE_VERSION else [
            f"ckpt_path: its data stream state has version {state.get('version')!r}, this version reads "
            f"{STATE_VERSION}"]
        problems = problems or mismatches(state.get("settings", {}), self.settings)
        if not problems and len(state["ranks"]) <= self.dataset.rank:
            problems = [mismatches({"world_size": len(state["ranks"])}, {"world_size": self.dataset.world_size})[0]]
        if problems:
            if not self.allow_restart:
                raise SettingsError(f"{problems[0]}; resume with the checkpoint's data settings, or pass "
                                    "--data.allow_restart true to restart the epoch's data stream")
            log.warning("resume: %s; data.allow_restart is set, so the data stream restarts its epoch "
                        "(samples before the checkpoint are trained again)", "; ".join(problems))
            self.warned = True
            return
        tally = Tally.from_dict(state["ranks"][self.dataset.rank])
        self.dataset.resume, self.dataset.resume_epoch = tally.replays(), tally.epoch
        self.dataset.epoch.value = tally.epoch - 1  # the next __iter__ is the checkpoint's epoch
        self.tally, self.restored = tally, True
        self.skips.update(tally.skips)
        log.info("resume: rank %d continues epoch %d after %d consumed batches", self.dataset.rank, tally.epoch,
                 sum(tally.batches.values()))


class UHDDataModule(L.LightningDataModule):
    """Webdataset shards -> bucketed, tokenised batches for LLaVA-UHD training and evaluation.

    Batch: ``input_ids``/``attention_mask``/``labels`` [B, L] (right-padded; labels -100 on pads and
    non-assistant tokens), ``pixel_values`` (uint8 pixels that the model normalises on its device:
    [N_img, 3, H, W] for a single bucket, else a list of [3, Hi, Wi]), ``image_sizes`` and
    ``orig_sizes`` per image (sample order, then image order, matching the order of the image pads in
    ``input_ids``), ``images_per_sample``, ``keys``, ``meta`` per sample, ``skips`` (new skip counts from the worker
    that made the batch).
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        val_tsv: str | None = None,
        test_shards: str | list[str] | None = None,
        tokenizer_path: str | None = None,
        tokenizer: object | None = None,
        pixels_per_token: int = 40,
        image_token_fn: Callable[[int, int], int] | None = None,
        min_pixels: int = 512 * 512,
        max_pixels: int = 1560 * 1560,
        max_side: int = 5120,
        max_length: int = 4096,
        batch_token_budget: int = 16384,
        max_batch_size: int = 32,
        packed: bool = False,
        caption_prompt: str = "Describe the image briefly.",
        vision_markers: bool = False,
        shard_shuffle: bool = True,
        sample_shuffle: int = 1000,
        resampled: bool = False,
        batches_per_epoch: int | None = None,
        eval_batches: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        max_image_pixels: int = 178_956_970,
        max_aspect_ratio: float = 50.0,
        max_skip_fraction: float = 0.1,
        synthetic_root: str = "data/synthetic",
        synthetic: dict | None = None,
        allow_restart: bool = False,
    ) -> None:
        """Shard specs, tokenizer, resolution policy, token budget and loader settings (see the class doc).

        Shard specs (``train_shards``, ``val_shards``, ``test_shards``): a folder of ``.tar`` shards, a brace
        pattern (``dir/shard-{000000..000009}.tar``), one ``.tar`` file, a list of these, a URL, or generated
        data asked for by name, ``synthetic:shapegrid,n=64,seed=0,min_side=64,max_side=256`` (any
        ``write_synthetic`` argument; generated once into ``synthetic_root/<task>-<settings>`` by
        :meth:`prepare_data`). A local path that does not exist is an error, never filled with generated data.
        ``max_skip_fraction``: a training epoch that skips more than this share of its samples fails (the
        counts by reason are in the message), as does one that trains on no sample at all.
        ``synthetic`` (the earlier dict of per-split generator settings) is gone; only ``null`` is accepted.
        When the module trains with a LightningModule whose model has ``num_image_tokens`` (LlavaUHD), the
        tokenizer, resolution policy and token counter are taken from that model (:meth:`bind_model`).
        ``allow_restart``: resume from a checkpoint whose data stream was saved under other data settings by
        restarting the epoch's stream (with a warning) instead of failing.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "image_token_fn"])
        self._tokenizer = tokenizer
        try:
            self.policy = ResolutionPolicy(min_pixels, max_pixels, max_side, multiple=pixels_per_token)
        except ValueError as err:
            raise SettingsError(f"data.min_pixels / max_pixels / max_side / pixels_per_token: {err}") from err
        self.image_token_fn = image_token_fn or GridTokens(pixels_per_token)
        self.counter = SkipCounter()
        self._train_loader: StreamLoader | None = None
        self._stream_state: dict | None = None  # from a checkpoint, for the next training loader

    def bind_model(self, model) -> None:
        """Take tokenizer, resolution policy and image-token counter from a :class:`LlavaUHD`, so that the
        ``<image>`` expansion always matches what the model's encoder and projector emit (SBE included)."""
        if self._tokenizer is None:
            self._tokenizer = model.tokenizer
        policy = model.policy
        if isinstance(policy, ResolutionPolicy):  # the model fixes the multiple; the pixel budget is the data's
            hp = self.hparams
            policy = ResolutionPolicy(hp.min_pixels, hp.max_pixels, hp.max_side, multiple=policy.multiple)
        self.policy = policy
        self.image_token_fn = model.image_token_counter()

    def _specs(self) -> dict[str, object]:
        return {split: self.hparams.get(f"{split}_shards") for split in ("train", "val", "test")}

    def prepare_data(self) -> None:
        """Generate the shards of ``synthetic:`` specs that have not been generated yet (atomically: a folder
        appears only complete)."""
        from datamodules.synthetic import write_synthetic

        self.check_settings("")  # settings only: no split's shards are resolved
        for split, spec in self._specs().items():
            items = [spec] if isinstance(spec, str) else spec if isinstance(spec, list) else []
            for item in items:
                if not (isinstance(item, str) and item.strip().startswith(SYNTHETIC_PREFIX)):
                    continue
                key = f"data.{split}_shards"
                out = synthetic_dir(item.strip(), self.hparams.synthetic_root, key)
                if os.path.isdir(out):
                    continue
                settings = parse_synthetic(item.strip(), key)
                try:
                    with replacing_dir(out, option="data.synthetic_root") as staging:
                        index = write_synthetic(out=staging, **settings)
                except ValueError as exn:
                    raise SettingsError(f"{key}: {item!r}: {exn}") from exn
                log.info("generated %s for %s in %s (%d shards)", item, key, out, len(index["shards"]))

    def check_settings(self, stage: str, generated: bool = False) -> None:
        """Fail on a shard spec that matches nothing or names a missing local shard, and on settings out of
        range. Cheap (no shard is read), so the CLI runs it before the trainer writes anything; ``generated``:
        also require the ``synthetic:`` specs' shards to exist (after :meth:`prepare_data`)."""
        hp = self.hparams
        if hp.synthetic is not None:
            raise SettingsError("data.synthetic: generated data is now asked for by name in the shard spec, e.g. "
                                "--data.train_shards 'synthetic:shapegrid,n=64,seed=0'; set data.synthetic to null")
        if not 0 <= hp.max_skip_fraction <= 1:
            raise SettingsError(f"data.max_skip_fraction: a share between 0 and 1, got {hp.max_skip_fraction}")
        for name in ("batch_token_budget", "max_batch_size", "max_length", "pixels_per_token", "max_image_pixels"):
            if hp[name] <= 0:
                raise SettingsError(f"data.{name}: must be positive, got {hp[name]}")
        if hp.num_workers < 0:
            raise SettingsError(f"data.num_workers: must be 0 or more, got {hp.num_workers}")
        if hp.sample_shuffle < 0:
            raise SettingsError(f"data.sample_shuffle: a buffer of 0 (off) or more samples, got {hp.sample_shuffle}")
        for name in ("batches_per_epoch", "eval_batches"):
            if hp.get(name) is not None and hp[name] <= 0:
                raise SettingsError(f"data.{name}: must be positive (or null), got {hp[name]}")
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage, ()):
            key, spec = f"data.{split}_shards", hp.get(f"{split}_shards")
            if spec is None:
                if split == "val" and hp.get("val_tsv"):  # a benchmark TSV is the val set (datamodules.tsv)
                    continue
                if split == {"fit": "train", "validate": "val"}.get(stage, "test"):
                    raise SettingsError(f"{key}: {stage} needs shards (a folder, brace pattern, .tar, list, or "
                                        "'synthetic:TASK,n=N')")
                continue
            resolve_shards(spec, key, hp.synthetic_root, generated=generated)

    def setup(self, stage: str) -> None:
        """Fail before training on bad settings or shard specs (see :meth:`check_settings`)."""
        self.check_settings(stage, generated=True)

    def check_training_data(self, used: int, skipped: dict[str, int]) -> None:
        """Fail a training epoch that used no sample, or skipped more than ``max_skip_fraction`` of them.
        ``epoch_overflow`` (surplus batches dropped to keep ranks equal) is not a data fault and not counted."""
        bad = {k: v for k, v in sorted(skipped.items()) if v and k != "epoch_overflow"}
        total = sum(bad.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in bad.items()) or "none"
        spec = self.hparams.train_shards
        if used == 0:
            counted = f"skipped {total}: {reasons}" if total else "the loader delivered no batch to count skips by"
            raise SettingsError(f"data.train_shards: no usable training sample in {spec!r} ({counted}); nothing "
                                "was trained")
        share = total / (used + total)
        if share > self.hparams.max_skip_fraction:
            raise SettingsError(f"data.train_shards: {total} of {used + total} samples skipped ({share:.0%} > "
                                f"data.max_skip_fraction {self.hparams.max_skip_fraction:.0%}): {reasons}")

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.hparams.tokenizer_path is None:
            raise ValueError("data.tokenizer_path: give a tokenizer directory (or train with a LlavaUHD model)")
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer_path)
        return self._tokenizer

    def unbatched_skips(self) -> dict[str, int]:
        """This epoch's training skips that reached no batch (a worker whose samples were all skipped), so a
        report of an epoch that trained on nothing still says why."""
        loader = self._train_loader
        return dict(loader.unbatched_skips) if isinstance(loader, StreamLoader) else {}

    @property
    def skip_counts(self) -> dict[str, int]:
        """Skipped samples per reason, added up over every batch the loaders have delivered so far."""
        return self.counter.as_dict()

    def skip_report(self) -> str:
        counts = self.skip_counts
        return f"skipped {sum(counts.values())} samples" + (f": {counts}" if counts else "")

    def _rank(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, spec, train: bool) -> StreamLoader:
        hp = self.hparams
        if spec is None:
            return []  # Lightning: no loader for this split
        key = next((f"data.{split}_shards" for split in ("train", "val", "test") if hp.get(f"{split}_shards") is spec),
                   "data shards")
        urls = resolve_shards(spec, key, hp.synthetic_root, check=False)
        rank, world_size = self._rank()
        decoder = SampleDecoder(self.tokenizer, self.policy, self.image_token_fn, hp.max_length, hp.caption_prompt,
                                hp.vision_markers, hp.max_image_pixels, hp.max_aspect_ratio)
        bucketer = Bucketer(self.image_token_fn, hp.batch_token_budget, hp.max_batch_size, hp.packed)
        stream = ShardStream(
            urls, decoder, bucketer, self.tokenizer.pad_token_id, rank, world_size, hp.seed,
            shard_shuffle=train and hp.shard_shuffle,
            sample_shuffle=hp.sample_shuffle if train else 0,
            resampled=train and hp.resampled,
            batches_per_epoch=hp.batches_per_epoch if train else hp.eval_batches,
        )
        workers = hp.num_workers
        # Lightning warns that an IterableDataset's __len__ may be wrong under workers; this one's is the plan of
        # what each worker yields (the padding and the epoch_overflow cut keep it exact), so the warning is noise.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        return StreamLoader(stream, self.counter, allow_restart=hp.allow_restart, num_workers=workers,
                            pin_memory=hp.pin_memory, persistent_workers=hp.persistent_workers and workers > 0)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Lightning calls this for the batch it is about to train on (not for prefetched ones): the training
        loader counts it as consumed. Other loaders' batches only lose their stream tag."""
        trainer = self.trainer
        train = self._train_loader if trainer is not None and trainer.training else None
        if isinstance(batch, dict) and isinstance(train, StreamLoader):
            if not train.restored and not train.warned and train.tally.batches == {}:
                done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
                if done > 0:  # resumed mid-epoch from a checkpoint that holds no stream state
                    log.warning("resume: the checkpoint holds no data stream position (saved by an older version); "
                                "the stream restarts its epoch, so its first %d batches are trained again", done)
                train.warned = True
            train.consume(batch)
        elif isinstance(batch, dict):
            batch.pop(STREAM_TAG, None)
        return batch

    def train_dataloader(self) -> StreamLoader:
        self._train_loader = self._loader(self.hparams.train_shards, train=True)
        self._apply_stream_state()
        return self._train_loader

    # ---- checkpointed stream position (see datamodules.stream_state) --------------------------------------------
    def state_dict(self) -> dict:
        """Lightning saves this in every checkpoint (on every rank; the ranks gather their positions)."""
        loader = self._train_loader
        return {"train_stream": loader.stream_state()} if isinstance(loader, StreamLoader) else {}

    def load_state_dict(self, state: dict) -> None:
        """Lightning calls this on resume, before the first training batch (and before or after the training
        loader is built)."""
        self._stream_state = state.get("train_stream")
        if self._stream_state is not None:  # Lightning cannot see that this loader resumes mid-epoch: it does
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        self._apply_stream_state()

    def _apply_stream_state(self) -> None:
        if self._stream_state is not None and isinstance(self._train_loader, StreamLoader):
            self._train_loader.load_stream_state(self._stream_state)
            self._stream_state = None

    def val_dataloader(self):
        """The val shards' loader; with ``val_tsv`` (a VLMEvalKit benchmark TSV, see ``datamodules.tsv``) that
        benchmark's rows instead, which the module scores as ``python -m llava_uhd.eval score`` does."""
        if self.hparams.get("val_tsv"):
            from datamodules.tsv import read_val_tsv, tsv_loader

            rank, world_size = self._rank()
            hp = self.hparams
            return tsv_loader(read_val_tsv(hp.val_tsv), self.tokenizer, self.policy, self.image_token_fn,
                              hp.max_length, hp.max_batch_size, hp.vision_markers, rank, world_size)
        return self._loader(self.hparams.val_shards, train=False)

    def test_dataloader(self) -> StreamLoader:
        return self._loader(self.hparams.test_shards, train=False)

    def predict_dataloader(self) -> StreamLoader:
        return self._loader(self.hparams.test_shards, train=False)
