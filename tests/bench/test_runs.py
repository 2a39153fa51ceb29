"""Run bookkeeping: config hash, code version, the --reuse decision and the training command of a job."""

import subprocess

from llava_uhd.bench import runs
from llava_uhd.bench.runs import (
    ROOT,
    RunJob,
    code_version,
    config_hash,
    job_dict,
    launch_fit,
    merge,
    resolved_settings,
    reuse_decision,
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


def test_reuse_is_refused_when_commit_diff_or_config_hash_differ():
    version = {"commit": "a" * 40, "dirty": False, "diff_sha": ""}
    record = {"commit": "a" * 40, "diff_sha": "", "config_hash": "h1"}
    assert reuse_decision(record, version, "h1")[0]
    ok, why = reuse_decision({**record, "commit": "b" * 40}, version, "h1")
    assert not ok and "commit" in why
    ok, why = reuse_decision(record, version, "h2")
    assert not ok and "config hash" in why and "h1" in why and "h2" in why
    ok, why = reuse_decision(record, {**version, "dirty": True, "diff_sha": "d1"}, "h1")
    assert not ok and "uncommitted" in why
    assert not reuse_decision(None, version, "h1")[0]
    assert not reuse_decision(record, {"commit": "unknown", "dirty": True, "diff_sha": "unknown"}, "h1")[0]


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
