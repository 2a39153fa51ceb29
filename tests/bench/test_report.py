"""The one markdown-table and CSV writer the benchmarks and the eval reports share."""

import csv

from llava_uhd.bench.report import markdown_table, write_csv


def test_markdown_table_has_a_separator_per_column_and_formats_cells():
    def fmt(value) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    text = markdown_table(["a", "b"], [[1, 2.5], ["x", None]], fmt=fmt)
    assert text.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 2.5 |", "| x | None |"]
    assert not text.endswith("\n")
    assert markdown_table(["only"], []) == "| only |\n| --- |"


def test_write_csv_keeps_the_named_columns_in_order_and_rounds_floats(tmp_path):
    path = tmp_path / "rows.csv"
    rows = [{"b": 1.23456, "a": "x", "extra": [1, 2]}, {"a": "y"}]
    write_csv(path, rows, ["a", "b"], digits=2)
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["a", "b"], ["x", "1.23"], ["y", ""]]
    write_csv(path, rows[:1], ["b"])
    assert path.read_text().splitlines() == ["b", "1.23456"]
