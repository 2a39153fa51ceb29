import pytest

from llava_uhd.bench.__main__ import main
from llava_uhd.bench.tokens import ENCODERS, token_counts
from llava_uhd.vision.resize import ResolutionPolicy
from llava_uhd.vision.slicing import SliceGridPolicy

RESOLUTIONS = [(512, 512), (768, 768), (1024, 1024), (2048, 2048), (720, 1280)]


KEYS = dict(zip((spec.label for spec in ENCODERS), ("GNE", "SBE", "ViT-UHD", "ViT-UHD merger")))


@pytest.fixture(scope="module")
def table():
    assert [spec.projector for spec in ENCODERS] == ["merger", "merger", "mlp", "merger"]
    return {(KEYS[r.label], r.resolution): r for r in token_counts(RESOLUTIONS)}


def expected_native(resolution, multiple):
    """Policy size (aspect kept, area in [512^2, 1560^2], sides a multiple of the pixels per token)."""
    h, w = ResolutionPolicy(multiple=multiple).target_size(*resolution)
    assert h % multiple == 0 and w % multiple == 0 and 512**2 <= h * w <= 1560**2
    return (h, w), (h // multiple) * (w // multiple)


def expected_sbe(resolution):
    """(rows*cols + 1) views of 24x24 patches merged 2x2 (144 tokens) + one separator per slice."""
    rows, cols = SliceGridPolicy(336, 9).grid(*resolution)
    views = 1 if rows * cols == 1 else rows * cols + 1
    return (rows * 336, cols * 336), views * 144 + (rows * cols if views > 1 else 0)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_counts_follow_the_formulas(table, resolution):
    for key, multiple in (("ViT-UHD", 40), ("ViT-UHD merger", 80), ("GNE", 28)):
        row = table[key, resolution]
        assert (row.encoded, row.tokens) == expected_native(resolution, multiple), key
    row = table["SBE", resolution]
    assert (row.encoded, row.tokens) == expected_sbe(resolution)


def test_known_values(table):
    # 1024 snaps to 1040 (26 x 40 px, 13 x 80 px); 2048 is capped by the 1560^2 area budget.
    assert table["ViT-UHD", (1024, 1024)].encoded == (1040, 1040)
    got = {res: [table[k, res].tokens for k in ("GNE", "SBE", "ViT-UHD", "ViT-UHD merger")] for res in RESOLUTIONS}
    assert got[512, 512] == [19 * 19, 5 * 144 + 4, 13 * 13, 7 * 7]
    assert got[1024, 1024] == [37 * 37, 10 * 144 + 9, 26 * 26, 13 * 13]
    assert got[2048, 2048] == [55 * 55, 10 * 144 + 9, 39 * 39, 19 * 19]
    # ViT-UHD's 64x setting emits far fewer tokens than the patch-14 + 2x2 merge baseline at every size.
    assert all(g[3] * 7 < g[0] for g in got.values())


def test_cli_prints_a_table(capsys):
    assert main(["tokens", "--resolutions", "512", "768x1024"]) == 0
    out = capsys.readouterr().out
    assert "| encoder | 512^2 | 768x1024 |" in out
    assert "169 (560x560)" not in out and "49 (560x560)" in out
    assert len([line for line in out.splitlines() if line.startswith("| ")]) == 2 + 4  # header, rule, 4 rows


@pytest.mark.parametrize("bad", ["0", "768x0", "abc", "1x2x3", "12.5"])
def test_cli_rejects_a_bad_resolution_in_one_message(capsys, bad):
    with pytest.raises(SystemExit) as info:
        main(["tokens", "--resolutions", bad])
    assert info.value.code == 2
    assert f"bad resolution {bad!r}" in capsys.readouterr().err
