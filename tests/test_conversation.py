import pytest

from llava_uhd.conversation import (
    IGNORE_INDEX,
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    ConversationError,
    build_prompt,
    normalize_turns,
    tokenize_conversation,
)
from llava_uhd.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


LLAVA = [
    {"from": "human", "value": "<image>\nWhat is at row 1, column 2?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "And how many squares are there?"},
    {"from": "gpt", "value": "3"},
]


def test_normalize_llava_and_chat_formats():
    turns = normalize_turns(LLAVA)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["content"] == LLAVA[0]["value"]
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
    ]
    assert normalize_turns(chat)[1]["content"] == "<image>Hi"


@pytest.mark.parametrize(
    ("conv", "reason"),
    [
        ([], "empty"),
        ([{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}], "empty"),
        ("not a list", "malformed"),
        ([{"from": "gpt", "value": "x"}], "malformed"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "malformed"),
        ([{"from": "alien", "value": "a"}], "malformed"),
        ([{"from": "human"}], "malformed"),
        ([{"from": "human", "value": "a"}, {"from": "system", "value": "b"}], "malformed"),
        (["just a string"], "malformed"),
    ],
)
def test_normalize_rejects_with_reason(conv, reason):
    with pytest.raises(ConversationError) as err:
        normalize_turns(conv)
    assert err.value.reason == reason


def _expected_text(tok, n_pad, markers=False):
    image = (VISION_START if markers else "") + IMAGE_PAD * n_pad + (VISION_END if markers else "")
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{image}\nWhat is at row 1, column 2?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nAnd how many squares are there?<|im_end|>\n"
        "<|im_start|>assistant\n3<|im_end|>\n"
    )


@pytest.mark.parametrize("markers", [False, True])
def test_ids_equal_full_template_tokenisation(tok, markers):
    out = tokenize_conversation(LLAVA, tok, [5], max_length=512, vision_markers=markers)
    assert out.input_ids == tok(_expected_text(tok, 5, markers), add_special_tokens=False)["input_ids"]
    pad = tok.convert_tokens_to_ids(IMAGE_PAD)
    assert out.input_ids.count(pad) == 5
    first = out.input_ids.index(pad)
    assert out.input_ids[first : first + 5] == [pad] * 5


def test_labels_token_by_token(tok):
    out = tokenize_conversation(LLAVA, tok, [4], max_length=512)
    assert len(out.labels) == len(out.input_ids)
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assistant_header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    # Walk the turns: the labelled span of an assistant turn is its content plus <|im_end|>, nothing else.
    expected = [IGNORE_INDEX] * len(out.input_ids)
    starts = [i for i, t in enumerate(out.input_ids) if t == im_start]
    n_assistant = 0
    for s in starts:
        if out.input_ids[s + 1 : s + 1 + len(assistant_header)] == assistant_header:
            n_assistant += 1
            body = s + 1 + len(assistant_header)
            end = out.input_ids.index(im_end, body)
            expected[body : end + 1] = out.input_ids[body : end + 1]
    assert n_assistant == 2
    assert out.labels == expected
    labelled = [t for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE_INDEX]
    assert tok.decode(labelled) == "A red circle.<|im_end|>3<|im_end|>"


def test_llava_convention_and_image_count_mismatch(tok):
    no_placeholder = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A cat."}]
    out = tokenize_conversation(no_placeholder, tok, [3], max_length=256)
    text = tok.decode(out.input_ids)
    assert f"user\n{IMAGE_PAD * 3}\nDescribe." in text
    assert tokenize_conversation(no_placeholder, tok, [], max_length=256).input_ids.count(
        tok.convert_tokens_to_ids(IMAGE_PAD)) == 0
    for counts in ([3, 3], []):
        with pytest.raises(ConversationError) as err:
            tokenize_conversation(LLAVA, tok, counts, max_length=256)
        assert err.value.reason == "image_count_mismatch"
    two = [{"from": "human", "value": "<image> vs <image>?"}, {"from": "gpt", "value": "Same."}]
    out = tokenize_conversation(two, tok, [2, 7], max_length=256)
    assert out.input_ids.count(tok.convert_tokens_to_ids(IMAGE_PAD)) == 9


def test_truncation_drops_trailing_text_pairs_never_image_tokens(tok):
    full = tokenize_conversation(LLAVA, tok, [10], max_length=512)
    first_pair = tokenize_conversation(LLAVA[:2], tok, [10], max_length=512)
    cut = tokenize_conversation(LLAVA, tok, [10], max_length=len(full.input_ids) - 1)
    assert cut.input_ids == first_pair.input_ids and cut.labels == first_pair.labels
    with pytest.raises(ConversationError) as err:
        tokenize_conversation(LLAVA, tok, [10], max_length=len(first_pair.input_ids) - 1)
    assert err.value.reason == "too_long"
    # An image in the last pair pins it: nothing may be dropped.
    late = [LLAVA[2], LLAVA[3], LLAVA[0], LLAVA[1]]
    with pytest.raises(ConversationError):
        tokenize_conversation(late, tok, [10], max_length=len(full.input_ids) - 1)


def test_system_override_and_trailing_user_turn(tok):
    conv = [{"from": "system", "value": "Be brief."}, *LLAVA, {"from": "human", "value": "Thanks?"}]
    out = tokenize_conversation(conv, tok, [1], max_length=512)
    text = tok.decode(out.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "Thanks?" not in text
    none = tokenize_conversation(LLAVA, tok, [1], max_length=512, system=None)
    assert tok.decode(none.input_ids).startswith("<|im_start|>user\n")


def test_build_prompt(tok):
    ids = build_prompt("<image>\nWhat is this?", tok, [4])
    expected = tok.apply_chat_template(
        [{"role": "user", "content": IMAGE_PAD * 4 + "\nWhat is this?"}], tokenize=False, add_generation_prompt=True
    )
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]
    assert build_prompt("What is this?", tok, [4]) == ids  # LLaVA convention
    multi = build_prompt(LLAVA[:3], tok, [2])
    assert tok.decode(multi).endswith("And how many squares are there?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ConversationError):
        build_prompt(LLAVA, tok, [2])
