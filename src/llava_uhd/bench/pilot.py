"""Pilot experiment (paper section 2.2) at CPU scale: GNE vs SBE vs PVC over seeds, accuracy per grid cell.

``python -m llava_uhd.bench pilot [--task where kind] [--seeds 5] [--jobs 2] [--steps N] [--out docs/pilot]``
trains the same tiny MLLM (tiny Qwen2, stage 3: everything trainable) once per vision encoder and seed, on
generated fixed-layout ShapeGrid data (``datamodules.synthetic.pilot_sample``), with ``configs/stage3.yaml`` +
``configs/tiny.yaml`` + ``configs/pilot/base.yaml`` + ``configs/pilot/{gne,sbe,pvc}.yaml``; then asks every
model the held-out questions and scores them by exact match (``llava_uhd.metrics.VQAMetrics``), per grid cell.

The paper reports a *cross-shaped bias* for slice-based encoding: cells that a slice boundary cuts through
are answered worse. The pilot layout makes that measurable: 224 px squares, which the tiny SBE cuts into
2x2 slices of 112 px (plus its thumbnail), and a 3x3 grid, so the slice boundaries run through the centres
of the middle row and column: 5 of the 9 cells are "cut", the 4 corners are not. Tasks (``--task``):
``where`` (one shape in a random cell; answer its place), ``kind`` (one shape in a random cell; answer its
kind: a cut splits the shape's outline between slices, so this is what a cut destroys), and the colour
questions ``position`` / ``marked``.

Seed ``s`` sets everything random in a run: the generated data (train and held-out), the model's initial
weights (``seed_everything``) and the data order (the data module's ``seed``); runs use torch's deterministic
algorithms where it has them, one CPU kernel set on every x86-64 CPU with AVX2 (``llava_uhd.bench.runs.KERNELS``:
a run gives the same numbers on any such machine) and ``--threads`` threads each, and are trained and scored in
processes of their own (``llava_uhd.bench.runs``). ``--jobs 2`` trains
two runs side by side. Per arm the outputs give mean and standard deviation of accuracy and of the learning
step over seeds (a run that never learned is counted, not averaged in), cut / uncut accuracy pooled over
seeds with a 95 % Wilson interval (``llava_uhd.bench.stats``), and one row per seed.

Outputs in ``--out``, per task ``<stem> = pilot_<task>``: ``<stem>.csv`` (one row per arm), ``<stem>_seeds.csv``
(one per run), ``<stem>_cells.csv`` (per cell, pooled over seeds), ``<stem>.json``, ``<stem>.md``, ``<stem>.png``
(heatmaps), ``<stem>_spread.png`` (per-seed points, mean +- std, cut/uncut intervals), ``<stem>_loss.png``, and
``seeds/<stem>/<arm>_seed<s>.json`` (every run: commit, config hash, data, tokenizer and platform hashes, steps
asked for and trained, seed, threads, wall time, scores). ``learned_at_step`` is the first logged step from
which three logged losses in a row stay under 0.05. Trained runs stay in ``--runs`` (with ``answers.json``, every
held-out answer); ``--reuse`` re-scores the final model of a complete earlier run instead of training it again
only when its record matches the current code version, config hash, steps, data, tokenizer, platform and
exported model, and says for every run which it did and why.

The generated shards of a task and seed (``--data``/<task>/seed<s>) carry a ``manifest.json``: the data spec,
a hash of the generator (the source of ``datamodules.synthetic``, the shard writer and the functions here that
write the shards, with the numpy and Pillow versions) and the hash of the bytes the shards hold. They are
written again whenever any of these differs from the current ones, so shards made by older code are never
used. Training reads the shards and so does scoring (the held-out questions and images are read from the
test shards), and a run's record holds the hash of exactly those bytes, taken before and checked after
training. A command holds a lock on every data and run folder it uses (``llava_uhd.bench.runs.hold``): a second
command on the same folders stops with one message naming the first.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import datamodules.synthetic
import datamodules.writer
from datamodules.synthetic import PILOT_QUESTIONS, PILOT_SHAPE_PAD, PilotData, pilot_chance, pilot_sample
from datamodules.writer import ShardSetWriter, replacing_dir
from llava_uhd.arguments import non_negative_int, positive_int
from llava_uhd.bench.figures import LEARNED_LOSS
from llava_uhd.bench.runs import (
    ROOT,
    RunError,
    RunJob,
    code_version,
    config_hash,
    folder_digest,
    hold,
    job_dict,
    kernel_env,
    launch_fit,
    platform_hash,
    platform_info,
    read_record,
    resolved_settings,
    reuse_decision,
    run_pool,
    sha256_file,
)
from llava_uhd.metrics import VQAMetrics, exact_match
from llava_uhd.vision import ResolutionPolicy, preprocess
from llava_uhd.vision.report import encoder_flops
from llava_uhd.vision.slicing import SliceGridPolicy

__all__ = ["PilotData", "pilot_sample", "chance", "cut_mask", "learned_at", "loss_curve", "ENCODERS"]

CONFIGS = ROOT / "configs"
ENCODERS = ("gne", "sbe", "pvc")
LABELS = {"gne": "GNE (patch 14, merger)", "sbe": "SBE (112 px slices, merger)", "pvc": "PVC / ViT-UHD (mlp)"}
SHAPE_PAD = PILOT_SHAPE_PAD
PIXEL_BUDGET = {"min_pixels": 4096, "max_pixels": 65536, "max_side": 512}
"""The data module's pixel budget in ``configs/tiny.yaml`` / ``configs/pilot/base.yaml``: evaluation resizes the
held-out images exactly as training did (a saved model's own policy keeps the full-size 512^2 minimum)."""
EVAL_TOKENS = 12
"""Generation cap in evaluation: "row 2, column 3" and a colour both fit, a run-on answer is cut and scored wrong."""
SBE_SLICES = SliceGridPolicy(slice_size=112, max_slices=6)
"""The tiny SBE's slice policy (``vit_sbe_tiny_patch14_siglip``), used to mark the cells slices cut."""
chance = pilot_chance


MANIFEST = "manifest.json"
"""In a pilot data folder: the spec, the generator hash and the shards' hashes (see :func:`write_pilot_data`)."""


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_split(spec: PilotData, split: str, n: int, out: str) -> None:
    writer = ShardSetWriter(out, 1024, prefix=f"pilot-{split}")
    for i in tqdm(range(n), desc=f"pilot data {spec.question} seed {spec.seed} {split}", leave=False):
        image, question, answer, meta = pilot_sample(i, spec.seed, spec, split)
        record = {"conversations": [{"from": "human", "value": question},
                                    {"from": "gpt", "value": answer}], "meta": meta}
        writer.write({"__key__": f"pilot{split}{i:07d}", "jpg": _jpeg(image, spec.quality),
                      "json": json.dumps(record).encode()}, [(image.height, image.width)])
    writer.close(task="shapegrid", seed=spec.seed, min_side=spec.min_side, max_side=spec.max_side)


def generator_digest() -> str:
    """sha256 (first 16 hex digits) of what makes the pilot shards' bytes: the source of ``datamodules.synthetic``
    and ``datamodules.writer``, of the functions here that write the shards, and the numpy and Pillow versions."""
    import PIL

    digest = hashlib.sha256()
    for part in (datamodules.synthetic, datamodules.writer, _jpeg, _write_split, write_pilot_data):
        digest.update(inspect.getsource(part).encode() + b"\0")
    digest.update(f"numpy {np.__version__}, pillow {PIL.__version__}".encode())
    return digest.hexdigest()[:16]


def data_digest(paths: dict[str, str]) -> dict[str, str]:
    """``{"train", "test", "data_hash"}``: the hashes of the bytes the train and held-out shards hold (see
    ``llava_uhd.bench.runs.folder_digest``) and of the two together."""
    hashes = {split: folder_digest(Path(paths[split])) for split in ("train", "test")}
    both = hashlib.sha256(f"train {hashes['train']} test {hashes['test']}".encode()).hexdigest()[:16]
    return {**hashes, "data_hash": both}


def write_pilot_data(spec: PilotData, root: Path) -> dict[str, str]:
    """Train and held-out shards of ``spec`` under ``root``; kept only when ``root``'s manifest names the same
    spec and generator (:func:`generator_digest`) and the shards still hold the bytes it names, else written
    again (each split beside its folder and swapped in, the manifest last)."""
    root = Path(root)
    paths = {"train": str(root / "train"), "test": str(root / "test")}
    manifest, generator = root / MANIFEST, generator_digest()
    try:
        kept = json.loads(manifest.read_text())
        if kept.get("spec") == asdict(spec) and kept.get("generator") == generator:
            if kept.get("hashes") == data_digest(paths):
                return paths
    except (OSError, ValueError):
        pass
    manifest.unlink(missing_ok=True)
    (root / "spec.json").unlink(missing_ok=True)  # an older layout's stamp: it named the spec only
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", spec.train), ("test", spec.test)):
        with replacing_dir(paths[split], overwrite=True, option="--data") as staging:
            _write_split(spec, split, n, staging)
    partial = root / f".{MANIFEST}.partial"
    partial.write_text(json.dumps({"spec": asdict(spec), "generator": generator, "hashes": data_digest(paths)},
                                  indent=1))
    os.replace(partial, manifest)
    return paths


def read_samples(folder: Path) -> Iterator[dict]:
    """The samples of a shard folder as the shards hold them, in shard and member order: ``{"key": str,
    "jpg": bytes, "json": dict}`` (what the data module reads; used to score the held-out set)."""
    shards = sorted(Path(folder).glob("*.tar"))
    if not shards:
        raise RunError(f"{folder}: no shards")
    for shard in shards:
        sample: dict = {}
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if sample and key != sample["key"]:
                    yield sample
                    sample = {}
                data = tar.extractfile(member).read()
                sample.update(key=key, **{ext: json.loads(data) if ext == "json" else data})
        if sample:
            yield sample


def cut_by_slices(meta: dict, policy: SliceGridPolicy = SBE_SLICES) -> bool:
    """Whether an SBE slice boundary runs through the asked shape (its row band or its column band)."""
    height, width = meta["height"], meta["width"]
    rows, cols = policy.grid(height, width)

    def crosses(index: int, cells: int, side: int, slices: int) -> bool:
        size = side / cells
        lo, hi = (index + SHAPE_PAD) * size, (index + 1 - SHAPE_PAD) * size
        return any(lo < k * side / slices < hi for k in range(1, slices))

    return crosses(meta["row"] - 1, meta["rows"], height, rows) or crosses(meta["col"] - 1, meta["cols"], width, cols)


def cut_mask(spec: PilotData) -> np.ndarray:
    """[grid, grid] bool: cells cut by a slice boundary (for a fixed image size; the first sample's size)."""
    side = spec.min_side
    return np.array([[cut_by_slices({"height": side, "width": side, "rows": spec.grid, "cols": spec.grid,
                                     "row": r + 1, "col": c + 1}) for c in range(spec.grid)] for r in range(spec.grid)])


def pilot_configs(name: str) -> list[Path]:
    """Config files of one pilot arm: stage 3, the tiny overlay, the pilot's shared settings, the arm's overlay."""
    return [CONFIGS / "stage3.yaml", CONFIGS / "tiny.yaml", CONFIGS / "pilot" / "base.yaml",
            CONFIGS / "pilot" / f"{name}.yaml"]


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) pairs a run logged to TensorBoard, in step order (empty when none were logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(run_dir).is_dir():
        return []
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "train/loss" not in events.Tags().get("scalars", []):
        return []
    return sorted((e.step, e.value) for e in events.Scalars("train/loss"))


def learned_at(curve: list[tuple[int, float]], threshold: float = LEARNED_LOSS, window: int = 3) -> int | None:
    """First step from which ``window`` consecutive logged losses stay under ``threshold`` (None: never)."""
    for i in range(len(curve) - window + 1):
        if all(value < threshold for _, value in curve[i : i + window]):
            return curve[i][0]
    return None


def data_policy(model) -> ResolutionPolicy | SliceGridPolicy:
    """The resolution policy the data module used in training: the model's multiple, the data's pixel budget."""
    policy = model.policy
    if isinstance(policy, ResolutionPolicy):
        return ResolutionPolicy(multiple=policy.multiple, **PIXEL_BUDGET)
    return policy


def input_size(model, side: int) -> tuple[int, int]:
    """(height, width) a ``side`` px square is resized to in training."""
    return data_policy(model).target_size(side, side)


def image_tokens(model, side: int) -> int:
    return int(model.num_image_tokens(*input_size(model, side)))


def cost(model, side: int) -> dict:
    """Encoder settings, input size, visual tokens and encoder FLOPs (meta device) at a ``side`` px square."""
    cfg = model.encoder.cfg
    height, width = input_size(model, side)
    kwargs = {"patch_size": cfg.patch_size, "wtc_layers": tuple(cfg.wtc_layers), "wtc_pooling": cfg.wtc_pooling}
    flops = encoder_flops(model.config.encoder, int(height), int(width), **kwargs)
    return {"pooling": cfg.wtc_pooling if cfg.wtc_layers else "none",
            "wtc_layers": "-".join(map(str, cfg.wtc_layers)) or "none", "patch": cfg.patch_size,
            "input": f"{height}x{width}", "image_tokens": image_tokens(model, side), "encoder_gflops": flops / 1e9}


@torch.no_grad()
def evaluate(model, test_dir: Path, grid: int, name: str) -> tuple[VQAMetrics, list[dict]]:
    """Greedy answers to the held-out questions in the shards of ``test_dir`` (the bytes the run's data hash
    names): the metric and one record per question."""
    model.eval()
    policy = data_policy(model)
    metric = VQAMetrics(tasks=("shapegrid",), max_grid=(grid, grid))
    records = []
    for i, sample in enumerate(tqdm(list(read_samples(test_dir)), desc=f"pilot eval {name}", leave=False)):
        turns, meta = sample["json"]["conversations"], sample["json"]["meta"]
        question, answer = turns[0]["value"], turns[1]["value"]
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        prediction = model.generate(preprocess(image, policy), question, max_new_tokens=EVAL_TOKENS).text
        metric.update([prediction], [meta])
        records.append({"index": i, "row": meta["row"], "col": meta["col"], "cut": cut_by_slices(meta),
                        "answer": answer, "prediction": prediction, "hit": bool(exact_match(prediction, answer))})
    return metric, records


def score(records: list[dict], grid: int) -> dict:
    """Correct / total overall, on cut and uncut cells and per cell, from the answer records."""
    correct, total = np.zeros((grid, grid), dtype=int), np.zeros((grid, grid), dtype=int)
    for r in records:
        total[r["row"] - 1, r["col"] - 1] += 1
        correct[r["row"] - 1, r["col"] - 1] += r["hit"]
    out = {"correct": int(correct.sum()), "questions": len(records)}
    for part, flag in (("cut", True), ("uncut", False)):
        chosen = [r for r in records if r["cut"] == flag]
        out.update({f"{part}_correct": sum(r["hit"] for r in chosen), f"{part}_total": len(chosen)})
    answers = Counter(r["prediction"].strip() for r in records)
    top, count = answers.most_common(1)[0] if answers else ("", 0)
    return {**out, "cell_correct": correct.tolist(), "cell_total": total.tolist(), "distinct_answers": len(answers),
            "top_answer": top, "top_answer_share": count / max(1, len(records))}


def trained_steps(run_dir: Path) -> int | None:
    """The global step of a run's final checkpoint (``checkpoints/last.ckpt``); None when it has none."""
    try:
        checkpoint = torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True,
                                mmap=True)
        return int(checkpoint["global_step"])
    except Exception:  # missing, unreadable or not a Lightning checkpoint: no final step to name
        return None


def execute(item: tuple[RunJob, bool, dict, dict, dict]) -> dict:
    """Train (or, when reused, only load) one run and score it; writes and returns its ``result.json`` record.

    ``item``: (job, train, code version, resolved settings, provenance: the data, tokenizer and platform hashes
    and the platform), all decided by the parent process."""
    from llava_uhd.mllm import LlavaUHD

    job, train, version, settings, found = item
    if job.threads:
        torch.set_num_threads(job.threads)
    run_dir = Path(job.run_dir)
    started = time.perf_counter()
    if train:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh log: no stale TensorBoard events mixed into the curve
        launch_fit(job)
        train_s = time.perf_counter() - started
        steps, previous = trained_steps(run_dir), {}
    else:
        previous = read_record(run_dir) or {}
        train_s, steps = previous["train_s"], previous["trained_steps"]
    export = run_dir / "export"
    if not export.is_dir():
        raise RunError(f"run {job.name} seed {job.seed}: no exported model in {export}")
    model = LlavaUHD.from_pretrained(str(export))
    spec = PilotData(**job.spec)
    eval_start = time.perf_counter()
    metric, records = evaluate(model, Path(job.data["test"]), spec.grid, f"{job.name} seed {job.seed}")
    values = metric.compute()
    data = data_digest(job.data)
    if data["data_hash"] != found["data_hash"]:
        raise RunError(f"run {job.name} seed {job.seed}: the shards in {Path(job.data['train']).parent} changed "
                       f"while it ran (data hash {found['data_hash']} before, {data['data_hash']} after)")
    curve = loss_curve(run_dir)
    answers = [r["prediction"] for r in records]
    (run_dir / "answers.json").write_text(json.dumps(records, indent=0))
    record = {
        "name": job.name, **job.labels, "task": spec.question, "seed": job.seed, "steps": job.steps,
        "trained_steps": steps, "complete": steps == job.steps, "threads": job.threads, **version,
        "config_hash": config_hash(settings), "data_hash": data["data_hash"],
        "data_hashes": {"train": data["train"], "test": data["test"], "generator": found["generator"]},
        "tokenizer_hash": found["tokenizer_hash"], "platform_hash": found["platform_hash"],
        "export_sha": sha256_file(export / "model.safetensors"), "reused": not train,
        "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - eval_start, 1),
        "encoder": model.config.encoder, "projector": model.config.projector,
        "image_tokens": image_tokens(model, spec.min_side), "learned_at_step": learned_at(curve),
        "accuracy": float(values["accuracy"]), **score(records, spec.grid),
        "answers_sha": hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:16], "loss_curve": curve,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "platform": found["platform"], "eval_torch_threads": torch.get_num_threads(),
        "settings": settings, "job": job_dict(job),
    }
    if previous and previous.get("export_sha") != record["export_sha"]:
        raise RunError(f"run {job.name} seed {job.seed}: its exported model changed since it was checked for reuse")
    if job.flops:
        record.update(cost(model, spec.min_side))
    if not record["complete"]:
        print(f"note: run {job.name} seed {job.seed} stopped at step {steps} of {job.steps}: recorded as not "
              "complete (never re-scored by --reuse)", file=sys.stderr)
    (run_dir / "result.json").write_text(json.dumps(record, indent=1))
    return record


def provenance(job: RunJob, cache: dict) -> dict:
    """What a run's figures depend on beside code and settings, as the parent process finds it now: the data's
    hashes, the generator's, the tokenizer's and the platform's (``cache`` keeps what jobs share)."""
    key = (job.data["train"], job.data["test"])
    if key not in cache:
        cache[key] = data_digest(job.data)
    if job.tokenizer not in cache:
        cache[job.tokenizer] = folder_digest(Path(job.tokenizer))
    if "platform" not in cache:
        info = platform_info()
        cache["platform"] = info
        cache["platform_hash"] = platform_hash(info)
        cache["generator"] = generator_digest()
    return {"data_hash": cache[key]["data_hash"], "tokenizer_hash": cache[job.tokenizer],
            "platform_hash": cache["platform_hash"], "platform": cache["platform"], "generator": cache["generator"]}


def schedule(jobs: list[RunJob], reuse: bool, locks: ExitStack) -> list[tuple[RunJob, bool, dict, dict, dict]]:
    """Hold every job's run folder, then decide per job whether to train or re-score (``--reuse``), printing
    every decision and its reason."""
    for job in jobs:
        locks.enter_context(hold(Path(job.run_dir), "run folder"))
    version, cache = code_version(), {}
    items, reused = [], 0
    for job in jobs:
        settings, found = resolved_settings(job), provenance(job, cache)
        train = True
        if reuse:
            run_dir = Path(job.run_dir)
            expected = {"config_hash": config_hash(settings), "steps": job.steps, "data_hash": found["data_hash"],
                        "tokenizer_hash": found["tokenizer_hash"], "platform_hash": found["platform_hash"],
                        "export_sha": sha256_file(run_dir / "export" / "model.safetensors")}
            ok, why = reuse_decision(read_record(run_dir), version, expected)
            if ok and not (run_dir / "export").is_dir():
                ok, why = False, "no exported model"
            train, reused = not ok, reused + ok
            print(f"reuse {job.name} seed {job.seed}: {'reused' if ok else 'refused, training again'} ({why})",
                  file=sys.stderr)
        items.append((job, train, version, settings, found))
    if reuse:
        print(f"reuse: {reused} of {len(jobs)} runs re-scored, {len(jobs) - reused} trained", file=sys.stderr)
    if version["dirty"]:
        print(f"note: uncommitted code changes (diff {version['diff_sha']}) are recorded with every run",
              file=sys.stderr)
    return items


def run_jobs(jobs: list[RunJob], reuse: bool, parallel: int, locks: ExitStack) -> list[dict]:
    """Every job trained or re-scored, ``parallel`` at a time; records in job order. The run folders stay held
    in ``locks`` (released by its owner)."""
    env = kernel_env(jobs[0].kernels) if jobs else {}
    return run_pool(execute, schedule(jobs, reuse, locks), parallel, desc="runs", env=env)


def seed_list(values: list[int]) -> list[int]:
    """``--seeds``: one number N means seeds 0..N-1, several numbers are the seeds themselves (duplicates dropped)."""
    if len(values) == 1:
        return list(range(values[0]))
    return list(dict.fromkeys(values))


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """Data, seeds, parallelism and run options shared by ``bench pilot`` and ``bench ablate``."""
    parser.add_argument("--task", "--question", nargs="+", choices=PILOT_QUESTIONS, default=[PilotData.question],
                        dest="tasks", help="pilot task(s); each gets its own outputs")
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, default=[1], metavar="S",
                        help="N (seeds 0..N-1) or a list of seeds, e.g. --seeds 0 1 2 (one seed k: --seeds k k)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs trained side by side (processes)")
    parser.add_argument("--threads", type=non_negative_int, default=1,
                        help="torch threads per run (0: torch's default); 1 is steadier on a shared CPU")
    parser.add_argument("--data", default="data/pilot", help="where the generated shards go (per task and seed)")
    parser.add_argument("--tokenizer", default="data/tiny/tokenizer", help="tiny tokenizer dir (built if missing)")
    parser.add_argument("--grid", type=positive_int, default=PilotData.grid)
    parser.add_argument("--min-side", type=positive_int, default=PilotData.min_side)
    parser.add_argument("--max-side", type=positive_int, default=PilotData.max_side)
    parser.add_argument("--train-samples", type=positive_int, default=PilotData.train)
    parser.add_argument("--test-samples", type=positive_int, default=PilotData.test)
    parser.add_argument("--reuse", action="store_true",
                        help="re-score earlier runs whose recorded commit and config hash match instead of training")
    parser.add_argument("--fit-arg", action="append", default=[], metavar="ARG",
                        help="extra fit argument (repeatable), e.g. --fit-arg=--trainer.log_every_n_steps=2")


def check(args: argparse.Namespace) -> str | None:
    """A problem with the shared options, as one message (None: fine)."""
    if len(args.seeds) == 1 and args.seeds[0] == 0:
        return "--seeds: 0 seeds means no runs; give N >= 1 or a list of seeds"
    if args.min_side > args.max_side:
        return f"--min-side {args.min_side} is larger than --max-side {args.max_side}"
    if args.min_side < 16:
        return f"--min-side {args.min_side}: images need at least 16 px"
    if args.jobs * max(1, args.threads) > (os.cpu_count() or 1):
        print(f"note: --jobs {args.jobs} x --threads {max(1, args.threads)} exceeds {os.cpu_count()} CPUs",
              file=sys.stderr)
    return None


def prepare(args: argparse.Namespace, task: str, locks: ExitStack) -> dict[int, tuple[PilotData, dict[str, str]]]:
    """Per seed: the pilot data spec (data seed = run seed) and its shards (written or kept, see
    :func:`write_pilot_data`), each data folder held in ``locks``; the tokenizer built if missing."""
    from llava_uhd.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(args.tokenizer)  # once here, not in two runs at the same time
    base = PilotData(args.grid, args.min_side, args.max_side, args.train_samples, args.test_samples, question=task)
    out = {}
    for seed in seed_list(args.seeds):
        spec = replace(base, seed=seed)
        root = locks.enter_context(hold(Path(args.data) / task / f"seed{seed}", "data folder"))
        out[seed] = (spec, write_pilot_data(spec, root))
    return out


def make_jobs(args: argparse.Namespace, names: list[str], configs, data: dict, runs: Path,
              labels=lambda name: {}, flops: bool = False, prealign=lambda name: (), prealign_steps: int = 0,
              ) -> list[RunJob]:
    """One job per (seed, name); seed-major so that side-by-side runs start with different arms. Every job uses
    the pinned CPU kernel set where this CPU runs it (``llava_uhd.bench.runs.KERNELS``). ``prealign(name)``: the
    config files of a pre-alignment run of ``prealign_steps`` trained before it (empty: none)."""
    kernels = platform_info()["kernels"]
    if kernels != "avx2":
        print("note: this CPU cannot run the pinned AVX2 kernel set; runs use torch's own kernels, and their numbers "
              "hold for this kind of CPU only (their records say so)", file=sys.stderr)
    return [RunJob(name=name, configs=tuple(str(c) for c in configs(name)), seed=seed, steps=args.steps,
                   threads=args.threads, spec=asdict(spec), data=paths, run_dir=str(runs / name / f"seed{seed}"),
                   tokenizer=args.tokenizer, extra=tuple(args.fit_arg), stream=args.jobs == 1, flops=flops,
                   labels=labels(name), kernels=kernels,
                   prealign_configs=tuple(str(c) for c in prealign(name)),
                   prealign_steps=prealign_steps if prealign(name) else 0)
            for seed, (spec, paths) in data.items() for name in names]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=600, help="training steps per run")
    parser.add_argument("--out", default="docs/pilot", help="where the tables and figures go")
    parser.add_argument("--runs", default="runs/pilot", help="where the trained runs go (per task, arm and seed)")
    parser.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    add_shared_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from llava_uhd.bench.report import write_pilot

    problem = check(args)
    if problem:
        print(f"bench pilot: {problem}", file=sys.stderr)
        return 2
    try:
        for task in args.tasks:
            with ExitStack() as locks:
                started = time.perf_counter()
                data = prepare(args, task, locks)
                jobs = make_jobs(args, list(args.encoders), pilot_configs, data, Path(args.runs) / task)
                records = run_jobs(jobs, args.reuse, args.jobs, locks)
                spec = next(iter(data.values()))[0]
                info = {"command": args.command_line, "task": task,
                        "steps": args.steps, "seeds": list(data), "jobs": args.jobs, "threads": args.threads,
                        "data": asdict(spec), "chance": chance(spec),
                        "total_s": round(time.perf_counter() - started, 1)}
                write_pilot(Path(args.out), f"pilot_{task}", records, cut_mask(spec), info, LABELS)
    except (RunError, OSError) as err:
        print(f"bench pilot: {err}", file=sys.stderr)
        return 1
    return 0
