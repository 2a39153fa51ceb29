"""Stage module wiring that the callback and CLI tests do not cover: parts, the data module's binding, reading
``init_from`` weights, and re-initialising the WTC gates."""

import pytest
import torch

from datamodules import UHDDataModule, write_synthetic
from llava_uhd.build import read_weights, reinit_wtc_gates
from llava_uhd.errors import MissingFileError, SettingsError
from llava_uhd.parts import PARTS, part_of
from llava_uhd.stages import SFT


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    write_synthetic("shapegrid", 8, str(root / "train"), seed=0, min_side=64, max_side=300)
    return root


def test_every_parameter_belongs_to_one_named_part(shards):
    module = SFT(encoder="vit_uhd_tiny_patch10_siglip", llm={"hidden_size": 32}, tokenizer=str(shards / "tok"))
    names = [n for n, _ in module.model.named_parameters()]
    parts = {part: [n for n in names if part_of(n) == part] for part in PARTS}
    assert all(parts.values()), "every part has parameters"
    assert sum(len(v) for v in parts.values()) == len(names)
    expected = ["encoder.pos_embed", "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias"]
    assert parts["patch_embed"] == expected
    assert all(n.startswith("encoder.wtc.") for n in parts["wtc"])


@pytest.mark.parametrize("encoder,projector", [("vit_sbe_tiny_patch14_siglip", "merger"),
                                               ("vit_gne_tiny_patch14_siglip", "merger"),
                                               ("vit_uhd_tiny_patch10_siglip", "mlp")])
def test_bound_data_module_expands_images_to_what_the_model_emits(shards, encoder, projector):
    # The data module takes tokenizer, policy and token counter from the model: SBE's slice grid and
    # separators included, so the <|image_pad|> runs always match the visual tokens.
    module = SFT(encoder=encoder, projector=projector, llm={"hidden_size": 32}, tokenizer=str(shards / "tok"))
    dm = UHDDataModule(train_shards=str(shards / "train"), num_workers=0, min_pixels=64 * 64,
                       max_pixels=200 * 200, batch_token_budget=4000, max_length=4096)
    dm.bind_model(module.model)
    batches = list(dm.train_dataloader())
    assert sum(len(b["keys"]) for b in batches) == 8
    for batch in batches:
        sizes = batch["image_sizes"]
        pads = int((batch["input_ids"] == module.model.image_token_id).sum())
        assert pads == sum(module.model.num_image_tokens(h, w) for h, w in sizes)
        loss = module.model(**batch).loss
        assert torch.isfinite(loss)


def test_init_from_weights_are_read_without_unpickling_and_bad_files_are_named(tmp_path):
    weight = torch.ones(2, 2)
    ckpt = tmp_path / "run.ckpt"  # a Lightning checkpoint: the module's model.* tensors, the teacher's left out
    torch.save({"state_dict": {"model.encoder.w": weight, "teacher.w": weight}, "epoch": 0}, ckpt)
    assert list(read_weights(ckpt)) == ["encoder.w"]
    torch.save(weight, tmp_path / "tensor.pt")
    with pytest.raises(SettingsError, match=r"model.init_from: .*tensor.pt holds a Tensor, not a checkpoint"):
        read_weights(tmp_path / "tensor.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        read_weights(tmp_path / "folder")
    with pytest.raises(MissingFileError, match="model.init_from: no checkpoint at"):
        read_weights(tmp_path / "missing.ckpt")


def test_reinit_wtc_gates_resets_every_content_adaptive_gate(shards):
    module = SFT(encoder="vit_uhd_tiny_patch10_siglip", llm={"hidden_size": 32}, tokenizer=str(shards / "tok"))
    gate = module.model.encoder.wtc["2"].fc2.weight
    gate.data.fill_(1.0)
    assert reinit_wtc_gates(module.model) == ["encoder.wtc.2", "encoder.wtc.4"]
    assert not gate.any()  # W2 back to zero: exact average pooling


def test_zero_wtc_gate_builds_the_release_s_dead_gate(shards):
    from llava_uhd.errors import SettingsError
    from llava_uhd.vision.pvc import average_pool_windows

    settings = dict(encoder="vit_uhd_tiny_patch10_siglip", llm={"hidden_size": 32}, tokenizer=str(shards / "tok"))
    module = SFT(**settings, zero_wtc_gate=True)
    wtc = module.model.encoder.wtc["2"]
    assert all(not p.any() for p in wtc.parameters())
    x = torch.randn(2, 16, wtc.dim, requires_grad=True)
    out = wtc(x)
    torch.testing.assert_close(out, average_pool_windows(x), rtol=0, atol=1e-7)
    out.square().sum().backward()
    assert not wtc.fc1.weight.grad.any() and not wtc.fc2.weight.grad.any()  # dead: no gradient reaches W1, W2
    with pytest.raises(SettingsError, match="reinit_wtc_gate and model.zero_wtc_gate: choose one"):
        SFT(**settings, zero_wtc_gate=True, reinit_wtc_gate=True)
    with pytest.raises(SettingsError, match="model.zero_wtc_gate: the encoder has no content-adaptive WTC gate"):
        SFT(**settings, wtc_pooling="avg", zero_wtc_gate=True)


def test_an_optimizer_and_schedule_handed_in_get_the_per_part_groups(shards):
    def sgd(params):
        return torch.optim.SGD(params, lr=9.0, momentum=0.9, weight_decay=0.5)

    def step_lr(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)

    module = SFT(encoder="vit_uhd_tiny_patch10_siglip", llm={"hidden_size": 32}, tokenizer=str(shards / "tok"),
                 lr={"llm": 0.25}, weight_decay=0.1, optimizer=sgd, lr_scheduler=step_lr)
    assert "optimizer" not in module.hparams and "lr_scheduler" not in module.hparams  # checkpoints: plain data
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 3
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["llm"]["lr"] == 0.25 and groups["vit"]["lr"] == SFT.default_lr["vit"]  # the parts' rates win
    assert groups["llm"]["weight_decay"] == 0.1 and groups["llm/no_decay"]["weight_decay"] == 0.0
    default = SFT(encoder="vit_uhd_tiny_patch10_siglip", llm={"hidden_size": 32}, tokenizer=str(shards / "tok"))
    default.trainer = type("T", (), {"estimated_stepping_batches": 100})()
    assert isinstance(default.configure_optimizers()["optimizer"], torch.optim.AdamW)
