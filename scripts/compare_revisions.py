"""Does the CLI write the same bytes at two revisions?  ``compare_revisions.py REV_A REV_B``

Checks both revisions out into temporary git worktrees, builds ONE tiny random-weight V1
checkpoint (ImageNet's 1000 real labels, every parameter given a real value), and runs under
each revision, with the same interpreter, environment, device (cpu), dtype (float32), batch
size and thread count:

- ``classify`` in every format: table (stdout, fixed COLUMNS), json, jsonl, csv, parquet, html;
- ``embed`` in every format: jsonl, json, csv, npy (+ paths.txt), safetensors, parquet;
- ``convert`` of the checkpoint's weights file into a Hub folder.

Inputs are the repository's sample photos (``sample_images/``), named by one absolute path
that both revisions see; outputs are written by relative names inside a per-revision run
folder, so neither revision's temp path can reach a record.  Each output is compared byte for
byte and reported as ``identical`` or ``differs``; a differing Parquet file is split into its
data (rows) and its metadata (schema and key/value metadata), an HTML report into its
records and the rest, with a short unified diff.  Fields that cannot be equal by nature are
listed in :data:`MASKS` and compared again with them masked: a file that is equal only then is
``identical after masking <the masks that applied>``, never silently ``identical``.

Exit status: 0 when every output is identical (masked or not), 1 otherwise, 2 on a usage or
setup error.  ``--keep`` leaves the temp folder for a look.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

CLASSIFY_FORMATS = {  # format -> output name ("" for stdout)
    "table": "",
    "json": "scores.json",
    "jsonl": "scores.jsonl",
    "csv": "scores.csv",
    "parquet": "scores.parquet",
    "html": "report.html",
}
EMBED_FORMATS = {
    "jsonl": "feats.jsonl",
    "json": "feats.json",
    "csv": "feats.csv",
    "npy": "feats.npy",
    "safetensors": "feats.safetensors",
    "parquet": "feats.parquet",
}

# What can't be equal between two runs by nature, masked explicitly (name, pattern, stand-in).
MASKS: list[tuple[str, re.Pattern[str], str]] = [
    (
        "timestamps (ISO 8601)",
        re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:?\d\d| UTC)?"),
        "<TIME>",
    ),
    (
        "durations (seconds, img/s, ms)",
        re.compile(
            r"(\"(?:seconds|elapsed|duration|wall_s|images_per_second)\"\s*:\s*)[0-9.eE+-]+"
            r"|\b\d+\.\d+ ?(?:s|ms|img/s)\b"
        ),
        "<DURATION>",
    ),
    ("temp folders", re.compile(r"/tmp/[^\s\"'<>,;]*?compare-revisions-[^/\s\"'<>]+"), "<TMP>"),
    ("process ids", re.compile(r"(\"pid\"\s*:\s*)\d+"), "<PID>"),
]


@dataclass
class Verdict:
    name: str
    status: str  # identical | identical after masking ... | differs | missing ...
    detail: str = ""


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, capture_output=True, check=False, **kwargs)


def git(*args: str) -> str:
    done = run(["git", "-C", str(REPO), *args])
    if done.returncode:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.decode().strip()}")
    return done.stdout.decode().strip()


def make_checkpoint(folder: Path) -> Path:
    """A tiny ConvNeXt V1 classifier with ImageNet's labels and random real-valued weights
    (the tests' factories: every parameter gets a real value)."""
    sys.path.insert(0, str(REPO / "tests" / "support"))
    from factories import hf_model, save_hf

    labels = next(REPO.glob("convnext_cli/**/imagenet-1k.txt")).read_text().splitlines()
    model = hf_model(
        num_labels=len(labels),
        seed=19,
        id2label=dict(enumerate(labels)),
        label2id={label: n for n, label in enumerate(labels)},
    )
    return save_hf(model, folder)


def commands(model: Path, photos: list[str], batch: int) -> dict[str, list[str]]:
    """name -> CLI arguments; each writes its output under the name it is keyed by."""
    common = ["-m", str(model), "--device", "cpu", "--dtype", "float32", "-b", str(batch)]
    found: dict[str, list[str]] = {}
    for fmt, out in CLASSIFY_FORMATS.items():
        where = ["-o", out] if out else []
        found[f"classify.{fmt}"] = ["classify", *photos, *common, "--format", fmt, *where]
    for fmt, out in EMBED_FORMATS.items():
        found[f"embed.{fmt}"] = ["embed", *photos, *common, "--format", fmt, "-o", out]
    found["convert"] = ["convert", str(model / "model.safetensors"), "converted", "--from", "hf"]
    return found


def run_revision(tree: Path, work: Path, model: Path, photos: list[str], args: argparse.Namespace):
    """Run every command under the revision checked out at ``tree``; stdout of a command
    without -o is kept as ``<name>.stdout``. Returns name -> (exit code, stderr)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CONVNEXT_", "PYTHON", "OMP_", "MKL_"))
    }
    env.update(
        PYTHONPATH=str(tree),
        PYTHONHASHSEED="0",
        COLUMNS=str(args.columns),
        LINES="50",
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        HF_HUB_OFFLINE="1",
        TZ="UTC",
        NO_COLOR="1",
    )
    work.mkdir(parents=True)
    outcome = {}
    for name, argv in commands(model, photos, args.batch).items():
        done = run([sys.executable, "-m", "convnext_cli", *argv], cwd=work, env=env, timeout=600)
        if name == "classify.table":
            (work / "table.stdout").write_bytes(done.stdout)
        outcome[name] = (done.returncode, done.stderr.decode(errors="replace"))
    return outcome


def mask(text: str, skip: str | None = None) -> tuple[str, list[str]]:
    """``text`` with every mask but ``skip`` applied, and the masks that matched."""
    used = []
    for label, pattern, stand_in in MASKS:
        if label == skip:
            continue

        def put(match: re.Match[str], stand_in: str = stand_in) -> str:
            groups = [g for g in match.groups() if g]
            return (groups[0] if groups else "") + stand_in

        text, count = pattern.subn(put, text)
        if count:
            used.append(label)
    return text, used


def same_masked(a: str, b: str) -> tuple[bool, list[str]]:
    """Whether ``a`` and ``b`` are equal once masked, and the masks that equality needs."""
    (ma, used_a), (mb, used_b) = mask(a), mask(b)
    if ma != mb:
        return False, []
    needed = [
        label
        for label in sorted(set(used_a) | set(used_b))
        if mask(a, label)[0] != mask(b, label)[0]
    ]
    return True, needed


def short_diff(a: str, b: str, lines: int = 14, width: int = 160) -> str:
    diff = difflib.unified_diff(a.splitlines(), b.splitlines(), "A", "B", n=0, lineterm="")
    shown = [line[:width] + ("…" if len(line) > width else "") for line in diff]
    more = f"\n      … {len(shown) - lines} more diff lines" if len(shown) > lines else ""
    return "\n".join("      " + line for line in shown[:lines]) + more


def masked_part(label: str, a: str, b: str, detail: list[str], render=str) -> str:
    """``label identical`` / ``label identical after masking M`` / ``label differs`` (with
    the diff of the masked texts added to ``detail``)."""
    if a == b:
        return f"{label} identical"
    same, needed = same_masked(a, b)
    if same:
        return f"{label} identical after masking {', '.join(needed)}"
    detail.append(short_diff(render(mask(a)[0]), render(mask(b)[0])))
    return f"{label} differs"


def verdict(name: str, parts: list[str], detail: list[str]) -> Verdict:
    if any(part.endswith("differs") for part in parts):
        status = "differs"
    elif any("after masking" in part for part in parts):
        status = "identical after masking"
    else:
        status = "bytes differ, content identical"
    return Verdict(name, f"{status} ({'; '.join(parts)})", "\n".join(detail))


def compare_text(name: str, a: bytes, b: bytes) -> Verdict:
    if a == b:
        return Verdict(name, "identical")
    ta, tb = a.decode(errors="replace"), b.decode(errors="replace")
    same, needed = same_masked(ta, tb)
    if same:
        return Verdict(name, f"identical after masking {', '.join(needed)}", short_diff(ta, tb, 6))
    return Verdict(name, "differs", short_diff(mask(ta)[0], mask(tb)[0]))


def compare_parquet(name: str, a: Path, b: Path) -> Verdict:
    """Data (schema without metadata, and rows) apart from metadata (each key/value)."""
    import pyarrow.parquet as pq

    if a.read_bytes() == b.read_bytes():
        return Verdict(name, "identical")
    ta, tb = pq.read_table(a), pq.read_table(b)
    parts: list[str] = []
    detail: list[str] = []
    bare_a, bare_b = ta.replace_schema_metadata(None), tb.replace_schema_metadata(None)
    parts.append(masked_part("schema", str(bare_a.schema), str(bare_b.schema), detail))
    data_same = bare_a.schema == bare_b.schema and bare_a.equals(bare_b)
    parts.append(
        "data identical" if data_same else masked_part("data", _rows(ta), _rows(tb), detail)
    )
    meta_a = {k.decode(): v.decode(errors="replace") for k, v in (ta.schema.metadata or {}).items()}
    meta_b = {k.decode(): v.decode(errors="replace") for k, v in (tb.schema.metadata or {}).items()}
    for key in sorted(set(meta_a) | set(meta_b)):
        va, vb = meta_a.get(key, "<absent>"), meta_b.get(key, "<absent>")
        parts.append(masked_part(f"metadata[{key}]", va, vb, detail, _pretty))
    return verdict(name, parts, detail)


def _rows(table: Any) -> str:
    return "\n".join(json.dumps(row, default=str) for row in table.to_pylist())


def _pretty(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=1, sort_keys=True)
    except ValueError:
        return text


def compare_html(name: str, a: bytes, b: bytes) -> Verdict:
    """The record cards apart from the rest of the page (head, the header with model,
    device, settings, time and command, the top-labels chips, scripts)."""
    if a == b:
        return Verdict(name, "identical")
    ta, tb = a.decode(errors="replace"), b.decode(errors="replace")
    (ra, sa), (rb, sb) = _split_html(ta), _split_html(tb)
    detail: list[str] = []
    parts = [] if ra and rb else ["no record cards found: compared as one page"]
    parts.append(masked_part("records", ra, rb, detail, _lines))
    parts.append(masked_part("page and header", sa, sb, detail, _lines))
    return verdict(name, parts, detail)


_CARD = re.compile(r"<(?:article|tr|li|div) class=\"(?:card|record|row)[^\"]*\"", re.I)


def _split_html(text: str) -> tuple[str, str]:
    starts = [m.start() for m in _CARD.finditer(text)]
    if not starts:
        return "", text
    body_end = text.rfind("</main>")
    end = body_end if body_end > starts[0] else len(text)
    return text[starts[0] : end], text[: starts[0]] + text[end:]


def _lines(html: str) -> str:
    return re.sub(r">\s*<", ">\n<", html)


def compare_tree(name: str, a: Path, b: Path) -> list[Verdict]:
    names = sorted(
        {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
        | {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    )
    verdicts = []
    for rel in names:
        fa, fb = a / rel, b / rel
        label = f"{name}/{rel}"
        if not (fa.exists() and fb.exists()):
            verdicts.append(Verdict(label, f"missing under {'B' if fa.exists() else 'A'}"))
        else:
            verdicts.append(compare_file(label, fa, fb))
    return verdicts


def compare_file(name: str, a: Path, b: Path) -> Verdict:
    if a.suffix == ".parquet":
        return compare_parquet(name, a, b)
    if a.suffix == ".html":
        return compare_html(name, a.read_bytes(), b.read_bytes())
    da, db = a.read_bytes(), b.read_bytes()
    if a.suffix in (".npy", ".safetensors") and da != db:
        return compare_binary(name, a, b)
    return compare_text(name, da, db)


def compare_binary(name: str, a: Path, b: Path) -> Verdict:
    """npy: header and array; safetensors: its JSON header (metadata) and tensors."""
    import numpy as np

    if a.suffix == ".npy":
        xa, xb = np.load(a), np.load(b)
        same = xa.shape == xb.shape and xa.dtype == xb.dtype and np.array_equal(xa, xb)
        return Verdict(
            name,
            f"differs (array {'identical' if same else 'differs'})",
            f"      shapes {xa.shape} {xb.shape}, dtypes {xa.dtype} {xb.dtype}",
        )
    from safetensors.numpy import load_file

    ha, hb = _safetensors_header(a), _safetensors_header(b)
    ta, tb = load_file(a), load_file(b)
    same = ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    meta = "identical" if ha.get("__metadata__") == hb.get("__metadata__") else "differs"
    return Verdict(
        name,
        f"differs (tensors {'identical' if same else 'differ'}; metadata {meta})",
        short_diff(_pretty(json.dumps(ha)), _pretty(json.dumps(hb))),
    )


def _safetensors_header(path: Path) -> dict[str, object]:
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size))


def producer(rel: Path) -> str:
    """Which command wrote ``rel`` (a run folder's file)."""
    names = {out or "table.stdout": f"classify.{fmt}" for fmt, out in CLASSIFY_FORMATS.items()}
    names.update({out: f"embed.{fmt}" for fmt, out in EMBED_FORMATS.items()})
    names["feats.paths.txt"] = "embed.npy"
    if rel.parts[0] == "converted":
        return "convert"
    base = rel.name.removeprefix(".").removesuffix(".run.json")
    return names.get(base, "?") + (" sidecar" if rel.name.endswith(".run.json") else "")


def compare_runs(a: Path, b: Path, outcome_a: dict, outcome_b: dict) -> list[Verdict]:
    """Every command's exit status, then every file either run wrote, side by side."""
    verdicts: list[Verdict] = []
    for name in outcome_a:
        (code_a, err_a), (code_b, err_b) = outcome_a[name], outcome_b[name]
        if code_a or code_b:
            last = lambda err: (err.strip().splitlines() or ["(no stderr)"])[-1]  # noqa: E731
            verdicts.append(
                Verdict(
                    name,
                    f"failed: exit {code_a} / {code_b}",
                    f"      A: {last(err_a)}\n      B: {last(err_b)}",
                )
            )
    for verdict in compare_tree("", a, b):
        rel = Path(verdict.name.lstrip("/"))
        verdict.name = f"{producer(rel)}: {rel}"
        verdicts.append(verdict)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of photos (default: the sample_images of REV_B, else A)",
    )
    parser.add_argument("-b", "--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--columns", type=int, default=120)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args(argv)

    revs = {
        side: git("rev-parse", "--verify", f"{rev}^{{commit}}")
        for side, rev in (("A", args.rev_a), ("B", args.rev_b))
    }
    temp = Path(tempfile.mkdtemp(prefix="compare-revisions-"))
    trees = {side: temp / f"tree-{side}" for side in revs}
    try:
        for side, commit in revs.items():
            git("worktree", "add", "--detach", "--force", str(trees[side]), commit)
        images = args.images or next(
            (
                t / "sample_images"
                for t in (trees["B"], trees["A"])
                if (t / "sample_images").is_dir()
            ),
            None,
        )
        if images is None:
            raise SystemExit("no sample_images/ at either revision: give --images")
        shared = temp / "photos"
        shutil.copytree(images, shared)
        photos = sorted(str(p) for p in shared.iterdir() if p.suffix.lower() in (".jpg", ".png"))
        model = make_checkpoint(temp / "model")
        outcome = {
            side: run_revision(trees[side], temp / f"run-{side}", model, photos, args)
            for side in revs
        }
        verdicts = compare_runs(temp / "run-A", temp / "run-B", outcome["A"], outcome["B"])
    finally:
        for tree in trees.values():
            if tree.exists():
                run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)])
        if not args.keep:
            shutil.rmtree(temp, ignore_errors=True)

    print(f"A = {args.rev_a} ({revs['A'][:10]} {git('log', '-1', '--format=%s', revs['A'])[:70]})")
    print(f"B = {args.rev_b} ({revs['B'][:10]} {git('log', '-1', '--format=%s', revs['B'])[:70]})")
    print(
        f"{len(photos)} photos, cpu float32, -b {args.batch}, {args.threads} threads, "
        f"COLUMNS={args.columns}"
    )
    print("masked where they differ: " + "; ".join(label for label, _, _ in MASKS))
    width = max(len(v.name) for v in verdicts)
    for verdict in verdicts:
        print(f"  {verdict.name:<{width}}  {verdict.status}")
        if verdict.detail and verdict.status != "identical":
            print(verdict.detail)
    if args.keep:
        print(f"kept: {temp}")
    return (
        0 if all(not v.status.startswith(("differs", "failed", "missing")) for v in verdicts) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
