"""Benchmark scoring as VLMEvalKit scores without an LLM judge: per-row scorers, then per-benchmark aggregates.

Two layers, so the CLI and the training app's torchmetrics (``llava_uhd.metrics``) share every rule:
:func:`score_row` turns one prediction into a :class:`RowScore` (a hit in [0, 1] and, for choice kinds, the
choice read from the text); :func:`aggregate` turns the rows' scores into the benchmark's numbers. Kinds:

- ``vqa`` (TextVQA): VQA soft accuracy. Answers and prediction are normalised as the VQA evaluation does
  (punctuation, number words -> digits, articles, contractions); each human answer is left out in turn and
  the prediction scores ``min(1, matches among the other answers / 3)``; the row's score is the mean.
- ``anls`` (DocVQA, InfoVQA): ANLS, best over the answers, a similarity under 0.5 counts 0 (0.5 itself counts).
- ``relaxed`` (ChartQA): a number within 5% of a numeric answer (relative to the answer), else exact string
  match, case-insensitive; best over the answers. "12%" reads as 0.12 (so it matches "0.12" but not "12");
  "1,000" is not a number and only matches "1,000" (VLMEvalKit parses numbers with ``float`` alone).
- ``exact`` (OCRVQA, GQA): case-insensitive equality of the stripped strings, any answer (no VQA
  normalisation: VLMEvalKit's ``accuracy`` rule, so "Harry Potter." does not match "Harry Potter").
- ``mcq``: the letter read from the text (:func:`extract_choice`); MMBench circular evaluation when the file
  holds circular copies (``index >= 1e6``): a question counts only if all its copies (same ``index % 1e6``)
  are right. Unparseable answers count as wrong and are reported.
- ``yesno`` / ``pope`` / ``mme`` / ``hallusion``: yes/no read from the text (:func:`extract_yes_no`);
  POPE accuracy, precision, recall, F1 (positive = yes); MME per category acc + acc+ (acc+: images whose
  questions are all right), summed into perception and cognition; HallusionBench aAcc, and qAcc / fAcc
  when the file has the question / figure ids.
- ``ocrbench``: the answer (lowercased, stripped; for handwritten maths with all spaces removed) is a
  substring of the prediction; the score is the count of hits (1000 points for the full 1000 questions).

A row without a prediction counts as wrong (VLMEvalKit scores a missing answer as wrong) when the caller
passes it to :func:`aggregate` as missing, as ``python -m llava_uhd.eval score`` / ``run`` do; it is counted
apart from unparseable answers. Percentages are 0-100; MME and OCRBench use their own points.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from torchmetrics.functional.text import edit_distance

from .tsv import KINDS, Benchmark, is_missing

HEADLINE = {
    "vqa": "accuracy", "anls": "anls", "relaxed": "relaxed_accuracy", "exact": "accuracy", "mcq": "accuracy",
    "yesno": "accuracy", "pope": "f1", "mme": "total", "hallusion": "overall", "ocrbench": "final_score",
}
"""The number a results table shows for each kind (MCQ with circular rows: ``circular_accuracy``)."""
CIRCULAR_OFFSET = 1_000_000
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
OCRBENCH_TEXT_RECOGNITION = (
    "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
)
OCRBENCH_MATH = "Handwritten Mathematical Expression Recognition"
NO_CHOICE = -1


@dataclass(frozen=True)
class RowScore:
    """One prediction, scored: ``hit`` in [0, 1]; ``choice``: letter number (A=0) for ``mcq``, 1 yes / 0 no for
    yes/no kinds, :data:`NO_CHOICE` when nothing could be read (unused by the other kinds)."""

    hit: float
    choice: int = NO_CHOICE


MISSING = RowScore(0.0, NO_CHOICE)
"""The score of a row without a prediction: wrong (and, for POPE, not a "yes"); not counted as unparseable."""
CHOICE_KINDS = ("mcq", "yesno", "pope", "mme", "hallusion")
"""Kinds that read a choice (a letter, yes / no) from the text: only their answers can be unparseable."""


# -- VQA answer normalisation ---------------------------------------------------------------------------------
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # "3.5" keeps its point
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {  # written without the apostrophe -> the usual spelling (both sides are normalised alike)
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't",
    "itd": "it'd", "itll": "it'll", "lets": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "oclock": "o'clock", "shant": "shan't",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "weve": "we've", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wholl": "who'll", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _strip_punctuation(text: str) -> str:
    # As the VQA evaluation: a mark next to a space, or any mark once the text has a digit-comma-digit, is
    # deleted; other marks become spaces; a full stop not followed by a digit is deleted.
    glue = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCT:
        if glue or mark + " " in text or " " + mark in text:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    return _PERIOD_NOT_DECIMAL.sub("", text)


def vqa_normalize(text: str) -> str:
    """VQA evaluation normalisation: "The Two dogs." -> "2 dogs"; "1,000" -> "1000"; "dont" -> "don't"."""
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the answers, each left out in turn, of ``min(1, matches among the others / 3)``."""
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(scores) / len(scores)


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Best over the answers of ``1 - lev / max(len)`` on lowercased, whitespace-collapsed strings; 0 when that
    similarity is under ``threshold`` (VLMEvalKit keeps a similarity of exactly 0.5)."""
    pred = " ".join(prediction.strip().lower().split())
    targets = [" ".join(a.strip().lower().split()) for a in answers]
    distances = edit_distance([pred] * len(targets), targets, reduction="none").tolist()
    best = 0.0
    for target, distance in zip(targets, distances):
        longest = max(len(pred), len(target))
        normalized = distance / longest if longest else 0.0
        if 1.0 - normalized >= threshold:
            best = max(best, 1.0 - normalized)
    return best


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, answer: str, tolerance: float = 0.05) -> bool:
    """ChartQA: within ``tolerance`` of a non-zero numeric answer (relative), else case-insensitive equality."""
    prediction, answer = prediction.strip(), answer.strip()
    pred, target = _to_float(prediction), _to_float(answer)
    if pred is not None and target:
        return abs(pred - target) / abs(target) <= tolerance
    return prediction.lower() == answer.lower()


# -- choices --------------------------------------------------------------------------------------------------
_CHOICE_MARKS = ".()[],:;!*#{}"


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option a free-text answer picks, VLMEvalKit's rule without a judge, or None.

    1. Marks ``.()[],:;!*#{}`` become spaces; if exactly one option letter (upper case) is a word of the
       text, it is the choice ("The answer is (B)." -> B; "A or B" has two: no choice from this step).
    2. Else (no letter, or several), if exactly one option's text is contained in the answer
       (case-insensitive), that option ("A or B: the dog" -> B when only B's text is "dog").
    3. Else (our addition, for small models) a whole answer that is one lower-case option letter ("b.").
    """
    text = prediction
    for mark in _CHOICE_MARKS:
        text = text.replace(mark, " ")
    words = text.split()
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    lowered = prediction.lower()
    texts = [letter for letter, option in options.items() if option.strip() and option.strip().lower() in lowered]
    if len(texts) == 1:
        return texts[0]
    if not letters and len(words) == 1 and words[0].upper() in options and words[0].islower():
        return words[0].upper()
    return None


def extract_yes_no(prediction: str) -> int:
    """1 for yes, 0 for no, :data:`NO_CHOICE` when both or neither word appears (VLMEvalKit's rule)."""
    words = _strip_punctuation(prediction.lower()).split()
    yes, no = "yes" in words, "no" in words
    if yes and not no:
        return 1
    if no and not yes:
        return 0
    return NO_CHOICE


def _gold_yes_no(answer: str) -> int:
    return {"yes": 1, "no": 0}.get(answer.strip().lower(), NO_CHOICE)


def ocrbench_hit(prediction: str, answers: Sequence[str], category: str) -> bool:
    if category == OCRBENCH_MATH:
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in answers)
    pred = prediction.lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in pred for a in answers)


# -- per row --------------------------------------------------------------------------------------------------
def score_row(benchmark: Benchmark, row: dict[str, str], prediction: str) -> RowScore:
    """Score one prediction for ``row`` under the benchmark's kind."""
    kind = benchmark.kind
    if kind == "mcq":
        letter = extract_choice(prediction, benchmark.options(row))
        if letter is None:
            return RowScore(0.0, NO_CHOICE)
        return RowScore(float(letter == row.get("answer", "").strip()), string.ascii_uppercase.index(letter))
    if kind in ("yesno", "pope", "mme", "hallusion"):
        said = extract_yes_no(prediction)
        return RowScore(float(said != NO_CHOICE and said == _gold_yes_no(row.get("answer", ""))), said)
    answers = benchmark.answers(row)
    if kind == "vqa":
        return RowScore(vqa_soft_accuracy(prediction, answers))
    if kind == "anls":
        return RowScore(anls(prediction, answers))
    if kind == "relaxed":
        return RowScore(float(any(relaxed_match(prediction, a) for a in answers)))
    if kind == "exact":
        pred = prediction.strip().lower()
        return RowScore(float(any(pred == a.strip().lower() for a in answers)))
    if kind == "ocrbench":
        return RowScore(float(ocrbench_hit(prediction, answers, row.get("category", ""))))
    raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")


# -- per benchmark --------------------------------------------------------------------------------------------
def _pct(hits: Sequence[float]) -> float:
    return 100.0 * sum(hits) / len(hits) if hits else 0.0


def _category(row: dict[str, str]) -> str:
    value = row.get("category", "")
    return "" if is_missing(value) else value.strip()


def aggregate(benchmark: Benchmark, scored: Sequence[tuple[dict[str, str], RowScore]],
              missing: Sequence[dict[str, str]] | None = None) -> dict:
    """``overall`` and ``per_category`` numbers plus counts of the ``scored`` rows.

    ``missing``: rows without a prediction; each counts as wrong (:data:`MISSING`, as VLMEvalKit scores a
    missing answer), so ``counts`` has ``rows`` = scored + missing. Without it (a partial validation pass) the
    numbers are of the scored rows only and ``counts["missing"]`` is the file's rows not scored.
    Returns ``{"benchmark", "kind", "headline", "overall": {...}, "per_category": {cat: {...}}, "counts"}``.
    """
    answered = len(scored)
    unparseable = sum(s.choice == NO_CHOICE for _, s in scored) if benchmark.kind in CHOICE_KINDS else 0
    if missing is None:
        rows, missing_count = len(benchmark.rows), len(benchmark.rows) - answered
    else:
        scored = [*scored, *((row, MISSING) for row in missing)]
        rows, missing_count = len(scored), len(missing)
    kind = benchmark.kind
    overall: dict[str, float] = {}
    per_category: dict[str, dict[str, float]] = {}
    groups: dict[str, list] = defaultdict(list)
    for row, score in scored:
        groups[_category(row)].append((row, score))
    headline = HEADLINE[kind]
    if kind == "pope":
        overall = _pope(scored)
        per_category = {c: _pope(items) for c, items in groups.items() if c}
    elif kind == "mme":
        overall, per_category = _mme(benchmark, groups)
    elif kind == "hallusion":
        overall = _hallusion(scored)
        per_category = {c: {"aAcc": _pct([s.hit for _, s in items])} for c, items in groups.items() if c}
    elif kind == "ocrbench":
        overall = {"final_score": sum(s.hit for _, s in scored), "accuracy": _pct([s.hit for _, s in scored])}
        per_category = {c: {"score": sum(s.hit for _, s in items)} for c, items in groups.items() if c}
        recognition = [s.hit for c in OCRBENCH_TEXT_RECOGNITION for _, s in groups.get(c, [])]
        if recognition:
            per_category["Text Recognition (6 kinds)"] = {"score": sum(recognition)}
    else:
        name = "relaxed_accuracy" if kind == "relaxed" else "anls" if kind == "anls" else "accuracy"
        overall = {name: _pct([s.hit for _, s in scored])}
        per_category = {c: {name: _pct([s.hit for _, s in items])} for c, items in groups.items() if c}
        if kind == "mcq":
            circular = _circular(benchmark, scored)
            if circular is not None:
                overall["circular_accuracy"], per_circular = circular
                for c, value in per_circular.items():
                    per_category.setdefault(c, {})["circular_accuracy"] = value
                headline = "circular_accuracy"
    for c, items in groups.items():
        if c in per_category:
            per_category[c]["count"] = len(items)
    counts = {"rows": rows, "scored": answered, "missing": missing_count, "unparseable": unparseable}
    return {"benchmark": benchmark.name, "kind": kind, "headline": headline, "overall": overall,
            "per_category": dict(sorted(per_category.items())), "counts": counts}


def _pope(items) -> dict[str, float]:
    tp = sum(s.choice == 1 and _gold_yes_no(r["answer"]) == 1 for r, s in items)
    fp = sum(s.choice == 1 and _gold_yes_no(r["answer"]) == 0 for r, s in items)
    fn = sum(s.choice != 1 and _gold_yes_no(r["answer"]) == 1 for r, s in items)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": _pct([s.hit for _, s in items]), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1}


def _mme(benchmark: Benchmark, groups) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    per_category = {}
    for category, items in groups.items():
        by_image: dict[str, list[float]] = defaultdict(list)
        for row, score in items:
            by_image[benchmark.image_key(row)].append(score.hit)
        acc = _pct([s.hit for _, s in items])
        acc_plus = _pct([float(all(h == 1.0 for h in hits)) for hits in by_image.values()])
        per_category[category or "uncategorised"] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    cognition = sum(v["score"] for c, v in per_category.items() if c.lower() in MME_COGNITION)
    perception = sum(v["score"] for c, v in per_category.items() if c.lower() not in MME_COGNITION)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition}, per_category


def _hallusion(items) -> dict[str, float]:
    out = {"aAcc": _pct([s.hit for _, s in items])}
    for name, column in (("qAcc", "question_id"), ("fAcc", "figure_id")):
        if items and all(column in r and "set_id" in r for r, _ in items):
            grouped: dict[tuple, list[float]] = defaultdict(list)
            for row, score in items:
                key = (row.get("category"), row.get("l2-category", row.get("subcategory")), row["set_id"], row[column])
                grouped[key].append(score.hit)
            out[name] = _pct([float(all(h == 1.0 for h in hits)) for hits in grouped.values()])
    out["overall"] = sum(out.values()) / len(out)
    return out


def _circular(benchmark: Benchmark, items) -> tuple[float, dict[str, float]] | None:
    """MMBench circular accuracy over the groups whose every copy has a prediction; None without copies."""
    indices = [row["index"] for row in benchmark.rows]
    if not all(i.isdigit() for i in indices) or not any(int(i) >= CIRCULAR_OFFSET for i in indices):
        return None
    copies = defaultdict(int)
    for i in indices:
        copies[int(i) % CIRCULAR_OFFSET] += 1
    groups: dict[int, list] = defaultdict(list)
    for row, score in items:
        groups[int(row["index"]) % CIRCULAR_OFFSET].append((row, score))
    results, per_category = [], defaultdict(list)
    for key, members in groups.items():
        if len(members) < copies[key]:
            continue
        ok = float(all(s.hit == 1.0 for _, s in members))
        results.append(ok)
        main = min(members, key=lambda m: int(m[0]["index"]))[0]
        per_category[_category(main)].append(ok)
    return _pct(results), {c: _pct(v) for c, v in per_category.items() if c}
