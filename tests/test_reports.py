"""Summary tables show no Python None: a value that does not exist is a dash."""

from __future__ import annotations

from xclip.cli import _summary_cell


def test_a_missing_summary_value_is_a_dash_and_numbers_keep_their_format():
    assert _summary_cell(None) == "-"
    assert _summary_cell(0.000123456) == "0.000123"
    assert _summary_cell(3) == "3" and _summary_cell(False) == "False"
