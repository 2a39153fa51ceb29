"""Reproducible training runs for ``bench pilot`` / ``bench ablate``: seeded, versioned, hashed, run side by side.

One run is one :class:`RunJob`: config files, a seed, a step count, a thread count and the pilot data. It is
trained by :func:`launch_fit`, which starts the training app (``src/main.py fit``) as its own process with
``seed_everything``, the data module's ``seed`` and ``trainer.deterministic=warn`` set from the job (torch's
deterministic algorithms where it has them, a warning where it does not) and the thread count in
``OMP_NUM_THREADS``; what an earlier or interrupted run left in the run folder is removed first.

A run's record names everything its figures depend on: the code version (:func:`code_version`: git commit,
whether tracked or untracked code or configs differ from it, and a hash of that difference), :func:`config_hash`
(sha256 of the sorted JSON of the resolved settings: the merged config files, the job's overrides and the data
spec; output locations are left out, so a moved run keeps its hash), the hash of the data it trained and was
scored on (:func:`folder_digest`: the bytes a reader gets from the shard files), the tokenizer's hash, the
platform (:func:`platform_info`: the CPU kernel set, library versions, and for the record the CPU), the steps
asked for and the steps the final checkpoint holds. :func:`reuse_decision` accepts an earlier run only when it is
complete and all of those match.

A command holds a lock (:func:`hold`) on every data and run folder it uses, so two commands cannot share one
unnoticed: a folder held by a live process is refused with one message naming it; a lock whose process died is
taken over with a note. :func:`run_pool` runs jobs in separate processes, one or ``jobs`` at a time.

Every process that trains or scores a run uses one CPU kernel set, :data:`KERNELS` (AVX2 for torch's own
kernels, oneDNN and MKL), whatever more the CPU offers. Without it torch picks its kernels by CPU: an AVX-512
machine and an AVX2-only one round differently from the first steps, and over 2000 steps that turns "learned"
into "never learned". With it the same run gives the same numbers bit for bit on both (checked:
``tests/bench/golden/pilot_loss.json``, made on an AVX2-only CPU, is reproduced exactly on an AVX-512 one).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[3]
MAIN = ROOT / "src" / "main.py"
CODE_PATHS = ("src", "datamodules", "callbacks", "configs", "pyproject.toml")
"""What a run's result depends on: a change under these paths (committed or not, tracked or not) changes its
code version."""
REUSE_KEYS = {
    "config_hash": "config hash",
    "steps": "steps",
    "data_hash": "data hash",
    "tokenizer_hash": "tokenizer hash",
    "platform_hash": "platform hash",
    "export_sha": "exported model hash",
}
"""Record keys an earlier run must match (besides the code version) to be re-scored, and how a refusal names them."""
PREALIGN_DIR = "prealign"
"""Sub-folder of a run folder where its pre-alignment run logs (:attr:`RunJob.prealign_configs`)."""
KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
"""The CPU kernels of every training and scoring process (read by torch, oneDNN and MKL when they load): torch's
vectorised kernels, oneDNN's and MKL's (its conditional-numerical-reproducibility mode) at AVX2, so that any x86-64
CPU with AVX2 and FMA computes the same roundings."""
PLATFORM_KEYS = ("machine", "kernels", "torch", "numpy", "pillow", "python")
"""The entries of :func:`platform_info` that results depend on: what :func:`platform_hash` covers. The CPU model,
its flags and core count are recorded for the reader but do not change a result under :data:`KERNELS`."""


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
    kernels: str = "avx2"
    """The CPU kernel set it trains and is scored with (:func:`kernel_set`)."""
    prealign_configs: tuple[str, ...] = ()
    """Config files of a pre-alignment run (stage 1) trained first, with the same seed and data, in
    ``<run_dir>/prealign/stage1``; the run then starts from its export (``--model.init_from``). Empty: none."""
    prealign_steps: int = 0
    """Training steps of that pre-alignment run."""

    @property
    def prealign_dir(self) -> Path | None:
        """Where the pre-alignment run logs (None without one)."""
        return Path(self.run_dir) / PREALIGN_DIR / "stage1" if self.prealign_configs else None

    def overrides(self, steps: int | None = None) -> dict[str, object]:
        """The settings a job sets on top of its config files (the ones that count in the config hash)."""
        return {"trainer.max_steps": self.steps if steps is None else steps, "seed_everything": self.seed,
                "data.seed": self.seed, "trainer.deterministic": "warn"}

    def fit_args(self, prealign: bool = False) -> list[str]:
        """The training app's ``fit`` arguments: configs, overrides, the data and where the run logs; with
        ``prealign``, those of its pre-alignment run. A run after one starts from that one's export."""
        run_dir = self.prealign_dir if prealign else Path(self.run_dir)
        configs = self.prealign_configs if prealign else self.configs
        args = ["fit", *[arg for config in configs for arg in ("-c", str(config))]]
        args += [f"--{key}={value}" for key, value in self.overrides(self.prealign_steps if prealign else None).items()]
        if self.prealign_configs and not prealign:
            args += ["--model.init_from", str(self.prealign_dir / "export")]
        args += ["--data.train_shards", self.data["train"], "--data.val_shards", self.data["test"],
                 "--data.test_shards", self.data["test"], "--model.tokenizer", self.tokenizer,
                 "--trainer.logger.init_args.save_dir", str(run_dir.parent.parent),
                 "--trainer.logger.init_args.name", run_dir.parent.name,
                 "--trainer.logger.init_args.version", run_dir.name]
        return [*args, *self.extra]


def _git(args: list[str], root: Path) -> bytes:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout


def code_version(root: Path = ROOT) -> dict:
    """``{"commit", "dirty", "diff_sha"}``: git HEAD, whether files under ``CODE_PATHS`` differ from it (tracked
    files changed, or files git does not track and does not ignore), and a short hash of that difference and of
    the untracked files' names and bytes ("" when clean)."""
    try:
        commit = _git(["rev-parse", "HEAD"], root).decode().strip()
        diff = _git(["diff", "HEAD", "--", *CODE_PATHS], root)
        untracked = _git(["ls-files", "--others", "--exclude-standard", "-z", "--", *CODE_PATHS], root)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": True, "diff_sha": "unknown"}
    digest = hashlib.sha256(diff)
    for name in sorted(n for n in untracked.decode().split("\0") if n):
        digest.update(b"\0untracked\0" + name.encode() + b"\0")
        try:
            digest.update((root / name).read_bytes())
        except OSError:
            digest.update(b"<unreadable>")
    dirty = bool(diff or untracked)
    return {"commit": commit, "dirty": dirty, "diff_sha": digest.hexdigest()[:16] if dirty else ""}


def sha256_file(path: Path) -> str | None:
    """sha256 (first 16 hex digits) of a file's bytes; None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()[:16]


def folder_digest(folder: Path) -> str:
    """sha256 (first 16 hex digits) of what a reader gets from ``folder``: every file by relative path, in name
    order; a ``.tar`` shard counts by its members' names and bytes (its headers hold the time it was written,
    which no reader sees), any other file by its bytes. Raises OSError when the folder cannot be read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OSError(f"{folder}: no such folder")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(b"\0file\0" + path.relative_to(folder).as_posix().encode() + b"\0")
        if path.suffix == ".tar":
            try:
                with tarfile.open(path, "r:") as tar:
                    for member in tar:
                        digest.update(b"\0member\0" + member.name.encode() + b"\0")
                        if member.isfile():
                            digest.update(tar.extractfile(member).read())
            except tarfile.TarError as err:
                raise OSError(f"{path}: not a readable tar shard ({err})") from None
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def kernel_set(flags: list[str], machine: str) -> str:
    """``"avx2"`` where :data:`KERNELS` can run (x86-64 with AVX2 and FMA), else ``"native"`` (torch's own pick:
    results then hold for this CPU only)."""
    return "avx2" if machine in ("x86_64", "AMD64") and {"avx2", "fma"} <= set(flags) else "native"


def kernel_env(kernels: str) -> dict[str, str]:
    """Environment variables that pin ``kernels`` (:func:`kernel_set`) in a process started with them."""
    return dict(KERNELS) if kernels == "avx2" else {}


def platform_info() -> dict:
    """What float results depend on beyond code, settings and data: the CPU kernel set runs use
    (:func:`kernel_set`) and the library versions; the CPU (model, vector extensions, cores) for the record."""
    import numpy
    import PIL
    import torch

    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            cpu.setdefault(key, value)
    except OSError:
        pass
    flags = sorted(f for f in cpu.get("flags", "").split() if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"machine": platform.machine(), "kernels": kernel_set(flags, platform.machine()),
            "cpu": cpu.get("model name") or platform.processor(), "cpu_flags": flags, "cpus": os.cpu_count(),
            "torch": torch.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
            "python": platform.python_version()}


def platform_hash(info: dict) -> str:
    """Hash of the :data:`PLATFORM_KEYS` of ``info``: equal wherever the same run gives the same numbers."""
    return config_hash({key: info.get(key) for key in PLATFORM_KEYS})


def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, mappings merged key by key, everything else replaced (as config files stack)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def merged_configs(paths: Sequence[str]) -> dict:
    """The config files merged as the training app stacks them."""
    config: dict = {}
    for path in paths:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise RunError(f"config {path}: cannot read it ({err})") from None
        config = merge(config, loaded)
    return config


def resolved_settings(job: RunJob) -> dict:
    """The settings a run's result depends on: the merged config files, the job's overrides, the thread count,
    the verbatim extra arguments and the data spec; and a pre-alignment run's config files and steps."""
    settings = {"config": merged_configs(job.configs), "overrides": job.overrides(), "threads": job.threads,
                "extra": list(job.extra), "data": job.spec}
    if job.prealign_configs:
        settings["prealign"] = {"config": merged_configs(job.prealign_configs), "steps": job.prealign_steps}
    return settings


def config_hash(settings: dict) -> str:
    """sha256 (first 16 hex digits) of the settings as sorted, compact JSON: the same settings, the same hash."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reuse_decision(record: dict | None, version: dict, expected: dict) -> tuple[bool, str]:
    """Whether an earlier run's ``record`` may be re-scored instead of trained again, and why (or why not).

    Only a complete run (its final checkpoint holds the steps it was asked for) whose record matches the
    current code version and every entry of ``expected`` (keys of :data:`REUSE_KEYS`: config hash, steps, data,
    tokenizer and platform hashes, the exported model's hash) is accepted."""
    if record is None:
        return False, "no recorded run"
    if version["commit"] == "unknown":
        return False, "the current code version is unknown (not a git checkout)"
    if record.get("commit") != version["commit"]:
        return False, f"recorded commit {str(record.get('commit'))[:10]} != current {version['commit'][:10]}"
    if record.get("diff_sha") != version["diff_sha"]:
        return False, (f"uncommitted changes differ (recorded {record.get('diff_sha') or 'clean'}, "
                       f"current {version['diff_sha'] or 'clean'})")
    if not record.get("complete") or record.get("trained_steps") != record.get("steps"):
        return False, (f"the recorded run is not complete (final checkpoint at step {record.get('trained_steps')} "
                       f"of {record.get('steps')})")
    for key, value in expected.items():
        if record.get(key) != value:
            return False, f"recorded {REUSE_KEYS.get(key, key)} {record.get(key)} != current {value}"
    return True, f"commit {version['commit'][:10]}, " + ", ".join(REUSE_KEYS.get(k, k) for k in expected) + " match"


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
    env = {**os.environ, **kernel_env(job.kernels)}
    if job.threads:
        env.update(OMP_NUM_THREADS=str(job.threads), MKL_NUM_THREADS=str(job.threads))
    stages = [(job.prealign_dir, job.fit_args(prealign=True), "pre-alignment")] if job.prealign_configs else []
    for folder, args, what in [*stages, (run_dir, job.fit_args(), "training")]:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(MAIN), *args]
        (folder / "fit_command.json").write_text(json.dumps(command))
        log = folder / "fit.log"
        if job.stream:
            done = subprocess.run(command, env=env)
        else:
            with open(log, "w") as f:
                done = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            tail = "" if job.stream else " ".join(log.read_text().strip().splitlines()[-1:])
            where = "see its output above" if job.stream else f"log {log}"
            raise RunError(f"run {job.name} seed {job.seed}: {what} failed (exit {done.returncode}; {where}) {tail}")


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _who(holder: dict) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (f"process {holder.get('pid')} on {holder.get('host')} since {since} "
            f"({' '.join(map(str, holder.get('command') or []))[:200]})")


class FolderBusy(RunError):
    """A data or run folder that another live command holds."""


@contextmanager
def hold(folder: Path | str, what: str = "folder") -> Iterator[Path]:
    """Hold ``folder`` for this process: a ``<folder>.lock`` file beside it, locked with ``flock`` and naming
    the process (pid, host, command, start time); removed when the block ends.

    Another live process holding it: :class:`FolderBusy`, one message naming that process. A lock file left by
    a process that died (the kernel drops its ``flock``) is taken over with a note on stderr. The lock lies
    beside the folder, not in it, so clearing the folder keeps it."""
    folder = Path(folder)
    path = folder.parent / f"{folder.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(f"{what} {folder} is in use by {_who(_holder(path))}; two commands must not share a "
                             "data or run folder: wait for it to end, or give this command other --data / --runs "
                             "folders") from None
        try:  # released and removed by its holder between our open and flock: lock the file now at the path
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        previous = _holder(path)
        if previous:
            print(f"note: {what} {folder}: taking over the lock left by {_who(previous)}, which is no longer running",
                  file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield folder
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def pin_kernels(env: dict[str, str]) -> None:
    """Worker start-up of :func:`run_pool`: set ``env`` before torch loads (it reads them once, when it loads)."""
    if env and "torch" in sys.modules:
        raise RunError("internal: torch was loaded before the CPU kernel set could be pinned")
    os.environ.update(env)


def run_pool(fn: Callable, items: Sequence, jobs: int = 1, desc: str = "runs",
             env: dict[str, str] | None = None) -> list:
    """``[fn(item) for item in items]`` in separate (spawned) worker processes, ``jobs`` at a time, each started
    with ``env`` (e.g. :func:`kernel_env`) set before it loads torch; results in item order."""
    results: list = [None] * len(items)
    if not items:
        return results
    workers = max(1, min(jobs, len(items)))
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=pin_kernels,
                             initargs=(dict(env or {}),)) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=len(items) <= 1):
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
    out["prealign_configs"] = [_relative(c) for c in job.prealign_configs]
    return out
