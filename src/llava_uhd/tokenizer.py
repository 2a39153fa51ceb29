"""A tiny offline ChatML tokenizer for tests, demos and CPU pilot runs.

The paper's LLM is Qwen2-7B-Instruct. Tests and tiny configs cannot download it, so this module trains a
small byte-level BPE (the same family as Qwen2's) on a built-in corpus with the ``tokenizers`` library and
saves it as an ordinary Hugging Face tokenizer directory with Qwen2's ChatML chat template and the special
tokens the data pipeline and the model use. ``AutoTokenizer.from_pretrained(out_dir)`` loads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [
    PAD_TOKEN,
    IM_START,
    IM_END,
    "<image>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|slice_sep|>",
    "<|row_sep|>",
]
QWEN2_SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
"""What Qwen2-7B-Instruct's tokenizer carries: no image or vision tokens (as in the released model's folder)."""

# Qwen2-7B-Instruct's template: a default system turn when the conversation has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

_WORDS = (
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta "
    "circle square triangle star diamond cross hexagon ellipse rectangle shape shapes colour color "
    "row column grid cell position left right top bottom middle center corner above below next to "
    "word words text read write letter number count how many what which where is are the a an of in on "
    "at and or with there this that image picture photo scene describe description shows contains "
    "you i it we they he she me my your our their yes no not one two three four five six seven eight "
    "nine ten eleven twelve first second third fourth fifth last please answer question short single "
    "phrase sentence briefly detail detailed helpful assistant user system model vision language large "
    "small big tiny huge many few some all none each every cat dog person people car tree house sky sun "
    "water road street table chair book computer screen sign board paper page document chart graph"
)

_SENTENCES = [
    "You are a helpful assistant.",
    "Describe the image in detail.",
    "Describe the scene briefly.",
    "What shape is at row 2, column 3?",
    "Which colour is the shape at row 1, column 4?",
    "How many red circles are there in the image?",
    "What word is written at row 3, column 1?",
    "Answer with a single word or phrase.",
    "The image shows a grid of coloured shapes on a white background.",
    "There are 3 blue squares and 2 green triangles.",
    "A photo of a cat sitting on a chair next to a table.",
    "The quick brown fox jumps over the lazy dog.",
    "Read the text in the image and write it down.",
    "It is a picture of a street with cars, trees and people.",
]


def _corpus() -> list[str]:
    """Small English + digits corpus: enough for sensible merges on the synthetic tasks' vocabulary."""
    words = _WORDS.split()
    lines = list(_SENTENCES)
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 6)]
    lines += [w.capitalize() + "." for w in words]
    lines += [f"row {r}, column {c}: {words[(r * 7 + c) % len(words)]}" for r in range(12) for c in range(12)]
    lines += [" ".join(str(n) for n in range(k, k + 20)) for k in range(0, 1000, 20)]
    lines += [f"{a} + {b} = {a + b}" for a in range(0, 100, 7) for b in range(0, 100, 11)]
    return lines * 2


def _train(vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def _has_tokenizer(out_dir: Path) -> bool:
    return all((out_dir / name).is_file() for name in _TOKENIZER_FILES)


def build_tiny_tokenizer(
    out_dir: str | os.PathLike, vocab_size: int = 1024, special_tokens: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train (once) and load the tiny ChatML byte-level BPE tokenizer saved in ``out_dir``.

    Idempotent: when ``out_dir`` already holds a saved tokenizer it is only loaded. Training is
    deterministic, so two machines building it get the same ids. ``special_tokens``: default
    :data:`SPECIAL_TOKENS`; :data:`QWEN2_SPECIAL_TOKENS` gives a Qwen2-like tokenizer without image tokens.
    """
    out = Path(out_dir)
    special_tokens = list(special_tokens or SPECIAL_TOKENS)
    if special_tokens[:3] != QWEN2_SPECIAL_TOKENS:
        raise ValueError(f"special_tokens must start with {QWEN2_SPECIAL_TOKENS}")
    if not _has_tokenizer(out):
        backend = _train(vocab_size, special_tokens)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token=PAD_TOKEN,
            eos_token=IM_END,
            unk_token=None,
            bos_token=None,
            additional_special_tokens=[IM_START, *special_tokens[3:]],
            model_max_length=32768,
            padding_side="right",
            clean_up_tokenization_spaces=False,
        )
        tokenizer.chat_template = CHATML_TEMPLATE
        out.mkdir(parents=True, exist_ok=True)
        # Write into a temp dir and rename, so concurrent builders (DDP ranks) never read half a directory.
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
        tmp.rmdir()
    return AutoTokenizer.from_pretrained(out)
