import json

import pytest
import torch

from llava_uhd.llm import llm_config_dict, load_llm, load_tokenizer, tiny_qwen2_config


def test_tiny_config_builds_a_random_qwen2():
    config = tiny_qwen2_config(300, hidden_size=32, layers=2, heads=4, kv_heads=2)
    json.dumps(config)  # plain data: fits a YAML or a saved model's config
    model = load_llm(config)
    assert model.config.model_type == "qwen2"
    assert model.get_input_embeddings().weight.shape == (300, 32)
    assert len(model.model.layers) == 2


def test_embeddings_grow_to_the_tokenizer():
    model = load_llm(tiny_qwen2_config(100), vocab_size=120)
    assert model.get_input_embeddings().num_embeddings == 120
    assert model.lm_head.weight.shape[0] == 120
    assert load_llm(tiny_qwen2_config(100), vocab_size=50).get_input_embeddings().num_embeddings == 100


def test_local_directory_round_trip(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = load_llm(tiny_qwen2_config(len(tokenizer))).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_llm(tmp_path).eval()
    loaded_tok = load_tokenizer(tmp_path)
    ids = torch.tensor([loaded_tok("What is in the image?")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert load_llm(llm_config_dict(model)).config.hidden_size == model.config.hidden_size


def test_tokenizer_without_chat_template_is_refused(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="chat template"):
        load_tokenizer(tmp_path)
