"""Summary tables show no Python None: a value that does not exist is a dash."""

from __future__ import annotations

import pytest

from xclip.cli.tables import _summary_cell


def test_a_missing_summary_value_is_a_dash_and_numbers_keep_their_format():
    assert _summary_cell(None) == "-"
    assert _summary_cell(0.000123456) == "0.000123"
    assert _summary_cell(3) == "3" and _summary_cell(False) == "False"


@pytest.mark.parametrize("width", [80, 100, 200])
def test_tables_keep_to_the_terminal_and_never_cut_a_word(width):
    import io

    from rich.console import Console
    from rich.table import Table

    from xclip.cli.tables import print_table

    # the shapes that were cut at 80 columns: seven numeric columns with two-word headers, and a caption beside
    # a long file name
    numbers = Table("inputs", "done", "mean nodes", "max nodes", "median error", "max error", "max map error bound", "missed")
    numbers.add_row("captions", "12", "19.3", "22", "7.66e-05", "5.02e-04", "7.85e-04", "0")
    captions = Table("caption", "score", "four-term value", "completeness error", "map error bound", "figure")
    captions.add_row("a red circle and a blue square beside a green cross", "0.4884", "0.3863", "1.64e-04", "1.74e-03", "pair000000.png")
    captions.add_row("a star", "0.3141", "-0.0175", "7.35e-06", "1.81e-03", "pair000001.png")
    for table in (numbers, captions):
        words = {w for column in table.columns for cell in [column.header, *column.cells] for w in str(cell).split()}
        out = io.StringIO()
        print_table(Console(file=out, width=width), table)
        lines = out.getvalue().splitlines()
        assert max(len(line) for line in lines) <= width, out.getvalue()
        drawn = {w.strip("│┃ ") for line in lines for w in line.replace("│", " ").replace("┃", " ").split()}
        assert words <= drawn, words - drawn  # every word whole: none cut, folded or ellipsised
