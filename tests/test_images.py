"""Image sources: the digits tree, sorted listing, fingerprints, the ADM crop, bad files named."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from storage.images import (
    BadImageError,
    ImageFile,
    adm_center_crop,
    decode_image,
    fingerprint,
    list_images,
    load_images,
    plan_shards,
    probe_channels,
    write_digits,
)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("digits"))
    write_digits(path)
    return path


def _jpeg(size: tuple[int, int] = (40, 30), seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def test_digits_tree_is_complete_sorted_and_faithful(digits_dir: str) -> None:
    source = list_images(digits_dir)
    digits = load_digits()
    assert len(source) == 1797
    assert source.class_names == tuple(str(d) for d in range(10))
    assert sorted(os.listdir(digits_dir)) == list(source.class_names)
    assert [f.relpath for f in source.files] == sorted(f.relpath for f in source.files)
    assert all(f.label == int(f.relpath.split("/")[0]) for f in source.files)
    # file names are the zero-padded index in load_digits, so each pixel can be checked against the original
    first = source.files[0]
    index = int(first.relpath.split("/")[1].split(".")[0])
    assert first.relpath == f"0/{index:04d}.png"
    with Image.open(os.path.join(digits_dir, first.relpath)) as im:
        assert im.mode == "L" and im.size == (8, 8)
        pixels = np.asarray(im)
    np.testing.assert_array_equal(pixels, np.round(digits.images[index] * 255 / 16).astype(np.uint8))
    assert probe_channels(source) == 1


def test_digits_upscale_and_memory_url() -> None:
    source = write_digits("memory://dumo-test-digits", upscale=3)
    assert len(source) == 1797
    x = load_images(source.url, source.files[:2], resolution=24, channels=1)
    assert x[0].shape == (1, 24, 24) and x[0].dtype == np.float32
    # pixel repetition: every 3x3 block is one value
    block = x[0][0, :3, :3]
    assert np.all(block == block[0, 0])


def test_decode_is_exact_at_native_size_and_in_range(digits_dir: str) -> None:
    source = list_images(digits_dir)
    f = source.files[5]
    with open(os.path.join(digits_dir, f.relpath), "rb") as fh:
        data = fh.read()
    x = decode_image(data, f.relpath, resolution=8, channels=1)
    expected = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(x[0], expected)
    assert x.min() >= -1.0 and x.max() <= 1.0
    rgb = decode_image(data, f.relpath, resolution=8, channels=3)
    assert rgb.shape == (3, 8, 8) and np.array_equal(rgb[0], rgb[2])


def test_adm_center_crop_box_halves_then_bicubic_then_centers() -> None:
    # 400x100: short side 100 >= 2*32 -> halved once to 200x50 (box), then bicubic to 128x32, center crop
    arr = np.zeros((100, 400), dtype=np.uint8)
    arr[:, 200:] = 255  # right half white: the center crop straddles the edge
    out = adm_center_crop(Image.fromarray(arr), 32)
    assert out.size == (32, 32)
    out_arr = np.asarray(out)
    assert out_arr[:, :10].max() < 10 and out_arr[:, -10:].min() > 245
    # already at the target: unchanged
    small = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    np.testing.assert_array_equal(np.asarray(adm_center_crop(small, 8)), np.asarray(small))
    # a tall RGB image comes out square and RGB
    tall = decode_image(_jpeg((30, 90)), "tall.jpg", resolution=16, channels=3)
    assert tall.shape == (3, 16, 16)


@pytest.mark.parametrize(
    "data",
    [b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10, _jpeg()[:200], b"plain text"],
    ids=["corrupt", "truncated", "not-an-image"],
)
def test_bad_files_raise_naming_their_path(data: bytes) -> None:
    with pytest.raises(BadImageError, match=r"n01440764/broken\.JPEG") as info:
        decode_image(data, "s3://bucket/train/n01440764/broken.JPEG", resolution=16, channels=3)
    assert info.value.path == "s3://bucket/train/n01440764/broken.JPEG"
    assert not isinstance(info.value, OSError)  # not retried as an I/O error


def test_load_images_returns_bad_files_as_errors_and_raises_io_errors(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "good.jpg").write_bytes(_jpeg())
    (tmp_path / "a" / "bad.jpg").write_bytes(b"garbage")
    source = list_images(str(tmp_path))
    out = load_images(str(tmp_path), source.files, 16, 3)
    assert [type(o).__name__ for o in out] == ["BadImageError", "ndarray"]  # sorted: bad.jpg, good.jpg
    assert "a/bad.jpg" in str(out[0])
    with pytest.raises(OSError, match="missing.jpg"):
        load_images(str(tmp_path), [ImageFile("a/missing.jpg", 1, 0)], 16, 3)


def test_listing_ignores_non_images_and_fingerprint_tracks_content(tmp_path) -> None:
    for cls in ("b", "a"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.JPEG").write_bytes(_jpeg())
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(_jpeg())
    (tmp_path / "README.png").write_bytes(_jpeg())  # not in a class folder
    source = list_images(str(tmp_path))
    assert [f.relpath for f in source.files] == ["a/x.JPEG", "b/x.JPEG"]
    assert source.class_names == ("a", "b") and probe_channels(source) == 3
    before = source.fingerprint
    assert list_images(str(tmp_path)).fingerprint == before
    (tmp_path / "b" / "x.JPEG").write_bytes(_jpeg(seed=1) + b"\0")
    assert list_images(str(tmp_path)).fingerprint != before
    assert fingerprint(source.files[:1]) != fingerprint(source.files)


def test_plan_shards_partitions_rows() -> None:
    shards = plan_shards(1797, 256)
    assert len(shards) == 8 and shards[-1].stop == 1797 and shards[-1].start == 7 * 256
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
    assert all(s.start == s.index * 256 for s in shards)
    with pytest.raises(ValueError):
        plan_shards(10, 0)
