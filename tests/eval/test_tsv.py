"""Reading benchmark files: the three ways a row gives its image, answer lists, and what is refused."""

import base64
import io

import numpy as np
import pytest

from llava_uhd.errors import EvalError
from llava_uhd.eval.tsv import parse_answers, read_benchmark

from .conftest import b64_image, drawn_image, write_tsv


def test_base64_shared_and_path_images(tmp_path):
    drawn_image(7).save(tmp_path / "seven.png")
    rows = [
        {"index": 10, "image": b64_image(3), "question": "q", "answer": "a"},
        {"index": 11, "image": "10", "question": "q", "answer": "a"},  # shares row 10's image
    ]
    bench = read_benchmark(write_tsv(tmp_path / "OCRVQA.tsv", rows))
    first, shared = (bench.load_image(r) for r in bench.rows)
    assert first.size == (96, 64) and np.array_equal(np.asarray(first), np.asarray(shared))
    assert np.array_equal(np.asarray(first), np.asarray(drawn_image(3)))
    assert bench.image_source(bench.rows[1]) == "10"
    paths = read_benchmark(write_tsv(tmp_path / "GQA.tsv", [
        {"index": 0, "image_path": "seven.png", "question": "q", "answer": "a"},  # relative to the TSV's folder
        {"index": 1, "image_path": str(tmp_path / "seven.png"), "question": "q", "answer": "a"},
        {"index": 2, "image_path": "gone.png", "question": "q", "answer": "a"},
    ]))
    assert np.array_equal(np.asarray(paths.load_image(paths.rows[0])), np.asarray(drawn_image(7)))
    assert paths.load_image(paths.rows[1]).size == (96, 64)
    with pytest.raises(EvalError, match="row 2: image_path 'gone.png' not found"):
        paths.load_image(paths.rows[2])


def test_jpeg_and_grey_images_come_back_rgb(tmp_path):
    buffer = io.BytesIO()
    drawn_image(1).convert("L").save(buffer, format="JPEG")
    rows = [{"index": 0, "image": base64.b64encode(buffer.getvalue()).decode(), "question": "q", "answer": "a"}]
    bench = read_benchmark(write_tsv(tmp_path / "OCRVQA.tsv", rows))
    assert bench.load_image(bench.rows[0]).mode == "RGB"


def test_sixteen_bit_and_transparent_images_get_the_pixels_generate_and_training_get(tmp_path):
    """PIL's plain RGB conversion saturates 16-bit PNGs to white and drops alpha; eval uses the product's."""
    from PIL import Image

    from llava_uhd.vision.resize import to_rgb

    deep = Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16))
    clear = drawn_image(2).convert("RGBA")
    clear.putalpha(0)
    rows = []
    for i, image in enumerate((deep, clear)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append({"index": i, "image": base64.b64encode(buffer.getvalue()).decode(), "question": "q", "answer": "a"})
    bench = read_benchmark(write_tsv(tmp_path / "GQA.tsv", rows))
    got_deep, got_clear = (np.asarray(bench.load_image(r)) for r in bench.rows)
    assert np.array_equal(got_deep, np.asarray(to_rgb(deep))) and got_deep.mean() < 200
    assert (got_clear == 255).all()


def test_answer_lists_are_parsed_without_eval():
    assert parse_answers('["a", "b"]') == ["a", "b"]
    assert parse_answers("['it''s', \"don't\"]") == ["its", "don't"]  # Python literal (adjacent strings join)
    assert parse_answers("plain answer") == ["plain answer"]
    assert parse_answers("") == [""]
    with pytest.raises(EvalError, match="looks like a list but is not a valid literal"):
        parse_answers("[__import__('os').system('true')]")


def test_kind_override_and_missing_options(tmp_path):
    rows = [{"index": 0, "image": b64_image(0), "question": "q", "answer": "x"}]
    path = write_tsv(tmp_path / "my_bench.tsv", rows)
    assert read_benchmark(path, kind="exact").kind == "exact"
    with pytest.raises(EvalError, match="no option columns A and B"):
        read_benchmark(path, kind="mcq")
    with pytest.raises(EvalError, match="unknown kind 'vqq'"):
        read_benchmark(path, kind="vqq")


def test_ragged_rows_and_non_utf8_are_refused(tmp_path):
    ragged = tmp_path / "OCRVQA.tsv"
    ragged.write_text("index\timage\tquestion\tanswer\n0\tabc\tq\n")
    with pytest.raises(EvalError, match="line 2: 3 cells for 4 columns"):
        read_benchmark(ragged)
    latin = tmp_path / "GQA.tsv"
    latin.write_bytes("index\timage\tquestion\n0\t1\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(EvalError, match="not UTF-8"):
        read_benchmark(latin)
