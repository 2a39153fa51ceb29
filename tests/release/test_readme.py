"""The model snippets of docs/model.md run as written (model folder pointed at a tiny one, in a scratch directory)."""

import re
from pathlib import Path

import numpy as np
from PIL import Image

MODEL_PAGE = Path(__file__).resolve().parents[2] / "docs" / "model.md"


def model_snippets() -> list[str]:
    section = MODEL_PAGE.read_text().split("\n## The model\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_model_page_snippets_run(release_dir, tmp_path, monkeypatch, capsys):
    load, build = model_snippets()
    assert 'model_dir = "runs/tiny/stage3/version_0/export"' in load and "LlavaUHD.from_pretrained(model_dir)" in load
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save("photo.jpg")
    exec(compile(load.replace("runs/tiny/stage3/version_0/export", str(release_dir)), "docs/model.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert len(printed) >= 4 and float(printed[-2]) > 0  # ... ttft_ms tokens/s
    assert (tmp_path / "runs/my_model/model.safetensors").is_file()
    exec(compile(build, "docs/model.md", "exec"), {})
    assert (tmp_path / "runs/new_model/config.json").is_file()
    assert (tmp_path / "runs/tokenizer/tokenizer.json").is_file()
