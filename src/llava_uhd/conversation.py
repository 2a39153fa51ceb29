"""Chat template, tokenisation and label masks (Qwen2 ChatML, as LLaVA-UHD v3 uses with Qwen2-7B-Instruct).

A conversation is rendered exactly as Qwen2's chat template renders it::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<image>\\nWhat is this?<|im_end|>\\n
    <|im_start|>assistant\\nA cat.<|im_end|>\\n

Each ``<image>`` placeholder becomes ``n_i`` copies of the ``<|image_pad|>`` id (optionally wrapped in
``<|vision_start|>``/``<|vision_end|>``), in order; the model later overwrites those positions with the
image's visual tokens. Text segments are tokenised on their own and the pad ids spliced in as integers, so
an image's tokens are never split or merged with text and no giant string of pad tokens is built. This is
equivalent to tokenising the whole rendered string, because every segment boundary is a special token or
a newline, where the byte-level pre-tokeniser splits anyway (a test checks the equivalence).

Labels are -100 everywhere except the assistant replies' content tokens and their closing ``<|im_end|>``.

LLaVA convention: a sample with exactly one image but no ``<image>`` placeholder gets ``"<image>\\n"``
prepended to its first user turn (LLaVA-Pretrain and parts of ShareGPT4V omit it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
IGNORE_INDEX = -100

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


class ConversationError(ValueError):
    """A sample that cannot be turned into training tokens; ``reason`` is the key skips are counted by."""

    REASONS = ("empty", "malformed", "image_count_mismatch", "too_long")

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]


def _content_text(content) -> str:
    """Plain text from a string or an HF multimodal content list ({"type": "image"} / {"type": "text"})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for item in content:
            if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
                raise ConversationError("malformed", f"bad content item {item!r:.80}")
            parts.append(IMAGE_PLACEHOLDER if item["type"] == "image" else str(item.get("text", "")))
        return "".join(parts)
    raise ConversationError("malformed", f"content of type {type(content).__name__}")


def normalize_turns(conversations: list[dict]) -> list[dict]:
    """LLaVA/ShareGPT4V turns ({"from", "value"}) or chat messages ({"role", "content"}) -> chat messages.

    Checks: a non-empty list; an optional leading system turn; then user and assistant strictly
    alternating, starting with the user; no empty content. A trailing user turn is kept (a prompt).
    """
    if not isinstance(conversations, list):
        raise ConversationError("malformed", f"conversation is a {type(conversations).__name__}, not a list")
    if not conversations:
        raise ConversationError("empty", "no turns")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ConversationError("malformed", f"turn {i} is not a dict")
        speaker = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        role = _ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None or content is None:
            raise ConversationError("malformed", f"turn {i} has speaker {speaker!r} and no usable content")
        text = _content_text(content)
        if not text.strip():
            raise ConversationError("empty", f"turn {i} is empty")
        if role == "system" and i != 0:
            raise ConversationError("malformed", f"system turn at position {i}")
        turns.append({"role": role, "content": text})
    dialogue = turns[1:] if turns[0]["role"] == "system" else turns
    if not dialogue:
        raise ConversationError("empty", "only a system turn")
    for i, turn in enumerate(dialogue):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ConversationError("malformed", f"turn {i} is {turn['role']}, expected {expected}")
    return turns


def _split_system(turns: list[dict], system: str | None) -> tuple[str | None, list[dict]]:
    if turns and turns[0]["role"] == "system":
        return turns[0]["content"], turns[1:]
    return system, turns


def _with_image_placeholders(dialogue: list[dict], n_images: int) -> list[dict]:
    """Apply the LLaVA convention and check that placeholders and images match."""
    if any(IMAGE_PLACEHOLDER in t["content"] for t in dialogue if t["role"] == "assistant"):
        raise ConversationError("malformed", "image placeholder in an assistant turn")
    found = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in dialogue)
    if found == 0 and n_images == 1:
        first = dict(dialogue[0], content=IMAGE_PLACEHOLDER + "\n" + dialogue[0]["content"])
        return [first, *dialogue[1:]]
    if found != n_images:
        raise ConversationError("image_count_mismatch", f"{found} placeholders for {n_images} images")
    return dialogue


class _Encoder:
    """Collects text segments and image spans, tokenises all text in one batched call, splices ids."""

    def __init__(self, tokenizer, vision_markers: bool) -> None:
        self.tokenizer = tokenizer
        ids = tokenizer.convert_tokens_to_ids([IMAGE_PAD, VISION_START, VISION_END])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError(f"tokenizer lacks the special tokens {IMAGE_PAD}, {VISION_START}, {VISION_END}")
        self.pad_id, self.start_id, self.end_id = ids
        self.vision_markers = vision_markers
        self.pieces: list[tuple[str, object, bool]] = []  # (kind, text or count, trainable)

    def text(self, text: str, trainable: bool = False) -> None:
        if text:
            self.pieces.append(("text", text, trainable))

    def content(self, text: str, counts: list[int], trainable: bool = False) -> None:
        """Text with image placeholders; consumes one count from ``counts`` per placeholder."""
        parts = text.split(IMAGE_PLACEHOLDER)
        for j, part in enumerate(parts):
            self.text(part, trainable)
            if j < len(parts) - 1:
                self.pieces.append(("image", counts.pop(0), False))

    def encode(self) -> list[tuple[list[int], bool]]:
        texts = [p[1] for p in self.pieces if p[0] == "text"]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        out = []
        for kind, value, trainable in self.pieces:
            if kind == "text":
                out.append((list(next(encoded)), trainable))
            else:
                ids = [self.pad_id] * value
                out.append(([self.start_id, *ids, self.end_id] if self.vision_markers else ids, False))
        return out


def _encode_turns(
    system: str | None, dialogue: list[dict], tokenizer, counts: list[int], vision_markers: bool
) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Ids of the system block, and per turn its ids and labels."""
    enc = _Encoder(tokenizer, vision_markers)
    bounds = []
    if system is not None:
        enc.text(f"{IM_START}system\n{system}{IM_END}\n")
    bounds.append(len(enc.pieces))
    counts = list(counts)
    for turn in dialogue:
        enc.text(f"{IM_START}{turn['role']}\n")
        trainable = turn["role"] == "assistant"
        enc.content(turn["content"], counts, trainable)
        enc.text(IM_END, trainable)
        enc.text("\n")
        bounds.append(len(enc.pieces))
    pieces = enc.encode()
    system_ids = [i for ids, _ in pieces[: bounds[0]] for i in ids]
    turn_ids, turn_labels = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        turn_ids.append([i for ids, _ in pieces[a:b] for i in ids])
        turn_labels.append([i if trainable else IGNORE_INDEX for ids, trainable in pieces[a:b] for i in ids])
    return system_ids, turn_ids, turn_labels


def training_dialogue(
    turns: list[dict], n_images: int, system: str | None = DEFAULT_SYSTEM
) -> tuple[str | None, list[dict]]:
    """(system, user/assistant turns) that training tokenises, or ``ConversationError``: the conversation rules
    shared by the converter's check and the loader (a trailing text-only user turn is dropped)."""
    turns = normalize_turns(turns)
    system, dialogue = _split_system(turns, system)
    if len(dialogue) % 2 == 1:
        if IMAGE_PLACEHOLDER in dialogue[-1]["content"]:
            raise ConversationError("malformed", "last user turn holds an image but has no answer")
        dialogue = dialogue[:-1]
    if not dialogue:
        raise ConversationError("empty", "no assistant reply")
    return system, _with_image_placeholders(dialogue, n_images)


def tokenize_conversation(
    turns: list[dict],
    tokenizer,
    image_token_counts: Sequence[int],
    max_length: int,
    system: str | None = DEFAULT_SYSTEM,
    vision_markers: bool = False,
) -> TokenizedConversation:
    """Training ids and labels for a conversation (raw LLaVA turns or normalised chat messages).

    A system turn in ``turns`` overrides ``system``; ``system=None`` omits the system block. A trailing
    unanswered user turn without images is dropped. Longer than ``max_length``: whole trailing
    (user, assistant) pairs without images are dropped; image tokens are never cut; if it still does
    not fit, or no assistant reply would remain, raises ``ConversationError("too_long")``.
    """
    system, dialogue = training_dialogue(turns, len(image_token_counts), system)
    system_ids, turn_ids, turn_labels = _encode_turns(system, dialogue, tokenizer, image_token_counts, vision_markers)

    pairs = [(turn_ids[i] + turn_ids[i + 1], turn_labels[i] + turn_labels[i + 1]) for i in range(0, len(turn_ids), 2)]
    has_image = [IMAGE_PLACEHOLDER in dialogue[i]["content"] for i in range(0, len(dialogue), 2)]
    total = len(system_ids) + sum(len(ids) for ids, _ in pairs)
    while total > max_length and len(pairs) > 1 and not has_image[len(pairs) - 1]:
        total -= len(pairs.pop()[0])
    if total > max_length:
        raise ConversationError("too_long", f"{total} tokens > max_length {max_length}")
    input_ids = system_ids + [i for ids, _ in pairs for i in ids]
    labels = [IGNORE_INDEX] * len(system_ids) + [label for _, labels in pairs for label in labels]
    return TokenizedConversation(input_ids=input_ids, labels=labels)


def build_prompt(
    turns_or_question: str | list[dict],
    tokenizer,
    image_token_counts: Sequence[int],
    system: str | None = DEFAULT_SYSTEM,
    vision_markers: bool = False,
) -> list[int]:
    """Generation prompt: ChatML ids of the conversation so far, ending with ``<|im_start|>assistant\\n``.

    ``turns_or_question`` is a question string (one user turn) or turns ending with a user turn.
    """
    if isinstance(turns_or_question, str):
        turns_or_question = [{"role": "user", "content": turns_or_question}]
    turns = normalize_turns(turns_or_question)
    system, dialogue = _split_system(turns, system)
    if dialogue[-1]["role"] != "user":
        raise ConversationError("malformed", "a prompt must end with a user turn")
    dialogue = _with_image_placeholders(dialogue, len(image_token_counts))
    system_ids, turn_ids, _ = _encode_turns(system, dialogue, tokenizer, image_token_counts, vision_markers)
    prompt = [i for ids in turn_ids for i in ids]
    return system_ids + prompt + tokenizer(f"{IM_START}assistant\n", add_special_tokens=False)["input_ids"]
