"""ThroughputLogger logs positive rates; ExportModel writes a folder the next stage starts from; JSONL predictions."""

import json

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks import ExportModel, JSONLPredictionWriter, ThroughputLogger
from callbacks.export import copy_with_state
from callbacks.throughput import batch_counts
from llava_uhd.mllm import LlavaUHD
from llava_uhd.stages import PreAlignment, Pretrain

from .conftest import HIGH_LR


def test_batch_counts():
    batch = {"pixel_values": torch.zeros(2, 3, 40, 40, dtype=torch.uint8),
             "input_ids": torch.tensor([[5, 7, 7, 1], [7, 2, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    assert batch_counts(batch, image_token_id=7) == (2.0, 3.0, 6.0, 2.0)
    text_only = {"pixel_values": [], "input_ids": torch.tensor([[1, 2]])}
    assert batch_counts(text_only, image_token_id=7) == (0.0, 0.0, 2.0, 1.0)


def test_throughput_logger_logs_positive_rates(make_module, fit, tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    throughput = ThroughputLogger(window=2)
    fit(make_module(PreAlignment), [throughput], max_steps=4, logger=logger)
    names = ("images", "visual_tokens", "llm_tokens", "samples")
    assert all(throughput.metrics[f"throughput/{n}_per_s"] > 0 for n in names)
    assert throughput.metrics["throughput/step_s"] > 0
    logger.save()
    rows = [line.split(",") for line in (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("throughput/visual_tokens_per_s")
    logged = [float(r[column]) for r in rows[1:] if r[column]]
    assert len(logged) == 2 and all(v > 0 for v in logged)  # steps 2 and 4


def test_export_is_loadable_and_the_next_stage_starts_from_it(make_module, fit, tmp_path):
    module = make_module(PreAlignment, lr=HIGH_LR)
    export = ExportModel()
    fit(module, [export], max_steps=2)
    assert export.path == tmp_path / "export" and (export.path / "model.safetensors").is_file()
    trained = {k: v.detach() for k, v in module.model.state_dict().items()}
    loaded = LlavaUHD.from_pretrained(export.path)
    nxt = make_module(Pretrain, init_from=str(export.path))
    for state in (loaded.state_dict(), nxt.model.state_dict()):
        assert state.keys() == trained.keys()
        assert all(torch.equal(state[k], trained[k]) for k in trained)


def test_copy_with_state_rebuilds_from_a_full_state_dict(make_module):
    """The FSDP2 export path (meta-device rebuild + assign), run on a plain model's state dict."""
    model = make_module(PreAlignment).model
    copy = copy_with_state(model, {k: v.detach().clone() for k, v in model.state_dict().items()})
    assert copy.llm.get_input_embeddings().weight is copy.llm.get_output_embeddings().weight  # ties kept
    for (name, a), (_, b) in zip(model.state_dict(keep_vars=True).items(), copy.state_dict(keep_vars=True).items()):
        assert torch.equal(a, b) and b.device.type == "cpu", name
    for (name, a), (_, b) in zip(model.named_buffers(), copy.named_buffers()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(copy.llm(ids).logits, model.llm(ids).logits)


def test_jsonl_writer_writes_one_valid_line_per_sample(make_module, make_datamodule, data_dir, tmp_path):
    module = make_module(PreAlignment, max_new_tokens=3)
    writer = JSONLPredictionWriter(tmp_path / "out" / "preds.jsonl")
    dm = make_datamodule(test_shards=str(data_dir / "train"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer],
                        limit_predict_batches=2)
    trainer.predict(module, datamodule=dm, return_predictions=False)
    lines = (tmp_path / "out" / "preds.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == writer.records > 0
    for record in records:
        assert {"key", "prompt", "answer", "ttft_ms", "encoder_ms"} <= record.keys()
        assert isinstance(record["answer"], str) and record["ttft_ms"] > 0
