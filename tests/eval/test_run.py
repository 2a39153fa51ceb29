"""``eval run`` on a tiny model: resumable after a SIGKILL, batched = one-by-one, bad rows skipped by name."""

import base64
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from llava_uhd.eval.__main__ import main
from llava_uhd.eval.generation import generate_batch
from llava_uhd.eval.prompts import MCQ_INSTRUCTION, build_prompt
from llava_uhd.eval.run import read_predictions, run_benchmark
from llava_uhd.eval.tiny import write_tiny
from llava_uhd.eval.tsv import read_benchmark
from llava_uhd.mllm import LlavaUHD

from .conftest import b64_image, mcq_rows, vqa_rows, write_tsv

FAST = ["--num-beams", "1", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"), rows=1)["model"]


def test_killed_run_resumes_to_the_same_predictions(tmp_path, model_dir):
    data = [str(write_tsv(tmp_path / "TextVQA_VAL.tsv", vqa_rows(30))),
            str(write_tsv(tmp_path / "MMStar.tsv", mcq_rows(30)))]
    args = ["--model", str(model_dir), "--data", data[0], "--data", data[1], "--max-new-tokens", "16", *FAST]
    assert main(["run", *args, "--out", str(tmp_path / "full")]) == 0

    killed = tmp_path / "killed"
    first = killed / "TextVQA_VAL_predictions.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llava_uhd.eval", "run", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (first.exists() and first.read_text().count("\n") >= 5):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    answered = first.read_text().count("\n")
    assert 5 <= answered < 30, "the run must be killed while answering the first benchmark"
    with first.open("a") as handle:  # as if killed in the middle of writing a record
        handle.write('{"index": "29", "predic')

    assert main(["run", *args, "--out", str(killed)]) == 0
    for name in ("TextVQA_VAL", "MMStar"):
        assert (killed / f"{name}_predictions.jsonl").read_text() == (tmp_path / "full" / f"{name}_predictions.jsonl"
                                                                      ).read_text()
    stats = json.loads((killed / "TextVQA_VAL_run.json").read_text())
    assert stats["answered_before"] == answered and stats["answered_now"] == 30 - answered
    assert 0 < stats["generate_share"] <= 1 and stats["rows_per_s"] > 0
    scores = json.loads((killed / "scores.json").read_text())
    assert set(scores) == {"TextVQA_VAL", "MMStar"} and scores["MMStar"]["counts"]["scored"] == 30


def test_batched_answers_equal_one_by_one(tmp_path, model_dir):
    torch.set_num_threads(1)
    model = LlavaUHD.from_pretrained(model_dir).eval()
    bench = read_benchmark(write_tsv(tmp_path / "AI2D_TEST.tsv", mcq_rows(5)))
    images = [bench.load_image(r) for r in bench.rows]
    prompts = [build_prompt(bench, r) for r in bench.rows]
    one = [generate_batch(model, [im], [p], 12, num_beams=1)[0] for im, p in zip(images, prompts)]
    assert generate_batch(model, images, prompts, 12, num_beams=1) == one
    beams = generate_batch(model, images[:2], prompts[:2], 6, num_beams=3)
    assert beams == [model.generate(im, p, max_new_tokens=6, num_beams=3).text for im, p in zip(images[:2], prompts)]


def test_prompts_follow_vlmevalkit(tmp_path):
    bench = read_benchmark(write_tsv(tmp_path / "MMStar.tsv", mcq_rows(2)))
    assert build_prompt(bench, bench.rows[1]) == (
        f"Hint: Look closely.\nWhich one is 1?\nA. cat\nB. dog\nC. bird\n{MCQ_INSTRUCTION}")
    assert build_prompt(bench, bench.rows[0]).startswith("Which one is 0?\nA. cat")  # empty hint: no hint line
    vqa = read_benchmark(write_tsv(tmp_path / "TextVQA_VAL.tsv", vqa_rows(1)))
    assert build_prompt(vqa, vqa.rows[0]) == "What is 0?\nAnswer the question using a single word or phrase."
    pope = read_benchmark(write_tsv(tmp_path / "POPE.tsv", [{"index": 0, "image": b64_image(0),
                                                             "question": "Is there a cat?", "answer": "yes"}]))
    assert build_prompt(pope, pope.rows[0]) == "Is there a cat? Please answer yes or no."


def test_bad_rows_are_skipped_by_name(tmp_path, model_dir):
    rows = vqa_rows(4)
    rows[1]["image"] = base64.b64encode(base64.b64decode(b64_image(1))[:120]).decode()  # a truncated PNG
    rows[2]["image"] = "17"  # no row 17
    bench = read_benchmark(write_tsv(tmp_path / "TextVQA_VAL.tsv", rows))
    model = LlavaUHD.from_pretrained(model_dir).eval()
    stats = run_benchmark(model, bench, tmp_path / "out", num_beams=1, max_new_tokens=4, progress=False)
    assert sorted(stats.skipped) == ["1", "2"]
    assert "undecodable image" in stats.skipped["1"] and "index '17'" in stats.skipped["2"]
    assert [r["index"] for r in read_predictions(tmp_path / "out" / "TextVQA_VAL_predictions.jsonl")] == ["0", "3"]
    assert json.loads((tmp_path / "out" / "TextVQA_VAL_run.json").read_text())["skipped"] == 2


def test_resume_refuses_other_generation_settings(tmp_path, model_dir, capsys):
    """Rows answered with 1 beam and a 4-token cap are not silently mixed with rows of another setting."""
    tsv = write_tsv(tmp_path / "TextVQA_VAL.tsv", vqa_rows(3))
    args = ["run", "--model", str(model_dir), "--data", str(tsv), "--out", str(tmp_path / "out"), *FAST]
    assert main([*args, "--max-new-tokens", "4", "--limit", "1"]) == 0
    capsys.readouterr()
    assert main([*args, "--max-new-tokens", "8"]) == 2
    assert "other settings (max_new_tokens 4 -> 8)" in capsys.readouterr().err
    assert len(read_predictions(tmp_path / "out" / "TextVQA_VAL_predictions.jsonl")) == 1
    assert main([*args, "--max-new-tokens", "4"]) == 0  # the same settings resume
    assert len(read_predictions(tmp_path / "out" / "TextVQA_VAL_predictions.jsonl")) == 3
