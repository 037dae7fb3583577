"""deepssim_fast.report: PNG figures and the self-contained HTML page."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from deepssim_fast import data
from deepssim_fast.report import _short, gallery_png, histogram_png, report_html, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(b: bytes) -> tuple[int, int]:
    assert b[:8] == PNG_MAGIC
    return int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")


def _suspects(n: int) -> list[dict]:
    sl = data.load_slices("s0_10slices")
    out = []
    for i in range(n):
        a = sl[i % len(sl)].array
        out.append(
            {
                "synth_id": f"/data/synth/<b>s{i}</b>.png#2:0",
                "train_id": f"/data/train/t{i}.nii.gz#2:{i}",
                "rank": 1,
                "cosine": 0.9 - 0.1 * i,
                "ssim": None if i == 2 else 0.95 - 0.2 * i,
                "transform": "hflip+shift(1,0)" if i == 0 else "none",
                "synth_image": a[::-1],
                "train_image": a,
            }
        )
    return out


def _summary(n_synth: int = 4) -> dict:
    return {
        "metric": "deepssim",
        "search_score": "cosine of encoder embeddings",
        "label_score": "verified SSIM (preset deepssim)",
        "verify": {"method": "ssim", "flips": True, "max_shift": 2, "max_rotation_deg": 0.0},
        "thresholds": {"low": 0.6, "high": 0.85, "rule": "duplicate if s > high"},
        "model": {"path": "/m/<x>.pt", "hash": "ab" * 32},
        "n_train": 10,
        "n_synth": n_synth,
        "n_train_files": 2,
        "n_synth_files": 4,
        "n_pairs": 10 * n_synth,
        "k": 5,
        "item_size": [128, 128],
        "mode": "slices",
        "counts": {"duplicate": 1, "similar": 1, "different": n_synth - 2},
        "fraction_memorised": 1 / n_synth,
        "versions": {"numpy": np.__version__},
        "skipped": [{"set": "synth", "path": "/d/bad.png", "reason": "/d/bad.png: not a PNG <&>"}],
    }


def test_histogram_png_is_deterministic_and_has_two_panels() -> None:
    rng = np.random.default_rng(0)
    edges = np.linspace(-1, 1, 201)
    counts = np.histogram(rng.normal(0.2, 0.2, 5000), bins=edges)[0]
    verified = rng.uniform(0, 1, 50)
    two = histogram_png(counts, edges, (0.6, 0.85), verified=verified)
    one = histogram_png(counts, edges, (0.6, 0.85))
    assert two == histogram_png(
        counts, edges, (0.6, 0.85), verified=verified.copy()
    )  # same inputs, same bytes
    assert one == histogram_png(counts.copy(), edges, (0.6, 0.85))
    w2, _ = _png_size(two)
    w1, _ = _png_size(one)
    assert w2 > 1.5 * w1  # the verified-SSIM panel is drawn beside the search histogram
    moved = histogram_png(counts, edges, (0.5, 0.9))
    assert moved != one  # the thresholds are drawn
    empty = histogram_png(np.zeros(200, dtype=np.int64), edges, (0.6, 0.85))
    assert empty[:8] == PNG_MAGIC


@pytest.mark.parametrize("n", [0, 1, 4, 7])
def test_gallery_png_any_count(n: int) -> None:
    png = gallery_png(_suspects(n), (0.6, 0.85))
    w, h = _png_size(png)
    rows = max(1, (n + 2) // 3)
    assert w > 1000 and h >= 250 * rows
    assert gallery_png(_suspects(n), (0.6, 0.85)) == png


def test_gallery_handles_volumes_and_missing_images() -> None:
    vol = data.load_volume("anatomical").array
    s = _suspects(2)
    s[0]["synth_image"], s[0]["train_image"] = vol, vol
    s[1]["synth_image"] = s[1]["train_image"] = None
    assert gallery_png(s, (0.6, 0.85))[:8] == PNG_MAGIC


def test_gallery_draws_each_pair_as_stored_and_the_middle_slice_of_volumes(monkeypatch) -> None:
    """The gallery shows the images themselves: every suspect's synthetic and training image, 2D as stored
    (row 0 at the top), a volume by its middle slice along the last axis; a missing image is not drawn."""
    import matplotlib.axes

    shown: list[np.ndarray] = []
    imshow = matplotlib.axes.Axes.imshow

    def spy(self, x, *args, **kwargs):
        shown.append(np.array(x))
        return imshow(self, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    s = _suspects(3)
    vol = data.load_volume("anatomical").array
    s[1]["synth_image"] = vol
    s[2]["train_image"] = None
    gallery_png(s, (0.6, 0.85))
    want = [s[0]["synth_image"], s[0]["train_image"], vol[:, :, vol.shape[2] // 2], s[1]["train_image"],
            s[2]["synth_image"]]
    assert len(shown) == len(want)
    for got, w in zip(shown, want, strict=True):
        np.testing.assert_array_equal(got, np.asarray(w, dtype=np.float32))
    # and the picture depends on the images: other images, other bytes
    s2 = _suspects(3)
    s2[0]["synth_image"] = s2[0]["synth_image"][:, ::-1]
    assert gallery_png(_suspects(3), (0.6, 0.85)) != gallery_png(s2, (0.6, 0.85))


def test_report_html_self_contained_and_escaped() -> None:
    h = b"\x89PNG-histogram"
    g = b"\x89PNG-gallery"
    page = report_html(_summary(), histogram=h, gallery=g, suspects=_suspects(3))
    assert page.startswith("<!DOCTYPE html>")
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs == [
        f"data:image/png;base64,{base64.b64encode(h).decode()}",
        f"data:image/png;base64,{base64.b64encode(g).decode()}",
    ]
    assert "<link" not in page and "<script" not in page and "http" not in page
    assert "&lt;b&gt;s0&lt;/b&gt;" in page and "<b>s0</b>" not in page  # ids are escaped
    assert "not a PNG &lt;&amp;&gt;" in page
    assert "25.0 %" in page
    # the file counts are of the files found; the skipped ones are said where the count is (one synth file)
    text = re.sub(r"\s+", " ", page)
    assert re.search(r"synthetic set</th><td class=num>[\d,]+ items from [\d,]+ files found \(1 skipped files "
                     r"or items, listed below\)</td>", text), text
    assert re.search(r"training set</th><td class=num>[\d,]+ items from [\d,]+ files found</td>", text)
    # run timings never reach the page, so a resumed run writes the same bytes
    s1, s2 = _summary(), _summary()
    s1["timings_s"], s2["timings_s"] = {"total": 1.5}, {"total": 99.0}
    assert report_html(s1, histogram=h, gallery=g, suspects=_suspects(3)) == report_html(
        s2, histogram=h, gallery=g, suspects=_suspects(3)
    )


def test_report_html_states_every_verified_transform() -> None:
    """The page names the rotations the audit verified over (--verify-rotations), beside flips and shifts:
    a report of a rotation audit said only 'flips=..., max shift=...'."""
    h, g = b"h", b"g"
    s = _summary()
    s["verify"] = {"method": "ssim", "flips": True, "max_shift": 2, "max_rotation_deg": 5.0}
    page = report_html(s, histogram=h, gallery=g, suspects=_suspects(1))
    row = re.search(r"<th>label score</th><td>(.*?)</td>", page, re.S).group(1)
    assert "flips yes" in row and "max shift 2 px" in row and "rotations ±2.5° and ±5°" in row
    s["verify"] = {"method": "ssim", "flips": False, "max_shift": 0, "max_rotation_deg": 0.0}
    row = re.search(r"<th>label score</th><td>(.*?)</td>", report_html(s, histogram=h, gallery=g,
                    suspects=_suspects(1)), re.S).group(1)
    assert "flips no" in row and "no rotations" in row and "False" not in row


def test_write_report_atomic_files(tmp_path) -> None:
    edges = np.linspace(-1, 1, 201)
    counts = np.zeros(200, dtype=np.int64)
    counts[150] = 10
    paths = write_report(
        tmp_path,
        summary=_summary(),
        hist_counts=counts,
        hist_edges=edges,
        verified=np.array([0.9, 0.5]),
        thresholds=(0.6, 0.85),
        suspects=_suspects(2),
    )
    assert sorted(p.name for p in paths.values()) == ["gallery.png", "histogram.png", "report.html"]
    for p in paths.values():
        assert p.stat().st_size > 100
    assert sorted(x.name for x in tmp_path.iterdir()) == ["gallery.png", "histogram.png", "report.html"]


def test_gallery_draws_names_the_font_lacks_without_warnings() -> None:
    """A file name in CJK printed a 'Glyph ... missing from font(s) DejaVu Sans' UserWarning per glyph on
    stderr while the gallery was drawn."""
    import warnings

    s = _suspects(2)
    s[0]["synth_id"] = "/data/synth/脑扫描_01.png"
    s[1]["train_id"] = "/data/train/患者_7.nii.gz#2:40"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = gallery_png(s, (0.6, 0.85))
    assert png[:8] == PNG_MAGIC


def test_gallery_shows_file_names_as_plain_text() -> None:
    """'$' pairs in file names are not mathtext; '#' in folder names does not cut the shown name."""
    s = _suspects(2)
    s[0]["synth_id"] = "/data/synth/cost $5_$ scan.png#2:0"
    s[1]["train_id"] = r"/data/run#3/train/$\frac{$x.npy#2:4"
    png = gallery_png(s, (0.6, 0.85))
    assert png[:8] == PNG_MAGIC
    assert _short("/data/run#3/synth/copy0.png#2:0") == "copy0.png#2:0"
    assert _short("/data/run#3/vol.nii.gz") == "vol.nii.gz"


def test_gallery_tells_files_of_the_same_name_apart(monkeypatch, axes_titles: list) -> None:
    """``a/img.png`` and ``b/img.png`` are labelled with the folder that tells them apart (the same folders
    for every item of one file); a name no other file has stays a bare name; long labels stay short."""
    titles = axes_titles
    s = _suspects(3)
    s[0]["synth_id"], s[1]["synth_id"] = "/data/synth/a/img.png#2:0", "/data/synth/b/img.png#2:0"
    s[2]["synth_id"] = "/data/synth/a/img.png#2:7"
    gallery_png(s, (0.6, 0.85))
    assert [t.split("\n")[1] for t in titles[::2]] == ["a/img.png#2:0", "b/img.png#2:0", "a/img.png#2:7"]
    assert [t.split("\n")[1] for t in titles[1::2]] == ["t0.nii.gz#2:0", "t1.nii.gz#2:1", "t2.nii.gz#2:2"]
    from deepssim_fast.report import _labels

    ids = ["/p/a/x/v.nii.gz@t1#2:3", "/p/b/x/v.nii.gz@t0", "/e/emb.npy#row:3", "/f/emb.npy#row:3",
           "/q/site_with_a_long_name/sub-0001/ses-01/anat/scan.png#2:5",
           "/r/site_with_a_long_name/sub-0001/ses-01/anat/scan.png#2:5"]
    got = _labels(ids)
    assert [got[i] for i in ids[:4]] == ["a/x/v.nii.gz@t1#2:3", "b/x/v.nii.gz@t0", "e/emb.npy#row:3",
                                         "f/emb.npy#row:3"]
    assert got[ids[4]].startswith("q/…") and got[ids[5]].startswith("r/…")
    assert all(len(v) <= 34 for v in got.values()) and len(set(got.values())) == len(ids)


def test_gallery_heads_tell_the_search_ssim_from_the_verified_one(tmp_path, monkeypatch) -> None:
    """With metric ssim both scores of a pair are SSIMs: a flipped copy's head read 'SSIM 1.000  SSIM 0.517'
    (verified, then searched). The search score is named as such, in the gallery and the histogram."""
    import matplotlib.axes

    drawn: list[str] = []
    text, set_xlabel = matplotlib.axes.Axes.text, matplotlib.axes.Axes.set_xlabel

    def spy_text(self, x, y, s, *args, **kwargs):
        drawn.append(str(s))
        return text(self, x, y, s, *args, **kwargs)

    def spy_xlabel(self, s, *args, **kwargs):
        drawn.append(str(s))
        return set_xlabel(self, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", spy_text)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", spy_xlabel)
    s = _summary()
    s["metric"], s["search_score"] = "ssim", "SSIM (preset deepssim)"
    counts = np.zeros(200, dtype=np.int64)
    counts[150] = 10
    write_report(tmp_path, summary=s, hist_counts=counts, hist_edges=np.linspace(-1, 1, 201),
                 verified=np.array([0.95, 0.75]), thresholds=(0.6, 0.85), suspects=_suspects(2))
    heads = [t for t in drawn if t.startswith("#")]
    assert heads == ["#1  duplicate  SSIM 0.9500  search SSIM 0.9000  (hflip+shift(1,0))",
                     "#2  similar  SSIM 0.7500  search SSIM 0.8000"]
    assert "search SSIM" in drawn  # the histogram's search-score axis


def test_report_html_states_the_model_and_its_whole_hash() -> None:
    """A model passed in memory was shown as 'None (sha256 efe53a68ca358c11…)', a hash no file has; a file's
    hash was cut to 16 digits, too few to check a checkpoint against."""
    s = _summary()
    page = report_html(s, histogram=b"h", gallery=b"g", suspects=[])
    row = re.search(r"<th>model</th><td>(.*?)</td></tr>", page, re.S).group(1)
    assert "/m/&lt;x&gt;.pt" in row and "ab" * 32 in row and "sha256 of the file" in row
    s["model"] = {"path": None, "hash": "cd" * 32}
    row = re.search(r"<th>model</th><td>(.*?)</td></tr>", report_html(s, histogram=b"h", gallery=b"g",
                    suspects=[]), re.S).group(1)
    assert "None" not in row and "cd" * 32 in row and "in memory" in row and "of the file" not in row
    s["model"] = None
    assert "<th>model</th><td>none</td>" in report_html(s, histogram=b"h", gallery=b"g", suspects=[])


@pytest.mark.parametrize(
    ("dup", "n", "shown"), [(1, 2001, "0.05 %"), (2000, 2001, "99.95 %"), (0, 7, "0.0 %"), (7, 7, "100.0 %")]
)
def test_report_html_never_rounds_a_share_to_none_or_all(dup: int, n: int, shown: str) -> None:
    """'1 of 2001 synthetic items (0.0 %) are labelled duplicate' read as none memorised; 2000 of 2001 as all."""
    s = _summary(n)
    s["counts"] = {"duplicate": dup, "similar": 0, "different": n - dup}
    s["fraction_memorised"] = dup / n
    text = re.sub(r"\s+", " ", report_html(s, histogram=b"h", gallery=b"g", suspects=[]))
    assert f"{dup:,} of {n:,} synthetic items ({shown}) are labelled" in text


def test_report_html_does_not_count_skipped_items_as_files() -> None:
    """A correlation audit of one volume with 12 blank slices read '36 items from 1 files found (12 skipped,
    listed below)': the 12 are slices of that one file, skipped one by one."""
    s = _summary(36)
    s["n_synth_files"] = 1
    s["skipped"] = [{"set": "synth", "path": "/d/vol.npy", "reason": f"/d/vol.npy#2:{i}: constant image"}
                    for i in range(12)]
    text = re.sub(r"\s+", " ", report_html(s, histogram=b"h", gallery=b"g", suspects=[]))
    assert "36 items from 1 files found (12 skipped files or items, listed below)" in text


def test_empty_gallery_does_not_say_there_are_no_synthetic_items(monkeypatch) -> None:
    """audit(gallery=0) drew 'no synthetic items' over an audit of 10 synthetic items."""
    import matplotlib.axes

    drawn: list[str] = []
    text = matplotlib.axes.Axes.text

    def spy(self, x, y, s, *args, **kwargs):
        drawn.append(str(s))
        return text(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", spy)
    gallery_png([], (0.6, 0.85))
    assert drawn == ["no pairs shown (gallery=0)"]


def test_report_html_keeps_names_whitespace_and_says_a_skipped_path_once() -> None:
    """A browser collapsed "a  b.npy" to "a b.npy" (no white-space rule for ids); the skip reason column
    repeated the path the path column shows ("/d/bad.png: not a PNG")."""
    page = report_html(_summary(), histogram=b"h", gallery=b"g", suspects=_suspects(1))
    assert re.search(r"code\{[^}]*white-space:pre-wrap", page)
    assert "<td><code>/d/bad.png</code></td><td>not a PNG &lt;&amp;&gt;</td>" in page


def test_report_html_prints_a_score_on_its_side_of_the_thresholds() -> None:
    """0.611539 against high = 0.6115 was shown as 0.6115 beside the label duplicate (the rule: s > high)."""
    s = _summary()
    s["thresholds"] = {"low": 0.6, "high": 0.6115, "rule": "duplicate if s > high"}
    sus = _suspects(1)
    sus[0]["ssim"], sus[0]["cosine"] = 0.611539, 0.6000001
    page = report_html(s, histogram=b"h", gallery=b"g", suspects=sus)
    assert "<td class=num>0.6000001</td><td class=num>0.61154</td>" in page


def test_report_html_shows_thresholds_to_every_digit_and_slice_skip_reasons_once() -> None:
    """Thresholds of 7 significant digits were shown rounded to 6 (low = 0.562405 for 0.5624046), so a score
    of 0.5624048, "similar", looked "different" beside it. And a skipped slice's reason repeated its path
    ("<path>#2:0: constant image ...") where only "<path>: " was stripped."""
    from deepssim_fast.report import skip_reason

    s = _summary()
    s["thresholds"] = {"low": 0.5624046, "high": 0.766498, "rule": "duplicate if s > high"}
    s["skipped"] = [{"set": "synth", "path": "/d/blank.npy", "reason": "/d/blank.npy#2:0: constant image (every "
                     "pixel 0)"},
                    {"set": "train", "path": "/d/s.nii", "reason": "/d/s.nii@t3#1:7: constant image"}]
    page = report_html(s, histogram=b"\x89PNG-h", gallery=b"\x89PNG-g", suspects=_suspects(1))
    assert "low = 0.5624046, high = 0.766498" in page
    assert "slice 2:0: constant image (every pixel 0)" in page and "/d/blank.npy#2:0" not in page
    assert skip_reason("/d/s.nii", "/d/s.nii@t3#1:7: constant image") == "frame 3, slice 1:7: constant image"
    assert skip_reason("/d/x.png", "/d/x.png: not a PNG") == "not a PNG"
    assert skip_reason("/d/x.png", "something else") == "something else"


def test_report_says_how_many_suspects_it_shows_of_how_many() -> None:
    """With 40 of 40 items duplicate the page showed 12 rows under "Top suspected copies" without saying so:
    they read as all the suspects. It says how many it shows, of how many flagged, and where every pair is."""
    s = _summary(n_synth=40)
    s["counts"] = {"duplicate": 40, "similar": 0, "different": 0}
    page = re.sub(r"\s+", " ", report_html(s, histogram=b"h", gallery=b"g", suspects=_suspects(12)))
    assert ("The 12 synthetic items of highest score, of 40 (40 labelled duplicate or similar), each with its best "
            "training match; every candidate pair is in <code>matches.csv</code>.") in page
    one = re.sub(r"\s+", " ", report_html(_summary(), histogram=b"h", gallery=b"g", suspects=_suspects(1)))
    assert "The 1 synthetic item of highest score, of 4 (2 labelled duplicate or similar)" in one


def _spy(monkeypatch, name: str) -> list[str]:
    """The text of every call of ``matplotlib.axes.Axes.<name>`` (set_title: the label; text: its string)."""
    import matplotlib.axes

    drawn: list[str] = []
    original = getattr(matplotlib.axes.Axes, name)

    def spy(self, *args, **kwargs):
        drawn.append(str(args[2] if name == "text" else args[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, name, spy)
    return drawn


def test_histogram_of_a_flip_search_says_it_counts_the_unflipped_items(monkeypatch) -> None:
    """--verify none --verify-flips on flipped copies: the page said 100 % duplicate, but the only histogram
    ('correlation: all 100 pairs') had every pair below 0.2. It counted the search of the synthetic items as
    given only, without saying so. Its title says so now, each flip/shift search's own histogram is drawn over
    it, and the page says what neither counts (a pair's best score over the searches)."""
    edges = np.linspace(-1, 1, 201)
    plain = np.zeros(200, dtype=np.int64)
    plain[100:110] = 10
    flipped = np.zeros(200, dtype=np.int64)
    flipped[105:114] = 10
    flipped[199] = 10
    titles = _spy(monkeypatch, "set_title")
    one = histogram_png(plain, edges, (0.6, 0.85), score_name="correlation")
    assert titles == ["correlation: all 100 pairs"]  # no variants searched: every pair, as given
    titles.clear()
    both = histogram_png(plain, edges, (0.6, 0.85), score_name="correlation", variants={"hflip": flipped})
    assert titles == ["correlation, search without flips: all 100 pairs"]
    assert both != one  # the flip search's histogram is drawn too
    titles.clear()
    histogram_png(plain, edges, (0.6, 0.85), variants={"hflip": flipped, "shift(0,2)": flipped})
    assert titles == ["search score, search without flips/shifts: all 100 pairs"]
    s = _summary()
    s["pair_counts_search_variants"] = {"hflip": {"different": 90, "similar": 0, "duplicate": 10}}
    page = re.sub(r"\s+", " ", report_html(s, histogram=b"h", gallery=b"g", suspects=[]))
    assert "search of the synthetic items as given (without flips)" in page
    # the best score over the searches is what no one search's histogram counts (the page read "...is its best
    # over all these searches: a pair's best score over these searches is in none of them")
    assert ("is its best over all these searches, so none of the histograms below counts these scores: each "
            "counts one search's scores") in page
    assert "is in none of them" not in page
    assert page.index("none of the histograms below") < page.index('alt="score histogram"')


def test_report_shows_the_audits_warnings_near_the_top_escaped() -> None:
    """A warning that changes how the results read ('6 file(s) of image formats this tool does not read are left
    out', 'a synthetic file is also a training file') went to stderr only, never into the report."""
    s = _summary()
    s["warnings"] = ["/d/<x>: 6 file(s) of image formats this tool does not read are left out (3 .dcm, 3 .jpg)",
                     "1 synthetic file(s) are also training files (/d/a&b.png): each will match itself"]
    page = report_html(s, histogram=b"h", gallery=b"g", suspects=_suspects(1))
    at = page.index("<h2>Warnings</h2>")
    assert at < page.index("<h2>Score distribution</h2>") and at < page.index("<th>metric (search score)</th>")
    assert "<li>/d/&lt;x&gt;: 6 file(s) of image formats this tool does not read are left out (3 .dcm, 3 .jpg)" in page
    assert "also training files (/d/a&amp;b.png)" in page and "<x>" not in page
    s["warnings"] = []
    assert "<h2>Warnings</h2>" not in report_html(s, histogram=b"h", gallery=b"g", suspects=[])


@pytest.mark.parametrize("ids", [
    # BIDS names: the subject is at the start of the file name, 70 characters long
    ["/data/bids/sub-0001/anat/sub-0001_ses-baseline_acq-mprage_run-01_desc-preproc_T1w.nii.gz#2:80",
     "/data/bids/sub-0002/anat/sub-0002_ses-baseline_acq-mprage_run-01_desc-preproc_T1w.nii.gz#2:80",
     "/data/bids/sub-0002/anat/sub-0002_ses-baseline_acq-mprage_run-01_desc-preproc_T1w.nii.gz#2:81"],
    # names that differ only in the middle, far from both ends
    ["/g/scan_of_the_head_acquired_at_site_A_with_the_protocol_number_7.png",
     "/g/scan_of_the_head_acquired_at_site_B_with_the_protocol_number_7.png",
     "/g/scan_of_the_head_acquired_at_site_C_with_the_protocol_number_7.png#2:0"],
    # and in several places at once
    ["/h/" + "x" * 20 + "_a_" + "y" * 20 + "_a_" + "z" * 20 + ".png",
     "/h/" + "x" * 20 + "_b_" + "y" * 20 + "_a_" + "z" * 20 + ".png",
     "/h/" + "x" * 20 + "_a_" + "y" * 20 + "_b_" + "z" * 20 + ".png",
     "/h/" + "x" * 20 + "_b_" + "y" * 20 + "_b_" + "z" * 20 + ".png"],
])
def test_gallery_labels_of_different_items_differ(ids: list[str]) -> None:
    """Labels kept the last 34 characters of a file name: two BIDS subjects' scans read the same. A label now
    keeps what tells its item apart (the head of the name, or the part around the first difference) besides
    its tail, and labels of different items always differ."""
    from deepssim_fast.report import _labels

    got = _labels(ids)
    assert len(set(got.values())) == len(ids), got
    assert not [(got[i], o) for i in ids for o in ids if o != i and _fits_label(got[i], o)], got
    if ids[0].startswith("/data/bids"):
        assert got[ids[0]].startswith("sub-0001") and got[ids[1]].startswith("sub-0002"), got
        assert got[ids[1]].endswith("#2:80") and got[ids[2]].endswith("#2:81"), got
        assert all(len(v) <= 34 for v in got.values()), got
    if ids[0].startswith("/g/"):
        assert all(len(v) <= 34 for v in got.values()), got
        assert "site_A" in got[ids[0]] and "site_B" in got[ids[1]] and "site_C" in got[ids[2]], got


def _fits_label(label: str, item_id: str) -> bool:
    """Whether a reader of ``label`` could take it for ``item_id``: split at each ``…`` (which stands for at
    least one character), its first part is a prefix of one of the id's path ends (from a folder or file name
    on), its last part a suffix of that end, and the parts between are in it, in order, between them."""
    parts = label.split("…")
    comps = item_id.split("/")
    for start in range(len(comps)):
        end = "/".join(comps[start:])
        if len(parts) == 1:
            if end == label:
                return True
            continue
        if not (end.startswith(parts[0]) and end.endswith(parts[-1])):
            continue
        pos = len(parts[0]) + 1
        for middle in parts[1:-1]:
            q = end.find(middle, pos)
            if q < 0:
                break
            pos = q + len(middle) + 1
        else:
            if pos <= len(end) - len(parts[-1]):
                return True
    return False


@pytest.mark.parametrize("ids", [
    # the folder that tells /a/x/... from /a/y/... (x) was cut away: "a/…ng_folder_name_here/img.png#2:0"
    ["/a/x/very_long_folder_name_here/img.png#2:0", "/a/y/very_long_folder_name_here/img.png#2:0",
     "/b/x/very_long_folder_name_here/img.png#2:0"],
    # "b/…" fits both: a folder b at the cut, and one further up
    ["/b/scan_of_the_head_acquired_at_site_A_with_protocol_7.png#2:10",
     "/a/sub-0001/b/very_long_folder_name_here/scan_of_the_head_acquired_at_site_A_with_protocol_7.png#2:10"],
])
def test_gallery_labels_fit_no_other_item(ids: list[str]) -> None:
    """Labels of different items differed, but a cut label could fit another item too: of /a/x/f/img.png
    beside /a/y/f/img.png and /b/x/f/img.png, "a/…f/img.png" (the differing folder x cut away) fit /a/y/f
    as well. What each label shows fits its own item and no other, and labels stay short here."""
    from deepssim_fast.report import _labels

    got = _labels(ids)
    for i in ids:
        assert _fits_label(got[i], i), (got[i], i)
        assert not [o for o in ids if o != i and _fits_label(got[i], o)], (got[i], got)
    assert all(len(v) <= 34 for v in got.values()), got
    if ids[0].startswith("/a/x/"):
        assert got[ids[0]].startswith("a/x/…"), got  # (the folder that tells it from /a/y/...)
    else:
        assert got[ids[0]].startswith("b/scan_…"), got  # (its start up to a separator: "b/…" fits both)
    assert not _fits_label("a/…ng_folder_name_here/img.png#2:0", "/a/y/very_long_folder_name_here/img.png#2:1")
    assert _fits_label("a/…ng_folder_name_here/img.png#2:0", "/a/y/very_long_folder_name_here/img.png#2:0")
    assert _fits_label("x/a/scan.png", "/p/x/a/scan.png") and not _fits_label("a/scan.png", "/p/xa/scan.png")


def test_cut_labels_have_no_ellipsis_for_nothing() -> None:
    """The start of a cut label took the separator after it, up to the next part kept: "sub-…0002…te_B…" of
    sub-0002/scan_…, whose first "…" stood for nothing (and so fit not even its own file)."""
    from deepssim_fast.report import _cut

    name = "scan_of_the_head_acquired_at_site_{}_with_protocol_7.png"
    label = "sub-0002/" + name.format("B") + "@t1"
    got = _cut(label, ["sub-0001/" + name.format("B"), "sub-0002/" + name.format("A"), "ses-01/" + name.format("B")],
               34, suffix=3)
    assert len(got) <= 34 and got.startswith("sub-0002…") and "te_B" in got, got
    assert _fits_label(got, "/d/" + label), got


def test_gallery_heads_keep_each_score_on_its_side_of_the_threshold_and_name_the_label(monkeypatch) -> None:
    """A duplicate at 0.97000 and a similar pair at 0.96980 against a high threshold of 0.9699 both read 'SSIM
    0.970' (3 decimals), and the label was told by colour only. The heads print scores as the table does and
    name the label."""
    heads = _spy(monkeypatch, "text")
    sus = _suspects(3)
    sus[0]["ssim"], sus[1]["ssim"], sus[2]["ssim"] = 0.97, 0.9698, 0.2
    sus[0]["cosine"] = sus[1]["cosine"] = sus[2]["cosine"] = 0.96995
    gallery_png(sus, (0.6, 0.9699))
    heads = [h for h in heads if h.startswith("#")]
    assert heads[0] == "#1  duplicate  SSIM 0.9700  cosine 0.96995  (hflip+shift(1,0))", heads
    assert heads[1] == "#2  similar  SSIM 0.9698  cosine 0.96995", heads
    assert heads[2] == "#3  different  SSIM 0.2000  cosine 0.96995", heads


def test_report_of_an_embeddings_audit_has_no_item_size() -> None:
    """An embeddings audit's page read 'item size: None (slices)'."""
    s = _summary()
    s["metric"], s["item_size"] = "embeddings", None
    page = report_html(s, histogram=b"h", gallery=b"g", suspects=[])
    row = re.search(r"<th>item size</th><td>(.*?)</td>", page, re.S).group(1)
    assert row == "n/a (embeddings given)"
    row = re.search(r"<th>item size</th><td>(.*?)</td>",
                    report_html(_summary(), histogram=b"h", gallery=b"g", suspects=[]), re.S).group(1)
    assert row == "128 × 128 (slices)"


def _contrast_on_white(colour: str) -> float:
    """The WCAG 2 contrast ratio of ``#rrggbb`` against white: (1 + 0.05) / (L + 0.05), L the relative
    luminance of the sRGB colour."""
    rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return 1.05 / (lum + 0.05)


def test_label_colours_are_readable_on_white_and_the_same_in_every_output(monkeypatch) -> None:
    """The 'similar' label's orange (#dd8452) had a contrast of 2.8:1 on the white page; text needs 4.5:1
    (WCAG AA). Every label colour the page writes text in has it now, and the figures use the same colours."""
    page = report_html(_summary(), histogram=b"h", gallery=b"g", suspects=[])
    colours = dict(re.findall(r"\.(duplicate|similar|different)\{color:(#[0-9a-f]{6})", page))
    assert set(colours) == {"duplicate", "similar", "different"}
    for name, c in colours.items():
        assert _contrast_on_white(c) >= 4.5, (name, c, _contrast_on_white(c))
    import matplotlib.axes

    used: list[str] = []
    for name in ("text", "axvline"):
        original = getattr(matplotlib.axes.Axes, name)

        def spy(self, *args, _original=original, **kwargs):
            used.append(kwargs.get("color"))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(matplotlib.axes.Axes, name, spy)
    sus = _suspects(3)
    sus[0]["ssim"], sus[1]["ssim"], sus[2]["ssim"] = 0.9, 0.7, 0.1
    gallery_png(sus, (0.6, 0.85))
    assert [c for c in used if c] == [colours["duplicate"], colours["similar"], colours["different"]]
    used.clear()
    histogram_png(np.ones(200, dtype=np.int64), np.linspace(-1, 1, 201), (0.6, 0.85), verified=np.array([0.7]))
    assert used == [colours["similar"], colours["duplicate"]] * 2


def test_report_table_has_a_verified_column_only_where_pairs_were_verified() -> None:
    """With --verify none the suspects table kept a "verified SSIM" column, empty in every row."""
    verified = _suspects(3)  # (one of them has no verified SSIM: its cell stays, empty)
    assert sum(s.get("ssim") is not None for s in verified) == 2
    page = report_html(_summary(), histogram=b"h", gallery=b"g", suspects=verified)
    assert page.count("<th>verified SSIM</th>") == 1
    assert all(len(re.findall(r"<td", row)) == 7 for row in re.findall(r"<tr><td class=num>\d+</td>.*?</tr>", page))
    unverified = [{**s, "ssim": None} for s in verified]
    page = report_html(_summary(), histogram=b"h", gallery=b"g", suspects=unverified)
    assert "<th>verified SSIM</th>" not in page
    rows = re.findall(r"<tr><td class=num>\d+</td>.*?</tr>", page)
    assert len(rows) == 3 and all(len(re.findall(r"<td", row)) == 6 for row in rows)
