"""The question a model is asked for one benchmark row, following VLMEvalKit's LLaVA-style prompts.

- multiple choice: ``Hint: <hint>`` (when the row has one), the question, one ``A. <text>`` line per option,
  then "Answer with the option's letter from the given choices directly.";
- short-answer VQA (TextVQA, DocVQA, InfoVQA, ChartQA, OCRVQA, GQA): the question, then "Answer the question
  using a single word or phrase.";
- yes/no (POPE, MME, HallusionBench): the question, then "Please answer yes or no." unless the question
  already ends with an instruction to answer yes or no (MME's questions carry it);
- OCRBench: the question as it is (its questions say what to output).

The image goes before the text (``LlavaUHD.build_prompt_ids`` puts the ``<image>`` line first).
"""

from __future__ import annotations

from .tsv import Benchmark, is_missing

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
YES_NO_INSTRUCTION = "Please answer yes or no."

SHORT_ANSWER_KINDS = ("vqa", "anls", "relaxed", "exact")
YES_NO_KINDS = ("yesno", "pope", "mme", "hallusion")


def build_prompt(benchmark: Benchmark, row: dict[str, str], kind: str | None = None) -> str:
    """Prompt text for ``row`` of ``benchmark`` (``kind`` defaults to the benchmark's)."""
    kind = kind or benchmark.kind
    question = row["question"].strip()
    if kind == "mcq":
        lines = []
        hint = row.get("hint")
        if not is_missing(hint):
            lines.append(f"Hint: {hint.strip()}")
        lines.append(question)
        lines += [f"{letter}. {text.strip()}" for letter, text in benchmark.options(row).items()]
        lines.append(MCQ_INSTRUCTION)
        return "\n".join(lines)
    if kind in SHORT_ANSWER_KINDS:
        return f"{question}\n{SHORT_ANSWER_INSTRUCTION}"
    if kind in YES_NO_KINDS:
        if "answer yes or no" in question.lower():
            return question
        return f"{question} {YES_NO_INSTRUCTION}"
    return question
