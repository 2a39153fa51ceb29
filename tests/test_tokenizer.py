from transformers import AutoTokenizer

from llava_uhd.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer


def test_builds_loads_and_is_idempotent(tmp_path):
    tok = build_tiny_tokenizer(tmp_path / "tok")
    assert 500 <= len(tok) <= 2048
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    mtime = (tmp_path / "tok" / "tokenizer.json").stat().st_mtime_ns
    again = build_tiny_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").stat().st_mtime_ns == mtime
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "What shape is at row 2, column 3? 1234 ünïcode"
    assert loaded(text)["input_ids"] == again(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_special_tokens_are_single_ids_and_template_is_chatml(tmp_path):
    tok = build_tiny_tokenizer(tmp_path / "tok")
    for special in SPECIAL_TOKENS:
        assert tok(f"a{special}b", add_special_tokens=False)["input_ids"][1:-1] == [tok.convert_tokens_to_ids(special)]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
