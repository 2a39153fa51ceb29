import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.batching import collate
from datamodules.samples import Sample
from llava_uhd.conversation import IGNORE_INDEX, tokenize_conversation
from llava_uhd.generation import warn_past_trained_length
from llava_uhd.llm import tiny_qwen2_config
from llava_uhd.mllm import LlavaUHD, LlavaUHDConfig
from llava_uhd.tokenizer import build_tiny_tokenizer

UHD, GNE, SBE = "vit_uhd_tiny_patch10_siglip", "vit_gne_tiny_patch14_siglip", "vit_sbe_tiny_patch14_siglip"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops gain nothing from threads, and on a shared 2-core box spinning OpenMP threads cost 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(path)
    return str(path)


def make_model(tokenizer_dir, encoder=UHD, projector="mlp", encoder_kwargs=None, seed=0, **config) -> LlavaUHD:
    torch.manual_seed(seed)
    llm = tiny_qwen2_config(1024, hidden_size=64, layers=2, initializer_range=0.2)
    config = LlavaUHDConfig(encoder=encoder, encoder_kwargs=encoder_kwargs or {}, projector=projector, llm=llm,
                            tokenizer=tokenizer_dir, min_pixels=40 * 40, max_pixels=160 * 160, **config)
    return LlavaUHD(config).eval()


def make_batch(model, samples):
    """samples: list of (turns, [image tensors]) -> a batch made by the data pipeline's own collate."""
    rows = []
    for i, (turns, images) in enumerate(samples):
        counts = [model.num_image_tokens(*im.shape[-2:]) for im in images]
        tokens = tokenize_conversation(turns, model.tokenizer, counts, max_length=1024,
                                       vision_markers=model.config.vision_markers)
        sizes = [tuple(im.shape[-2:]) for im in images]
        rows.append(Sample(f"sample-{i}", list(images), sizes, tokens.input_ids, tokens.labels))
    return collate(rows, model.tokenizer.pad_token_id)


def chat(question, answer, *more):
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    for q, a in zip(more[::2], more[1::2]):
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


def test_loss_is_finite_and_overfits_one_batch(tokenizer_dir):
    model = make_model(tokenizer_dir).train()
    torch.manual_seed(1)
    batch = make_batch(model, [
        (chat("<image>\nDescribe the image.", "There are 3 blue squares and 2 green triangles."),
         [torch.randn(3, 80, 120)]),
        (chat("<image>\n<image>\nWhat word is written?", "The quick brown fox."),
         [torch.randn(3, 40, 80), torch.randn(3, 80, 40)]),
    ])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(24):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_labels_cover_exactly_the_assistant_replies(tokenizer_dir):
    model = make_model(tokenizer_dir)
    tok = model.tokenizer
    replies = ["A red circle.", "It is at row 2, column 3."]
    turns = chat("<image>\nWhat shape is there?", replies[0], "Where is it?", replies[1])
    batch = make_batch(model, [(turns, [torch.randn(3, 80, 80)])])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    # Independently: every reply is "<|im_start|>assistant\n" + reply ids + <|im_end|>; only those reply ids
    # and their <|im_end|> carry labels, each equal to the input id at its position.
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    expected = [IGNORE_INDEX] * len(ids)
    start = 0
    for reply in replies:
        reply_ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        at = next(i for i in range(start, len(ids)) if ids[i : i + len(header)] == header) + len(header)
        assert ids[at : at + len(reply_ids)] == reply_ids
        expected[at : at + len(reply_ids)] = reply_ids
        start = at + len(reply_ids)
    assert labels == expected
    # The model's loss is the mean next-token cross-entropy over exactly those positions.
    with torch.no_grad():
        out = model(**batch)
        logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    target = torch.tensor(expected[1:])
    keep = target != IGNORE_INDEX
    manual = F.cross_entropy(logits[0, :-1][keep], target[keep])
    torch.testing.assert_close(out.loss, manual)


def test_packed_batch_matches_per_sample_and_dense_matches_packed(tokenizer_dir):
    model = make_model(tokenizer_dir)
    torch.manual_seed(2)
    samples = [
        (chat("<image>\n<image>\nCompare the two images.", "The first is bigger."),
         [torch.randn(3, 80, 120), torch.randn(3, 40, 80)]),
        (chat("<image>\nWhat is this?", "A cat."), [torch.randn(3, 120, 40)]),
        (chat("Say hello.", "Hello."), []),  # text-only sample in the same batch
    ]
    with torch.no_grad():
        batch = make_batch(model, samples)
        logits = model(**batch).logits
        for i, sample in enumerate(samples):
            alone = make_batch(model, [sample])
            n = alone["input_ids"].shape[1]
            torch.testing.assert_close(logits[i, :n], model(**alone).logits[0], atol=1e-4, rtol=1e-4)
        # Same-size images: the dense [N, 3, H, W] encoder path (what collate makes of one grid shape) equals the
        # packed list path.
        same = make_batch(model, [samples[1], (chat("<image>\nAnd this?", "A dog."), [torch.randn(3, 120, 40)])])
        packed = model(**dict(same, pixel_values=list(same["pixel_values"]))).logits
        dense = model(**same).logits
    torch.testing.assert_close(dense, packed, atol=1e-5, rtol=1e-5)


def test_image_token_count_mismatch_is_a_clear_error(tokenizer_dir):
    model = make_model(tokenizer_dir)
    batch = make_batch(model, [(chat("<image>\nWhat is this?", "A cat."), [torch.randn(3, 80, 80)])])
    with pytest.raises(ValueError, match="positions but the images give"):
        model(**dict(batch, pixel_values=[torch.randn(3, 80, 120)]))
    with pytest.raises(ValueError, match="positions but the images give"):
        model(**dict(batch, pixel_values=None))


def test_kv_cache_greedy_equals_uncached_greedy_and_beam_search_runs(tokenizer_dir):
    model = make_model(tokenizer_dir)
    images = [torch.randn(3, 80, 120), torch.randn(3, 40, 40)]
    cached = model.generate(images, "<image> and <image>: what differs?", max_new_tokens=10)
    uncached = model.generate(images, "<image> and <image>: what differs?", max_new_tokens=10, use_cache=False)
    assert len(cached.token_ids) >= 2 and len(set(cached.token_ids)) > 1  # not a degenerate repeat
    assert cached.token_ids == uncached.token_ids
    assert cached.text == model.tokenizer.decode(cached.token_ids, skip_special_tokens=True)
    assert cached.num_image_tokens == 6 + 1
    assert cached.encoder_ms > 0 and cached.prefill_ms > 0 and cached.decode_tokens_per_s > 0
    assert cached.ttft_ms >= cached.encoder_ms + cached.prefill_ms
    beam = model.generate(images, "<image> and <image>: what differs?", max_new_tokens=6, num_beams=3)
    assert 1 <= len(beam.token_ids) <= 6 and beam.ttft_ms > 0
    text_only = model.generate(None, "Say hello.", max_new_tokens=3)
    assert text_only.num_image_tokens == 0 and text_only.encoder_ms == 0


def test_save_and_load_round_trip(tokenizer_dir, tmp_path):
    model = make_model(tokenizer_dir, projector="merger")
    batch = make_batch(model, [(chat("<image>\nWhat is this?", "A cat."), [torch.randn(3, 160, 80)])])
    model.save_pretrained(tmp_path / "model")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "model").iterdir()}
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["projector"] == "merger" and isinstance(config["llm"], dict)
    loaded = LlavaUHD.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    image = batch["pixel_values"][0]
    assert loaded.generate(image, "What?", 5).token_ids == model.generate(image, "What?", 5).token_ids


@pytest.mark.parametrize(
    ("encoder", "projector", "encoder_kwargs"),
    [
        (UHD, "mlp", {}),
        (UHD, "merger", {}),
        (UHD, "mlp", {"wtc_pooling": "pixel_unshuffle"}),
        (GNE, "merger", {}),
        (SBE, "mlp", {"slice_size": 28}),
        (SBE, "merger", {"slice_size": 56, "max_slices": 4}),
    ],
)
def test_every_encoder_kind_works_in_the_model(tokenizer_dir, encoder, projector, encoder_kwargs):
    model = make_model(tokenizer_dir, encoder, projector, encoder_kwargs)
    photos = [Image.new("RGB", (150, 100), "red"), Image.new("RGB", (60, 90), "blue")]
    pixels = [model.preprocess(p) for p in photos]
    for p in pixels:  # the resolution policy gives sizes the model can encode, and the counts agree
        assert p.shape[-2] % model.pixels_per_token == 0 and p.shape[-1] % model.pixels_per_token == 0
    batch = make_batch(model, [(chat("<image>\n<image>\nDescribe.", "Two shapes."), pixels)])
    assert (batch["input_ids"] == model.image_token_id).sum() == sum(model.num_image_tokens(*p.shape[-2:])
                                                                      for p in pixels)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert next(model.encoder.parameters()).grad is not None
    assert len(model.generate(photos, "<image><image>Describe.", max_new_tokens=2).token_ids) >= 1


def test_sbe_separator_positions_hold_the_separator_embeddings(tokenizer_dir):
    model = make_model(tokenizer_dir, SBE, "mlp", {"slice_size": 28})
    image = torch.randn(3, 56, 56)  # 2x2 slices + thumbnail: 5 views x 4 tokens + 4 separators
    assert model.num_image_tokens(56, 56) == 24
    batch = make_batch(model, [(chat("<image>\nDescribe.", "Shapes."), [image])])
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])[0]
    table = model.llm.get_input_embeddings().weight
    slice_sep, row_sep = (table[model.tokenizer.convert_tokens_to_ids(t)] for t in ("<|slice_sep|>", "<|row_sep|>"))
    visual = embeds[batch["input_ids"][0] == model.image_token_id]
    for position, expected in ((4, row_sep), (9, slice_sep), (14, row_sep), (19, slice_sep)):
        torch.testing.assert_close(visual[position], expected)


def test_vision_markers_wrap_each_image(tokenizer_dir):
    model = make_model(tokenizer_dir, vision_markers=True)
    ids = model.build_prompt_ids("<image> What is this?", [(80, 80)])
    start, end = (model.tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    at = ids.index(start)
    assert ids[at + 1 : at + 5] == [model.image_token_id] * 4 and ids[at + 5] == end
    assert len(model.generate(torch.randn(3, 80, 80), "What is this?", max_new_tokens=2).token_ids) >= 1


@pytest.mark.parametrize("packed", [False, True])
def test_batches_from_the_data_module_train(tokenizer_dir, tmp_path, packed):
    from datamodules.datamodule import UHDDataModule
    from datamodules.synthetic import write_synthetic

    write_synthetic("shapegrid", 6, str(tmp_path / "shards"), min_side=40, max_side=160)
    model = make_model(tokenizer_dir, projector="merger")
    dm = UHDDataModule(train_shards=str(tmp_path / "shards"), tokenizer=model.tokenizer,
                       pixels_per_token=model.pixels_per_token, min_pixels=model.config.min_pixels,
                       max_pixels=model.config.max_pixels, batch_token_budget=1024, max_batch_size=3, packed=packed,
                       num_workers=0, pin_memory=False, persistent_workers=False, sample_shuffle=0)
    batch = next(iter(dm.train_dataloader()))
    if not packed:  # one aspect-ratio bucket: the dense encoder path
        assert isinstance(batch["pixel_values"], torch.Tensor)
    loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("encoder", "projector", "encoder_kwargs"),
    [(UHD, "mlp", {}), (GNE, "merger", {}), (SBE, "merger", {"slice_size": 56, "max_slices": 4})],
)
def test_the_worker_counter_counts_what_the_encoder_emits(tokenizer_dir, encoder, projector, encoder_kwargs):
    """One interface for every encoder kind: the picklable counter the data workers use, the model's count and
    the tokens the encoder and projector really produce agree (SBE separators included)."""
    model = make_model(tokenizer_dir, encoder, projector, encoder_kwargs)
    counter = pickle.loads(pickle.dumps(model.image_token_counter()))
    for width, height in [(150, 100), (60, 90), (200, 40)]:
        pixels = model.preprocess(Image.new("RGB", (width, height), "red"))
        with torch.no_grad():
            emitted = model.encode_images([pixels]).shape[0]
        assert counter(*pixels.shape[-2:]) == model.num_image_tokens(*pixels.shape[-2:]) == emitted


def test_generation_past_the_llm_length_warns_and_within_it_does_not(tokenizer_dir, caplog):
    model = make_model(tokenizer_dir)
    limit = model.llm.config.max_position_embeddings
    with caplog.at_level("WARNING", logger="llava_uhd.generation"):
        model.generate(None, "Say hello.", max_new_tokens=2)
        assert not caplog.records
        prompt = len(model.build_prompt_ids("Say hello.", []))
        assert not warn_past_trained_length(model, prompt, limit - prompt)
        assert warn_past_trained_length(model, prompt, limit - prompt + 1)
    assert "max_position_embeddings" in caplog.text and str(limit) in caplog.text
