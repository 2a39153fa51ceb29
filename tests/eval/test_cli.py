"""Bad input to ``python -m llava_uhd.eval``: one message on stderr, exit status 2, never a traceback."""

import json
import subprocess
import sys

import pytest

from llava_uhd.eval.__main__ import main

from .conftest import b64_image, vqa_rows, write_predictions, write_tsv


def fails(capsys, argv, *expected):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture
def bench(tmp_path):
    return write_tsv(tmp_path / "TextVQA_VAL.tsv", vqa_rows(3))


def test_score_writes_tables_and_chart(tmp_path, bench, capsys):
    preds = write_predictions(tmp_path / "p.jsonl", {0: "word0", 1: "nope", 2: "Word2."})
    assert main(["score", "--data", str(bench), "--predictions", str(preds), "--out", str(tmp_path / "s")]) == 0
    assert "accuracy 66.67 (3/3 rows" in capsys.readouterr().out  # rows 0 and 2 right (case, trailing period)
    scores = json.loads((tmp_path / "s" / "scores.json").read_text())["TextVQA_VAL"]
    assert scores["per_category"]["even"]["accuracy"] == pytest.approx(100.0)  # rows 0, 2
    assert scores["per_category"]["odd"]["accuracy"] == 0.0
    csv_text = (tmp_path / "s" / "TextVQA_VAL_scores.csv").read_text().splitlines()
    assert csv_text[0] == "category,accuracy,count" and csv_text[1].startswith("overall,66.66")
    assert (tmp_path / "s" / "TextVQA_VAL_scores.png").stat().st_size > 1000
    # A second run folder, then the table across both
    preds2 = write_predictions(tmp_path / "p2.jsonl", {0: "word0", 1: "word1", 2: "word2"})
    assert main(["score", "--data", str(bench), "--predictions", str(preds2), "--out", str(tmp_path / "t")]) == 0
    assert main(["table", str(tmp_path / "s"), str(tmp_path / "t"), "--out", str(tmp_path / "r")]) == 0
    table = (tmp_path / "r" / "results.md").read_text().splitlines()
    assert table[0] == "| run | TextVQA_VAL (accuracy) |"
    assert table[2:] == ["| s | 66.67 |", "| t | 100.00 |"]
    assert (tmp_path / "r" / "results.png").is_file()


def test_a_row_without_a_prediction_counts_as_wrong(tmp_path, bench, capsys, caplog):
    # the missing row is in the total: 2 of 3 rows right, not 2 of 2
    preds = write_predictions(tmp_path / "p.jsonl", {0: "word0", 1: "word1"})  # row 2 has no prediction
    assert main(["score", "--data", str(bench), "--predictions", str(preds), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "TextVQA_VAL: accuracy 66.67 (2/3 rows, 1 without a prediction, counted wrong; 0 unparseable)" in out
    assert "1 of 3 rows have no prediction" in caplog.text and "each counts as wrong" in caplog.text
    scores = json.loads((tmp_path / "s" / "scores.json").read_text())["TextVQA_VAL"]
    assert scores["counts"] == {"rows": 3, "scored": 2, "missing": 1, "unparseable": 0}
    assert scores["per_category"]["even"] == {"accuracy": pytest.approx(50.0), "count": 2}  # rows 0 and 2
    assert "3 rows scored, 1 of them without a prediction (counted wrong)" in (
        tmp_path / "s" / "TextVQA_VAL_scores.md").read_text()


def test_the_kind_picked_from_the_file_is_printed(tmp_path, capsys):
    rows = [{"index": i, "image": b64_image(i), "question": "Which?", "A": "cat", "B": "dog", "answer": "AB"[i % 2]}
            for i in range(2)]
    quiz = write_tsv(tmp_path / "my_quiz.tsv", rows)
    preds = write_predictions(tmp_path / "p.jsonl", {0: "A", 1: "A"})
    assert main(["score", "--data", str(quiz), "--predictions", str(preds)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("my_quiz: kind mcq (its name is not a known benchmark's and it has option columns A and B; "
                          "--kind overrides, one of vqa, anls,")
    assert "my_quiz: accuracy 50.00 (2/2 rows" in out
    checks = write_tsv(tmp_path / "my_checks.tsv", [{"index": 0, "image": b64_image(0), "question": "Red?",
                                                      "answer": "yes"}])
    preds = write_predictions(tmp_path / "y.jsonl", {0: "Yes, it is."})
    assert main(["score", "--data", str(checks), "--predictions", str(preds), "--kind", "yesno"]) == 0
    out = capsys.readouterr().out
    assert "kind" not in out.splitlines()[0]  # given, not picked: nothing to say
    assert "my_checks: accuracy 100.00 (1/1 rows" in out


def test_bad_benchmark_files(tmp_path, capsys):
    missing_column = write_tsv(tmp_path / "ChartQA_TEST.tsv", [{"index": 0, "image": b64_image(0), "answer": "1"}])
    fails(capsys, ["score", "--data", str(missing_column), "--predictions", "x"], "missing column(s) question")
    empty = tmp_path / "DocVQA_VAL.tsv"
    empty.write_text("")
    fails(capsys, ["score", "--data", str(empty), "--predictions", "x"], "empty file")
    unknown = write_tsv(tmp_path / "my_bench.tsv", [{"index": 0, "image": b64_image(0), "question": "?"}])
    fails(capsys, ["score", "--data", str(unknown), "--predictions", "x"], "pass --kind")
    twice = write_tsv(tmp_path / "OCRVQA.tsv", [{"index": 0, "image": "0", "question": "?", "answer": "a"}] * 2)
    fails(capsys, ["score", "--data", str(twice), "--predictions", "x"], "index '0' appears twice")
    fails(capsys, ["score", "--data", str(tmp_path / "nope.tsv"), "--predictions", "x"], "not found")


def test_bad_predictions(tmp_path, bench, capsys):
    args = ["score", "--data", str(bench), "--predictions"]
    unknown = write_predictions(tmp_path / "u.jsonl", {0: "a", 7: "b", 9: "c"})
    fails(capsys, [*args, str(unknown)], "2 prediction(s) for indices not in", "7, 9")
    dup = tmp_path / "d.jsonl"
    dup.write_text("".join(json.dumps({"index": i, "prediction": p}) + "\n" for i, p in [(0, "a"), (1, "b"), (0, "c")]))
    fails(capsys, [*args, str(dup)], "predicted twice: 0 (records 1 and 3)")
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"index": 0, "prediction": "a"}\nnot json\n{"index": 1, "prediction": "b"}\n')
    fails(capsys, [*args, str(broken)], "line 2: not a prediction record")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    fails(capsys, [*args, str(empty)], "no predictions to score")
    fails(capsys, [*args, str(tmp_path / "missing.jsonl")], "predictions file not found")
    fails(capsys, [*args, str(tmp_path)], "a folder, not a predictions file")
    fails(capsys, ["score", "--data", str(tmp_path), "--predictions", str(empty)], "a folder, not a benchmark file")
    fails(capsys, ["tiny", "--out", str(empty)], "a file, not a folder")
    header_only = tmp_path / "GQA.tsv"
    header_only.write_text("index\timage\tquestion\tanswer\n")
    fails(capsys, ["score", "--data", str(header_only), "--predictions", str(empty)], "a header and no rows")
    for name, text in [("g", "garbage\n"), ("l", "[1, 2]\n"), ("n", '{"index": 0}\n')]:  # whole lines, not records
        (tmp_path / f"{name}.jsonl").write_text(text)
        fails(capsys, [*args, str(tmp_path / f"{name}.jsonl")], "line 1: not a prediction record")


def test_bad_arguments(tmp_path, bench, capsys):
    fails(capsys, ["rnu"], "invalid choice")
    fails(capsys, ["score", "--dat", str(bench)], "required")
    fails(capsys, ["run", "--model", "m", "--data", str(bench), "--out", "o", "--batch-size", "x"], "whole number")
    fails(capsys, ["run", "--model", "m", "--data", str(bench), "--out", "o", "--num-beams", "0"], "at least 1")
    fails(capsys, ["run", "--model", str(tmp_path), "--data", str(bench), "--out", "o"], "not a model folder")
    fails(capsys, ["table", str(tmp_path)], "no scores.json")
    (tmp_path / "scores.json").write_text("{")
    fails(capsys, ["table", str(tmp_path)], "not valid JSON")
    fails(capsys, ["tiny", "--out", str(tmp_path), "--rows", "0"], "at least 1")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llava_uhd.eval", "score", "--data", str(tmp_path / "x.tsv"),
                             "--predictions", "p.jsonl"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: benchmark file not found: {tmp_path / 'x.tsv'}"]
