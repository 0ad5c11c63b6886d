"""A small JPEG grid of thumbnails of the accepted photos, shown to the member with the intake report."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image


def contact_sheet(images: Sequence[Image.Image], *, cell: int = 96, columns: int = 6) -> bytes | None:
    """JPEG bytes of the images (the accepted, cropped photos) side by side, or None when there are none."""
    images = list(images)
    if not images:
        return None
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (cell * min(columns, len(images)), cell * rows), "white")
    for index, image in enumerate(images):
        thumb = image.convert("RGB")
        thumb.thumbnail((cell, cell))
        x, y = (index % columns) * cell, (index // columns) * cell
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
    out = io.BytesIO()
    sheet.save(out, "JPEG", quality=80)
    return out.getvalue()
