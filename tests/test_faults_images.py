"""Images are taken as they are meant (16-bit scaled, alpha composited on white, CMYK and palettes
converted), every content-changing conversion is counted in the store's report, and a bad image tree
behaves as its policy says across Dask worker processes."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from flows.build_latents import run_build_latents
from storage import latents
from storage.images import decode_image, list_images


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _to_unit(x: np.ndarray) -> np.ndarray:
    return (x + 1.0) * 127.5  # back to 0..255


def test_a_16_bit_gradient_is_scaled_not_clipped() -> None:
    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    im = Image.fromarray(gradient)
    assert im.mode.startswith("I")
    notes: list[str] = []
    x = _to_unit(decode_image(_png(im), "g16.png", resolution=64, channels=1, notes=notes))
    assert x.mean() == pytest.approx(127.5, abs=1.0)  # was 254 of 255: everything above 255 clipped
    assert x.min() == 0 and x.max() == 255 and notes == ["scaled_16bit"]


def test_alpha_is_composited_on_white_and_only_counted_when_something_is_transparent() -> None:
    la = Image.merge("LA", [Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 128)])  # black, half transparent
    notes: list[str] = []
    x = _to_unit(decode_image(_png(la), "la.png", resolution=8, channels=1, notes=notes))
    assert np.allclose(x, 127, atol=1) and notes == ["alpha_composited"]  # was 0: alpha dropped
    opaque = Image.new("RGBA", (8, 8), (10, 200, 30, 255))
    notes = []
    x = _to_unit(decode_image(_png(opaque), "o.png", resolution=8, channels=3, notes=notes))
    assert np.allclose(x[:, 0, 0], (10, 200, 30), atol=0.01) and notes == []


def test_palette_and_cmyk_images_are_converted_to_their_colours() -> None:
    rgb = Image.fromarray(np.repeat(np.array([[[200, 30, 40], [20, 180, 60]]], np.uint8), 4, axis=0))
    pal = rgb.quantize(colors=2)
    assert pal.mode == "P"
    notes: list[str] = []
    x = _to_unit(decode_image(_png(pal), "p.png", resolution=2, channels=3, notes=notes))
    assert notes == [] and np.allclose(x[:, 0, 0], (200, 30, 40), atol=1)
    pal.info["transparency"] = 0  # palette index 0 transparent: that colour becomes white
    notes = []
    decode_image(_png(pal, transparency=0), "pt.png", resolution=2, channels=3, notes=notes)
    assert notes == ["alpha_composited"]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in ink
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    notes = []
    x = _to_unit(decode_image(buf.getvalue(), "c.jpg", resolution=4, channels=3, notes=notes))
    assert notes == ["cmyk_formula"] and x[0].mean() > 200 and x[1].mean() < 60 and x[2].mean() < 60


def test_every_conversion_is_counted_in_the_store_report(tmp_path) -> None:
    from tests.stores import pixels_store

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    gradient = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    Image.fromarray(gradient).save(src / "a" / "g16.png")
    Image.merge("LA", [Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 100)]).save(src / "a" / "la.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(src / "a" / "tiny.png")  # 1x1, and colour in a grey store
    Image.new("L", (16, 16), 50).save(src / "a" / "plain.png")
    source = list_images(str(src))
    url = pixels_store(str(tmp_path / "s.zarr"), source, shard_size=2)  # two encode tasks
    report = latents.open_store(url).attrs["report"]
    counts = {kind: e["count"] for kind, e in report["conversions"].items()}
    assert counts == {"scaled_16bit": 1, "alpha_composited": 1, "colour_to_grey": 1, "upscaled": 1}
    assert report["conversions"]["upscaled"]["examples"] == ["a/tiny.png"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_bad_image_under_both_policies_across_dask_worker_processes(tmp_path) -> None:
    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for k in range(3):
            Image.new("L", (8, 8), 40 * k).save(src / c / f"{k}.png")
    with open(os.path.join(src, "b", "1.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then nothing an image can be
    store = str(tmp_path / "latents" / "s.zarr")
    processes = {"workers": 1, "processes": True}  # the error is pickled back from a worker process
    with pytest.raises(RuntimeError, match=r"^1 of 3 shards failed: bad image file .*b/1\.png"):
        run_build_latents(str(src), store, resolution=8, shard_size=2, **processes)
    summary = run_build_latents(str(src), store, resolution=8, shard_size=2, on_bad_image="skip", **processes)
    assert summary.report["num_skipped"] == 1 and summary.report["skipped"][0]["source"] == "b/1.png"
