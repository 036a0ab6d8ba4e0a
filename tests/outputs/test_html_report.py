"""The HTML report (``--format html``): the writer on synthetic results, then the page in a
real headless Chromium (driven over the DevTools protocol), skipped when none is installed."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import tracemalloc
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from chromium_cdp import Chromium, find_chromium
from html_report_demo import classify_jsonl, results_from_jsonl

from convnext_cli.outputs.html import (
    THUMBNAIL_SIZE,
    HtmlReportWriter,
    display_text,
    make_thumbnail,
    plain_text,
    thumbnail_image,
)
from convnext_cli.results import Prediction, Result

# Names a file system allows and a page must show literally, never interpret.
HOSTILE_NAMES = [
    "dir/<script>alert(1)</script>.jpg",
    "quote\"and'apos&amp;.png",
    "new\nline\ttab\rreturn.jpg",
    "bytes-\udcff\udcfe-not-utf8.jpg",  # surrogateescape, as os.fsdecode gives them
    "bell\x07esc\x1b del\x7f c1\x85.jpg",
    "rlo-\u202egpj.exe",  # a right-to-left override would show "exe.jpg"
    "caf\u00e9 \u65e5\u672c \U0001f431.jpg",
    "lone-\ud800-surrogate.jpg",
    " leading and trailing spaces ",
]


def preds(*pairs: tuple[str, float], base: int = 0) -> list[Prediction]:
    return [Prediction(label, base + n, score) for n, (label, score) in enumerate(pairs)]


def render(results: list[Result], top_k: int = 3, batch: int = 4, **kwargs) -> str:
    stream = io.StringIO()
    writer = HtmlReportWriter(stream, top_k, **kwargs)
    for start in range(0, len(results), batch):
        writer.write(results[start : start + batch])
    writer.close()
    return stream.getvalue()


class Structure(HTMLParser):
    """Checks that every element is closed in order; collects the text of the page."""

    VOID = {"meta", "link", "img", "input", "br", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.text: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:]} ")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if not self.stack or self.stack[-1] not in ("style", "script"):
            self.text.append(data)


def parse(page: str) -> Structure:
    parser = Structure()
    parser.feed(page)
    parser.close()
    assert parser.problems == []
    assert parser.stack == []
    return parser


# -- the text shown for names ------------------------------------------------------------


def test_display_text_shows_hostile_characters_literally_and_visibly():
    assert display_text("<b>&\"'") == "&lt;b&gt;&amp;&quot;&#x27;"
    assert plain_text("a\udcffb") == "a\\xffb"
    assert '<span class="esc">\\xff</span>' in display_text("a\udcffb")
    assert plain_text("a\nb\tc\rd\x00e\x1bf\x7fg\x85h") == "a\\nb\\tc\\rd\\x00e\\x1bf\\x7fg\\x85h"
    assert plain_text("x\u202ey\u2028z\ud800") == "x\\u202ey\\u2028z\\ud800"
    assert plain_text("caf\u00e9 \u65e5 \U0001f431") == "caf\u00e9 \u65e5 \U0001f431"


def test_page_is_ascii_well_formed_and_shows_every_name(photos):
    results = [
        Result(path=name, predictions=preds((f"label-{n}", 0.9)))
        for n, name in enumerate(HOSTILE_NAMES)
    ]
    results.append(
        Result(path="bad-\udc80<b>.jpg", error="not a recognised image format \udcff<i>")
    )
    results.append(
        Result(path=str(photos[0]), predictions=preds(("<img src=x onerror=alert(1)>", 0.5)))
    )
    page = render(results, title="<title> & \udcff")
    page.encode("ascii")  # pure ASCII: valid UTF-8 whatever the stream's encoding
    structure = parse(page)
    scripts = [t for t, _ in structure.tags if t == "script"]
    assert scripts == ["script"]  # the page's own script, nothing injected
    assert not any(t == "img" and "onerror" in a for t, a in structure.tags)
    text = "".join(structure.text)
    for result in results:
        assert plain_text(result.path) in text
    assert "error: not a recognised image format \\xff<i>" in text
    assert "<img src=x onerror=alert(1)>" in text  # a label shown as text, not markup
    assert "<title> & \\xff" in text


def test_writes_to_an_ascii_stream_and_a_utf8_file(tmp_path):
    results = [Result(path=name, error="gone") for name in HOSTILE_NAMES]
    with open(tmp_path / "a.html", "w", encoding="ascii") as stream:  # strict: any non-ASCII fails
        writer = HtmlReportWriter(stream, 5)
        writer.write(results)
        writer.close()
    (tmp_path / "a.html").read_bytes().decode("utf-8")


# -- streaming and the summary ------------------------------------------------------------


class RecordingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushed_at: list[int] = []

    def flush(self) -> None:
        self.flushed_at.append(len(self.getvalue()))
        super().flush()


def test_streams_head_then_cards_per_batch_then_summary():
    stream = RecordingStream()
    writer = HtmlReportWriter(stream, 2, title="run")
    head = stream.getvalue()
    assert stream.flushed_at == [len(head)]
    assert '<input id="filter"' in head and head.rstrip().endswith("<main>")
    writer.write([Result(path="a.jpg", predictions=preds(("cat", 0.8), ("dog", 0.1)))])
    after_one = stream.getvalue()
    assert stream.flushed_at[-1] == len(after_one)
    assert "a.jpg" in after_one and "cat" in after_one and "</html>" not in after_one
    writer.write([Result(path="b.jpg", error="broken"), Result(path="c.jpg", predictions=[])])
    assert stream.flushed_at[-1] == len(stream.getvalue())
    assert 'id="summary"' not in stream.getvalue()
    writer.close()
    page = stream.getvalue()
    assert stream.flushed_at[-1] == len(page)
    assert page.endswith("</html>\n")
    assert (
        page.index("a.jpg") < page.index("b.jpg") < page.index("c.jpg") < page.index('id="summary"')
    )
    text = "".join(parse(page).text)
    assert "3 images" in text and "2 classified" in text and "1 failed" in text
    assert "incomplete" not in text


def test_abort_ends_the_page_marked_incomplete():
    stream = io.StringIO()
    writer = HtmlReportWriter(stream, 1)
    writer.write([Result(path="a.jpg", predictions=preds(("cat", 0.8)))])
    writer.abort()
    page = stream.getvalue()
    assert "incomplete" in "".join(parse(page).text)
    writer.abort()  # idempotent: nothing written twice
    assert stream.getvalue() == page


def test_abort_on_a_closed_stream_does_not_raise():
    stream = io.StringIO()
    writer = HtmlReportWriter(stream, 1)
    stream.close()
    writer.abort()


def test_summary_counts_top_labels():
    results = [
        Result(path=f"{n}.jpg", predictions=preds((f"label{n % 15}", 0.5))) for n in range(150)
    ]
    results += [Result(path=f"x{n}.jpg", error="bad") for n in range(7)]
    results += [
        Result(path=f"cat{n}.jpg", predictions=preds(("cat", 0.9), ("label0", 0.05)))
        for n in range(20)
    ]
    page = render(results, batch=16, thumbnailer=None)
    summary = page[page.index('id="summary"') :]
    text = "".join(parse(page).text)
    assert "177 images" in text and "170 classified" in text and "7 failed" in text
    assert summary.index('data-q="top:cat"') < summary.index(
        'data-q="top:label0"'
    )  # most frequent first
    assert summary.count('class="chip"') == 12
    assert "and 4 other labels" in text  # 16 distinct top-1 labels, 12 shown
    bar = summary[summary.index('data-q="top:cat"') :]
    assert 'style="width:11.76%"' in bar[: bar.index("</button>")]  # 20 of 170


def test_score_bars_are_proportional_and_scores_are_numbers():
    page = render(
        [Result(path="a.jpg", predictions=preds(("a", 0.75), ("b", 0.2), ("c", 1e-9)))],
        thumbnailer=None,
    )
    assert 'style="width:75.00%"' in page and 'style="width:20.00%"' in page
    assert 'style="width:0.00%"' in page
    text = "".join(parse(page).text)
    assert "0.7500" in text and "0.2000" in text and "0.0000" in text


# -- thumbnails ----------------------------------------------------------------------------


def thumbnails(page: str) -> list[str]:
    return [str(a["src"]) for t, a in parse(page).tags if t == "img"]


def test_thumbnails_of_real_photos_are_small_jpegs(photos):
    from PIL import Image

    for photo in photos:
        uri = make_thumbnail(photo.read_bytes())
        assert uri is not None and uri.startswith("data:image/jpeg;base64,")
        assert len(uri) < 8000, photo  # a few KB each, base64 included
        image = Image.open(io.BytesIO(__import__("base64").b64decode(uri.split(",", 1)[1])))
        assert max(image.size) == THUMBNAIL_SIZE and image.mode == "RGB"


def test_thumbnail_follows_the_decoding_policy(tmp_path):
    from PIL import Image

    # EXIF orientation 6 (rotate 90): a landscape JPEG shows as portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (400, 200), (200, 30, 30)).save(buffer, "JPEG", exif=exif.tobytes())
    assert thumbnail_image(buffer.getvalue()).size == (64, 128)
    # Transparency over white.
    buffer = io.BytesIO()
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(buffer, "PNG")
    assert thumbnail_image(buffer.getvalue()).getpixel((10, 10)) == (255, 255, 255)
    # A large JPEG is scaled at decode time and still ends at 128 px.
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 120, 10)).save(buffer, "JPEG")
    assert thumbnail_image(buffer.getvalue()).size == (128, 96)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_thumbnail_failures_show_a_placeholder_and_never_fail_the_record(tmp_path, photos):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "bomb.png").write_bytes(bomb_png(20_000, 20_000))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    os.mkfifo(tmp_path / "fifo.jpg")  # opening it for reading without O_NONBLOCK would hang
    names = ["corrupt.jpg", "bomb.png", "empty.jpg", "folder.jpg", "fifo.jpg", "missing.jpg"]
    results = [
        Result(path=str(tmp_path / n), predictions=preds((f"label-{n}", 0.5))) for n in names
    ]
    results.append(Result(path="member-of.tar/x.jpg", predictions=preds(("in-archive", 0.5))))
    out: list[str] = []
    worker = threading.Thread(target=lambda: out.append(render(results)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the writer blocked on a thumbnail"
    page = out[0]
    assert thumbnails(page) == []
    assert page.count('<div class="thumb none">no preview</div>') == len(results)
    text = "".join(parse(page).text)
    for name in names:
        assert f"label-{name}" in text
    assert "0 failed" in text

    def raising(result: Result) -> bytes:
        raise RuntimeError("boom")

    page = render(
        [Result(path=str(photos[0]), predictions=preds(("ok", 1.0)))], thumbnailer=raising
    )
    assert "no preview" in page and "ok" in page


def test_thumbnails_in_parallel_keep_the_order_and_the_threads_end(photos):
    results = [
        Result(path=str(photos[n % len(photos)]), predictions=preds((f"label {n}", 0.5)))
        if n % 5
        else Result(path=f"bad {n}.jpg", error="broken")
        for n in range(30)
    ]
    before = threading.active_count()
    parallel = render(results, batch=10, workers=4)
    assert threading.active_count() == before
    assert parallel == render(results, batch=10, workers=1)
    assert len(thumbnails(parallel)) == 24


def test_errors_have_no_thumbnail(photos):
    page = render([Result(path=str(photos[0]), error="cannot decode image: truncated")])
    assert thumbnails(page) == []
    assert 'class="card failed"' in page
    assert "error: cannot decode image: truncated" in "".join(parse(page).text)


def test_2000_results_stay_light(photos):
    """2000 cards, top-5, a real thumbnail on every 100th: under 2.6 MB.

    The bound: 30 KB of head, styles and script; 1,200 bytes of markup per card with five
    ImageNet-length labels, their bars and scores (about 1 KB measured); 8 KB per embedded
    thumbnail (128 px JPEG at quality 70 in base64: 2 to 4 KB for the sample photos, 8 KB
    checked above).  A folder of 5,000 photos thus makes a page of at most 5000 x 9 KB,
    45 MB, typically half that: it opens in a second or two, and cards off screen are not
    laid out (content-visibility: auto).
    """
    labels = [
        ("tabby, tabby cat", 0.61),
        ("tiger cat", 0.2),
        ("Egyptian cat", 0.1),
        ("lynx, catamount", 0.05),
        ("window screen", 0.01),
    ]
    results = []
    for n in range(2000):
        if n % 100 == 0:
            results.append(
                Result(path=str(photos[(n // 100) % len(photos)]), predictions=preds(*labels))
            )
        elif n % 50 == 25:
            results.append(
                Result(
                    path=f"photos/2024/IMG_{n:05d}.jpg",
                    error="cannot decode image: image file is truncated",
                )
            )
        else:
            results.append(
                Result(
                    path=f"photos/2024/IMG_{n:05d}.jpg", predictions=preds(*labels, base=n % 900)
                )
            )
    page = render(results, top_k=5, batch=32)
    assert len(thumbnails(page)) == 20
    size = len(page.encode())
    assert size < 30_000 + 2000 * 1200 + 20 * 8000, size
    assert page.count("<article") == 2000


def test_memory_does_not_grow_with_the_number_of_results():
    """Nothing is kept per image: peak traced memory for 4000 results ~ that for 400."""

    def peak(count: int) -> int:
        with open(os.devnull, "w") as sink:
            tracemalloc.start()
            writer = HtmlReportWriter(sink, 5, thumbnailer=None)
            for start in range(0, count, 50):
                writer.write(
                    [
                        Result(
                            path=f"img_{n:06d}.jpg",
                            predictions=preds(("a", 0.5), ("b", 0.3), base=n % 10),
                        )
                        for n in range(start, start + 50)
                    ]
                )
            writer.close()
            _, top = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        return top

    small, large = peak(400), peak(4000)
    assert large < small * 1.5 + 100_000, (small, large)


# -- in a real browser ---------------------------------------------------------------------

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary (chromium, chromium-browser or google-chrome on PATH, or "
    "$CHROMIUM): install it (Debian: apt-get install chromium) to run the browser tests",
)

PHOTO_LABELS = [
    "tabby, tabby cat",
    "espresso",
    "space shuttle",
    "military uniform",
    "reflex camera",
    "astronaut suit",
]


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM is not None
    with Chromium(CHROMIUM) as chromium:
        yield chromium


def fresh_events(browser: Chromium) -> None:
    browser.events.clear()


def open_synthetic_report(
    browser: Chromium, photos: list[Path], tmp_path: Path
) -> tuple[list[Result], Path]:
    """The page of :func:`synthetic_results` (top 3), written and loaded fresh in Chromium:
    (the results, the page's file)."""
    results = synthetic_results(photos)
    page = tmp_path / "report.html"
    page.write_text(render(results, top_k=3), encoding="utf-8")
    fresh_events(browser)
    browser.load(page.as_uri())
    return results, page


def visible_cards(browser: Chromium) -> int:
    return browser.evaluate(
        "Array.from(document.querySelectorAll('main .card'))"
        ".filter(c => c.checkVisibility()).length"
    )


def set_filter(browser: Chromium, text: str) -> str:
    """Type into the filter box; the count of shown cards once the page has updated."""
    return browser.evaluate(
        "new Promise(resolve => {"
        " const box = document.getElementById('filter');"
        f" box.value = {json.dumps(text)};"
        " box.dispatchEvent(new Event('input', {bubbles: true}));"
        " const shown = () => document.getElementById('shown').textContent;"
        " requestAnimationFrame(() => setTimeout(() => resolve(shown()), 0));"
        "})"
    )


def synthetic_results(photos) -> list[Result]:
    results = []
    for photo, label in zip(photos, PHOTO_LABELS, strict=False):
        results.append(
            Result(
                path=str(photo),
                predictions=preds((label, 0.8), ("other thing", 0.15), ("rare", 0.01)),
            )
        )
    for n, name in enumerate(HOSTILE_NAMES):
        results.append(
            Result(
                path=name, predictions=preds((f"hostile label {n} <&>", 0.6), ("other thing", 0.3))
            )
        )
    results.append(Result(path="broken-\udcfe.jpg", error="cannot decode image: truncated <data>"))
    results.append(Result(path="missing.jpg", error="cannot read file: No such file or directory"))
    return results


@needs_chromium
def test_page_loads_in_chromium_without_errors_and_shows_every_top_label(browser, photos, tmp_path):
    results, _ = open_synthetic_report(browser, photos, tmp_path)
    assert browser.problems() == []
    cards = browser.evaluate(
        "Array.from(document.querySelectorAll('main .card')).map(c => ({"
        " path: c.querySelector('.path').textContent,"
        " top: c.querySelector('.top .label') && c.querySelector('.top .label').textContent,"
        " error: c.querySelector('.error') && c.querySelector('.error').textContent,"
        " img: c.querySelector('img') ? c.querySelector('img').naturalWidth : 0,"
        " visible: c.checkVisibility()}))"
    )
    assert len(cards) == len(results)
    body = browser.evaluate("document.body.textContent")
    for card, result in zip(cards, results, strict=True):
        assert card["visible"]
        assert card["path"] == plain_text(result.path)
        if result.error is None:
            assert card["top"] == result.predictions[0].label
            assert result.predictions[0].label in body
        else:
            assert card["error"] == f"error: {result.error}"
            assert card["img"] == 0
    assert all(c["img"] > 0 for c in cards[: len(photos)])  # thumbnails decode in the browser
    assert browser.evaluate("document.scripts.length") == 1  # no name or label became a script
    assert (
        browser.evaluate("document.getElementById('shown').textContent") == f"{len(results)} images"
    )
    assert f"{len(results)}\nimages" in body or f"{len(results)} images" in body
    assert browser.problems() == []


@needs_chromium
def test_filter_box_hides_non_matching_cards(browser, photos, tmp_path):
    results, page = open_synthetic_report(browser, photos, tmp_path)
    total = len(results)
    assert set_filter(browser, "ESPRESSO") == f"1 of {total} images shown"  # a label, any case
    assert visible_cards(browser) == 1
    assert (
        set_filter(browser, "other thing") == f"{total - 2} of {total} images shown"
    )  # a 2nd label
    assert set_filter(browser, photos[0].name) == f"1 of {total} images shown"  # a path fragment
    assert set_filter(browser, "not-utf8") == f"1 of {total} images shown"
    assert set_filter(browser, "\\xff") == f"1 of {total} images shown"  # the escape, as shown
    assert set_filter(browser, "top:other thing") == f"0 of {total} images shown"
    assert set_filter(browser, "top: Space Shuttle") == f"1 of {total} images shown"
    assert set_filter(browser, "is:failed") == f"2 of {total} images shown"
    assert visible_cards(browser) == 2
    assert set_filter(browser, "no such thing anywhere") == f"0 of {total} images shown"
    assert visible_cards(browser) == 0
    assert set_filter(browser, "") == f"{total} images"
    assert visible_cards(browser) == total
    # A summary chip filters by its label; clicking it again clears the filter.
    browser.evaluate("document.querySelector('.chip[data-q=\"top:espresso\"]').click()")
    assert browser.evaluate("document.getElementById('filter').value") == "top:espresso"
    assert visible_cards(browser) == 1
    browser.evaluate("document.querySelector('.chip[data-q=\"top:espresso\"]').click()")
    assert visible_cards(browser) == total
    # The address can carry the filter: #q=... applies on load.
    browser.load("about:blank")
    browser.load(page.as_uri() + "#q=space%20shuttle")
    assert browser.evaluate("document.getElementById('filter').value") == "space shuttle"
    assert visible_cards(browser) == 1
    assert browser.problems() == []


@needs_chromium
def test_a_page_still_being_written_and_an_aborted_page_load_cleanly(browser, photos, tmp_path):
    stream = io.StringIO()
    writer = HtmlReportWriter(stream, 3)
    writer.write(synthetic_results(photos)[:4])
    partial = tmp_path / "partial.html"
    partial.write_text(stream.getvalue(), encoding="utf-8")  # as a viewer sees it mid-run
    fresh_events(browser)
    browser.load(partial.as_uri())
    assert visible_cards(browser) == 4
    assert browser.evaluate("document.getElementById('filter').disabled") is True
    writer.abort()
    aborted = tmp_path / "aborted.html"
    aborted.write_text(stream.getvalue(), encoding="utf-8")
    browser.load(aborted.as_uri())
    assert "incomplete" in browser.evaluate("document.getElementById('summary').innerText")
    assert set_filter(browser, "espresso") == "1 of 4 images shown"
    assert browser.problems() == []


@needs_chromium
def test_real_classify_results_in_chromium(browser, v1_checkpoint, photos, tmp_path):
    """classify's own JSON lines for the sample photos (and a missing file) as a page."""
    inputs = [str(p) for p in photos] + [str(tmp_path / "missing.jpg")]
    results = results_from_jsonl(classify_jsonl(inputs, str(v1_checkpoint), top_k=5))
    assert len(results) == len(photos) + 1 and results[-1].error is not None
    page = tmp_path / "classified.html"
    page.write_text(render(results, top_k=5, batch=3, title="sample photos"), encoding="utf-8")
    fresh_events(browser)
    browser.load(page.as_uri())
    assert browser.problems() == []
    tops = browser.evaluate(
        "Array.from(document.querySelectorAll('main .card')).map(c =>"
        " c.querySelector('.top .label') ? c.querySelector('.top .label').textContent : null)"
    )
    assert tops == [r.predictions[0].label if r.error is None else None for r in results]
    images = browser.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
    assert len(images) == len(photos) and all(images)
    summary = browser.evaluate("document.getElementById('summary').innerText")
    assert f"{len(results)}\nimages" in summary or f"{len(results)} images" in summary
    browser.screenshot(tmp_path / "classified.png")
    assert (tmp_path / "classified.png").stat().st_size > 10_000
    paths = browser.evaluate(
        "Array.from(document.querySelectorAll('main .card .path')).map(p => p.textContent)"
    )
    assert paths == [plain_text(r.path) for r in results]
