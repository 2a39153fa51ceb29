"""Reproducible training runs for ``bench pilot`` / ``bench ablate``: seeded, versioned, hashed, run side by side.

One run is one :class:`RunJob`: config files, a seed, a step count, a thread count and the pilot data. It is
trained by :func:`launch_fit`, which starts the training app (``src/main.py fit``) as its own process with
``seed_everything``, the data module's ``seed`` and ``trainer.deterministic=warn`` set from the job (torch's
deterministic algorithms where it has them, a warning where it does not) and the thread count in
``OMP_NUM_THREADS``. Every run records the code version (:func:`code_version`: git commit, whether tracked code
or configs differ from it, and a hash of that difference) and :func:`config_hash` (sha256 of the sorted JSON of
the resolved settings: the merged config files, the job's overrides and the data spec; output locations are
left out, so a moved run keeps its hash). :func:`reuse_decision` accepts an earlier run only when all of those
match. :func:`run_pool` runs jobs one after another, or ``jobs`` at a time in separate processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[3]
MAIN = ROOT / "src" / "main.py"
CODE_PATHS = ("src", "datamodules", "callbacks", "configs", "pyproject.toml")
"""What a run's result depends on: a change under these paths (committed or not) changes its code version."""


class RunError(RuntimeError):
    """A run that could not be trained or scored; the message names the run and where its log is."""


@dataclass(frozen=True)
class RunJob:
    """One training run of one arm / config at one seed, and where it goes."""

    name: str
    configs: tuple[str, ...]
    seed: int
    steps: int
    threads: int
    spec: dict
    """The pilot data spec (``datamodules.synthetic.PilotData`` as a dict; its ``seed`` is the data seed)."""
    data: dict
    """``{"train": dir, "test": dir}``: the shards of ``spec``."""
    run_dir: str
    tokenizer: str
    extra: tuple[str, ...] = ()
    """Further ``fit`` arguments, verbatim (``--fit-arg``); they count in the config hash."""
    stream: bool = False
    """Show the training app's output live (one run at a time) instead of writing it to ``fit.log``."""
    flops: bool = False
    """Also count the encoder's FLOPs (ablations)."""
    labels: dict = field(default_factory=dict)
    """Extra columns for the result rows (e.g. the ablation set)."""

    def overrides(self) -> dict[str, object]:
        """The settings a job sets on top of its config files (the ones that count in the config hash)."""
        return {"trainer.max_steps": self.steps, "seed_everything": self.seed, "data.seed": self.seed,
                "trainer.deterministic": "warn"}

    def fit_args(self) -> list[str]:
        """The training app's ``fit`` arguments: configs, overrides, the data and where the run logs."""
        run_dir = Path(self.run_dir)
        args = ["fit", *[arg for config in self.configs for arg in ("-c", str(config))]]
        args += [f"--{key}={value}" for key, value in self.overrides().items()]
        args += ["--data.train_shards", self.data["train"], "--data.val_shards", self.data["test"],
                 "--data.test_shards", self.data["test"], "--model.tokenizer", self.tokenizer,
                 "--trainer.logger.init_args.save_dir", str(run_dir.parent.parent),
                 "--trainer.logger.init_args.name", run_dir.parent.name,
                 "--trainer.logger.init_args.version", run_dir.name]
        return [*args, *self.extra]


def _git(args: list[str], root: Path) -> bytes:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout


def code_version(root: Path = ROOT) -> dict:
    """``{"commit", "dirty", "diff_sha"}``: git HEAD, whether tracked files under ``CODE_PATHS`` differ from it
    (untracked files are not seen), and a short hash of that difference ("" when clean)."""
    try:
        commit = _git(["rev-parse", "HEAD"], root).decode().strip()
        diff = _git(["diff", "HEAD", "--", *CODE_PATHS], root)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": True, "diff_sha": "unknown"}
    return {"commit": commit, "dirty": bool(diff), "diff_sha": hashlib.sha256(diff).hexdigest()[:16] if diff else ""}


def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, mappings merged key by key, everything else replaced (as config files stack)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolved_settings(job: RunJob) -> dict:
    """The settings a run's result depends on: the merged config files, the job's overrides, the thread count,
    the verbatim extra arguments and the data spec."""
    config: dict = {}
    for path in job.configs:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise RunError(f"config {path}: cannot read it ({err})") from None
        config = merge(config, loaded)
    return {"config": config, "overrides": job.overrides(), "threads": job.threads, "extra": list(job.extra),
            "data": job.spec}


def config_hash(settings: dict) -> str:
    """sha256 (first 16 hex digits) of the settings as sorted, compact JSON: the same settings, the same hash."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reuse_decision(record: dict | None, version: dict, digest: str) -> tuple[bool, str]:
    """Whether an earlier run's ``record`` may be re-scored instead of trained again, and why (or why not)."""
    if record is None:
        return False, "no recorded run"
    if version["commit"] == "unknown":
        return False, "the current code version is unknown (not a git checkout)"
    if record.get("commit") != version["commit"]:
        return False, f"recorded commit {str(record.get('commit'))[:10]} != current {version['commit'][:10]}"
    if record.get("diff_sha") != version["diff_sha"]:
        return False, (f"uncommitted changes differ (recorded {record.get('diff_sha') or 'clean'}, "
                       f"current {version['diff_sha'] or 'clean'})")
    if record.get("config_hash") != digest:
        return False, f"recorded config hash {record.get('config_hash')} != current {digest}"
    return True, f"commit {version['commit'][:10]} and config hash {digest} match"


def read_record(run_dir: Path) -> dict | None:
    """The ``result.json`` an earlier run wrote, or None (missing or unreadable)."""
    try:
        return json.loads((Path(run_dir) / "result.json").read_text())
    except (OSError, ValueError):
        return None


def launch_fit(job: RunJob) -> None:
    """Train ``job`` with the training app in a child process (``job.threads`` threads); raises RunError on
    failure, naming the log. What an earlier, interrupted or refused run left in the run folder is removed first:
    its TensorBoard events would otherwise mix into this run's loss curve."""
    run_dir = Path(job.run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if job.threads:
        env.update(OMP_NUM_THREADS=str(job.threads), MKL_NUM_THREADS=str(job.threads))
    command = [sys.executable, str(MAIN), *job.fit_args()]
    (run_dir / "fit_command.json").write_text(json.dumps(command))
    log = run_dir / "fit.log"
    if job.stream:
        done = subprocess.run(command, env=env)
    else:
        with open(log, "w") as f:
            done = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "" if job.stream else " ".join(log.read_text().strip().splitlines()[-1:])
        where = "see its output above" if job.stream else f"log {log}"
        raise RunError(f"run {job.name} seed {job.seed}: training failed (exit {done.returncode}; {where}) {tail}")


def run_pool(fn: Callable, items: Sequence, jobs: int = 1, desc: str = "runs") -> list:
    """``[fn(item) for item in items]``, ``jobs`` at a time in separate (spawned) processes when ``jobs > 1``."""
    if jobs <= 1 or len(items) <= 1:
        return [fn(item) for item in tqdm(items, desc=desc, disable=len(items) <= 1)]
    results: list = [None] * len(items)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc):
            results[futures[future]] = future.result()
    return results


def _relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (records name no machine's folders)."""
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


def job_dict(job: RunJob) -> dict:
    """The job as plain JSON data (recorded beside its result), config paths relative to the repository."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(job).items()}
    out["configs"] = [_relative(c) for c in job.configs]
    return out
