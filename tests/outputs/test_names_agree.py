"""The terminal table and the HTML page agree about which characters in a name are dangerous."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from convnext_cli.outputs.html import HtmlReportWriter
from convnext_cli.outputs.writers import open_writer
from convnext_cli.results import Prediction, Result

# Every bidirectional-text control (embeddings, overrides, isolates, marks) and the BOM: each
# reorders or hides text; U+202E makes "rlo-\u202egpj.exe" look like "rlo-exe.jpg".
BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"


def results(char: str) -> list[Result]:
    name = f"rlo-{char}gpj.exe"
    return [
        Result(name, predictions=[Prediction(f"label{char}x", 0, 0.9)]),
        Result(f"bad-{char}.jpg", error=f"cannot decode {char}"),
    ]


@pytest.mark.parametrize("char", list(BIDI), ids=[f"U+{ord(c):04X}" for c in BIDI])
def test_bidi_controls_are_escaped_in_the_table_and_the_page(
    char: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    escape = f"\\u{ord(char):04x}"
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "table.txt"
    writer = open_writer("classify", "table", out, top_k=1)
    writer.write(results(char))
    writer.close()
    table = out.read_text(encoding="utf-8")
    assert char not in table
    assert f"rlo-{escape}gpj.exe" in table and f"bad-{escape}.jpg" in table

    stream = io.StringIO()
    page = HtmlReportWriter(stream, 1, thumbnailer=None)
    page.write(results(char))
    page.close()
    html = stream.getvalue()
    assert char not in html and f"&#{ord(char)};" not in html and f"&#x{ord(char):x};" not in html
    assert f"rlo-{escape}gpj.exe" in html or f'<span class="esc">{escape}</span>' in html
    assert html.count(escape) >= 3  # the path, the label and the error, each shown as an escape
