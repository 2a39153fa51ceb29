"""One rank's stream of collated batches from webdataset shards, and the DataLoader that checkpoints its position.

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

**Mid-epoch resume.** :class:`StreamLoader` holds each rank's and worker's position as the batches training
consumed; a resumed loader's workers replay up to it from image headers and carry on (see
``datamodules.stream_state``).
"""

from __future__ import annotations

import logging
import multiprocessing
import random
from collections import Counter
from collections.abc import Callable, Iterator
from functools import lru_cache, partial

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.batching import Bucketer, collate
from datamodules.samples import SampleDecoder, SkipCounter
from datamodules.shards import ShardInfo, load_shard_infos, split_shards
from datamodules.stream_state import (
    STATE_VERSION,
    STREAM_TAG,
    MutableSkips,
    Replay,
    Tally,
    decode_pending,
    gather,
    replay_decode,
    resume_problems,
    resume_refusal,
)
from llava_uhd.errors import SettingsError

__all__ = ["SKIPS_ONLY", "ShardStream", "StreamLoader", "equalize"]

SKIPS_ONLY = "skips_only"  # marks a worker's skip counts sent without a batch; the loader never yields it

log = logging.getLogger(__name__)


def equalize(natural: list[list[int]], total: int) -> list[list[int]]:
    """Per-rank rows of per-worker batch counts, each row brought to ``total``: a short row's workers get the
    extra batches in turn (padding passes); a long one (an explicit ``batches_per_epoch`` below the natural count)
    is trimmed from its largest workers."""
    targets = []
    for row in natural:
        row, workers = list(row), len(row)
        extra = total - sum(row)
        if extra < 0:
            for _ in range(-extra):
                row[row.index(max(row))] -= 1
        else:
            for w in range(workers):
                row[w] += extra // workers + (1 if w < extra % workers else 0)
        targets.append(row)
    return targets


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
        return equalize(natural, self.batches_per_epoch or max(sum(row) for row in natural))

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
                batch = decode_pending(batch, self.decoder, self.skips)
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

    def consume(self, batch: dict, steps_done: Callable[[], int] | None = None) -> None:
        """Count ``batch`` as trained on: its worker's position moves one batch on.

        ``steps_done``: the fit loop's batches done this epoch, read at the run's first batch: above 0 without a
        restored stream state, the run resumed mid-epoch from a checkpoint that holds no stream position, and
        the stream restarts its epoch (warned once)."""
        if steps_done is not None and not self.restored and not self.warned and self.tally.batches == {}:
            done = steps_done()
            if done > 0:
                log.warning("resume: the checkpoint holds no data stream position (saved by an older version); "
                            "the stream restarts its epoch, so its first %d batches are trained again", done)
            self.warned = True
        tag = batch.pop(STREAM_TAG, None)
        if tag is not None:
            self.tally.consume(tag, batch.get("skips", {}))

    def stream_state(self) -> dict:
        """Every rank's position (ranks gather theirs: Lightning calls this on all ranks, rank 0 writes)."""
        return {"version": STATE_VERSION, "settings": self.settings, "ranks": gather(self.tally.as_dict())}

    def load_stream_state(self, state: dict) -> None:
        """Make the next epoch start where the checkpoint's training stopped; a settings change is an error
        naming the setting (with ``allow_restart``, a warning, and the stream restarts its epoch)."""
        problems = resume_problems(state, self.settings, self.dataset.rank, self.dataset.world_size)
        if problems:
            if not self.allow_restart:
                raise SettingsError(resume_refusal(problems))
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
