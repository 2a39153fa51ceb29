"""A benchmark TSV as the validation set (``--data.val_tsv``): the torchmetrics scores equal ``eval score``."""

import json

import lightning as L
import pytest
import torch

from datamodules import UHDDataModule
from datamodules.tsv import TSVRows
from llava_uhd.eval.report import score_predictions
from llava_uhd.eval.run import run_benchmark
from llava_uhd.eval.tsv import read_benchmark
from llava_uhd.metrics import BenchmarkScores
from llava_uhd.stages import SFT
from llava_uhd.tokenizer import build_tiny_tokenizer

from .conftest import b64_image, write_predictions, write_tsv

POPE_CASES = [("yes", "Yes"), ("yes", "No"), ("no", "no."), ("no", "Yes, there is."),
              ("yes", "yes"), ("no", "I am not sure"), ("yes", "Yes and no"), ("no", "NO")]


def pope_tsv(tmp_path):
    rows = [{"index": i, "image": b64_image(i) if i % 2 == 0 else str(i - 1), "question": "Is there a dog?",
             "answer": a, "category": "adversarial" if i < 4 else "random"} for i, (a, _) in enumerate(POPE_CASES)]
    return write_tsv(tmp_path / "POPE.tsv", rows)


def test_metric_equals_cli_scores_and_drops_repeats(tmp_path):
    path = pope_tsv(tmp_path)
    bench = read_benchmark(path)
    predictions = {i: p for i, (_, p) in enumerate(POPE_CASES)}
    cli = score_predictions(bench, write_predictions(tmp_path / "p.jsonl", predictions))
    metric = BenchmarkScores(bench)
    metric.update([predictions[i] for i in range(5)], [str(i) for i in range(5)])
    metric.update([predictions[i] for i in (4, 5, 6, 7)], ["4", "5", "6", "7"])  # row 4 again: a rank's padding
    values = metric.compute()
    assert metric.headline == "f1"
    for name, value in cli["overall"].items():
        assert float(values[name]) == pytest.approx(value)  # accuracy 50, precision 66.7, recall 50, F1 57.1
    assert float(values["f1/adversarial"]) == pytest.approx(cli["per_category"]["adversarial"]["f1"])
    assert float(values["count"]) == 8 and float(values["unparseable"]) == 2
    with pytest.raises(KeyError, match="no row with index '99'"):
        metric.update(["yes"], ["99"])


def test_ranks_take_equal_shares():
    class Bench:
        rows = [{"index": str(i)} for i in range(5)]

    shares = [TSVRows(Bench(), None, None, None, 64, rank=r, world_size=2).rows for r in (0, 1)]
    assert [[r["index"] for r in s] for s in shares] == [["0", "2", "4"], ["1", "3", "1"]]


def test_validate_on_a_benchmark_tsv(tmp_path):
    torch.manual_seed(0)
    build_tiny_tokenizer(tmp_path / "tok")
    module = SFT(encoder="vit_uhd_tiny_patch10_siglip", llm={"hidden_size": 64}, tokenizer=str(tmp_path / "tok"),
                 projector="mlp", max_new_tokens=4)
    module.model.config.min_pixels, module.model.config.max_pixels = 40 * 40, 120 * 120
    path = pope_tsv(tmp_path)
    dm = UHDDataModule(val_tsv=str(path), num_workers=0, max_length=1024, min_pixels=40 * 40,
                       max_pixels=120 * 120, max_batch_size=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    logged = trainer.validate(module, datamodule=dm)[0]
    assert torch.isfinite(torch.tensor(logged["val/loss"]))
    assert logged["val/POPE/count"] == 8
    # The same model answering through `eval run` (same prompts, image policy, greedy) scores the same.
    bench = read_benchmark(path)
    run_benchmark(module.model, bench, tmp_path / "out", num_beams=1, max_new_tokens=4, progress=False)
    cli = score_predictions(bench, tmp_path / "out" / "POPE_predictions.jsonl")
    for name, value in cli["overall"].items():
        assert logged[f"val/POPE/{name}"] == pytest.approx(value, abs=1e-4)
    assert logged["val/POPE/unparseable"] == cli["counts"]["unparseable"]
    assert json.loads((tmp_path / "out" / "POPE_run.json").read_text())["answered_now"] == 8
