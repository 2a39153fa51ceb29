"""Every scoring kind on TSV files written here, with tricky predictions; each expected number worked by hand."""

import json

import pytest

from llava_uhd.eval.report import score_predictions
from llava_uhd.eval.scoring import extract_choice, vqa_normalize
from llava_uhd.eval.tsv import kind_from_name, read_benchmark

from .conftest import b64_image, write_predictions, write_tsv


def score(tmp_path, name, rows, predictions, kind=None):
    data = write_tsv(tmp_path / f"{name}.tsv", rows)
    preds = write_predictions(tmp_path / f"{name}_predictions.jsonl", predictions)
    return score_predictions(read_benchmark(data, kind), preds)


OPTIONS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


def test_multiple_choice_letter_extraction(tmp_path):
    cases = [  # (answer, prediction, right?)
        ("B", "The answer is (B).", 1),  # marks -> spaces: words The/answer/is/B: one letter, B
        ("C", "c", 1),  # no upper-case letter, no option text inside "c": a lone lower-case letter, C
        ("C", "bird", 1),  # the text of exactly one option (C)
        ("C", "A bird.", 0),  # "A" is a word: read as option A (VLMEvalKit's article-as-letter quirk), wrong
        ("A", "A or B", 0),  # two letters: unparseable
        ("D", "", 0),  # empty: unparseable
        ("B", "B.", 1),  # trailing period
        ("A", "猫 (A)", 1),  # unicode around the letter
    ]
    rows = [{"index": i, "image": b64_image(i), "question": "Which animal?", **OPTIONS, "answer": a,
             "category": "animals"} for i, (a, _, _) in enumerate(cases)]
    scores = score(tmp_path, "AI2D_TEST", rows, {i: p for i, (_, p, _) in enumerate(cases)})
    assert scores["kind"] == "mcq" and scores["headline"] == "accuracy"
    assert scores["overall"]["accuracy"] == pytest.approx(100 * 5 / 8)  # 5 right of 8 = 62.5
    assert scores["counts"]["unparseable"] == 2  # "A or B" and ""
    assert scores["per_category"]["animals"] == {"accuracy": pytest.approx(62.5), "count": 8}


def test_extract_choice_text_decides_between_two_letters():
    # Two letters are no choice by themselves; the text of exactly one option then decides.
    assert extract_choice("A or B: the dog", OPTIONS) == "B"
    assert extract_choice("A or B", OPTIONS) is None


def test_extract_choice_only_offered_letters():
    # "E" is not an option here, so "E" alone is no choice; with E offered it is.
    assert extract_choice("E", {"A": "x", "B": "y"}) is None
    assert extract_choice("E", {"A": "x", "B": "y", "E": "z"}) == "E"


def test_mmbench_circular(tmp_path):
    # Question 1: four circular copies (options rotated; the answer letter moves with them), all right.
    # Question 2: two copies, one wrong. Question 3: two copies, only one predicted (right): the missing copy
    # counts as wrong, so question 3 is wrong.
    base = {"question": "Pick the animal.", "category": "attribute"}
    rows = [
        {"index": 1, "image": b64_image(1), "A": "cat", "B": "dog", "C": "bird", "D": "fish", "answer": "B", **base},
        {"index": 1000001, "image": "1", "A": "dog", "B": "bird", "C": "fish", "D": "cat", "answer": "A", **base},
        {"index": 2000001, "image": "1", "A": "bird", "B": "fish", "C": "cat", "D": "dog", "answer": "D", **base},
        {"index": 3000001, "image": "1", "A": "fish", "B": "cat", "C": "dog", "D": "bird", "answer": "C", **base},
        {"index": 2, "image": b64_image(2), "A": "red", "B": "blue", "answer": "A", **base},
        {"index": 1000002, "image": "2", "A": "blue", "B": "red", "answer": "B", **base},
        {"index": 3, "image": b64_image(3), "A": "one", "B": "two", "answer": "B", **base},
        {"index": 1000003, "image": "3", "A": "two", "B": "one", "answer": "A", **base},
    ]
    predictions = {1: "B", 1000001: "A", 2000001: "D", 3000001: "C", 2: "A", 1000002: "A", 3: "B"}
    scores = score(tmp_path, "MMBench_DEV_EN", rows, predictions)
    assert scores["headline"] == "circular_accuracy"
    assert scores["overall"]["accuracy"] == pytest.approx(100 * 6 / 8)  # 8 rows; 1000002 wrong, 1000003 missing
    assert scores["overall"]["circular_accuracy"] == pytest.approx(100 / 3)  # q1 right, q2 wrong, q3 missing a copy
    assert scores["counts"] == {"rows": 8, "scored": 7, "missing": 1, "unparseable": 0}


def test_textvqa_soft_accuracy(tmp_path):
    answers = [
        # "1,000" -> "1000" (comma between digits). Leaving out one of the three "1000": 2 matches left -> 2/3;
        # leaving out a "thousand": 3 matches -> 1. Mean (3 * 2/3 + 7 * 1) / 10 = 0.9.
        (["1,000", "1000", "1000"] + ["thousand"] * 7, "1000"),
        # "the dog" -> "dog" (article); leaving it out: 0 matches; leaving out a "dogs": 1 match -> 1/3.
        # Mean (0 + 9 * 1/3) / 10 = 0.3.
        (["the dog"] + ["dogs"] * 9, "Dog."),
        (["yes"] * 10, ""),  # empty answer: 0
        (["don't know"] * 10, "dont know"),  # contraction restored: 9 matches each -> 1
    ]
    rows = [{"index": i, "image": b64_image(0) if i == 0 else "0", "question": "?", "answer": json.dumps(a)}
            for i, (a, _) in enumerate(answers)]
    scores = score(tmp_path, "TextVQA_VAL", rows, {i: p for i, (_, p) in enumerate(answers)})
    assert scores["overall"]["accuracy"] == pytest.approx(100 * (0.9 + 0.3 + 0 + 1) / 4)  # 55.0


def test_vqa_normalize():
    assert vqa_normalize("The Two dogs.") == "2 dogs"
    assert vqa_normalize("3.5 m") == "3.5 m"
    assert vqa_normalize("well-known") == "well known"


def test_docvqa_anls(tmp_path):
    cases = [
        (["1000"], "1,000"),  # lev 1, longest 5: NL 0.2 -> 0.8
        (["hello world"], "Hello   World"),  # lowercased, spaces collapsed: 1.0
        (["abcxyz"], "abcdef"),  # lev 3 / 6 = 0.5: similarity 0.5 is not under the threshold, kept: 0.5
        (["abcdxyz"], "abcuvwz"),  # lev 3 / 7: similarity 4/7 = 0.571, kept
        (["abcxyz"], "axxxxx"),  # lev 4 / 6 (4 substitutions): similarity 1/3, under 0.5: 0
        (["x"], ""),  # lev 1 / 1: 0
        (["café"], "Café"),  # unicode, case: 1.0
    ]
    rows = [{"index": i, "image": b64_image(i), "question": "?", "answer": repr(a)} for i, (a, _) in enumerate(cases)]
    scores = score(tmp_path, "DocVQA_VAL", rows, {i: p for i, (_, p) in enumerate(cases)})
    assert scores["overall"]["anls"] == pytest.approx(100 * (0.8 + 1 + 0.5 + 4 / 7 + 0 + 0 + 1) / 7)


def test_chartqa_relaxed(tmp_path):
    cases = [
        ("0.12", "12%", 1),  # "12%" reads 0.12: equal
        ("12", "12%", 0),  # 0.12 vs 12: 99% off
        ("1000", "1,000", 0),  # "1,000" is no float: string compare, unequal
        ("100", "104", 1),  # 4% off
        ("100", "106", 0),  # 6% off
        ("Yes", "yes", 1),  # case-insensitive string match
        ("0", "0.0", 0),  # answer 0: no relative tolerance, string compare
    ]
    rows = [{"index": i, "image": b64_image(i), "question": "?", "answer": a} for i, (a, _, _) in enumerate(cases)]
    scores = score(tmp_path, "ChartQA_TEST", rows, {i: p for i, (_, p, _) in enumerate(cases)})
    assert scores["overall"]["relaxed_accuracy"] == pytest.approx(100 * 3 / 7)


def test_exact_match_ocrvqa_and_gqa(tmp_path):
    rows = [{"index": 0, "image": b64_image(0), "question": "Title?", "answer": "['Harry Potter']"},
            {"index": 1, "image": b64_image(1), "question": "Title?", "answer": "['Harry Potter']"}]
    preds = {0: " HARRY potter ", 1: "Harry Potter."}  # case and outer spaces ignored; the full stop is not
    assert score(tmp_path, "OCRVQA_TEST", rows, preds)["overall"]["accuracy"] == pytest.approx(50.0)
    assert score(tmp_path, "GQA_TestDev_Balanced", rows, preds)["kind"] == "exact"


def test_pope(tmp_path):
    cases = [("yes", "Yes"), ("yes", "No"), ("no", "no."), ("no", "Yes, there is."),
             ("yes", "yes"), ("no", "I am not sure"), ("yes", "Yes and no"), ("no", "NO")]
    rows = [{"index": i, "image": b64_image(i % 2), "question": "Is there a dog?", "answer": a,
             "category": "adversarial" if i < 4 else "random"} for i, (a, _) in enumerate(cases)]
    scores = score(tmp_path, "POPE", rows, {i: p for i, (_, p) in enumerate(cases)})
    o = scores["overall"]
    # right: rows 0, 2, 4, 7 -> 50%. TP rows 0, 4; FP row 3; FN rows 1, 6 (no word read counts as not "yes").
    assert o["accuracy"] == pytest.approx(50.0)
    assert o["precision"] == pytest.approx(100 * 2 / 3) and o["recall"] == pytest.approx(50.0)
    assert o["f1"] == pytest.approx(100 * 4 / 7)  # 2 * (2/3 * 1/2) / (2/3 + 1/2)
    assert scores["counts"]["unparseable"] == 2
    # adversarial rows 0-3: TP 1, FP 1, FN 1 -> precision = recall = F1 = 50
    assert scores["per_category"]["adversarial"]["f1"] == pytest.approx(50.0)


def test_mme_perception_cognition(tmp_path):
    # existence: image a (yes right, no right), image b (yes right, no wrong): acc 3/4 = 75, acc+ 1/2 = 50 -> 125.
    # code_reasoning: image c both right: 100 + 100 = 200. Perception 125, cognition 200, total 325.
    rows = []
    for i, (image, category, answer) in enumerate([("a", "existence", "Yes"), ("a", "existence", "No"),
                                                   ("b", "existence", "Yes"), ("b", "existence", "No"),
                                                   ("c", "code_reasoning", "Yes"), ("c", "code_reasoning", "No")]):
        rows.append({"index": i, "image": b64_image(i) if i % 2 == 0 else str(i - 1), "image_path": f"{image}.jpg",
                     "question": "Is it? Please answer yes or no.", "answer": answer, "category": category})
    preds = {0: "Yes", 1: "No", 2: "yes.", 3: "Yes", 4: "Yes", 5: "No"}
    scores = score(tmp_path, "MME", rows, preds)
    assert scores["per_category"]["existence"]["score"] == pytest.approx(125.0)
    assert scores["overall"] == pytest.approx({"perception": 125.0, "cognition": 200.0, "total": 325.0})


def test_hallusionbench(tmp_path):
    # aAcc 3/4 = 75; qAcc: q0 (right, wrong) 0, q1 (right, right) 1 -> 50; fAcc: f0 both right, f1 one wrong -> 50.
    layout = [("f0", "q0", "Yes"), ("f1", "q0", "No"), ("f0", "q1", "Yes"), ("f1", "q1", "No")]
    rows = [{"index": i, "image": b64_image(i), "question": "Is it so?", "answer": a, "category": "VD",
             "l2-category": "chart", "set_id": "0", "figure_id": f, "question_id": q}
            for i, (f, q, a) in enumerate(layout)]
    scores = score(tmp_path, "HallusionBench", rows, {0: "Yes", 1: "Yes", 2: "Yes", 3: "No"})
    o = scores["overall"]
    assert (o["aAcc"], o["qAcc"], o["fAcc"]) == pytest.approx((75.0, 50.0, 50.0))
    assert o["overall"] == pytest.approx((75 + 50 + 50) / 3)


def test_ocrbench(tmp_path):
    cases = [
        ("Regular Text Recognition", ["HELLO"], "the word is hello"),  # lowercased substring: hit
        ("Handwritten Mathematical Expression Recognition", ["x ^ 2"], "$x^2$"),  # spaces removed: hit
        ("Scene Text-centric VQA", ["1000"], "1,000"),  # not a substring: miss
        ("Doc-oriented VQA", ["Café"], "café."),  # unicode, lowercased: hit
    ]
    rows = [{"index": i, "image": b64_image(i), "question": "?", "answer": json.dumps(a), "category": c}
            for i, (c, a, _) in enumerate(cases)]
    scores = score(tmp_path, "OCRBench", rows, {i: p for i, (_, _, p) in enumerate(cases)})
    assert scores["overall"]["final_score"] == 3 and scores["overall"]["accuracy"] == pytest.approx(75.0)
    assert scores["per_category"]["Text Recognition (6 kinds)"]["score"] == 1


@pytest.mark.parametrize(("name", "kind"), [
    ("MMBench_DEV_EN_V11", "mcq"), ("SEEDBench_IMG", "mcq"), ("MMStar", "mcq"), ("ScienceQA_TEST", "mcq"),
    ("MME", "mme"), ("MME-RealWorld", "mcq"), ("TextVQA_VAL", "vqa"), ("InfoVQA_VAL", "anls"),
    ("ChartQA_TEST", "relaxed"), ("OCRBench", "ocrbench"), ("POPE", "pope"), ("HallusionBench", "hallusion"),
    ("GQA_TestDev_Balanced", "exact"), ("my_bench", None),
])
def test_kind_from_name(name, kind):
    assert kind_from_name(name) == kind
    assert kind_from_name("my_bench", ["index", "A", "B"]) == "mcq"


def test_generic_yes_no_kind(tmp_path):
    rows = [{"index": i, "image": b64_image(i), "question": "Is it red?", "answer": a}
            for i, a in enumerate(["yes", "yes", "no"])]
    # "Yes." right; "no" against yes wrong; "" reads as neither: wrong and unparseable -> 1/3
    scores = score(tmp_path, "my_checks", rows, {0: "Yes.", 1: "no", 2: ""}, kind="yesno")
    assert scores["overall"]["accuracy"] == pytest.approx(100 / 3)
    assert scores["counts"]["unparseable"] == 1
