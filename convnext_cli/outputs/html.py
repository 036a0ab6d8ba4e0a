"""``--format html``: one self-contained page that shows classify's results.

Each input is a card: a small thumbnail (embedded as a ``data:`` URI), its path, its top-k
labels with score bars, or its error.  A summary (images, failed, the most frequent top
labels) and a filter box complete the page.  The filter matches a fragment of a path or of
any of the top-k labels, case-insensitively; ``top:LABEL`` matches the top-1 label only,
``is:failed`` the errors; ``#q=...`` in the address pre-fills it.  Nothing is fetched
from the network: the CSS and the script are inline.

The page streams like the other writers: the head (styles, title, filter box) is written
when the writer is built, each batch's cards are written and flushed as the batch arrives,
and the summary, the script and the closing tags at :meth:`HtmlReportWriter.close`.  The
summary is written last but shown first (CSS ``order``), so it is right whatever the run
turned out to be.  Memory stays bounded: nothing is kept per image but the counters the
summary needs (a count per distinct top-1 label).

The page is pure ASCII (every other character is a numeric character reference), so it is
valid UTF-8 whatever the encoding of the stream it is written to.  Text from the outside
(paths, labels, error messages) is shown literally, HTML-escaped; characters that would be
invisible or misleading are shown as escapes in a marked span: bytes that were not UTF-8
(carried in the ``str`` as ``surrogateescape`` lone surrogates) as ``\\xNN``, control
characters as ``\\n``, ``\\t``, ``\\xNN``, and other lone surrogates, line separators and
bidirectional-text controls as ``\\uNNNN``.

Thumbnails are decoded with the project's decoding policy and limits
(:func:`convnext_cli.imaging.decoding.decode_bytes`; JPEGs at a reduced DCT scale), at most 128 px
on the longest side, JPEG quality 70: about 3 to 6 KB each, base64 included.  A thumbnail
that cannot be made (a file that changed, a member of an archive, anything at all) shows a
placeholder; it never fails the record.  They are made in a few threads (Pillow releases
the GIL), in order, for each batch before its cards are written.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import stat
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TYPE_CHECKING

from convnext_cli.outputs.names import escape_char

if TYPE_CHECKING:
    from PIL import Image

    from convnext_cli.results import Result

THUMBNAIL_SIZE = 128  # longest side, pixels
THUMBNAIL_QUALITY = 70  # JPEG quality
THUMBNAIL_MAX_FILE_BYTES = 256 * 2**20  # a file larger than this gets a placeholder
THUMBNAIL_WORKERS = min(4, os.cpu_count() or 1)  # threads: Pillow releases the GIL
SUMMARY_TOP_LABELS = 12

Thumbnailer = Callable[["Result"], "bytes | None"]


def display_text(text: str) -> str:
    """``text`` as HTML: escaped, invisible or misleading characters as marked escapes."""
    out: list[str] = []
    plain: list[str] = []
    for char in text:
        escaped = escape_char(char) if (char < " " or char > "~") else None
        if escaped is None:
            plain.append(char)
            continue
        if plain:
            out.append(html.escape("".join(plain)))
            plain = []
        out.append(f'<span class="esc">{html.escape(escaped)}</span>')
    if plain:
        out.append(html.escape("".join(plain)))
    return "".join(out)


def plain_text(text: str) -> str:
    """``text`` as the page shows it, without markup (what the filter matches)."""
    return "".join(escape_char(c) or c for c in text)


def _ascii(markup: str) -> str:
    """Markup with every non-ASCII character as a character reference: valid in any encoding."""
    return markup.encode("ascii", "xmlcharrefreplace").decode("ascii")


def read_image_file(path: str, limit: int = THUMBNAIL_MAX_FILE_BYTES) -> bytes | None:
    """A regular file's bytes, or None; never blocks (FIFOs, devices), never reads past limit."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError):
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(limit + 1)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def file_thumbnailer(result: Result) -> bytes | None:
    """The encoded bytes of the input a result is for: the file, tar member or Parquet row
    it was read from (``result.source``), else None.  Never a file that a dataset's id
    names: the path of a record from a dataset is only its name.  A result made without a
    source (the Python API's own) falls back to its path as a file on disk."""
    from convnext_cli.errors import ImageError
    from convnext_cli.inputs.datasets import Item, read_item

    source = getattr(result, "source", None)
    if source is None:
        return read_image_file(result.path)
    if isinstance(source, str):
        return read_image_file(source)
    if not isinstance(source, Item) or source.error is not None or source.file is None:
        return None
    if source.length is None and source.row_group is None:  # a whole file, named twice
        return read_image_file(source.file)
    try:
        return read_item(source, THUMBNAIL_MAX_FILE_BYTES)
    except (ImageError, OSError):
        return None


def thumbnail_image(data: bytes, size: int = THUMBNAIL_SIZE) -> Image.Image:
    """Decode encoded image bytes by the decoding policy, to an RGB image of at most ``size`` px.

    Any format goes through :func:`convnext_cli.imaging.decoding.decode_bytes` (EXIF orientation,
    transparency over white, 16-bit scaled, first frame, the pixel limit), except JPEG,
    which takes the same steps from the same helpers (``open_header``'s pixel limit, EXIF
    orientation, ``pil_to_rgb``) with libjpeg's DCT scaling (``draft``) first: a 12 MP
    photo decodes at 1/8 scale, about six times faster than in full.
    """
    from PIL import Image, ImageOps

    from convnext_cli.imaging.decoding import decode_bytes, open_header, pil_to_rgb

    image = open_header(data)  # refuses decompression bombs from the header
    if image.format == "JPEG":
        image.draft("RGB", (2 * size, 2 * size))
        image = ImageOps.exif_transpose(image) or image
        image = pil_to_rgb(image)
    else:
        pixels = decode_bytes(data)  # (3, H, W) uint8
        image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")
        del pixels
    image.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return image


def make_thumbnail(data: bytes, size: int = THUMBNAIL_SIZE) -> str | None:
    """A ``data:image/jpeg;base64,...`` URI for encoded image bytes, or None if it fails."""
    try:
        image = thumbnail_image(data, size)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    except Exception:  # noqa: BLE001 - a thumbnail must never fail the record
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _attr(text: str) -> str:
    """``text`` for an attribute (a tooltip): as the page shows it, quotes escaped."""
    return html.escape(plain_text(text), quote=True)


def _score_text(score: float) -> str:
    return f"{score:.4f}" if math.isfinite(score) else "n/a"


def _bar_width(score: float) -> str:
    if not math.isfinite(score):
        return "0"
    return f"{min(max(score, 0.0), 1.0) * 100:.2f}"


class HtmlReportWriter:
    """The HTML report: built on a text stream, ``write`` per batch, ``close`` or ``abort``."""

    def __init__(
        self,
        stream: IO[str],
        top_k: int,
        title: str | None = None,
        thumbnailer: Thumbnailer | None = file_thumbnailer,
        workers: int = THUMBNAIL_WORKERS,
        scores: str = "probs",
    ) -> None:
        self.stream = stream
        self.scores = scores  # probs, logits or log-probs (classify --scores)
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self.top_k = top_k
        self.title = title or "convnext classify"
        self.thumbnailer = thumbnailer
        self.images = 0
        self.failed = 0
        self.top_labels: Counter[str] = Counter()
        self.run_info: dict[str, str] = {}  # what made the page (set_run_info)
        self.closed = False
        self.stream.write(_ascii(_head(self.title)))
        self.stream.flush()

    def set_run_info(self, info: dict[str, str]) -> None:
        """What made the page (model, device, dtype, settings, when, the command line),
        shown above the cards; the page's summary, written at the end, carries it."""
        self.run_info = dict(info)

    def _bar(self, score: float) -> str:
        """Probabilities as they are, log-probabilities as probabilities, logits as none."""
        if self.scores == "logits":
            return "0"
        return _bar_width(math.exp(score) if self.scores == "log-probs" else score)

    def _per_image(self) -> str:
        text = f"top-{self.top_k} labels" if self.top_k > 0 else "every label"
        return text + (" per image" if self.scores == "probs" else f" per image ({self.scores})")

    def write(self, results: list[Result]) -> None:
        uris = self._thumbnails(results)
        self.stream.write(_ascii("".join(map(self._card, results, uris))))
        self.stream.flush()

    def close(self) -> None:
        self._finish(complete=True)

    def abort(self) -> None:
        """The run stopped: end the page with what it has (marked incomplete), flush."""
        try:
            self._finish(complete=False)
        except (OSError, ValueError):  # a closed or broken stream: nothing more to save
            pass

    def _finish(self, complete: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if not self.closed:
            self.closed = True
            self.stream.write(_ascii(self._summary(complete) + _TAIL))
        self.stream.flush()

    def _thumbnails(self, results: list[Result]) -> list[str | None]:
        """Each result's thumbnail URI (None for errors and failures), made in parallel."""
        if self.thumbnailer is None:
            return [None] * len(results)
        wanted = [r for r in results if r.error is None]
        if self.workers > 1 and len(wanted) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="thumbnails")
            made = iter(list(self._pool.map(self._thumbnail, wanted)))
        else:
            made = iter([self._thumbnail(r) for r in wanted])
        return [None if r.error is not None else next(made) for r in results]

    def _thumbnail(self, result: Result) -> str | None:
        if self.thumbnailer is None:
            return None
        try:
            data = self.thumbnailer(result)
        except Exception:  # noqa: BLE001 - a thumbnail must never fail the record
            return None
        return make_thumbnail(data) if data else None

    def _card(self, result: Result, uri: str | None) -> str:
        self.images += 1
        path = display_text(result.path)
        if result.error is not None:
            self.failed += 1
            return (
                '<article class="card failed">'
                '<div class="thumb none" aria-hidden="true">!</div>'
                f'<div class="body"><div class="path">{path}</div>'
                f'<div class="error">error: {display_text(result.error)}</div></div>'
                "</article>\n"
            )
        if result.predictions:
            self.top_labels[result.predictions[0].label] += 1
        if uri is None:
            thumb = '<div class="thumb none">no preview</div>'
        else:
            thumb = f'<img class="thumb" alt="" src="{uri}">'
        rows = []
        for rank, p in enumerate(result.predictions, start=1):
            rows.append(
                f"<li{' class=top' if rank == 1 else ''}>"
                f'<span class="label" title="{_attr(p.label)}">{display_text(p.label)}</span>'
                f'<span class="bar"><i style="width:{self._bar(p.score)}%"></i></span>'
                f'<span class="score" title="{float(p.score)!r} (class {p.index})">'
                f"{_score_text(p.score)}</span></li>"
            )
        return (
            f'<article class="card">{thumb}<div class="body"><div class="path">{path}</div>'
            f'<ol class="preds">{"".join(rows)}</ol></div></article>\n'
        )

    def _run_info_html(self) -> str:
        if not self.run_info:
            return ""
        items = "".join(
            f"<div><dt>{html.escape(name)}</dt><dd>{display_text(value)}</dd></div>"
            for name, value in self.run_info.items()
        )
        return f'<dl class="runinfo">{items}</dl>'

    def _summary(self, complete: bool) -> str:
        ok = self.images - self.failed
        state = "" if complete else '<p class="incomplete">incomplete: the run stopped early</p>'
        failed = (
            f'<button type="button" class="stat bad" data-q="is:failed">'
            f"<b>{self.failed}</b> failed</button>"
            if self.failed
            else '<span class="stat"><b>0</b> failed</span>'
        )
        chips = []
        most = self.top_labels.most_common(SUMMARY_TOP_LABELS)
        for label, count in most:
            share = count / ok * 100 if ok else 0.0
            chips.append(
                f'<button type="button" class="chip" data-q="top:{html.escape(plain_text(label))}">'
                f'<span class="label" title="{_attr(label)}">{display_text(label)}</span>'
                f'<span class="bar"><i style="width:{share:.2f}%"></i></span>'
                f'<span class="count">{count}</span></button>'
            )
        others = len(self.top_labels) - len(most)
        more = f'<p class="more">and {others} other labels</p>' if others > 0 else ""
        labels = (
            f'<div class="toplabels"><h2>Top-1 labels</h2>{"".join(chips)}{more}</div>'
            if chips
            else ""
        )
        return (
            '</main>\n<section id="summary">'
            f'<div class="stats"><span class="stat"><b>{self.images}</b> images</span>'
            f'<span class="stat"><b>{ok}</b> classified</span>{failed}'
            f'<span class="stat">{self._per_image()}</span></div>'
            f"{self._run_info_html()}{state}{labels}</section>\n"
        )


_CSS = """
:root{--bg:#f6f7f9;--card:#fff;--fg:#1d2330;--dim:#667085;--line:#e3e6eb;--bar:#dfe7f5;
--acc:#2f6fdb;--acc2:#8fb0ea;--bad:#c62828;--badbg:#fdecec;--esc:#fff3c4}
@media (prefers-color-scheme:dark){:root{--bg:#14171c;--card:#1d2129;--fg:#e6e8ec;
--dim:#98a2b3;--line:#2c323d;--bar:#2a3342;--acc:#6ea0ff;--acc2:#3d5d99;--bad:#ff6b6b;
--badbg:#3a1f22;--esc:#4a3f12}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
background:var(--bg);color:var(--fg);display:flex;flex-direction:column;min-height:100vh}
header{order:0;position:sticky;top:0;z-index:2;background:var(--bg);
border-bottom:1px solid var(--line);padding:10px 20px;display:flex;flex-wrap:wrap;
align-items:center;gap:8px 16px}
header h1{font-size:18px;margin:0;font-weight:600;flex:0 1 auto;overflow-wrap:anywhere}
#filter{flex:1 1 260px;max-width:480px;font:inherit;padding:6px 10px;border-radius:6px;
border:1px solid var(--line);background:var(--card);color:var(--fg)}
#shown{color:var(--dim);font-variant-numeric:tabular-nums}
#summary{order:1;padding:12px 20px 0}
main{order:2;display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,460px),1fr));
gap:12px;padding:12px 20px 24px}
.runinfo{display:flex;flex-wrap:wrap;gap:2px 20px;margin:8px 0 0;color:var(--dim);
font-size:12px}
.runinfo div{display:flex;gap:4px;min-width:0;max-width:100%}
.runinfo dt{font-weight:600}
.runinfo dd{margin:0;overflow-wrap:anywhere;color:var(--fg)}
.stats{display:flex;flex-wrap:wrap;gap:8px 20px;align-items:baseline}
.stat{color:var(--dim);font:inherit;background:none;border:0;padding:0}
.stat b{color:var(--fg);font-size:18px;margin-right:3px}
button.stat.bad,button.stat.bad b{color:var(--bad);cursor:pointer}
.incomplete{color:var(--bad);font-weight:600;margin:6px 0 0}
.toplabels{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,320px),1fr));
gap:2px 20px;margin-top:8px}
.toplabels h2{grid-column:1/-1;font-size:13px;font-weight:600;color:var(--dim);margin:0 0 2px;
text-transform:uppercase;letter-spacing:.04em}
.more{grid-column:1/-1;color:var(--dim);margin:2px 0 0}
.chip{display:grid;grid-template-columns:minmax(0,1fr) 80px 40px;gap:8px;align-items:center;
font:inherit;color:inherit;background:none;border:0;padding:2px 0;text-align:left;cursor:pointer}
.chip:hover .label{text-decoration:underline}
.chip .count{text-align:right;font-variant-numeric:tabular-nums;color:var(--dim)}
.card{display:flex;gap:12px;background:var(--card);border:1px solid var(--line);
border-radius:8px;padding:10px;content-visibility:auto;contain-intrinsic-size:auto 150px}
.card.failed{border-color:var(--bad);background:var(--badbg);align-self:start}
.thumb{width:128px;height:128px;flex:none;object-fit:contain;border-radius:4px;
background:var(--bg)}
.thumb.none{display:flex;align-items:center;justify-content:center;color:var(--dim);
font-size:12px;border:1px dashed var(--line)}
.failed .thumb.none{color:var(--bad);border-color:var(--bad);font-size:40px;font-weight:700;
width:48px;height:48px;border-radius:50%}
.body{min-width:0;flex:1}
.path{font:12px/1.35 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:var(--dim);
overflow-wrap:anywhere;white-space:pre-wrap;margin-bottom:6px}
.esc{background:var(--esc);color:var(--fg);border-radius:2px;padding:0 1px}
.error{color:var(--bad);font-weight:600;overflow-wrap:anywhere}
.preds{list-style:none;margin:0;padding:0}
.preds li{display:grid;grid-template-columns:minmax(0,1fr) 64px 52px;gap:8px;
align-items:start;padding:2px 0}
.preds .bar{margin-top:5px}
.label{overflow-wrap:anywhere;min-width:0}
.chip .label{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.preds .top .label{font-weight:600}
.bar{height:8px;background:var(--bar);border-radius:4px;overflow:hidden}
.bar i{display:block;height:100%;background:var(--acc2)}
.top .bar i,.chip .bar i{background:var(--acc)}
.score{text-align:right;font-variant-numeric:tabular-nums;color:var(--dim)}
.top .score{color:var(--fg)}
[hidden]{display:none!important}
@media (max-width:520px){header,#summary{padding-left:10px;padding-right:10px}
main{padding:10px 10px 20px;gap:8px}
.card{gap:8px;padding:8px}.thumb{width:64px;height:64px}
.preds li{grid-template-columns:minmax(0,1fr) 36px 48px;gap:6px}}
"""

_SCRIPT = """
(function () {
  "use strict";
  var input = document.getElementById("filter");
  var shown = document.getElementById("shown");
  var cards = Array.prototype.slice.call(document.querySelectorAll("main .card"));
  var texts = cards.map(function (card) {
    var parts = [card.querySelector(".path").textContent];
    card.querySelectorAll(".label").forEach(function (l) { parts.push(l.textContent); });
    return parts.join("\\n").toLowerCase();
  });
  var tops = cards.map(function (card) {
    var top = card.querySelector(".top .label");
    return top ? top.textContent.toLowerCase() : null;
  });
  function apply() {
    var q = input.value.trim().toLowerCase();
    var count = 0;
    cards.forEach(function (card, i) {
      var match = q === "" ? true :
        q === "is:failed" ? card.classList.contains("failed") :
        q.slice(0, 4) === "top:" ? tops[i] !== null && tops[i].indexOf(q.slice(4).trim()) !== -1 :
        texts[i].indexOf(q) !== -1;
      card.hidden = !match;
      if (match) { count += 1; }
    });
    shown.textContent = (q === "" ? "" : count + " of ") + cards.length +
      (cards.length === 1 ? " image" : " images") + (q === "" ? "" : " shown");
    try {
      history.replaceState(null, "", q === "" ? location.pathname + location.search :
        "#q=" + encodeURIComponent(input.value.trim()));
    } catch (e) { /* some file: URLs refuse; the filter still works */ }
  }
  function fromHash() {
    var m = /^#q=(.*)$/.exec(location.hash);
    if (m) {
      try { input.value = decodeURIComponent(m[1]); } catch (e) { input.value = m[1]; }
    }
  }
  var pending = false;
  input.addEventListener("input", function () {
    if (pending) { return; }
    pending = true;
    requestAnimationFrame(function () { pending = false; apply(); });
  });
  document.querySelectorAll("[data-q]").forEach(function (b) {
    b.addEventListener("click", function () {
      input.value = input.value.trim() === b.dataset.q ? "" : b.dataset.q;
      apply();
      window.scrollTo(0, 0);
    });
  });
  document.addEventListener("mouseover", function (event) {
    var t = event.target;  // a label cut by an ellipsis shows in full on hover
    if (t.classList && t.classList.contains("label") && !t.title && t.scrollWidth > t.clientWidth) {
      t.title = t.textContent;
    }
  });
  window.addEventListener("hashchange", function () { fromHash(); apply(); });
  fromHash();
  input.disabled = false;
  apply();
})();
"""

_TAIL = f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"


def _head(title: str) -> str:
    shown = html.escape(plain_text(title))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="convnext_cli">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{shown}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{display_text(title)}</h1>"
        '<input id="filter" type="search" disabled autocomplete="off" spellcheck="false" '
        'placeholder="Filter: a label or part of a path (top:label, is:failed)" '
        'aria-label="filter">'
        '<span id="shown" aria-live="polite"></span></header>\n'
        "<main>\n"
    )
