"""Storage conditions read from the files: JPEG quality, subsampling, and JPEG history."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from forensics.data.conditions import file_condition, jpeg_quality
from forensics.data.images import scan_folder
from forensics.stats.conditions import jpeg_lattice
from forensics.steps.storage import condition_label, manifest_conditions, mismatch, set_conditions


def _jpeg(im: np.ndarray, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(im).save(b, "JPEG", **kw)
    return b.getvalue()


def _png(im: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(im).save(b, "PNG")
    return b.getvalue()


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """64 real 32x32 colour tiles: crops of scikit-image's photographs."""
    import skimage.data as data

    tiles = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        im = getattr(data, name)()
        for k in range(16):
            y, x = 37 * k % (im.shape[0] - 64), 53 * k % (im.shape[1] - 64)
            tiles.append(np.asarray(Image.fromarray(im[y:y + 64, x:x + 64]).resize((32, 32))))
    return np.stack(tiles)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_pillow_jpeg_quality_is_read_back_exactly(photos, mode):
    im = np.asarray(Image.fromarray(photos[0]).convert(mode))
    for q in range(1, 101):
        c = file_condition(_jpeg(im, quality=q))
        assert c.format == "JPEG" and c.lossy and (c.width, c.height) == (32, 32)
        assert c.jpeg_quality_exact, q
        # q 98-100 share one table with 8-bit entries of 1: read as 100, the same file
        assert c.jpeg_quality == q or (q >= 98 and c.jpeg_quality == 100), (q, c)


def test_subsampling_and_another_encoders_tables(photos):
    assert file_condition(_jpeg(photos[0], quality=80, subsampling=0)).subsampling == "4:4:4"
    assert file_condition(_jpeg(photos[0], quality=80, subsampling=2)).subsampling == "4:2:0"
    flat = [12] * 64  # no IJG quality gives a flat table: the nearest is named, not exact
    c = file_condition(_jpeg(photos[0], qtables=[flat, flat]))
    assert c.jpeg_quality_exact is False and 1 <= c.jpeg_quality <= 100
    png = file_condition(_png(photos[0]))
    assert png.format == "PNG" and not png.lossy and png.jpeg_quality is None
    with pytest.raises(ValueError, match="64 entries"):
        jpeg_quality([1, 2, 3])


def test_a_jpeg_saved_again_as_png_is_seen_and_clean_tiles_are_not(photos):
    clean = jpeg_lattice([p @ [0.299, 0.587, 0.114] for p in photos.astype(float)])
    assert not clean.detected and clean.score < clean.threshold / 2
    for q in (50, 75, 90):
        again = [_decoded(_jpeg(p, quality=q)).astype(float) @ [0.299, 0.587, 0.114]
                 for p in photos]
        found = jpeg_lattice(again)
        assert found.detected and found.offset == (0, 0), (q, found)
        assert found.score > 2 * found.threshold
    cropped = [_decoded(_jpeg(p, quality=75))[3:, 5:].astype(float) @ [0.299, 0.587, 0.114]
               for p in photos]
    found = jpeg_lattice(cropped)  # cropped after JPEG: the grid is found where it moved
    assert found.detected and found.offset == (5, 3), found


def test_set_conditions_label_and_mismatch_in_words(photos, tmp_path):
    clean = set_conditions([_png(p) for p in photos])
    assert clean["label"] == "lossless" and clean["formats"] == {"PNG": 64}
    assert clean["sizes"] == {"32x32": 64} and clean["jpeg"] is None
    again = set_conditions([_png(_decoded(_jpeg(p, quality=75))) for p in photos])
    assert again["label"] == "lossless, earlier JPEG" and again["jpeg_history"]["detected"]
    jpeg = set_conditions([_jpeg(p, quality=75) for p in photos])
    assert jpeg["label"] == "JPEG q75" and jpeg["jpeg"]["qualities"] == [75, 75, 75]
    assert jpeg["jpeg_history"] is None
    mixed = {**clean, "formats": {"PNG": 32, "JPEG": 32}, "jpeg": jpeg["jpeg"]}
    assert condition_label(mixed) == "mixed: JPEG q75 + lossless"
    said = mismatch(jpeg, [clean, clean])
    assert len(said) == 1 and "stored as JPEG q75" in said[0] and "lossless (2 curves)" in said[0]
    assert mismatch(clean, [clean]) == []
    assert "1 of 2 enrolled curve(s)" in mismatch(clean, [clean, None])[0]
    big = {**clean, "sizes": {"64x64": 64}}
    assert any("64x64 px" in s and "32x32" in s for s in mismatch(big, [clean]))


def test_manifest_conditions_refuse_a_file_changed_after_listing(photos, tmp_path):
    from forensics.errors import InputError

    for i, p in enumerate(photos[:4]):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    manifest = scan_folder(tmp_path)
    assert manifest_conditions(manifest)["n_images"] == 4
    assert manifest_conditions(manifest, [1, 2])["n_images"] == 2
    Image.fromarray(photos[9]).save(tmp_path / "2.png")
    with pytest.raises(InputError, match="2.png changed"):
        manifest_conditions(manifest)


def _summary(label, quality=None, history_steps=None):
    out = {"label": label, "jpeg": None, "jpeg_history": None, "sizes": {"32x32": 8}}
    if quality is not None:
        out["jpeg"] = {"qualities": [quality, quality, quality]}
    if history_steps is not None:
        out["jpeg_history"] = {"detected": True, "steps": history_steps}
    return out


def _rows(*conditions):
    return [{"curve_id": f"c{i}", "params_json": json.dumps({"condition": c} if c else {})}
            for i, c in enumerate(conditions)]


def test_like_with_like_selection():
    from forensics.data.conditions import STANDARD_LUMA, quality_from_steps
    from forensics.stats.conditions import LATTICE_FREQUENCIES
    from forensics.steps.storage import select as select_with_figures

    def select(*args):  # the choice of curves alone; the figures' rule is tested below
        return select_with_figures(*args, apply_figures=False)

    rows = _rows(None, None, "jpeg75", "jpeg75", "jpeg90")
    assert select(rows, _summary("lossless")).condition == "clean"
    assert len(select(rows, _summary("lossless")).rows) == 2
    got = select(rows, _summary("JPEG q72", 72))
    assert got.condition == "jpeg75" and [r["curve_id"] for r in got.rows] == ["c2", "c3"]
    assert select(rows, _summary("JPEG q93", 93)).condition == "jpeg90"
    low = select(rows, _summary("JPEG q50", 50))
    assert low.inconclusive and "--conditions jpeg50" in low.inconclusive
    # a JPEG saved again as PNG: its quality from the lattice's steps
    q75 = [(int(s) * 50 + 50) // 100 for s in STANDARD_LUMA]  # the IJG table at quality 75
    steps = [q75[r * 8 + c] for r, c in LATTICE_FREQUENCIES]
    assert abs(quality_from_steps(steps, LATTICE_FREQUENCIES) - 75) <= 2  # 7 steps: ties
    history = select(rows, _summary("lossless, earlier JPEG", history_steps=steps))
    assert history.condition == "jpeg75" and not history.inconclusive
    mixed = select(rows, _summary("mixed: JPEG q75 + lossless", 75))
    assert mixed.inconclusive and "several ways" in mixed.inconclusive
    asked = select(rows, _summary("lossless"), "jpeg90")
    assert asked.condition == "jpeg90" and len(asked.rows) == 1
    missing = select(rows, _summary("lossless"), "half")
    assert missing.inconclusive and "--conditions half" in missing.inconclusive
    assert select(rows, None).condition == "clean"  # embeddings: nothing read


def _figures(wrong=0, drop=0.0, top1=0.9):
    return {"top1": top1, "set": "cifar zoo", "drop": drop, "drop_set": "mnist protocol",
            "wrong_above_half": wrong, "answers": 40, "measured": "2000-01-01"}


def test_a_condition_measured_not_attributable_gives_an_inconclusive_answer(
        photos, tmp_path, monkeypatch):
    from forensics import defaults
    from forensics.steps.storage import select

    rows = _rows(None, None, "jpeg75", "jpeg75", "jpeg90", "half")
    for i, im in enumerate(photos[:8]):  # the suspects as a user has them: JPEG files
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(im, quality=75))
    suspect = set_conditions(sorted(tmp_path.glob("*.jpg")))
    assert suspect["label"] == "JPEG q75"

    monkeypatch.setattr(defaults, "CONDITION_FIGURES", {"jpeg75": _figures(wrong=3)})
    got = select(rows, suspect)
    assert got.condition == "jpeg75" and got.inconclusive
    assert "measured 'jpeg75' as not attributable" in got.inconclusive
    assert "3 of 40 answers naming a wrong family with confidence above 0.5" in got.inconclusive
    assert "measured 2000-01-01" in got.inconclusive
    # too far below clean suspects' top-1: inconclusive too, with the figure
    monkeypatch.setattr(defaults, "CONDITION_FIGURES", {"jpeg75": _figures(drop=0.3)})
    assert "0.30 below clean suspects on the mnist protocol set" in (
        select(rows, suspect).inconclusive or "")
    # too few named right on the worst set, however close to clean
    monkeypatch.setattr(defaults, "CONDITION_FIGURES", {"jpeg75": _figures(top1=0.3)})
    assert "top-1 0.30 on the cifar zoo set" in (select(rows, suspect).inconclusive or "")
    # figures that support it: the like-with-like answer
    monkeypatch.setattr(defaults, "CONDITION_FIGURES", {"jpeg75": _figures(drop=0.05)})
    ok = select(rows, suspect)
    assert ok.condition == "jpeg75" and ok.inconclusive is None and len(ok.rows) == 2
    # never measured: no answer under it either
    q90 = set_conditions([_jpeg(im, quality=90) for im in photos[:8]])
    assert "'jpeg90' was not measured" in (select(rows, q90).inconclusive or "")
    # a condition named by the user is held to its figures as well
    monkeypatch.setattr(defaults, "CONDITION_FIGURES", {"half": _figures(drop=0.6)})
    clean = set_conditions([_png(im) for im in photos[:8]])
    assert "'half' as not attributable" in (select(rows, clean, "half").inconclusive or "")
    # clean suspects are compared with clean curves, whatever the table says
    assert select(rows, clean).inconclusive is None and select(rows, clean).condition == "clean"
    # the measurement itself sees through the rule
    assert select(rows, suspect, apply_figures=False).inconclusive is None


def test_the_shipped_condition_figures_are_well_formed():
    from forensics import defaults
    from forensics.steps.storage import attributable

    for name, f in defaults.CONDITION_FIGURES.items():
        assert name in defaults.CONDITIONS
        assert set(f) == {"top1", "set", "drop", "drop_set", "wrong_above_half", "answers",
                          "measured"}
        assert 0 <= float(f["top1"]) <= 1 and 0 <= int(f["wrong_above_half"]) <= int(f["answers"])
        why = attributable(name)
        assert (why is None) == (int(f["wrong_above_half"]) == 0
                                 and float(f["drop"]) <= defaults.CONDITION_MAX_DROP
                                 and float(f["top1"]) >= defaults.CONDITION_MIN_TOP1)
    assert attributable(defaults.CLEAN_CONDITION) is None
