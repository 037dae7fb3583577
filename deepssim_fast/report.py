"""Figures and the self-contained HTML page of an audit (matplotlib, Agg backend; no network needed to view).

* ``histogram.png`` — left: the search score over all (synthetic, training) pairs, log-scaled counts, with
  the two thresholds drawn; right: the verified SSIM of every candidate pair, same thresholds.
* ``gallery.png`` — the top suspected copies: each synthetic item beside its best training match, with
  the search score and the verified SSIM (3D items show their middle slice along the last axis). Each item
  is named by the shortest path suffix that no other item of the gallery shares (``img.png#2:0``, or
  ``a/img.png#2:0`` beside ``b/img.png#2:0``), drawn as plain text (no mathtext: ``$`` is a character like
  any other).
* ``report.html`` — the summary (metric, label score and the transforms verified over, thresholds, model,
  set sizes), the label counts, both figures (base64 PNG), the table of suspects and the skipped inputs,
  with inline CSS only. Run timings are left out so a resumed run writes the same bytes.

Every file is written atomically (temporary file, then rename) and deterministically.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._atomic import atomic_write_bytes as _atomic_bytes
from .io import skip_reason

logger = logging.getLogger(__name__)

_PNG_META = {"Software": None}  # keep the PNG bytes independent of the matplotlib build string


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _fig_bytes(fig) -> bytes:
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        # file names in scripts the default font lacks (CJK, say) are drawn as boxes in the figure (the report's
        # text names them in full): without a UserWarning per glyph on stderr
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        fig.savefig(buf, format="png", dpi=100, metadata=_PNG_META)
    _pyplot().close(fig)
    return buf.getvalue()


def histogram_png(
    counts: np.ndarray,
    edges: np.ndarray,
    thresholds: tuple[float, float],
    *,
    verified: np.ndarray | None = None,
    score_name: str = "search score",
) -> bytes:
    """PNG bytes of the score histogram(s). ``counts`` (bins,) over ``edges`` (bins + 1,); ``verified``:
    the verified SSIM of the candidate pairs (any shape), or None."""
    plt = _pyplot()
    panels = 2 if verified is not None and np.size(verified) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.0), squeeze=False)
    ax = axes[0, 0]
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="none")
    if counts.sum() > 0:
        ax.set_yscale("log")
    nz = np.nonzero(counts)[0]
    lo = edges[nz[0]] if nz.size else edges[0]
    lo = min(lo, thresholds[0]) - 0.05
    ax.set_xlim(max(edges[0], lo), edges[-1])
    ax.set_title(f"{score_name}: all {int(counts.sum()):,} pairs")
    ax.set_xlabel(score_name)
    ax.set_ylabel("pairs (log scale)")
    for t, name, c in ((thresholds[0], "similar >", "#dd8452"), (thresholds[1], "duplicate >", "#c44e52")):
        ax.axvline(t, color=c, linestyle="--", linewidth=1.5, label=f"{name} {float(t)!r}")  # (every digit: :g rounds)
    ax.legend(loc="upper left", fontsize=8)
    if panels == 2:
        ax2 = axes[0, 1]
        v = np.asarray(verified, dtype=np.float64).ravel()
        bins = np.linspace(min(-0.2, float(v.min())) if v.size else -0.2, 1.0, 61)
        ax2.hist(v, bins=bins, color="#55a868")
        ax2.set_title(f"verified SSIM: {v.size:,} candidate pairs")
        ax2.set_xlabel("SSIM (preset deepssim)")
        ax2.set_ylabel("pairs")
        for t, c in ((thresholds[0], "#dd8452"), (thresholds[1], "#c44e52")):
            ax2.axvline(t, color=c, linestyle="--", linewidth=1.5)
    fig.tight_layout()
    return _fig_bytes(fig)


def _show(img: np.ndarray | None) -> np.ndarray | None:
    if img is None:
        return None
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3:
        a = a[:, :, a.shape[2] // 2]
    return a  # shown as stored: row 0 at the top


def gallery_png(
    suspects: Sequence[dict], thresholds: tuple[float, float], *, score_name: str = "cosine"
) -> bytes:
    """PNG bytes of the suspects gallery: pairs (synthetic | training match) in a grid, 3 pairs per row.

    Each suspect is a dict with ``synth_image``, ``train_image`` (2D/3D arrays or None), ``synth_id``,
    ``train_id``, ``cosine``, ``ssim`` (None when not verified) and ``transform``.
    """
    plt = _pyplot()
    n = len(suspects)
    per_row = 3
    nrows = max(1, (n + per_row - 1) // per_row)
    height = 3.1 * nrows + 0.9
    fig, axes = plt.subplots(nrows, 2 * per_row, figsize=(2.4 * 2 * per_row, height), squeeze=False)
    # fixed margins (no tight_layout): the layout, hence the bytes, depend only on the number of rows
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.85 / height, wspace=0.06, hspace=0.5)
    for ax in axes.ravel():
        ax.axis("off")
    if n == 0:
        # (an audit always has synthetic items: none are shown because none were asked for, gallery=0)
        axes[0, 0].text(0, 0.5, "no pairs shown (gallery=0)", fontsize=12)
    names = _labels([s[key] for s in suspects for key in ("synth_id", "train_id")])
    for q, s in enumerate(suspects):
        r, c = divmod(q, per_row)
        a_s, a_t = axes[r, 2 * c], axes[r, 2 * c + 1]
        ssim = s.get("ssim")
        label_score = ssim if ssim is not None else s.get("cosine", 0.0)
        color = (
            "#c44e52"
            if label_score > thresholds[1]
            else ("#dd8452" if label_score > thresholds[0] else "#4c72b0")
        )
        head = f"#{q + 1}  "
        if ssim is not None:
            head += f"SSIM {ssim:.3f}  "
        head += f"{score_name} {s.get('cosine', float('nan')):.3f}"
        if s.get("transform") and s["transform"] != "none":
            head += f"  ({s['transform']})"
        for ax, img, side in ((a_s, s.get("synth_image"), "synth"), (a_t, s.get("train_image"), "train")):
            shown = _show(img)
            if shown is not None:
                ax.imshow(shown, cmap="gray", interpolation="nearest")
            name = names[s["synth_id" if side == "synth" else "train_id"]]
            # file names are plain text: a '$' pair must not be parsed as mathtext
            ax.set_title(
                ("synthetic" if side == "synth" else "training match") + f"\n{name}",
                fontsize=7,
                parse_math=False,
            )
        a_s.text(
            1.03,
            1.2,
            head,
            transform=a_s.transAxes,
            fontsize=8.5,
            color=color,
            va="bottom",
            ha="center",
            fontweight="bold",
            parse_math=False,
        )
    fig.suptitle(
        "top suspected copies: synthetic (left) beside its training match (right)",
        fontsize=11,
        y=1 - 0.12 / height,
        va="top",
    )
    return _fig_bytes(fig)


def _readable(text: str) -> str:
    """``text`` with the bytes of a file name that are not UTF-8 (kept by Python as lone surrogates,
    ``\\udcfc`` for a Latin-1 ``ü``) shown as U+FFFD, as a terminal shows them: a figure's text and the UTF-8
    page cannot hold a lone surrogate (matplotlib raised TypeError, ``str.encode`` UnicodeEncodeError)."""
    return os.fsencode(text).decode("utf-8", "replace") if any("\udc80" <= ch <= "\udcff" for ch in text) else text


def _short(item_id: str, n: int = 34) -> str:
    """The file name of an item id with its suffix (``t0.png#2:5``, ``vol.nii.gz@t1``), at most n characters.

    The suffixes (``#<axis>:<index>``, ``#row:<i>``, ``@t<t>``) never hold a ``/``, so the last path component
    is the file name even when a folder name holds a ``#``."""
    base = os.path.basename(item_id)
    return base if len(base) <= n else "…" + base[-(n - 1) :]


def _labels(item_ids: Sequence[str], n: int = 34) -> dict[str, str]:
    """A short label for each distinct item id: its file name with the item suffix, preceded by as few of
    the file's folders as tell its file apart from the other files of ``item_ids``. So ``/x/a/img.png#2:0``
    and ``/x/b/img.png#2:3`` read ``a/img.png#2:0`` and ``b/img.png#2:3`` (:func:`_short` gives both the
    name ``img.png``), and every item of one file gets the same folders.

    A label over ``n`` characters keeps its start (the distinguishing folder, up to half of ``n``) and its
    end, with an ellipsis between; a file name alone is cut as :func:`_short` cuts it."""
    comps = {i: _readable(i).replace(os.sep, "/").split("/") for i in dict.fromkeys(item_ids)}
    # the file of each item: the item suffix (``#<axis>:<index>``, ``#row:<i>``, ``@t<t>``) taken off its name
    files = {i: (*c[:-1], _ITEM_SUFFIX.sub("", c[-1])) for i, c in comps.items()}
    out: dict[str, str] = {}
    for i, c in comps.items():
        mine = files[i]
        others = {f for f in files.values() if f != mine}
        k = next((k for k in range(1, len(c) + 1) if all(f[-k:] != mine[-k:] for f in others)), len(c))
        if k == 1:
            out[i] = _short(_readable(i), n)
            continue
        label = "/".join(c[-k:])
        if len(label) > n:
            head = min(len(c[-k]) + 1, (n - 1) // 2)
            label = label[:head] + "…" + label[-(n - 1 - head) :]
        out[i] = label
    return out


_ITEM_SUFFIX = re.compile(r"(@t\d+)?(#(\d+:\d+|row:\d+))?$")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.duplicate{color:#c44e52;font-weight:bold}.similar{color:#dd8452}.different{color:#4c72b0}
img{max-width:100%;border:1px solid #eee}.big{font-size:1.4em;font-weight:bold}code{font-size:.9em;white-space:pre-wrap}
"""


def _transforms_txt(v: dict) -> str:
    """The transforms the audit searched and verified over, as the page states them: flips, shifts and
    rotations (``--verify-rotations``; summary.json's ``max_rotation_deg``, absent in older summaries)."""
    rot = float(v.get("max_rotation_deg") or 0.0)
    return (
        f"flips {'yes' if v.get('flips') else 'no'}, max shift {int(v.get('max_shift') or 0)} px, "
        + (f"rotations ±{rot / 2:g}° and ±{rot:g}°" if rot else "no rotations")
    )


def format_percent(fraction: float) -> str:
    """``fraction`` as a percentage with one decimal, or as many more as keep a share that is neither none
    nor all from reading ``0.0`` or ``100.0`` (1 of 2,001 items is ``0.05``, not ``0.0``)."""
    x = 100.0 * float(fraction)
    for digits in range(1, 16):
        txt = f"{x:.{digits}f}"
        if (float(txt) == 0.0) == (x == 0.0) and (float(txt) == 100.0) == (x == 100.0):
            break
    return txt


def format_score(value: float, thresholds: Sequence[float], decimals: int = 4) -> str:
    """``value`` with ``decimals`` decimals, or as many more as keep it on its own side of each threshold:
    0.611539 against a high threshold of 0.6115 is ``0.61154``, not ``0.6115`` beside the label duplicate
    (the rule is s > high), and 0.85000038 is ``0.8500004``, not ``0.850000``."""
    v = float(value)
    txt = f"{v:.{decimals}f}"
    for digits in range(decimals + 1, 18):
        r = float(txt)
        if all((r > t) == (v > t) for t in thresholds):
            break
        txt = f"{v:.{digits}f}"
    return txt


def report_html(summary: dict, *, histogram: bytes, gallery: bytes, suspects: Sequence[dict]) -> str:
    """The self-contained report page (inline CSS, base64 images). Timings are deliberately omitted."""
    def e(text: str) -> str:  # (file names that are not UTF-8 shown with U+FFFD: see _readable)
        return html.escape(_readable(text))

    c = summary["counts"]
    n = summary["n_synth"]
    th = summary["thresholds"]
    rows = []
    for q, s in enumerate(suspects):
        score = s["ssim"] if s.get("ssim") is not None else s["cosine"]
        lab = "duplicate" if score > th["high"] else ("similar" if score > th["low"] else "different")
        cuts = (th["low"], th["high"])
        ssim_txt = "" if s.get("ssim") is None else format_score(s["ssim"], cuts)
        rows.append(
            f"<tr><td class=num>{q + 1}</td><td><code>{e(s['synth_id'])}</code></td>"
            f"<td><code>{e(s['train_id'])}</code></td><td class=num>{format_score(s['cosine'], cuts)}</td>"
            f"<td class=num>{ssim_txt}</td>"
            f"<td>{e(s.get('transform') or '')}</td><td class={lab}>{lab}</td></tr>"
        )
    # (12 rows of 40 duplicates read as if they were all the suspects)
    flagged = c["duplicate"] + c["similar"]
    shown_txt = (f"The {len(suspects):,} synthetic item{'s' if len(suspects) != 1 else ''} of highest score, of "
                 f"{n:,} ({flagged:,} labelled duplicate or similar), each with its best training match; every "
                 "candidate pair is in <code>matches.csv</code>.")
    skipped = summary.get("skipped") or []

    def skipped_of(side: str) -> str:  # the files counted are those found; say how many inputs were left out
        # an entry is an unreadable file or one item the metric cannot score (a constant slice): "1 file found
        # (12 skipped)" must not read as 12 files
        n = sum(1 for s in skipped if s.get("set") == side)
        return f" ({n:,} skipped files or items, listed below)" if n else ""

    skipped_html = (
        "<p>None.</p>"
        if not skipped
        else "<table><tr><th>set</th><th>path</th><th>reason</th></tr>"
        + "".join(
            f"<tr><td>{e(s['set'])}</td><td><code>{e(s['path'])}</code></td>"
            f"<td>{e(skip_reason(s['path'], s['reason']))}</td></tr>"
            for s in skipped
        )
        + "</table>"
    )
    model = summary.get("model")
    if not model:
        model_txt = "none"
    elif model.get("path"):  # the whole hash: a reader checks the file against it (sha256sum)
        model_txt = f"<code>{e(str(model['path']))}</code>, sha256 of the file <code>{e(str(model.get('hash')))}</code>"
    else:  # a model passed in memory: its hash is of the module (class, settings, weights), not of any file
        model_txt = (
            "given in memory, not as a file; sha256 of its class, settings and weights "
            f"<code>{e(str(model.get('hash')))}</code>"
        )
    b64h = base64.b64encode(histogram).decode()
    b64g = base64.b64encode(gallery).decode()
    versions = ", ".join(f"{e(k)} {e(v)}" for k, v in sorted(summary.get("versions", {}).items()))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>deepssim_fast memorisation audit</title>
<style>{_CSS}</style></head><body>
<h1>Memorisation audit</h1>
<p class=big>{c["duplicate"]:,} of {n:,} synthetic items ({format_percent(summary["fraction_memorised"])} %)
are labelled
<span class=duplicate>duplicate</span>; {c["similar"]:,} <span class=similar>similar</span>,
{c["different"]:,} <span class=different>different</span>.</p>
<table>
<tr><th>metric (search score)</th><td>{e(summary["metric"])} — {e(summary["search_score"])}</td></tr>
<tr><th>label score</th><td>{e(summary["label_score"])}; {_transforms_txt(summary["verify"])}</td></tr>
<tr><th>thresholds</th><td>{e(th["rule"])}; low = {float(th["low"])!r}, high = {float(th["high"])!r}</td></tr>
<tr><th>model</th><td>{model_txt}</td></tr>
<tr><th>training set</th><td class=num>{summary["n_train"]:,} items from {summary["n_train_files"]:,}
files found{skipped_of("train")}</td></tr>
<tr><th>synthetic set</th><td class=num>{summary["n_synth"]:,} items from {summary["n_synth_files"]:,}
files found{skipped_of("synth")}</td></tr>
<tr><th>pairs searched</th><td class=num>{summary["n_pairs"]:,} (top {summary["k"]} kept per
synthetic item)</td></tr>
<tr><th>item size</th><td>{e(str(summary.get("item_size")))} ({e(summary["mode"])})</td></tr>
<tr><th>versions</th><td>{versions}</td></tr>
</table>
<h2>Score distribution</h2>
<img alt="score histogram" src="data:image/png;base64,{b64h}">
<h2>Top suspected copies</h2>
<p>{shown_txt}</p>
<img alt="gallery of suspected copies" src="data:image/png;base64,{b64g}">
<table><tr><th>#</th><th>synthetic</th><th>training match</th><th>search score</th><th>verified SSIM</th>
<th>transform</th><th>label</th></tr>
{"".join(rows)}
</table>
<h2>Skipped inputs</h2>
{skipped_html}
<p>All candidate pairs: <code>matches.csv</code>; counts, settings and timings: <code>summary.json</code>.</p>
</body></html>
"""


def write_report(
    out: str | os.PathLike,
    *,
    summary: dict,
    hist_counts: np.ndarray,
    hist_edges: np.ndarray,
    verified: np.ndarray | None,
    thresholds: tuple[float, float],
    suspects: Sequence[dict],
    files: dict[str, Path] | None = None,
) -> dict[str, Path]:
    """Write histogram.png, gallery.png and report.html into ``out`` (atomically); return their paths."""
    out = Path(out)
    files = files or {}
    paths = {name: files.get(name, out / name) for name in ("histogram.png", "gallery.png", "report.html")}
    # the search score's name in both figures; metric ssim's is "search SSIM", so that a gallery head never
    # reads "SSIM 1.000  SSIM 0.517" (verified, then searched) for a flipped copy
    score_name = {
        "deepssim": "cosine",
        "embeddings": "cosine",
        "correlation": "correlation",
        "ssim": "search SSIM",
    }.get(summary.get("metric", ""), "score")
    h = histogram_png(hist_counts, hist_edges, thresholds, verified=verified, score_name=score_name)
    g = gallery_png(suspects, thresholds, score_name=score_name)
    _atomic_bytes(paths["histogram.png"], h)
    _atomic_bytes(paths["gallery.png"], g)
    _atomic_bytes(
        paths["report.html"], report_html(summary, histogram=h, gallery=g, suspects=suspects).encode()
    )
    logger.info("report written to %s", paths["report.html"])
    return paths
