"""LoRA fine-tuning of a tiny release-format folder on real photos: what trains, what is saved, how the adapter
loads (peft's own PeftModel, unmerged, merged), exact resume, and the one-message refusals."""

from __future__ import annotations

import json
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image
from sklearn.datasets import load_sample_image

from callbacks import ExportModel, StageFreeze
from llava_uhd import convert, generate
from llava_uhd.errors import SettingsError
from llava_uhd.lora import MANIFEST_NAME, PARTS_NAME, VISION_DIR, is_adapter
from llava_uhd.mllm import LlavaUHD
from llava_uhd.stages import SFT

from ..helpers.fit import tiny_datamodule

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "apply_to": ["llm", "vit_attention"]}
LR = {"llm": 1e-2, "vit": 1e-2, "wtc": 1e-3, "projector": 1e-3}
STEPS = 8
RATIO_LIMIT = 0.25  # of a full fine-tune's checkpoint; the tiny model's WTC gates (trained whole) weigh a lot


def lora_module(base, **overrides) -> SFT:
    kwargs = dict(init_from=str(base), llm="", trainable=["wtc", "projector"], reinit_wtc_gate=True, lora=LORA,
                  lr=LR, eval_generate=False)
    module = SFT(**{**kwargs, **overrides})
    module.model.config.min_pixels, module.model.config.max_pixels = 40 * 40, 120 * 120  # small CPU steps
    return module


class Record(Callback):
    """Losses per step, and the names of the parameters the optimizer holds."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.optimized: set[str] = set()

    def on_train_start(self, trainer, pl_module) -> None:
        names = {id(p): n for n, p in pl_module.model.named_parameters()}
        self.optimized = {names[id(p)] for g in trainer.optimizers[0].param_groups for p in g["params"]}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(module, shards, root, steps, ckpt_path=None, extra=()):
    record = Record()
    checkpoints = ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=4, save_top_k=-1, save_last=True)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root),
                        callbacks=[StageFreeze(), record, checkpoints, ExportModel(str(root / "export")), *extra])
    trainer.fit(module, tiny_datamodule(shards), ckpt_path=ckpt_path)
    return record


def step_checkpoint(root, step):
    (found,) = (root / "ckpt").glob(f"epoch=*-step={step}.ckpt")
    return found


@pytest.fixture(scope="module")
def run(lora_base, photo_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_run")
    module = lora_module(lora_base)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    record = fit(module, photo_shards, root, STEPS)
    return {"root": root, "module": module, "before": before, "record": record}


def test_the_loss_falls_and_only_adapters_and_chosen_parts_train(run):
    module, before, record = run["module"], run["before"], run["record"]
    losses = record.losses
    assert len(losses) == STEPS and sum(losses[-3:]) < 0.95 * sum(losses[:3]), losses
    named = dict(module.model.named_parameters())
    adapters = {n for n in named if is_adapter(n)}
    assert adapters and all(n.startswith(("llm.", "encoder.blocks.")) for n in adapters)
    chosen = {n for n in named if n.startswith(("projector.", "encoder.wtc."))}
    assert record.optimized == adapters | chosen  # nothing else in the optimizer
    for name, param in named.items():
        if name in adapters | chosen:
            continue
        assert torch.equal(param, before[name]), f"base weight {name} changed"  # bit for bit
    assert all(not torch.equal(named[n], before[n]) for n in adapters if ".lora_B." in n)


def test_the_checkpoint_holds_only_what_trains(run, lora_base, photo_shards, tmp_path):
    module = run["module"]
    last = run["root"] / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    trained = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    params = {f"model.{n}" for n, _ in module.model.named_parameters()}
    assert trained <= set(state) and not (set(state) & params) - trained
    # the same model fully fine-tuned for one step: its checkpoint (weights + AdamW state of every parameter)
    full = SFT(init_from=str(lora_base), llm="", reinit_wtc_gate=True, lr=LR, eval_generate=False)
    full.model.config.min_pixels, full.model.config.max_pixels = 40 * 40, 120 * 120
    fit(full, photo_shards, tmp_path, 1)
    full_size, size = (tmp_path / "ckpt" / "last.ckpt").stat().st_size, last.stat().st_size
    weights = sum(p.numel() * p.element_size() for p in full.model.parameters())
    print(f"LoRA checkpoint {size} B: {size / full_size:.1%} of a full fine-tune's ({full_size} B), "
          f"{size / weights:.1%} of the weights alone ({weights} B)")
    assert size < RATIO_LIMIT * full_size


def test_resume_from_a_lora_checkpoint_is_exact(run, lora_base, photo_shards, tmp_path):
    """Steps 5-8 resumed from the step-4 checkpoint (base rebuilt from the settings) end where the run did."""
    module = lora_module(lora_base)
    record = fit(module, photo_shards, tmp_path, STEPS, ckpt_path=str(step_checkpoint(run["root"], 4)))
    assert record.losses == run["record"].losses[4:]
    done = dict(run["module"].model.named_parameters())
    for name, param in module.model.named_parameters():
        assert torch.equal(param, done[name]), name


def test_a_checkpoint_of_other_lora_settings_is_refused(run, lora_base, photo_shards, tmp_path):
    module = lora_module(lora_base, lora={**LORA, "apply_to": ["llm"]})
    with pytest.raises(SettingsError, match="does not match this run's LoRA settings"):
        fit(module, photo_shards, tmp_path, STEPS, ckpt_path=str(run["root"] / "ckpt" / "last.ckpt"))


def test_the_export_is_peft_format_and_loads_onto_the_base_llm(run, lora_base):
    from peft import PeftModel

    export = run["root"] / "export"
    assert {p.name for p in export.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", PARTS_NAME,
                                                  MANIFEST_NAME, VISION_DIR}
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(lora_base.resolve())
    base = LlavaUHD.from_pretrained(lora_base).eval()
    peft_llm = PeftModel.from_pretrained(base.llm, str(export)).eval()
    ids = torch.randint(0, 900, (2, 24), generator=torch.Generator().manual_seed(0))
    trained = run["module"].model.eval()
    with torch.no_grad():
        assert torch.equal(peft_llm(input_ids=ids).logits, trained.llm(input_ids=ids).logits)


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(load_sample_image("flower.jpg")).resize((120, 80))


@pytest.fixture(scope="module")
def merged_dir(run, lora_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    assert convert.main(["merge", "--base", str(lora_base), "--adapter", str(run["root"] / "export"),
                         "--out", str(out)]) == 0
    return out


def test_unmerged_and_merged_models_agree(run, lora_base, merged_dir, photo):
    unmerged = LlavaUHD.from_pretrained(lora_base, adapter=run["root"] / "export").eval()
    merged = LlavaUHD.from_pretrained(merged_dir).eval()
    assert not any(is_adapter(n) for n, _ in merged.named_parameters())
    pixels = unmerged.preprocess(photo)
    ids = torch.tensor([unmerged.build_prompt_ids("What is in the photo?", [tuple(pixels.shape[-2:])])])
    with torch.no_grad():
        a = unmerged(input_ids=ids, pixel_values=[pixels]).logits
        b = merged(input_ids=ids, pixel_values=[pixels]).logits
        c = run["module"].model.eval()(input_ids=ids, pixel_values=[pixels]).logits
    assert torch.equal(a, c)  # the export round-trips exactly
    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()  # merging re-rounds the sums in fp32
    answers = [m.generate(photo, "What is in the photo?", max_new_tokens=6).text for m in (unmerged, merged)]
    assert answers[0] == answers[1]


def test_generate_takes_the_adapter(run, lora_base, merged_dir, tmp_path, capsys):
    image = tmp_path / "flower.jpg"
    Image.fromarray(load_sample_image("flower.jpg")).resize((120, 80)).save(image)
    common = ["--image", str(image), "--prompt", "What is in the photo?", "--max-new-tokens", "4", "--json"]
    assert generate.main(["--model", str(lora_base), "--adapter", str(run["root"] / "export"), *common]) == 0
    unmerged = json.loads(capsys.readouterr().out)
    assert generate.main(["--model", str(merged_dir), *common]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == unmerged["answer"]


def test_an_adapter_on_another_base_is_refused(run, other_base, tmp_path, capsys):
    export = str(run["root"] / "export")
    with pytest.raises(SettingsError, match="trained on another base"):
        LlavaUHD.from_pretrained(other_base, adapter=export)
    assert convert.main(["merge", "--base", str(other_base), "--adapter", export, "--out", str(tmp_path / "m")]) == 1
    assert "trained on another base" in capsys.readouterr().err
    image = tmp_path / "x.jpg"
    Image.fromarray(load_sample_image("china.jpg")).save(image)
    assert generate.main(["--model", str(other_base), "--adapter", export, "--image", str(image), "--prompt",
                          "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --adapter:") and "another base" in err and "Traceback" not in err


@pytest.mark.parametrize(("lora", "message"), [
    ({"r": 0}, "model.lora.r: a positive integer rank"),
    ({"r": -2}, "model.lora.r: a positive integer rank"),
    ({"r": 4, "target_modules": ["q_prj"]}, "model.lora.target_modules: no linear layer named 'q_prj' (did you mean "
                                            "'q_proj'?)"),
    ({"r": 4, "apply_to": ["vit"]}, "model.lora.apply_to: unknown 'vit'"),
    ({"r": 4, "dropout": 1.5}, "model.lora.dropout"),
    ({"r": 4, "alhpa": 8}, "model.lora: unknown key(s) alhpa (did you mean alpha?)"),
])
def test_bad_settings_are_one_message(lora_base, lora, message):
    with pytest.raises(SettingsError) as err:
        SFT(init_from=str(lora_base), llm="", lora=lora)
    assert str(err.value).startswith(message), str(err.value)


def test_lora_needs_a_saved_base(tmp_path):
    with pytest.raises(SettingsError, match="model.lora: LoRA fine-tunes a saved model"):
        SFT(encoder="vit_uhd_tiny_patch10_siglip", llm={"hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1}, tokenizer=str(tmp_path / "tok"), lora={"r": 2})


def test_qlora_without_support_is_refused(lora_base, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(SettingsError, match=r"model.lora.qlora: 4-bit NF4 is not available: bitsandbytes is not "):
        SFT(init_from=str(lora_base), llm="", lora={"r": 2, "qlora": True})


def test_bad_adapter_folders_are_one_message(lora_base, tmp_path, capsys):
    assert convert.main(["merge", "--base", str(lora_base), "--adapter", str(tmp_path / "nope"), "--out",
                         str(tmp_path / "o")]) == 1
    assert "--adapter: no adapter folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingsError, match="is not an adapter folder"):
        LlavaUHD.from_pretrained(lora_base, adapter=tmp_path / "empty")


def test_qlora_trains_adapters_over_a_4bit_llm(lora_base, photo_shards, tmp_path):
    """Where bitsandbytes runs NF4 (its CPU backend here): the LLM's decoder layers are 4-bit, and stay so."""
    from llava_uhd.lora import qlora_refusal

    if qlora_refusal() is not None:
        pytest.skip(f"QLoRA is not available here: {qlora_refusal()}")
    import bitsandbytes as bnb

    module = lora_module(lora_base, lora={**LORA, "apply_to": ["llm"], "qlora": True})
    quantized = {n: m.weight.detach().clone() for n, m in module.model.llm.named_modules()
                 if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 14 and all(w.dtype == torch.uint8 for w in quantized.values())
    # an answer in eval mode first (validation, generation): the 4-bit layers must still train afterwards (on a CPU
    # with AVX512-BF16 bitsandbytes would repack them for inference, and the next training forward would fail)
    photo = Image.fromarray(load_sample_image("china.jpg")).resize((100, 70))
    module.model.eval()
    module.model.generate(photo, "Describe the photo.", max_new_tokens=2)
    module.model.train()
    record = fit(module, photo_shards, tmp_path, 4)
    assert all(is_adapter(n) or n.startswith(("projector.", "encoder.wtc.")) for n in record.optimized)
    layers = dict(module.model.llm.named_modules())
    assert all(torch.equal(layers[n].weight, w) for n, w in quantized.items())
    assert sum(record.losses[-2:]) < sum(record.losses[:2])
    merged = LlavaUHD.from_pretrained(lora_base)  # a QLoRA adapter merges into the full-precision base
    from llava_uhd.lora import merge_adapter

    merge_adapter(merged, tmp_path / "export")
    assert not any(is_adapter(n) for n, _ in merged.named_parameters())


def test_adapters_of_a_frozen_part_train_and_its_base_does_not(lora_base):
    """Stage 2 freezes the LLM: StageFreeze leaves its adapters trainable (and in train mode), the optimizer holds
    them at the LLM's learning rate."""
    from llava_uhd.stages import Pretrain

    module = Pretrain(init_from=str(lora_base), llm="", lora={"r": 2, "dropout": 0.1}, lr={"llm": 1e-4})
    freeze = StageFreeze()
    module.train()
    freeze.setup(None, module, "fit")
    llm = dict(module.model.llm.named_parameters())
    assert all(p.requires_grad == is_adapter(n) for n, p in llm.items())
    q_proj = module.model.llm.model.layers[0].self_attn.q_proj
    assert q_proj.training and q_proj.lora_dropout["default"].training  # adapter dropout stays on
    assert not module.model.llm.model.norm.training  # the frozen base stays in eval mode
    parts, named = module.optimized()
    assert "llm" in parts and {n for n, _ in named if n.startswith("llm.")} == {f"llm.{n}" for n in llm
                                                                                if is_adapter(n)}
