"""Image intake: order, hashes, every bad-input class, every conversion mode, EXIF."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from forensics.data.images import Manifest, load_rgb, scan_folder, to_rgb
from forensics.errors import InputError


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, "PNG")
    return buf.getvalue()


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _rgb(seed: int, size=(6, 5)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge size, with a tiny (incomplete) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


# ---------------------------------------------------------------- order and hashes


def test_scan_order_is_sorted_recursive_and_ignores_other_files(tmp_path):
    names = ["b/z.png", "a.JPG", "b/a.webp", "c.tif", "a/b/c.bmp", "d.jpeg", "e.tiff"]
    for i, name in enumerate(reversed(names)):
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF",
               "bmp": "BMP", "png": "PNG"}[name.rsplit(".", 1)[1].lower()]
        buf = io.BytesIO()
        Image.fromarray(_rgb(i)).save(buf, fmt)
        _write(tmp_path / name, buf.getvalue())
    _write(tmp_path / "notes.txt", b"not scanned")
    _write(tmp_path / "b" / "data.npy", b"not scanned either")

    manifest = scan_folder(tmp_path)
    rels = [e.relpath for e in manifest.entries]
    assert rels == sorted(names)
    for e in manifest.entries:
        data = (tmp_path / e.relpath).read_bytes()
        assert e.sha256 == hashlib.sha256(data).hexdigest() and e.size == len(data)
    assert manifest.root == str(tmp_path.resolve()) and manifest.skipped == []


def test_manifest_hash_depends_on_content_not_location(tmp_path):
    for root in ("one", "two"):
        for i in range(3):
            _write(tmp_path / root / f"{i}.png", _png(_rgb(i)))
    one, two = scan_folder(tmp_path / "one"), scan_folder(tmp_path / "two")
    assert one.sha256 == two.sha256
    _write(tmp_path / "two" / "1.png", _png(_rgb(99)))
    assert scan_folder(tmp_path / "two").sha256 != one.sha256
    again = Manifest.from_dict(one.to_dict())
    assert again == one and again.sha256 == one.sha256 and one.to_dict()["count"] == 3


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "readme.md", b"# nothing")
    with pytest.raises(InputError, match="no images found"):
        scan_folder(tmp_path)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        scan_folder(tmp_path / "nope")


# ---------------------------------------------------------------- bad inputs


@pytest.fixture
def bad_folder(tmp_path):
    good = _png(_rgb(0, (16, 16)))
    jpeg = io.BytesIO()
    Image.fromarray(_rgb(1, (64, 64))).save(jpeg, "JPEG", quality=90)
    files = {
        "good.png": good,
        "zero.png": b"",
        "text.jpg": b"this is a text file, not an image\n" * 4,
        "truncated.png": good[: len(good) // 2],
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "corrupt.png": good[:40] + bytes(range(256)) * 2,
        "bomb.png": _bomb_png(100_000, 100_000),
    }
    for name, data in files.items():
        _write(tmp_path / name, data)
    return tmp_path


EXPECTED_REASONS = {
    "zero.png": "empty file",
    "text.jpg": "not an image",
    "truncated.png": "truncated or corrupt",
    "truncated.jpg": "truncated or corrupt",
    "corrupt.png": "truncated or corrupt",
    "bomb.png": "decompression bomb",
}


def test_bad_files_stop_the_run_with_one_error_listing_all(bad_folder):
    with pytest.raises(InputError) as info:
        scan_folder(bad_folder)
    msg = str(info.value)
    assert "6 of 7 image files" in msg and "--skip-bad" in msg
    for name, reason in EXPECTED_REASONS.items():
        line = next(line for line in msg.splitlines() if line.strip().startswith(name + ":"))
        assert reason in line, line
    assert "good.png" not in msg


def test_skip_bad_records_what_was_skipped(bad_folder):
    manifest = scan_folder(bad_folder, skip_bad=True)
    assert [e.relpath for e in manifest.entries] == ["good.png"]
    reasons = dict(manifest.skipped)
    assert set(reasons) == set(EXPECTED_REASONS)
    for name, reason in EXPECTED_REASONS.items():
        assert reason in reasons[name]
    assert manifest.to_dict()["skipped"] == [list(s) for s in manifest.skipped]


def test_only_bad_files_is_an_error_even_with_skip_bad(tmp_path):
    _write(tmp_path / "zero.png", b"")
    with pytest.raises(InputError, match="none of the 1 image files"):
        scan_folder(tmp_path, skip_bad=True)


def test_bomb_just_over_the_limit_is_refused(tmp_path, monkeypatch):
    # Between MAX_IMAGE_PIXELS and twice that, Pillow only warns: the limit is still ours.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    _write(tmp_path / "a.png", _png(_rgb(0, (11, 11))))
    _write(tmp_path / "ok.png", _png(_rgb(0, (10, 10))))
    with pytest.warns(Image.DecompressionBombWarning):
        manifest = scan_folder(tmp_path, skip_bad=True)
    assert [e.relpath for e in manifest.entries] == ["ok.png"]
    assert "11x11 = 121 pixels" in manifest.skipped[0].reason


def test_load_rgb_names_the_bad_file(bad_folder):
    with pytest.raises(InputError, match="zero.png: empty file"):
        load_rgb(bad_folder / "zero.png")
    with pytest.raises(InputError, match="text.jpg: not an image"):
        load_rgb(bad_folder / "text.jpg")


# ---------------------------------------------------------------- conversions


def test_rgb_passes_through(tmp_path):
    arr = _rgb(3)
    im = load_rgb(_write(tmp_path / "a.png", _png(arr)))
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), arr)


def test_greyscale_and_bilevel_replicate_channels():
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    out = np.asarray(to_rgb(Image.fromarray(grey, "L")))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))
    bits = Image.fromarray(grey > 100).convert("1")
    out = np.asarray(to_rgb(bits))
    np.testing.assert_array_equal(out[..., 0], np.where(grey > 100, 255, 0))


def test_palette_maps_through_the_palette():
    im = Image.new("P", (3, 1))
    im.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2])
    out = np.asarray(to_rgb(im))
    np.testing.assert_array_equal(out[0], [[10, 20, 30], [200, 100, 0], [0, 0, 255]])


def test_palette_transparency_is_composited_over_white(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 40, 50, 60] + [0] * (254 * 3))
    im.putdata([0, 1])
    im.info["transparency"] = 0
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)
    out = np.asarray(load_rgb(_write(tmp_path / "p.png", buf.getvalue())))
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [40, 50, 60]])


def test_rgba_and_la_are_composited_over_white():
    rgba = np.array([[[200, 0, 0, 255], [200, 0, 0, 0], [0, 0, 200, 128]]], dtype=np.uint8)
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_allclose(out[0, 2], [127, 127, 227], atol=1)  # half blue, half white
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(np.asarray(to_rgb(la))[0], [[255] * 3, [50] * 3])


def test_cmyk_converts_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (4, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 0, 255)])
    buf = io.BytesIO()
    cmyk.save(buf, "TIFF")
    out = np.asarray(load_rgb(_write(tmp_path / "c.tif", buf.getvalue())))
    np.testing.assert_array_equal(
        out[0], [[255, 255, 255], [0, 255, 255], [255, 0, 255], [0, 0, 0]]
    )


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("TIFF", "tif")])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path, fmt, suffix):
    values = np.array([[0, 257, 32896, 65535, 1000, 40000]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    buf = io.BytesIO()
    im.save(buf, fmt)
    out = np.asarray(load_rgb(_write(tmp_path / f"g.{suffix}", buf.getvalue())))
    expected = np.rint(values.astype(float) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert expected[0, 3] == 255 and expected[0, 2] == 128  # clipping would give 255 for all


def test_float_images_map_unit_range_to_8_bit():
    arr = np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32)
    out = np.asarray(to_rgb(Image.fromarray(arr, "F")))[..., 0]
    np.testing.assert_array_equal(out[0], [0, 128, 255, 255, 0])


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((4, 8, 3), dtype=np.uint8)
    arr[:, :4] = (255, 0, 0)  # left half red
    arr[:, 4:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", exif=exif.tobytes())
    im = load_rgb(_write(tmp_path / "rot.png", buf.getvalue()))
    assert im.size == (4, 8)  # (width, height): now tall
    out = np.asarray(im)
    assert (out[:4] == (255, 0, 0)).all() and (out[4:] == (0, 0, 255)).all()


def test_content_decoded_before_is_hashed_not_decoded_again(tmp_path, monkeypatch):
    from PIL import Image

    from forensics.data import images

    for i in range(3):
        Image.new("L", (8, 8), i).save(tmp_path / f"{i}.png")
    first = images.scan_folder(tmp_path)

    def no_decoding(data):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images, "decode_rgb", no_decoding)
    again = images.scan_folder(tmp_path, known=lambda sha: True)  # e.g. in the cache
    assert [e.sha256 for e in again.entries] == [e.sha256 for e in first.entries]
    with pytest.raises(AssertionError, match="decoded again"):  # unknown content: decoded
        images.scan_folder(tmp_path, known=lambda sha: sha != first.entries[0].sha256)
