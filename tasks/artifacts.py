"""Pictures in the Prefect UI. An image artifact holds a URL that the browser fetches itself, so a ``file://``
or ``s3://`` URL shows nothing there; a markdown artifact whose image is a PNG data URI shows the picture
wherever the UI runs (its markdown sanitiser allows ``data:`` images). Pictures wider than MAX_WIDTH_PX are
scaled down for the UI; the full-size PNG stays in the run directory, named under the picture."""

from __future__ import annotations

import base64
import io
import re

from PIL import Image

from tasks.run_context import in_prefect_run

MAX_WIDTH_PX = 1200  # about the width of an artifact panel; keeps an ImageNet grid's artifact under ~2 MB


def key_of(*parts: str) -> str:
    """A Prefect artifact key (lower-case letters, digits and dashes) from free text."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def image_markdown(png: bytes, alt: str, max_width_px: int = MAX_WIDTH_PX) -> str:
    """``![alt](data:image/png;base64,...)``, scaled down to ``max_width_px`` wide when larger."""
    image = Image.open(io.BytesIO(png))
    if image.width > max_width_px:
        height = max(1, round(image.height * max_width_px / image.width))
        image = image.resize((max_width_px, height), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        png = buf.getvalue()
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def publish_png(key: str, png: bytes, title: str, where: str, description: str) -> None:
    """A markdown artifact showing ``png`` under ``title``, with the plain path of the full-size file."""
    from prefect.artifacts import create_markdown_artifact

    if not in_prefect_run():
        return
    text = f"### {title}\n\n{image_markdown(png, title)}\n\nFull size: `{where}`\n"
    create_markdown_artifact(text, key=key, description=description)
