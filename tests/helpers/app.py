"""The training app (``src/main.py fit``) as the kill, resume, distributed and non-finite tests run it: tiny data,
the stage-2 command line on the tiny overlay, the subprocess environment, and what a run leaves behind (the probe
files of :class:`tests.helpers.probes.ProbePretrain`, checkpoints and their saved steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from datamodules import write_synthetic
from llava_uhd.tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
MAIN = ROOT / "src" / "main.py"
PROBE = "tests.helpers.probes.ProbePretrain"  # Pretrain on small images that writes what it saw (see there)


def write_app_data(root: Path) -> Path:
    """Shards (40-80 px shape grids), tokenizer and a callbacks overlay under ``root`` (the ``app_data`` fixture)."""
    write_synthetic("shapegrid", 32, str(root / "train"), seed=0, min_side=40, max_side=80)
    write_synthetic("shapegrid", 4, str(root / "val"), seed=1, min_side=40, max_side=80)
    build_tiny_tokenizer(str(root / "tokenizer"))
    # base.yaml's freezing callback only: stage 2 keeps its LLM frozen; no export / monitors to pay for
    (root / "callbacks.yaml").write_text("trainer:\n  callbacks:\n    - class_path: callbacks.StageFreeze\n")
    return root


def app_args(data: Path, run_dir: Path, steps: int, every: int, *extra: str) -> list[str]:
    """``fit`` arguments for stage 2 on the tiny overlay, logging and checkpointing into ``run_dir``."""
    return [
        "fit", "-c", str(CONFIGS / "stage2.yaml"), "-c", str(CONFIGS / "tiny.yaml"), "-c", str(data / "callbacks.yaml"),
        "--model.class_path", PROBE, "--model.init_args.probe_dir", str(run_dir / "probe"),
        "--model.tokenizer", str(data / "tokenizer"),
        "--data.train_shards", str(data / "train"), "--data.val_shards", str(data / "val"), "--data.synthetic", "null",
        "--data.max_batch_size", "2",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "-1", "--trainer.max_steps", str(steps),
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(run_dir / "runs"),
        "--checkpoint.every_n_train_steps", str(every),
        *extra,
    ]


def app_env(threads: int = 2, extra: dict[str, str] | None = None) -> dict[str, str]:
    """``tests`` importable (the probe module), and no more threads than the 2 cores can run; plus ``extra``."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": str(threads), **(extra or {})}


def run_app(args: list[str], timeout: float = 240, threads: int = 2, env: dict[str, str] | None = None) -> str:
    """Run the app to completion; its output (stdout then stderr). A non-zero exit fails the test with the output."""
    proc = subprocess.run([sys.executable, str(MAIN), *args], cwd=ROOT, env=app_env(threads, env),
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def start_app(args: list[str], log: Path, threads: int = 2, env: dict[str, str] | None = None,
              new_session: bool = False) -> subprocess.Popen:
    """Start the app in the background, output to ``log``; ``new_session``: its own process group (to kill all
    of a multi-process run at once)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(MAIN), *args], cwd=ROOT, env=app_env(threads, env),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session)


def probe(run_dir: Path, rank: int = 0, name: str = "probe") -> dict:
    """What :class:`tests.helpers.probes.ProbePretrain` recorded on ``rank`` (``name``: its probe folder)."""
    return json.loads((run_dir / name / f"rank{rank}.json").read_text())


def checkpoint_dir(run_dir: Path) -> Path:
    """The one ``checkpoints`` folder a stage-2 run logged into ``run_dir`` holds."""
    (found,) = (run_dir / "runs" / "stage2").glob("version_*/checkpoints")
    return found


def saved_step(path: Path) -> int:
    """The global step a checkpoint holds: a ``.ckpt`` file, or a distributed-checkpoint directory's meta.pt."""
    file = path / "meta.pt" if path.is_dir() else path
    return int(torch.load(file, map_location="cpu", weights_only=True)["global_step"])
