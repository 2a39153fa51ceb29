"""LLaVA-UHD v3 training app: ``python src/main.py fit -c configs/stage2.yaml [-c configs/tiny.yaml] [--key value]``.

A LightningCLI in subclass mode: ``model`` is a stage (``llava_uhd.stages.PreAlignment`` / ``Pretrain`` /
``SFT``), ``data`` a ``datamodules.UHDDataModule``. ``configs/base.yaml`` is always loaded first; stage
files hold only what differs; any key can be overridden (``--model.wtc_pooling avg``,
``--model.wtc_layers "[4, 18]"``). ``--ckpt_path last`` resumes the newest run of the configured logger
name in its own log directory.

A mistake in a setting (a ``SettingsError`` from the library, Lightning's ``MisconfigurationException``, a
parser error) ends in one ``config error: ...`` message and a non-zero exit, without a traceback; settings
and shard specs are checked before the trainer creates a log folder. Training data that fails its check (more
than ``data.max_skip_fraction`` of an epoch's samples skipped, or none usable: a ``DataError``) ends the same
way with ``data error: ...``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from datamodules import UHDDataModule
from llava_uhd.checkpoint_io import UNREADABLE, unreadable_checkpoint
from llava_uhd.errors import DataError, SettingsError
from llava_uhd.stages import UHDModule

# The DataLoader workers are forked after this process has used the tokenizer; HF tokenizers would then warn in
# every worker and turn their thread pool off there. Off from the start: the workers are the parallelism.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIGS / "base.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def newest_last_checkpoint(save_dir: str | Path, name: str) -> Path | None:
    """``<save_dir>/<name>/version_*/checkpoints/last.ckpt`` of the newest version that has one: a file, or an
    FSDP2 distributed-checkpoint directory (dated by its newest file: re-saving overwrites files in place)."""
    runs = Path(save_dir) / name
    candidates = sorted(runs.glob("version_*/checkpoints/last.ckpt"), key=_saved_at)
    return candidates[-1] if candidates else None


def _saved_at(path: Path) -> float:
    return max(p.stat().st_mtime for p in (path, *path.iterdir())) if path.is_dir() else path.stat().st_mtime


class UHDCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Checkpointing as its own config section, so overlays can change it (`checkpoint.every_n_train_steps`).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": -1,
                             "checkpoint.every_n_train_steps": 1000})

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads a --ckpt_path file's hyperparameters before anything else: a corrupt file is the
        # user's error there, not a traceback.
        try:
            super()._parse_ckpt_path()
        except UNREADABLE as err:
            raise unreadable_checkpoint("ckpt_path", self.config[self.config.subcommand].get("ckpt_path"), err
                                        ) from err

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_ckpt_path(config.get("ckpt_path"))
        accumulate = config.get("trainer", {}).get("accumulate_grad_batches")
        if isinstance(accumulate, int) and accumulate < 1:  # Lightning divides by it before checking it
            raise SettingsError(f"trainer.accumulate_grad_batches: at least 1, got {accumulate}")
        if config.get("ckpt_path") != "last":
            return
        logger = config.trainer.logger
        init = getattr(logger, "init_args", None)
        if init is None or "save_dir" not in init:
            return  # let Lightning resolve "last" itself
        found = newest_last_checkpoint(init.save_dir, init.get("name") or "lightning_logs")
        if found is None:
            raise SettingsError(f"ckpt_path: no last.ckpt under {Path(init.save_dir) / (init.get('name') or '')}")
        config.ckpt_path = str(found)
        init.version = found.parent.parent.name  # keep logging into the resumed run's directory
        print(f"resuming from {found}", file=sys.stderr)


    def _check_data(self) -> None:
        """The data settings, before the trainer creates a log folder (a mistake then leaves nothing behind)."""
        check = getattr(self.datamodule, "check_settings", None)
        if check is not None:
            check(self.subcommand)

    def _check_resume(self) -> None:
        """Refuse a resume whose data stream cannot go on (other shards or data settings) before the trainer
        writes anything: Lightning reads the checkpoint's stream state only after it has opened the logger's
        events file and saved the run's config. The DataModule's own check at restore, on the same loader."""
        from datamodules.datamodule import stream_loader
        from datamodules.samples import SkipCounter
        from datamodules.shards import resolve_shards
        from datamodules.stream_state import resume_problems, resume_refusal

        dm = self.datamodule
        if not isinstance(dm, UHDDataModule) or dm.hparams.allow_restart or dm.hparams.train_shards is None:
            return
        state = saved_stream_state(self.config[self.subcommand].get("ckpt_path"), type(dm).__qualname__)
        if state is None:
            return
        hp = dm.hparams
        try:
            urls = resolve_shards(hp.train_shards, "data.train_shards", hp.synthetic_root, check=False)
        except SettingsError:  # generated data not made yet (prepare_data does that): checked at restore
            return
        model = getattr(self.model, "model", None)
        if model is not None:
            dm.bind_model(model)  # as the stage's setup does: the model fixes tokenizer and resolution
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        loader = stream_loader(hp, urls, dm.tokenizer, dm.policy, dm.image_token_fn, SkipCounter(), rank,
                               world_size, train=True)
        problems = resume_problems(state, loader.settings, rank, world_size)
        if problems:
            raise SettingsError(resume_refusal(problems))

    def before_fit(self) -> None:
        self._check_data()
        self._check_resume()

    def before_validate(self) -> None:
        self._check_data()

    def before_test(self) -> None:
        self._check_data()

    def before_predict(self) -> None:
        self._check_data()


def check_ckpt_path(ckpt_path: object) -> None:
    """Fail before anything is built or written when ``--ckpt_path`` names no checkpoint (a file, or an FSDP2
    distributed-checkpoint folder holding ``.metadata``)."""
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_NAMES or "://" in str(ckpt_path):
        return
    path = Path(str(ckpt_path))
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise SettingsError(f"ckpt_path: {path} is a folder, not a checkpoint (resume from a .ckpt file; to start "
                                "from an exported model folder use --model.init_from)")
    elif not path.is_file():
        raise SettingsError(f"ckpt_path: no checkpoint file at {path} (or 'last' for the newest run's last.ckpt)")


DISTRIBUTED_METADATA = "meta.pt"
"""The file of an FSDP2 distributed-checkpoint folder holding everything but the tensors (Lightning's name)."""


def saved_stream_state(ckpt_path: object, key: str) -> dict | None:
    """The training stream state a local checkpoint holds under its DataModule's ``key`` (a ``.ckpt`` file, or
    an FSDP2 checkpoint folder's ``meta.pt``), read memory-mapped (no tensor is loaded); None when there is
    none, or the file cannot be read (the trainer then names it when it loads the checkpoint)."""
    import torch

    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_NAMES or "://" in str(ckpt_path):
        return None
    path = Path(str(ckpt_path))
    path = path / DISTRIBUTED_METADATA if path.is_dir() else path
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (*UNREADABLE, OSError):
        return None
    state = checkpoint.get(key) if isinstance(checkpoint, dict) else None
    return state.get("train_stream") if isinstance(state, dict) else None


def main(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> UHDCLI:
    """The app; ``exit_on_error=False`` raises a command-line mistake as ``argparse.ArgumentError`` instead of
    printing the whole usage and exiting."""
    # allow_abbrev off: a typo such as --trainer.max_step must not quietly set --trainer.max_steps
    defaults = {"default_config_files": [str(BASE_CONFIG)], "exit_on_error": exit_on_error, "allow_abbrev": False}
    return UHDCLI(
        UHDModule,
        UHDDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"exit_on_error": exit_on_error, "allow_abbrev": False,
                       **{name: defaults for name in SUBCOMMANDS}},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def user_error(err: BaseException) -> tuple[str, str] | None:
    """``(prefix, message)`` of the user's mistake wherever it sits in the exception chain: ``data error`` for
    a :class:`DataError` (the training data failed its check), ``config error`` for any other
    :class:`SettingsError` or Lightning's ``MisconfigurationException``; None for anything else (a bug keeps
    its traceback)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    while err is not None:
        if isinstance(err, DataError):
            return "data error", str(err)
        if isinstance(err, SettingsError | MisconfigurationException):
            return "config error", str(err)
        err = err.__cause__ or err.__context__
    return None


def config_error(err: BaseException) -> str | None:
    """The message of :func:`user_error` (a setting's or the data's), without its prefix."""
    found = user_error(err)
    return found[1] if found is not None else None


SKIPPED_PARSER_LINES = ("Does not validate", "Subtypes:", "Errors:", "Problem with given class_path", "Given value")


def parser_message(text: str) -> str:
    """The parser's message, cut to the setting and what is wrong with it where jsonargparse explains a subclass
    section (``model``, ``data``) by listing every union member it tried; any other message as it is."""
    lines = text.strip().splitlines()
    head = re.match(r'Parser key "([^"]+)":', lines[0]) if lines else None
    if head is None or len(lines) < 2 or "Does not validate against any of the Union subtypes" not in lines[1]:
        return text
    path, problem, at = [head.group(1)], None, 0
    for i, line in enumerate(lines[2:], start=2):
        stripped = line.strip().removeprefix("- ")
        key = re.match(r'Parser key "([^"]+)":', stripped)
        if key:
            path.append(key.group(1))
        elif not stripped.startswith(SKIPPED_PARSER_LINES) and stripped != "Expected a <class 'NoneType'>":
            problem, at = stripped, i
            break
    if problem is None:
        return text
    given = next((line.strip() for line in lines[at:] if line.strip().startswith("Given value:")), None)
    if "Got value" not in problem and given is not None and "NestedArg" not in given:
        problem = f"{problem}. Got value: {given.removeprefix('Given value:').strip()}"
    unknown = re.match(r"Option '([^']+)' is not accepted", problem)
    if unknown:
        path.append(unknown.group(1))
        problem = "no such setting (a typo? `python src/main.py fit --help` lists them)"
    # The section's own "Given value" holds the whole key below it (``lr.vit`` of ``--model.lr.vit abc``):
    # name the key itself, not just the mapping that holds it
    outer = [re.match(r"Given value: NestedArg\(key='([^']+)'", line.strip()) for line in lines]
    outer = [m.group(1) for m in outer if m]
    if outer and not unknown:
        path = [head.group(1), *outer[-1].split(".")]
    return f"{'.'.join(path)}: {problem}"


def cli(args: list[str] | None = None) -> None:
    """``main`` for people: a mistake in a setting or an input ends with one message and exit status 1."""
    try:
        main(args, exit_on_error=False)
    except argparse.ArgumentError as err:  # a malformed command line or config file: the parser's message
        sys.stderr.write(f"config error: {parser_message(str(err))}\n(options: python src/main.py fit --help)\n")
        sys.exit(2)
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        sys.exit(f"{found[0]}: {found[1]}")  # a user setting or the data: no traceback


if __name__ == "__main__":
    cli()
