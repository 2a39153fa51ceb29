"""Run bookkeeping: config hash, code version, data hash, the --reuse decision, folder locks and the training
command of a job."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from llava_uhd.bench import runs
from llava_uhd.bench.runs import (
    ROOT,
    FolderBusy,
    RunJob,
    code_version,
    config_hash,
    folder_digest,
    hold,
    job_dict,
    kernel_env,
    kernel_set,
    launch_fit,
    merge,
    platform_hash,
    platform_info,
    resolved_settings,
    reuse_decision,
    run_pool,
)


def job(tmp_path, **changes):
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  max_steps: 5\n  log_every_n_steps: 2\nmodel:\n  init_args: {lr: 0.1, depth: 2}\n")
    arm = tmp_path / "arm.yaml"
    arm.write_text("model:\n  init_args: {depth: 4}\n")
    fields = dict(name="pvc", configs=(str(base), str(arm)), seed=3, steps=7, threads=1, spec={"grid": 3, "seed": 3},
                  data={"train": "d/train", "test": "d/test"}, run_dir=str(tmp_path / "runs" / "pvc" / "seed3"),
                  tokenizer="tok")
    return RunJob(**{**fields, **changes})


def test_settings_merge_the_config_files_and_the_hash_is_stable(tmp_path):
    settings = resolved_settings(job(tmp_path))
    assert settings["config"]["model"]["init_args"] == {"lr": 0.1, "depth": 4}  # later file wins, keys merged
    assert settings["overrides"]["seed_everything"] == 3 and settings["overrides"]["data.seed"] == 3
    digest = config_hash(settings)
    assert config_hash({k: settings[k] for k in reversed(list(settings))}) == digest  # key order does not matter
    assert config_hash(resolved_settings(job(tmp_path, seed=4))) != digest
    assert config_hash(resolved_settings(job(tmp_path, threads=2))) != digest
    assert config_hash(resolved_settings(job(tmp_path, extra=("--trainer.max_epochs=2",)))) != digest
    # where a run is written is not a setting: a moved run keeps its hash
    assert config_hash(resolved_settings(job(tmp_path, run_dir="elsewhere/pvc/seed3"))) == digest
    assert merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}


def test_fit_args_seed_the_run_and_log_into_its_folder(tmp_path):
    args = job(tmp_path).fit_args()
    assert args[0] == "fit" and args.count("-c") == 2
    for flag in ("--seed_everything=3", "--data.seed=3", "--trainer.max_steps=7", "--trainer.deterministic=warn"):
        assert flag in args
    assert args[args.index("--trainer.logger.init_args.name") + 1] == "pvc"
    assert args[args.index("--trainer.logger.init_args.version") + 1] == "seed3"
    # the recorded job names repository configs relative to the repository (no machine's folders)
    inside = job(tmp_path, configs=(str(ROOT / "configs" / "tiny.yaml"),))
    assert job_dict(inside)["configs"] == ["configs/tiny.yaml"] and job_dict(inside)["seed"] == 3


def test_reuse_is_refused_unless_the_run_is_complete_and_everything_matches():
    version = {"commit": "a" * 40, "dirty": False, "diff_sha": ""}
    expected = {"config_hash": "h1", "steps": 7, "data_hash": "d1", "tokenizer_hash": "t1", "platform_hash": "p1",
                "export_sha": "e1"}
    record = {"commit": "a" * 40, "diff_sha": "", "complete": True, "trained_steps": 7, **expected}
    ok, why = reuse_decision(record, version, expected)
    assert ok and "config hash" in why and "data hash" in why and "platform hash" in why
    ok, why = reuse_decision({**record, "commit": "b" * 40}, version, expected)
    assert not ok and "commit" in why
    ok, why = reuse_decision(record, {**version, "dirty": True, "diff_sha": "d1"}, expected)
    assert not ok and "uncommitted" in why
    for key, label in runs.REUSE_KEYS.items():  # each one alone refuses, and is named with both values
        ok, why = reuse_decision(record, version, {**expected, key: "other"})
        assert not ok and label in why and str(record[key]) in why and "other" in why, key
    # an interrupted run (its final checkpoint short of the steps asked for), or an old record without the fields
    ok, why = reuse_decision({**record, "trained_steps": 5, "complete": False}, version, expected)
    assert not ok and "not complete" in why and "step 5 of 7" in why
    assert not reuse_decision({k: v for k, v in record.items() if k != "complete"}, version, expected)[0]
    assert not reuse_decision(None, version, expected)[0]
    assert not reuse_decision(record, {"commit": "unknown", "dirty": True, "diff_sha": "unknown"}, expected)[0]


def test_folder_digest_counts_what_a_reader_gets(tmp_path):
    def shard(folder, mtime, payload=b"abc"):
        folder.mkdir()
        with tarfile.open(folder / "s-000000.tar", "w") as tar:
            info = tarfile.TarInfo("k0.jpg")
            info.size, info.mtime = len(payload), mtime
            tar.addfile(info, io.BytesIO(payload))
        (folder / "index.json").write_text('{"shards": 1}')
        return folder_digest(folder)

    first = shard(tmp_path / "a", mtime=1)
    assert shard(tmp_path / "b", mtime=2) == first  # written at another time: the same bytes to read
    assert shard(tmp_path / "c", mtime=1, payload=b"abd") != first  # one byte of an image
    (tmp_path / "a" / "extra.tar").write_bytes((tmp_path / "a" / "s-000000.tar").read_bytes())
    assert folder_digest(tmp_path / "a") != first  # a shard dropped beside the set is read too
    with pytest.raises(OSError):
        folder_digest(tmp_path / "missing")


def test_platform_names_what_float_results_depend_on():
    info = platform_info()
    for key in ("cpu", "cpu_flags", "kernels", "torch", "numpy", "pillow"):
        assert key in info, key
    assert json.loads(json.dumps(info)) == info and platform_hash(info) == platform_hash(platform_info())
    assert platform_hash({**info, "cpu": "another CPU", "cpu_flags": [*info["cpu_flags"], "avx512f"]}) == \
        platform_hash(info)  # under the pinned kernels the CPU model does not change a result
    assert platform_hash({**info, "kernels": "native"}) != platform_hash(info)
    assert platform_hash({**info, "torch": "0.0"}) != platform_hash(info)


def test_the_kernel_set_is_pinned_where_the_cpu_runs_it():
    assert kernel_set(["avx", "avx2", "avx512f", "fma"], "x86_64") == "avx2"
    assert kernel_set(["avx", "avx2", "fma"], "x86_64") == "avx2"
    assert kernel_set(["avx"], "x86_64") == "native"
    assert kernel_set([], "aarch64") == "native"
    assert kernel_env("avx2")["ATEN_CPU_CAPABILITY"] == "avx2" and kernel_env("native") == {}


def _capability(_) -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def test_pool_workers_load_torch_with_the_pinned_kernels():
    if platform_info()["kernels"] != "avx2":
        pytest.skip("this CPU cannot run the pinned AVX2 kernels")
    assert run_pool(_capability, [None, None], jobs=1, env=kernel_env("avx2")) == ["AVX2", "AVX2"]


def test_code_version_sees_commits_and_uncommitted_changes(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    git("add", "src/a.py")
    git("commit", "-q", "-m", "one")
    clean = code_version(tmp_path)
    assert len(clean["commit"]) == 40 and not clean["dirty"] and clean["diff_sha"] == ""
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    dirty = code_version(tmp_path)
    assert dirty["commit"] == clean["commit"] and dirty["dirty"] and dirty["diff_sha"]
    (tmp_path / "notes.md").write_text("docs do not count\n")
    assert code_version(tmp_path) == dirty
    # a new file under the code paths that git does not track counts, by its bytes
    (tmp_path / "src" / "new.py").write_text("y = 1\n")
    untracked = code_version(tmp_path)
    assert untracked["dirty"] and untracked["diff_sha"] not in ("", dirty["diff_sha"])
    (tmp_path / "src" / "new.py").write_text("y = 2\n")
    assert code_version(tmp_path)["diff_sha"] != untracked["diff_sha"]
    assert code_version(tmp_path / "src" / "missing")["commit"] == "unknown"


def test_a_run_trained_again_starts_from_an_empty_folder(tmp_path, monkeypatch):
    """An interrupted run's TensorBoard events left in the folder would mix into the new run's loss curve."""
    the_job = job(tmp_path)
    run_dir = tmp_path / "runs" / "pvc" / "seed3"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "events.out.tfevents.1.old").write_text("half a run")
    (run_dir / "checkpoints" / "last.ckpt").write_text("stale")
    seen = {}

    def fake_fit(command, **kwargs):
        seen["files"] = sorted(p.name for p in run_dir.rglob("*"))
        (run_dir / "events.out.tfevents.2.new").write_text("this run")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(runs.subprocess, "run", fake_fit)
    launch_fit(the_job)
    assert seen["files"] == ["fit.log", "fit_command.json"]  # only what this launch wrote
    assert sorted(p.name for p in run_dir.iterdir()) == ["events.out.tfevents.2.new", "fit.log", "fit_command.json"]


HOLDER = textwrap.dedent("""
    import sys, time
    from llava_uhd.bench.runs import hold
    with hold(sys.argv[1], "data folder"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_folder_held_by_a_live_process_is_refused_with_one_message(tmp_path):
    folder = tmp_path / "data" / "where" / "seed0"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy) as busy:
            with hold(folder, "data folder"):
                pass
        message = str(busy.value)
        assert "\n" not in message and f"data folder {folder} is in use by process {holder.pid}" in message
        assert "--data" in message and "--runs" in message
    finally:
        holder.kill()
        holder.wait()
    # its process is gone: the lock it left is taken over, with a note naming it
    lock = tmp_path / "data" / "where" / "seed0.lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid
    with hold(folder, "data folder"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()  # released: nothing left behind


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
    folder = tmp_path / "runs" / "pvc" / "seed0"
    lock = tmp_path / "runs" / "pvc" / "seed0.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": 999999, "host": "h", "since": 0, "command": ["bench", "pilot"]}))
    with hold(folder, "run folder") as held:
        assert held == folder
        err = capsys.readouterr().err
        assert "taking over the lock left by process 999999" in err and "no longer running" in err
        # the same folder cannot be held twice, not even by one process
        with pytest.raises(FolderBusy, match=f"process {os.getpid()}"):
            with hold(folder, "run folder"):
                pass
    assert not lock.exists()
    with hold(folder, "run folder"):
        assert capsys.readouterr().err == ""  # a lock released normally leaves no note for the next one
