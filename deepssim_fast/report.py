"""Figures and the self-contained HTML page of an audit (matplotlib, Agg backend; no network needed to view).

* ``histogram.png`` — left: the search score over all (synthetic, training) pairs, log-scaled counts, with
  the two thresholds drawn; with flips or shifts searched, the bars are the search of the synthetic items as
  given (the title says "search without flips/shifts") and each flipped or shifted search's own histogram is
  a grey line (none of them counts the pairs' best scores over the searches, which matches.csv keeps: one
  histogram per search cannot be merged into one of per-pair maxima); right: the verified SSIM of every
  candidate pair, same thresholds.
* ``gallery.png`` — the top suspected copies: each synthetic item beside its best training match, headed by
  its label in words and the verified SSIM and search score, printed as the page's table prints them (as
  many digits as keep a score on its side of the thresholds), in the label's colour (3D items show their
  middle slice along the last axis). Each item is named by the shortest path suffix that no other item of the
  gallery shares (``img.png#2:0``, or ``a/img.png#2:0`` beside ``b/img.png#2:0``), cut to 34 characters
  around what tells it apart (``sub-0001_…preproc_T1w.nii.gz#2:80``; see :func:`_labels`), drawn as plain
  text (no mathtext: ``$`` is a character like any other).
* ``report.html`` — the summary (metric, label score and the transforms verified over, thresholds, model,
  set sizes), the audit's warnings (summary.json's ``warnings``: files of formats not read, files in both
  sets, ...), the label counts, both figures (base64 PNG), the table of suspects and the skipped inputs,
  with inline CSS only. Run timings are left out so a resumed run writes the same bytes.

Labels have one colour each on the page and in both figures (:data:`LABEL_COLOURS`), each with a contrast of
at least 4.5:1 on white. Every file is written atomically (temporary file, then rename) and deterministically.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ._atomic import atomic_write_bytes as _atomic_bytes
from .io import skip_reason

logger = logging.getLogger(__name__)

_PNG_META = {"Software": None}  # keep the PNG bytes independent of the matplotlib build string

#: The colour of each label, on the page (text on white) and in both figures. Each has a contrast of at least
#: 4.5:1 against white (WCAG AA for text): duplicate 4.6, similar 4.9 (the orange of seaborn's palette,
#: ``#dd8452``, darkened at the same hue; it had 2.8), different 4.8.
LABEL_COLOURS = {"duplicate": "#c44e52", "similar": "#b35723", "different": "#4c72b0"}


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
    variants: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    """PNG bytes of the score histogram(s). ``counts`` (bins,) over ``edges`` (bins + 1,); ``verified``:
    the verified SSIM of the candidate pairs (any shape), or None.

    ``variants``: for a search that also queried flipped or shifted synthetic items, each such search's own
    histogram (name as matches.csv writes the transform -> counts over ``edges``), drawn as grey lines over
    the bars; ``counts`` is then the search of the synthetic items as given, and the title says so. None of them
    counts the pairs' best scores over the searches (the ones matches.csv keeps): per-search histograms cannot
    be merged into the histogram of per-pair maxima."""
    plt = _pyplot()
    panels = 2 if verified is not None and np.size(verified) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.0), squeeze=False)
    ax = axes[0, 0]
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    variants = {name: np.asarray(v, dtype=np.float64) for name, v in (variants or {}).items()}
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="none",
           label="synthetic items as given" if variants else None)
    for q, v in enumerate(variants.values()):
        # (one legend entry for all: 11 of them in 2D with flips and shifts; summary.json names each one's counts)
        ax.stairs(np.where(v > 0, v, np.nan), edges, color="#555555", linewidth=0.8, alpha=0.8,
                  label=f"each {_variants_txt(variants, each=True)} search ({len(variants)})" if q == 0 else None)
    if counts.sum() > 0 or any(v.sum() > 0 for v in variants.values()):
        ax.set_yscale("log")
    nz = np.nonzero(counts + sum(variants.values(), np.zeros_like(counts)))[0]
    lo = edges[nz[0]] if nz.size else edges[0]
    lo = min(lo, thresholds[0]) - 0.05
    ax.set_xlim(max(edges[0], lo), edges[-1])
    if variants:
        ax.set_title(f"{score_name}, search without {_variants_txt(variants)}: all {int(counts.sum()):,} pairs",
                     fontsize=10)
    else:
        ax.set_title(f"{score_name}: all {int(counts.sum()):,} pairs")
    ax.set_xlabel(score_name)
    ax.set_ylabel("pairs (log scale)")
    for t, name, c in ((thresholds[0], "similar >", LABEL_COLOURS["similar"]),
                       (thresholds[1], "duplicate >", LABEL_COLOURS["duplicate"])):
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
        for t, c in ((thresholds[0], LABEL_COLOURS["similar"]), (thresholds[1], LABEL_COLOURS["duplicate"])):
            ax2.axvline(t, color=c, linestyle="--", linewidth=1.5)
    fig.tight_layout()
    return _fig_bytes(fig)


def _label(score: float, thresholds: Sequence[float]) -> str:
    """The label of ``score`` under ``thresholds`` (low, high): duplicate if s > high; similar if
    low < s <= high; different otherwise."""
    return "duplicate" if score > thresholds[1] else ("similar" if score > thresholds[0] else "different")


def _variants_txt(names: Iterable[str], *, each: bool = False) -> str:
    """What the variant searches named ``names`` transform: ``flips``, ``shifts`` or ``flips/shifts`` (a shift
    is named ``shift(dy,dx)``, a flip ``hflip``, ``vflip``, ``hvflip`` or ``flip0``..``flip012``); ``each``:
    in the singular, ``flip/shift`` ("each flip/shift search")."""
    names = list(names)
    kinds = [k for k, there in (("flip", any(not n.startswith("shift") for n in names)),
                                ("shift", any(n.startswith("shift") for n in names))) if there]
    return "/".join(k if each else k + "s" for k in kinds)


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
        label = _label(label_score, thresholds)
        # the label in words (not by colour alone), and the scores as the page's table prints them: as many
        # digits as keep each on its side of the thresholds (0.97000 and 0.96980 against 0.9699 both read 0.970)
        head = f"#{q + 1}  {label}  "
        if ssim is not None:
            head += f"SSIM {format_score(ssim, thresholds)}  "
        head += f"{score_name} {format_score(s.get('cosine', float('nan')), thresholds)}"
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
            color=LABEL_COLOURS[label],
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

    A label over ``n`` characters is cut by :func:`_cut`, which keeps what tells its file apart from the other
    files besides its end (``sub-0001_…preproc_T1w.nii.gz#2:80``; every item of one file is cut alike).
    What a cut label shows (the parts between its ``…``s, the first starting a folder or file name) fits no
    other id's path, so it tells its item from every other, not only from the other labels (of
    ``/a/x/very_long_folder_name_here/img.png`` beside ``/a/y/…`` and ``/b/x/…``, ``a/…ng_folder_name_here/…``
    would fit ``/a/y/…`` too: it reads ``a/x/…_folder_name_here/img.png``). A cut that still fits another
    path is replaced by the label's start up to a separator and its end (``b/scan_…`` beside
    ``/a/b/f/scan_….png``, which ``b/…`` fits too), else the label is shown whole: a whole label is the end of
    its own path only, so labels of different ids always differ (but for ids that differ only in bytes that
    are not UTF-8, which both show as U+FFFD)."""
    comps = {i: _readable(i).replace(os.sep, "/").split("/") for i in dict.fromkeys(item_ids)}
    # the file of each item: the item suffix (``#<axis>:<index>``, ``#row:<i>``, ``@t<t>``) taken off its name
    files = {i: (*c[:-1], _ITEM_SUFFIX.sub("", c[-1])) for i, c in comps.items()}
    paths = {i: "/".join(c) for i, c in comps.items()}

    def fits_another(label: str, i: str) -> bool:
        return any(_fits(label, path) for o, path in paths.items() if o != i)

    out: dict[str, str] = {}
    for i, c in comps.items():
        mine = files[i]
        others = {f for f in files.values() if f != mine}
        k = next((k for k in range(1, len(c) + 1) if all(f[-k:] != mine[-k:] for f in others)), len(c))
        full = "/".join(c[-k:])
        suffix = len(full) - len("/".join(mine[-k:]))  # (the item suffix's length)
        # cut against the other files' last k folders and names, what stands in their paths where the label's
        # parts stand: against their own labels (fewer folders) a difference in a folder went unseen, and
        # /a/x/f/img.png read "a/…f/img.png" beside /a/y/f/img.png ("y/…") and /b/x/f/img.png ("b/…")
        label = _cut(full, {"/".join(f[-k:]) for f in others}, n, suffix=suffix)
        if label != full and fits_another(label, i):
            tail = max((n - 1) // 2, suffix + n // 4)  # (as much end as _cut keeps)
            starts = (full[:j] + "…" + full[-(n - 1 - j):] for j in range(1, n - tail)
                      if full[j - 1] in _NAME_SEPARATORS)
            label = next((cut for cut in starts if not fits_another(cut, i)), full)
        out[i] = label
    return out


def _fits(label: str, path: str) -> bool:
    """Whether the label ``label`` (an end of a path, whole from a ``/`` or cut with ``…``) fits ``path``: a
    reader who sees its visible parts cannot tell ``path`` from its own. Each ``…`` stands for at least one
    character (a ``…`` in a name is read as one too)."""
    pattern = "(?:.*/)?" + ".+".join(re.escape(part) for part in label.split("…"))
    return re.fullmatch(pattern, path, re.S) is not None


#: Characters that end a part of a name: what a label keeps of a name ends before one, or at its start with one
#: (``sub-0001_…``, ``a/…``)
_NAME_SEPARATORS = frozenset("/_-. #@:")


def _cut(label: str, others: Iterable[str], n: int, *, suffix: int = 0) -> str:
    """``label`` in at most ``n`` characters, keeping what tells its file apart from the ``others`` (the other
    files' labels, without item suffixes; ``suffix``: the length of ``label``'s item suffix, which it ends with).

    * ``label`` of at most ``n`` characters: whole;
    * its end tells it apart from every other, some way in from its cut: ``…`` and its last ``n - 1``
      characters (the end holds the extension and the item suffix, ``#2:80``);
    * else its end (at least half of ``n``), and before it, for each first difference from another label that
      the end does not show, the characters up to the end of the part that holds it, ``…`` between each:
      ``sub-0001_…preproc_T1w.nii.gz#2:80``, ``…quired_at_site_A…ocol_number_7.png``,
      ``…xxxxx_a…yyyyy_a…zzzzzzzzzzzzz.png``;
    * with more such differences than fit: whole (:func:`_labels` also shows whole any two cut labels that
      read the same)."""
    if len(label) <= n:
        return label
    stem = label[: len(label) - suffix]
    others = list(others)

    def common_end(a: str, b: str) -> int:
        m = 0
        while m < min(len(a), len(b)) and a[-1 - m] == b[-1 - m]:
            m += 1
        return m

    ends = [common_end(stem, o) for o in others]
    margin = n // 4  # (a difference at the very cut, "…_A_with…", leaves out what it belongs to: "site_A")
    if all(c + suffix < n - 1 - margin for c in ends):
        return "…" + label[-(n - 1) :]
    tail = max((n - 1) // 2, suffix + margin)
    limit = len(label) - tail  # (the windows end before the end kept)
    firsts = {min(len(os.path.commonprefix([stem, o])), limit - 1)
              for o, c in zip(others, ends, strict=True) if c + suffix >= tail}
    stops = []
    for p in sorted(q for q in firsts if q >= 0):
        q = next((q for q in range(p + 1, limit) if stem[q] in _NAME_SEPARATORS), limit)
        stops.append(min(q, p + 1 + margin))
    stops = sorted(set(stops))
    width = (n - tail - len(stops) - 1) // max(1, len(stops))  # after an ellipsis before each and the end
    if not stops or width < 2:
        return label if stops else "…" + label[-(n - 1) :]
    windows: list[list[int]] = []
    for e in stops:
        s = max(0, e - width)
        if windows and s <= windows[-1][1]:  # overlapping the previous one: one window (within both budgets)
            windows[-1][1] = e
        else:
            windows.append([s, e])
    if windows[0][0] == 0 and stem[windows[0][1]] in _NAME_SEPARATORS:
        windows[0][1] += 1  # from the start: with the separator that ends it, in the ellipsis' place ("q/…")
        if len(windows) > 1 and windows[0][1] == windows[1][0]:  # (no "…" for nothing: "x/a/…scan" of "x/a/scan")
            windows[0:2] = [[0, windows[1][1]]]
    elif windows[0][0] == 1:
        windows[0][0] = 0  # (the one character an ellipsis would stand for)
    text = "".join(("…" if s > 0 else "") + label[s:e] for s, e in windows)
    last = windows[-1][1]
    rest = max(last, len(label) - (n - len(text) - 1))
    return text + ("…" if rest > last else "") + label[rest:]


_ITEM_SUFFIX = re.compile(r"(@t\d+)?(#(\d+:\d+|row:\d+))?$")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}.big{font-size:1.4em;font-weight:bold}code{font-size:.9em;white-space:pre-wrap}
.warnings{border:1px solid #e3b5b6;background:#fdf4f4;padding:0 1em;margin:1em 0}.warnings h2{border:none}
""" + (
    f".duplicate{{color:{LABEL_COLOURS['duplicate']};font-weight:bold}}.similar{{color:{LABEL_COLOURS['similar']}}}"
    f".different{{color:{LABEL_COLOURS['different']}}}\n"
)


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
    # (with --verify none no pair has a verified SSIM: the column was there, empty in every row)
    verified_col = any(s.get("ssim") is not None for s in suspects)
    for q, s in enumerate(suspects):
        score = s["ssim"] if s.get("ssim") is not None else s["cosine"]
        cuts = (th["low"], th["high"])
        lab = _label(score, cuts)
        ssim_txt = "" if s.get("ssim") is None else format_score(s["ssim"], cuts)
        rows.append(
            f"<tr><td class=num>{q + 1}</td><td><code>{e(s['synth_id'])}</code></td>"
            f"<td><code>{e(s['train_id'])}</code></td><td class=num>{format_score(s['cosine'], cuts)}</td>"
            + (f"<td class=num>{ssim_txt}</td>" if verified_col else "")
            + f"<td>{e(s.get('transform') or '')}</td><td class={lab}>{lab}</td></tr>"
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
    # warnings that change how the results read (summary.json's "warnings": files of formats not read, files in
    # both sets, ...), near the top: they were on stderr only
    warned = summary.get("warnings") or []
    warnings_html = (
        "<div class=warnings><h2>Warnings</h2><ul>" + "".join(f"<li>{e(w)}</li>" for w in warned) + "</ul></div>"
        if warned else ""
    )
    # the histogram's bars count the search of the synthetic items as given; with flips or shifts each variant's
    # search is drawn beside it: each counts one search's scores, so none is the histogram of a pair's best score
    # over them (the one matches.csv keeps)
    variants = list(summary.get("pair_counts_search_variants") or {})
    if variants:
        labels_by = (", the score it is labelled by (<code>--verify none</code>),"
                     if summary.get("verify", {}).get("method") == "none" else "")
        hist_txt = (
            f"<p>The bars count the search score of every (synthetic, training) pair in the search of the synthetic "
            f"items as given (without {_variants_txt(variants)}); each grey line counts those of one search of "
            f"transformed synthetic items ({e(', '.join(variants))}; <code>summary.json</code>: "
            "<code>pair_counts_search_variants</code>). A pair's search score in <code>matches.csv</code>"
            f"{labels_by} is its best over all these searches, so none of the histograms below counts these "
            "scores: each counts one search's scores, and histograms of separate searches cannot be merged into "
            "one of per-pair best scores.</p>"
        )
    else:
        hist_txt = ""
    size = summary.get("item_size")
    if size:
        size_txt = " × ".join(str(int(v)) for v in size) + f" ({e(summary['mode'])})"
    else:  # (an embeddings audit reads vectors, not images)
        size_txt = "n/a (embeddings given)" if summary.get("metric") == "embeddings" else "n/a"
    verified_th = "<th>verified SSIM</th>" if verified_col else ""
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
{warnings_html}
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
<tr><th>item size</th><td>{size_txt}</td></tr>
<tr><th>versions</th><td>{versions}</td></tr>
</table>
<h2>Score distribution</h2>
{hist_txt}
<img alt="score histogram" src="data:image/png;base64,{b64h}">
<h2>Top suspected copies</h2>
<p>{shown_txt}</p>
<img alt="gallery of suspected copies" src="data:image/png;base64,{b64g}">
<table><tr><th>#</th><th>synthetic</th><th>training match</th><th>search score</th>{verified_th}
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
    hist_variants: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Path]:
    """Write histogram.png, gallery.png and report.html into ``out`` (atomically); return their paths.
    ``hist_variants``: each flip/shift search's own histogram over ``hist_edges`` (see :func:`histogram_png`)."""
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
    h = histogram_png(hist_counts, hist_edges, thresholds, verified=verified, score_name=score_name,
                      variants=hist_variants)
    g = gallery_png(suspects, thresholds, score_name=score_name)
    _atomic_bytes(paths["histogram.png"], h)
    _atomic_bytes(paths["gallery.png"], g)
    _atomic_bytes(
        paths["report.html"], report_html(summary, histogram=h, gallery=g, suspects=suspects).encode()
    )
    logger.info("report written to %s", paths["report.html"])
    return paths
