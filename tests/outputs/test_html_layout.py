"""The HTML report in headless Chromium at 1280 and 400 px: full labels reachable (wrapped,
every label with its full text as a tooltip), no sideways overflow, scores not clipped, and
the page says which model made it, when, with which settings."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from chromium_cdp import Chromium, find_chromium

from convnext_cli.outputs.html import HtmlReportWriter
from convnext_cli.results import Prediction, Result

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium (Debian: apt-get install chromium)"
)
SCREENS = Path(__file__).resolve().parents[2] / "docs" / "screens"
LABELS = [
    "Granny Smith, apple, eating apple, dessert apple, Malus pumila",
    "espresso maker, coffee machine, percolator",
    "crash helmet, motorcycle helmet, protective headgear",
    "tabby, tabby cat, domestic cat, house cat, Felis catus",
    "space shuttle",
]
INFO = {
    "model": "facebook/convnext-tiny-224",
    "device": "cpu float32",
    "top-k": "3",
    "made": "2026-12-01 22:00 UTC",
    "command": "convnext classify photos/ -k 3 -o report.html",
}


def page(photos: list[Path], tmp_path: Path) -> Path:
    stream = io.StringIO()
    writer = HtmlReportWriter(stream, 3, title="sample photos")
    writer.set_run_info(INFO)
    results = []
    for n, photo in enumerate(photos):
        labels = LABELS[n % len(LABELS) :] + LABELS[: n % len(LABELS)]
        predictions = [Prediction(labels[i], 100 + i, s) for i, s in enumerate((0.81, 0.12, 0.03))]
        results.append(Result(path=str(photo), predictions=predictions))
    results.append(Result(path="missing.jpg", error="no such file"))
    writer.write(results)
    writer.close()
    target = tmp_path / "report.html"
    target.write_text(stream.getvalue(), encoding="utf-8")
    return target


MEASURE = """(() => {
  const doc = document.documentElement;
  const labels = Array.from(document.querySelectorAll('.label')).map(l => ({
    text: l.textContent, title: l.getAttribute('title'),
    cut: l.scrollWidth > l.clientWidth + 1 && getComputedStyle(l).textOverflow === 'ellipsis',
    inChip: !!l.closest('.chip')}));
  const clipped = Array.from(document.querySelectorAll('.score')).filter(s => {
    const r = s.getBoundingClientRect(), card = s.closest('.card').getBoundingClientRect();
    return s.scrollWidth > s.clientWidth + 1 || r.right > card.right + 0.5 || r.left < card.left;
  }).length;
  const wide = Array.from(document.querySelectorAll('.card')).filter(c =>
    c.getBoundingClientRect().right > doc.clientWidth + 0.5).length;
  const info = document.querySelector('.runinfo');
  return {scroll: doc.scrollWidth, client: doc.clientWidth, labels, clipped, wide,
          info: info ? info.innerText : ''};
})()"""


@pytest.mark.parametrize("width", [1280, 400])
def test_report_layout_in_chromium(width: int, photos: list[Path], tmp_path: Path) -> None:
    assert CHROMIUM is not None
    target = page(photos, tmp_path)
    with Chromium(CHROMIUM, width=width, height=900) as browser:
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        browser.load(target.as_uri())
        assert browser.problems() == []
        got = browser.evaluate(MEASURE)
        shot = tmp_path / f"report-{width}.png"
        browser.screenshot(shot, full_page=True)
        if os.environ.get("CONVNEXT_CAPTURE_SCREENS"):
            SCREENS.mkdir(parents=True, exist_ok=True)
            (SCREENS / f"html-report-{width}.png").write_bytes(shot.read_bytes())
    assert got["client"] == width or got["client"] <= width
    assert got["scroll"] <= got["client"], got  # no sideways overflow
    assert got["wide"] == 0 and got["clipped"] == 0, got
    card_labels = [label for label in got["labels"] if not label["inChip"]]
    assert len(card_labels) == 3 * len(photos)
    for label in got["labels"]:
        assert label["title"] == label["text"]  # the full name on hover, every label
    for label in card_labels:
        assert not label["cut"], label  # wrapped, never cut, in the cards
    for key, value in INFO.items():
        assert key in got["info"] and value in got["info"], got["info"]
