"""Streaming webdataset DataModule with aspect-ratio buckets under a visual-token budget.

Rooms: :mod:`datamodules.stream` (one rank's stream of batches: equal batch counts on every rank, the
checkpointed position), :mod:`datamodules.batching` (buckets, collation), :mod:`datamodules.samples`
(decoding, tokenisation, skips), :mod:`datamodules.settings` (setting checks, shard specs, generated data).

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
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch

from datamodules import settings
from datamodules.batching import Bucketer
from datamodules.samples import SampleDecoder, SkipCounter
from datamodules.shards import resolve_shards
from datamodules.stream import ShardStream, StreamLoader
from datamodules.stream_state import STREAM_TAG
from llava_uhd.errors import SettingsError
from llava_uhd.hook_warnings import IgnoreBetweenHooks
from llava_uhd.tokens import ImageTokenCounter
from llava_uhd.vision.resize import ResolutionPolicy

__all__ = ["UHDDataModule"]

log = logging.getLogger(__name__)


def rank_and_world_size(trainer: L.Trainer | None) -> tuple[int, int]:
    """This process's (rank, world size): the trainer's, else torch.distributed's, else a single process."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def stream_loader(
    hp: Mapping[str, Any], urls: list[str], tokenizer, policy, image_token_fn: Callable[[int, int], int],
    skips: SkipCounter, rank: int, world_size: int, train: bool,
) -> StreamLoader:
    """The loader of one split's shards under the data module's settings ``hp`` (train: shuffled, resampled
    when asked, ``batches_per_epoch`` long; eval: in order, ``eval_batches`` long)."""
    decoder = SampleDecoder(tokenizer, policy, image_token_fn, hp["max_length"], hp["caption_prompt"],
                            hp["vision_markers"], hp["max_image_pixels"], hp["max_aspect_ratio"])
    bucketer = Bucketer(image_token_fn, hp["batch_token_budget"], hp["max_batch_size"], hp["packed"])
    stream = ShardStream(
        urls, decoder, bucketer, tokenizer.pad_token_id, rank, world_size, hp["seed"],
        shard_shuffle=train and hp["shard_shuffle"],
        sample_shuffle=hp["sample_shuffle"] if train else 0,
        resampled=train and hp["resampled"],
        batches_per_epoch=hp["batches_per_epoch"] if train else hp["eval_batches"],
    )
    workers = hp["num_workers"]
    return StreamLoader(stream, skips, allow_restart=hp["allow_restart"], num_workers=workers,
                        pin_memory=hp["pin_memory"], persistent_workers=hp["persistent_workers"] and workers > 0)


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
        ``synthetic``: only ``null``; generated data is named in a shard spec (above), and any other value
        is an error that says so.
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
        self.image_token_fn = image_token_fn or ImageTokenCounter(pixels_per_token)
        self.counter = SkipCounter()
        self._train_loader: StreamLoader | None = None
        self._stream_state: dict | None = None  # from a checkpoint, for the next training loader
        self._quiet = IgnoreBetweenHooks()  # Lightning's false alarms about these loaders, during a trainer run
        self._in_run = False

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

    def prepare_data(self) -> None:
        """Generate the shards of ``synthetic:`` specs that have not been generated yet (atomically: a folder
        appears only complete)."""
        self.check_settings("")  # settings only: no split's shards are resolved
        settings.generate_synthetic(self.hparams)

    def check_settings(self, stage: str, generated: bool = False) -> None:
        """Fail on a shard spec that matches nothing or names a missing local shard, and on settings out of
        range. Cheap (no shard is read), so the CLI runs it before the trainer writes anything; ``generated``:
        also require the ``synthetic:`` specs' shards to exist (after :meth:`prepare_data`)."""
        settings.check_settings(self.hparams, stage, generated)

    def setup(self, stage: str) -> None:
        """Fail before training on bad settings or shard specs (see :meth:`check_settings`)."""
        self.check_settings(stage, generated=True)
        # Lightning warns, when it sets up a loader, that an IterableDataset's __len__ may be wrong under
        # workers; these loaders' is the plan of what each worker yields (the padding and the epoch_overflow cut
        # keep it exact), so the warning is noise until the run ends (teardown).
        self._quiet.ignore("Your `IterableDataset` has `__len__` defined")
        self._in_run = True

    def teardown(self, stage: str) -> None:
        """The trainer run is over: Lightning's warnings are shown as they come again."""
        self._in_run = False
        self._quiet.restore()

    def on_exception(self, exception: BaseException) -> None:
        self.teardown("")

    def check_training_data(self, used: int, skipped: dict[str, int]) -> None:
        """Fail a training epoch that used no sample, or skipped more than ``max_skip_fraction`` of them.
        ``epoch_overflow`` (surplus batches dropped to keep ranks equal) is not a data fault and not counted."""
        settings.check_training_data(self.hparams, used, skipped)

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.hparams.tokenizer_path is None:
            raise SettingsError("data.tokenizer_path: give a tokenizer directory (or train with a LlavaUHD model)")
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

    def _loader(self, spec, train: bool) -> StreamLoader:
        if spec is None:
            return []  # Lightning: no loader for this split
        hp = self.hparams
        urls = resolve_shards(spec, settings.shard_key(hp, spec), hp.synthetic_root, check=False)
        return stream_loader(hp, urls, self.tokenizer, self.policy, self.image_token_fn, self.counter,
                             *rank_and_world_size(self.trainer), train=train)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Lightning calls this for the batch it is about to train on (not for prefetched ones): the training
        loader counts it as consumed. Other loaders' batches only lose their stream tag."""
        trainer = self.trainer
        train = self._train_loader if trainer is not None and trainer.training else None
        if isinstance(batch, dict) and isinstance(train, StreamLoader):
            train.consume(batch, lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready)
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
        if self._stream_state is not None and self._in_run:
            # Lightning warns that a loader without its own state_dict cannot resume mid-epoch; this one does
            self._quiet.ignore("You're resuming from a checkpoint that ended before the epoch")
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

            rank, world_size = rank_and_world_size(self.trainer)
            hp = self.hparams
            return tsv_loader(read_val_tsv(hp.val_tsv), self.tokenizer, self.policy, self.image_token_fn,
                              hp.max_length, hp.max_batch_size, hp.vision_markers, rank, world_size)
        return self._loader(self.hparams.val_shards, train=False)

    def test_dataloader(self) -> StreamLoader:
        return self._loader(self.hparams.test_shards, train=False)

    def predict_dataloader(self) -> StreamLoader:
        return self._loader(self.hparams.test_shards, train=False)
