"""Pathological generators (`fp synth`) on small real images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.errors import InputError
from forensics.paper.synth import KINDS, image_rng, synth_folder, transform

runner = CliRunner()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """Six sklearn digits (8x8, bright strokes on black) as PNGs in class folders."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for i in range(6):
        folder = root / str(digits.target[i])
        folder.mkdir(exist_ok=True)
        img = (digits.images[i] * 15).astype(np.uint8)  # 0..16 -> 0..240
        Image.fromarray(img).save(folder / f"d{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Two real photos (skimage), 64x64, grey levels kept within 64..192 (no noise clipping)."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for name, arr in (("camera", data.camera()), ("astronaut", data.astronaut())):
        small = np.asarray(Image.fromarray(arr).resize((64, 64), Image.Resampling.BOX), float)
        mid = (64 + small / 255 * 128).round().astype(np.uint8)
        Image.fromarray(mid).save(root / f"{name}.png")
    return root


def _load(path):
    return np.asarray(Image.open(path))


def _pairs(src, out, suffix=".png"):
    for path in sorted(src.rglob("*.png")):
        yield _load(path), _load(out / path.relative_to(src).with_suffix(suffix))


def test_rotate_90_is_rot90(digits_dir, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["synth", "rotate", str(digits_dir), str(out), "--angle", "90"])
    assert result.exit_code == 0, result.output
    assert "Wrote 6 images" in result.output
    pairs = list(_pairs(digits_dir, out))
    assert len(pairs) == 6
    for before, after in pairs:
        np.testing.assert_array_equal(after, np.rot90(before))
        assert not np.array_equal(after, before)


def test_random_rotation_is_seeded(digits_dir, tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        synth_folder("rotate", digits_dir, tmp_path / name, seed=seed)
        runs[name] = {
            p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*.png")
        }
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    synth_folder("rotate", digits_dir, tmp_path / "zero", max_angle=0.0)
    for before, after in _pairs(digits_dir, tmp_path / "zero"):
        np.testing.assert_array_equal(after, before)


def test_shuffle_permutes_patches(digits_dir, tmp_path):
    synth_folder("shuffle", digits_dir, tmp_path / "out", seed=3, grid=4)
    moved = 0
    for before, after in _pairs(digits_dir, tmp_path / "out"):

        def patches(a):
            return sorted(
                a[r : r + 2, c : c + 2].tobytes() for r in range(0, 8, 2) for c in range(0, 8, 2)
            )

        assert patches(after) == patches(before)
        moved += not np.array_equal(after, before)
    assert moved >= 5


def test_shuffle_keeps_the_remainder_in_place():
    arr = np.arange(100, dtype=np.uint8).reshape(10, 10)
    out = np.asarray(transform("shuffle", Image.fromarray(arr), np.random.default_rng(0), grid=4))
    np.testing.assert_array_equal(out[8:, :], arr[8:, :])
    np.testing.assert_array_equal(out[:, 8:], arr[:, 8:])
    assert sorted(out[:8, :8].ravel()) == sorted(arr[:8, :8].ravel())
    with pytest.raises(InputError, match="too small"):
        transform("shuffle", Image.fromarray(arr[:3, :3]), np.random.default_rng(0), grid=4)


def test_noise_has_the_requested_std(photo_dir, tmp_path):
    synth_folder("noise", photo_dir, tmp_path / "out", seed=0, sigma=10)
    for before, after in _pairs(photo_dir, tmp_path / "out"):
        diff = after.astype(float) - before.astype(float)
        assert diff.std() == pytest.approx(10.0, abs=0.4)
        assert abs(diff.mean()) < 0.4
        assert after.shape == before.shape and after.dtype == np.uint8


def _high_frequency_energy(img, cutoff):
    grey = img.astype(float).mean(axis=2) if img.ndim == 3 else img.astype(float)
    power = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    fy = np.fft.fftfreq(grey.shape[0])[:, None]
    fx = np.fft.fftfreq(grey.shape[1])[None, :]
    return power[np.maximum(abs(fy), abs(fx)) > cutoff].sum()


def _low_frequency_energy(img, cutoff):
    grey = img.astype(float).mean(axis=2) if img.ndim == 3 else img.astype(float)
    return _high_frequency_energy(img, 0.0) - _high_frequency_energy(grey, cutoff)


def test_downup_loses_high_frequencies(photo_dir, tmp_path):
    synth_folder("downup", photo_dir, tmp_path / "x4", factor=4)
    synth_folder("downup", photo_dir, tmp_path / "x2", factor=2)
    for (before, x4), (_, x2) in zip(
        _pairs(photo_dir, tmp_path / "x4"), _pairs(photo_dir, tmp_path / "x2"), strict=True
    ):
        assert x4.shape == before.shape
        # above the Nyquist frequency of the 16x16 intermediate (0.125 cycles / pixel)
        lost4 = _high_frequency_energy(x4, 0.125) / _high_frequency_energy(before, 0.125)
        lost2 = _high_frequency_energy(x2, 0.125) / _high_frequency_energy(before, 0.125)
        assert lost4 < 0.35 and lost4 < lost2 < 1.0
        # the coarse structure stays
        kept = _low_frequency_energy(x4, 0.05) / _low_frequency_energy(before, 0.05)
        assert 0.8 < kept < 1.1


@pytest.mark.parametrize("mode", ["color", "noise", "checker"])
def test_background_keeps_foreground(digits_dir, tmp_path, mode):
    synth_folder("background", digits_dir, tmp_path / "out", seed=4, mode=mode, threshold=32)
    colours = set()
    for before, after in _pairs(digits_dir, tmp_path / "out"):
        assert after.shape == before.shape + (3,)
        fg = before > 32
        assert 0 < fg.sum() < fg.size
        np.testing.assert_array_equal(after[fg], np.repeat(before[fg][:, None], 3, axis=1))
        background = {tuple(px) for px in after[~fg]}
        if mode == "color":
            assert len(background) == 1
            colours |= background
        elif mode == "checker":
            assert len(background) <= 2
        else:
            assert len(background) > 10
    if mode == "color":
        assert len(colours) > 1  # a colour per image


def test_seed_depends_on_path_not_on_order(digits_dir, tmp_path):
    one = tmp_path / "one"
    rel = next(p.relative_to(digits_dir) for p in sorted(digits_dir.rglob("*.png")))
    (one / rel.parent).mkdir(parents=True)
    shutil.copy(digits_dir / rel, one / rel)
    synth_folder("noise", digits_dir, tmp_path / "all", seed=9)
    synth_folder("noise", one, tmp_path / "single", seed=9)
    assert (tmp_path / "all" / rel).read_bytes() == (tmp_path / "single" / rel).read_bytes()
    a = image_rng(9, rel.as_posix()).normal(size=3)
    assert np.array_equal(a, image_rng(9, rel.as_posix()).normal(size=3))
    assert not np.array_equal(a, image_rng(9, "other.png").normal(size=3))


def test_manifest_paths_and_no_leftovers(digits_dir, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["synth", "noise", str(digits_dir), str(out), "--seed", "5", "--json"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest == json.loads((out / "fp-synth.json").read_text())
    assert manifest["kind"] == "noise" and manifest["seed"] == 5
    assert manifest["params"] == {"sigma": 25.0}
    expected = sorted(p.relative_to(digits_dir).as_posix() for p in digits_dir.rglob("*.png"))
    assert manifest["outputs"] == expected
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([*expected, "fp-synth.json"])  # no temporary files left


def test_refuses_non_empty_out_without_force(digits_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["synth", "downup", str(digits_dir), str(out), "--factor", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "is not empty" in result.output and "--force" in result.output
    assert not list(out.rglob("*.png"))
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert len(list(out.rglob("*.png"))) == 6 and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["blur"],
            "unknown synth kind 'blur'; choose one of: rotate, downup, updown, shuffle, noise, "
            "background",
        ),
        (
            ["rotate", "--sigma", "3"],
            "--sigma do not apply to rotate; it takes --angle, --max-angle",
        ),
        (["background", "--mode", "plaid"], "unknown background mode 'plaid'"),
        (["downup", "--factor", "1"], "factor must be > 1"),
        (["noise", "--sigma", "-1"], "sigma must be >= 0"),
    ],
)
def test_cli_errors(digits_dir, tmp_path, args, message):
    kind, *rest = args
    result = runner.invoke(app, ["synth", kind, str(digits_dir), str(tmp_path / "o"), *rest])
    assert result.exit_code == 1
    assert "Error: " in result.output and message in result.output


def test_folder_errors(digits_dir, tmp_path):
    with pytest.raises(InputError, match="must not be inside the source"):
        synth_folder("noise", digits_dir, digits_dir / "out")
    with pytest.raises(InputError, match="does not exist"):
        synth_folder("noise", tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        synth_folder("noise", tmp_path / "empty", tmp_path / "o")
    clash = tmp_path / "clash"
    clash.mkdir()
    Image.new("L", (4, 4)).save(clash / "a.png")
    Image.new("L", (4, 4)).save(clash / "a.jpg")
    with pytest.raises(InputError, match="would both be written"):
        synth_folder("noise", clash, tmp_path / "o")
    (clash / "a.jpg").unlink()
    (clash / "b.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"cannot read image .*b\.png"):
        synth_folder("noise", clash, tmp_path / "o2")


def test_every_kind_runs_on_rgb(photo_dir, tmp_path):
    for kind in KINDS:
        manifest = synth_folder(kind, photo_dir, tmp_path / kind, seed=1)
        assert manifest["n_images"] == 2
        suffix = ".jpg" if kind == "jpeg" else ".png"
        for before, after in _pairs(photo_dir, tmp_path / kind, suffix):
            if kind == "crop":
                assert after.shape[:2] == (58, 58)  # round(64 * 0.9)
            elif kind == "background":
                # the photos are all brighter than the threshold: all foreground, kept (as RGB)
                rgb = before if before.ndim == 3 else np.repeat(before[..., None], 3, axis=2)
                np.testing.assert_array_equal(after, rgb)
            else:
                assert after.shape == before.shape and not np.array_equal(after, before)


def test_jpeg_writes_jpeg_files_whose_error_grows_as_quality_falls(photo_dir, tmp_path):
    errors = []
    for q in (90, 75, 50):
        manifest = synth_folder("jpeg", photo_dir, tmp_path / f"q{q}", quality=q)
        assert all(o.endswith(".jpg") for o in manifest["outputs"])
        err = []
        for before, after in _pairs(photo_dir, tmp_path / f"q{q}", ".jpg"):
            assert Image.open(tmp_path / f"q{q}" / "camera.jpg").format == "JPEG"
            err.append(np.abs(after.astype(float) - before.astype(float)).mean())
        errors.append(np.mean(err))
    assert 0 < errors[0] < errors[1] < errors[2]
    # the file holds exactly what transform() gives
    src = Image.open(photo_dir / "camera.png")
    np.testing.assert_array_equal(_load(tmp_path / "q75" / "camera.jpg"),
                                  np.asarray(transform("jpeg", src, np.random.default_rng(0))))
    with pytest.raises(InputError, match="quality must be within 1..95"):
        synth_folder("jpeg", photo_dir, tmp_path / "bad", quality=0)


def test_crop_keeps_the_centre(digits_dir, tmp_path):
    arr = np.arange(100, dtype=np.uint8).reshape(10, 10)
    out = np.asarray(transform("crop", Image.fromarray(arr), np.random.default_rng(0),
                               fraction=0.6))
    np.testing.assert_array_equal(out, arr[2:8, 2:8])
    with pytest.raises(InputError, match="fraction must be within"):
        transform("crop", Image.fromarray(arr), np.random.default_rng(0), fraction=1.5)



def test_updown_is_the_bicubic_round_trip_through_double_size(photo_dir, tmp_path):
    synth_folder("updown", photo_dir, tmp_path / "x2")
    synth_folder("downup", photo_dir, tmp_path / "half", factor=2)
    for path in sorted(photo_dir.glob("*.png")):
        src = Image.open(path)
        w, h = src.size
        want = src.resize((2 * w, 2 * h), Image.Resampling.BICUBIC).resize(
            (w, h), Image.Resampling.BICUBIC)
        after = _load(tmp_path / "x2" / path.name)
        np.testing.assert_array_equal(after, np.asarray(want))
        before = np.asarray(src, dtype=float)
        up = np.abs(after - before).mean()
        down = np.abs(_load(tmp_path / "half" / path.name) - before).mean()
        assert 0 < up < down  # it changes the image, far less than halving does
    with pytest.raises(InputError, match="updown factor must be > 1"):
        transform("updown", Image.open(path), np.random.default_rng(0), factor=0.5)
