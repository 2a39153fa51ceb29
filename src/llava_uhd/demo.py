"""``make demo``: the three training stages on tiny models and synthetic ShapeGrid data, on a CPU.

Runs exactly what a user runs, one stage after the other, each starting from the previous stage's
exported model folder::

    python src/main.py fit -c configs/stage1.yaml -c configs/tiny.yaml
    python src/main.py fit -c configs/stage2.yaml -c configs/tiny.yaml --model.init_from <stage 1 export>
    python src/main.py fit -c configs/stage3.yaml -c configs/tiny.yaml --model.init_from <stage 2 export>
    python src/main.py predict -c configs/stage3.yaml -c configs/tiny.yaml --model.init_from <stage 3 export> ...

then prints where the logs and checkpoints are and what the last stage answers on three validation
questions. The models are tiny and train for seconds: the answers show the pipeline works end to end,
not that the model has learned the task. The model is a tiny ViT-UHD with the ``mlp`` projector (the released
model's; ``configs/tiny.yaml``); its stage 3 export is a folder ``python -m llava_uhd.generate --model`` takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "runs" / "tiny"
MODEL = "vit_uhd_tiny_patch10_siglip + mlp projector + tiny Qwen2 (configs/tiny.yaml)"


def newest(pattern: str) -> Path:
    found = sorted(RUNS.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"nothing matches {RUNS / pattern}")
    return found[-1]


def run(args: list[str], steps: int) -> None:
    command = [sys.executable, "src/main.py", *args, "--trainer.max_steps", str(steps)]
    print("\n$ " + " ".join(["python", *command[1:]]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def main(steps: int = 40) -> None:
    start = time.perf_counter()
    export = None
    for stage in (1, 2, 3):
        args = ["fit", "-c", f"configs/stage{stage}.yaml", "-c", "configs/tiny.yaml"]
        if export is not None:
            args += ["--model.init_from", str(export.relative_to(ROOT))]
        run(args, steps)
        export = newest(f"stage{stage}/version_*/export")
    predictions = RUNS / "demo_predictions.jsonl"
    predictions.unlink(missing_ok=True)
    subprocess.run(
        [sys.executable, "src/main.py", "predict", "-c", "configs/stage3.yaml", "-c", "configs/tiny.yaml",
         "--model.init_from", str(export.relative_to(ROOT)),
         "--data.test_shards", "synthetic:shapegrid,n=16,seed=1,min_side=64,max_side=256",
         "--data.max_batch_size", "1", "--trainer.limit_predict_batches", "3", "--trainer.logger", "false",
         "--trainer.default_root_dir", "runs/tiny/predict",
         "--trainer.callbacks+=callbacks.JSONLPredictionWriter",
         f"--trainer.callbacks.output_path={predictions.relative_to(ROOT)}"],
        cwd=ROOT, check=True,
    )
    print(f"\nfinished in {time.perf_counter() - start:.0f} s")
    print("\nlogs (tensorboard --logdir runs/tiny):")
    for stage in (1, 2, 3):
        run_dir = newest(f"stage{stage}/version_*/checkpoints").parent.relative_to(ROOT)
        print(f"  stage {stage}: {run_dir}  checkpoints: {run_dir / 'checkpoints'}  export: {run_dir / 'export'}")
    print(f"\nmodel: {MODEL}; ask it: python -m llava_uhd.generate --model "
          f"{newest('stage3/version_*/export').relative_to(ROOT)} --image IMAGE --prompt QUESTION")
    print("\nstage 3 on three validation questions:")
    for line in predictions.read_text().splitlines()[:3]:
        record = json.loads(line)
        print(f"  Q: {record['prompt']!r}\n     expected {record.get('reference')!r}, answered {record['answer']!r}"
              f" (TTFT {record['ttft_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
