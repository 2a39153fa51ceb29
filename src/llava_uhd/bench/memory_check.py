"""``python -m llava_uhd.bench memory --check docs/memory``: the planner's answer against what a run really takes.

Small configs (a 39M-parameter Qwen2-style LLM and the tiny ViT-UHD, float32, batches of 4 images and 2048 LLM
tokens) train two steps on the CPU in a fresh process each: full fine-tune, LoRA and QLoRA (bitsandbytes' CPU NF4),
with and without activation checkpointing. Measured: the process's peak resident memory over the two steps
(``VmHWM``, reset just before them by writing 5 to ``/proc/self/clear_refs``) less its resident memory before the
model was built, with glibc returning every freed block of 64 KiB or more (``MALLOC_MMAP_THRESHOLD_``), so that
resident memory follows live tensors as a GPU allocator's peak does. Predicted: the planner on the same settings.
Writes ``memory.csv``, ``memory.png`` and the table of ``README.md`` (between its markers) into the folder.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

LLM = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12,
       "num_key_value_heads": 4}
DATA = {"max_pixels": 320 * 320, "min_pixels": 40 * 40, "batch_token_budget": 256, "max_batch_size": 4,
        "max_length": 512}
POINTS = [(mode, ckpt) for mode in ("full", "lora", "qlora") for ckpt in (False, True)]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "apply_to": ["llm"]}
TOLERANCE = 0.15
BEGIN, END = "<!-- memory-check:begin -->", "<!-- memory-check:end -->"
MIB = 1024**2


def overlay(tokenizer_dir: str, folder: Path) -> Path:
    """The small config as a training overlay (what the planner reads, as for any run)."""
    config = {"trainer": {"precision": "32-true"},
              "model": {"class_path": "llava_uhd.stages.SFT", "init_args": {
                  "encoder": "vit_uhd_tiny_patch10_siglip", "projector": "mlp", "llm": LLM, "tokenizer": tokenizer_dir,
                  "init_from": None, "trainable": ["wtc", "projector"], "lora": LORA}},
              "data": {"init_args": DATA}}
    path = folder / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(config: str, mode: str, checkpointing: bool) -> dict:
    """In a fresh process: build the small model of ``mode``, train two steps, return the peak over them."""
    import torch

    from llava_uhd.bench.memory_plan import read_settings, run_shape

    torch.set_num_threads(1)
    torch.manual_seed(0)
    settings = read_settings([config])
    shape = run_shape(settings)
    tokenizer = str(Path(config).parent / "tok")
    # the same run on a one-layer LLM and one small image first: every library, module and kernel the step uses is
    # loaded before the baseline, so the difference is the run's own memory
    small = dataclasses.replace(shape, model={**shape.model, "llm": {**LLM, "num_hidden_layers": 1,
                                                                       "hidden_size": 96, "intermediate_size": 64,
                                                                       "num_attention_heads": 12}})
    _steps(*_setup(small, mode, checkpointing, tokenizer, images=1))
    gc.collect()
    baseline = _rss("VmRSS")
    model, ids, pixels, optimizer = _setup(shape, mode, checkpointing, tokenizer)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    _steps(model, ids, pixels, optimizer)
    return {"peak": _rss("VmHWM") - baseline, "tokens": int(ids.numel())}


def _setup(shape, mode: str, checkpointing: bool, tokenizer: str, images: int | None = None):
    import torch

    from llava_uhd.bench.memory_plan import prepared_model

    model, _ = prepared_model(shape, mode, checkpointing, tokenizer, "cpu")
    model.train()
    per_image = model.num_image_tokens(shape.side, shape.side)
    images = images or max(1, min(DATA["max_batch_size"], DATA["batch_token_budget"] // per_image))
    ids = torch.full((images, max(shape.seq_len, per_image + 1)), 5, dtype=torch.long)
    ids[:, :per_image] = model.image_token_id
    pixels = torch.rand(images, 3, shape.side, shape.side)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=False)
    return model, ids, pixels, optimizer


def _steps(model, ids, pixels, optimizer) -> None:
    for _ in range(2):
        model(input_ids=ids, labels=ids, pixel_values=pixels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure(config: Path, mode: str, checkpointing: bool) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    code = ("import json, sys; from llava_uhd.bench.memory_check import worker; "
            f"print('RESULT', json.dumps(worker({str(config)!r}, {mode!r}, {checkpointing!r})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"measuring {mode} (checkpointing {checkpointing}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def check(out: str | Path) -> list[dict]:
    from llava_uhd.bench.memory_plan import per_gpu, plan
    from llava_uhd.tokenizer import build_tiny_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer(Path(tmp) / "tok")
        config = overlay(str(Path(tmp) / "tok"), Path(tmp))
        _, traces = plan([str(config)])
        predicted = {(t.mode, t.checkpointing): per_gpu(t, 1, "ddp") for t in traces}
        for mode, ckpt in POINTS:
            measured = measure(config, mode, ckpt)
            e = predicted[(mode, ckpt)]
            rows.append({"mode": mode, "checkpointing": ckpt, "tokens": measured["tokens"],
                         "weights_mib": round(e.weights / MIB, 1), "gradients_mib": round(e.gradients / MIB, 1),
                         "optimizer_mib": round(e.optimizer / MIB, 1), "activations_mib": round(e.activations / MIB, 1),
                         "predicted_mib": round(e.total / MIB, 1), "measured_mib": round(measured["peak"] / MIB, 1),
                         "error_pct": round(100 * (e.total - measured["peak"]) / measured["peak"], 1)})
            print(rows[-1], flush=True)
    write(out, rows)
    return rows


def write(out: Path, rows: list[dict]) -> None:
    with (out / "memory.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{r['mode']}\n{'ckpt' if r['checkpointing'] else 'no ckpt'}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["predicted_mib"] for r in rows], 0.4, label="planner (meta device)")
    ax.bar([x + 0.2 for x in xs], [r["measured_mib"] for r in rows], 0.4, label="measured (CPU peak RSS)")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['error_pct']:+.0f}%", (x, max(r["predicted_mib"], r["measured_mib"])), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("peak memory of a training step (MiB)")
    ax.set_title("Memory planner vs a real run (39M LLM + tiny ViT-UHD, 2048 tokens, float32)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)
    header = ("| mode | act. ckpt | weights | gradients | optimizer | activations | predicted | measured | error |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    body = "".join(f"| {r['mode']} | {'on' if r['checkpointing'] else 'off'} | {r['weights_mib']} | "
                   f"{r['gradients_mib']} | {r['optimizer_mib']} | {r['activations_mib']} | {r['predicted_mib']} | "
                   f"{r['measured_mib']} | {r['error_pct']:+.1f}% |\n" for r in rows)
    readme = out / "README.md"
    text = readme.read_text() if readme.is_file() else f"# Memory planner\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\nMiB; written by `python -m llava_uhd.bench memory --check docs/memory`.\n\n" + \
            header + body + END + rest.split(END, 1)[1]
        readme.write_text(text)
