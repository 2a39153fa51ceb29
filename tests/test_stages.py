"""Stage module wiring that the callback and CLI tests do not cover: parts, the data module's binding."""

import pytest
import torch

from datamodules import UHDDataModule, write_synthetic
from llava_uhd.stages import PARTS, SFT, part_of


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
