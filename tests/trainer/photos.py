"""Photo-like test images made in-process: distinct (so dedupe keeps them), sharp, and in any format or mode."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_pixels(seed: int, size: tuple[int, int] = (320, 320)) -> np.ndarray:
    """A sharp, distinct RGB image: stripes whose frequency and angle depend on the seed, plus a little noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.03, 0.12)
    wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) * freq)
    colour = rng.uniform(60, 200, 3)
    pixels = colour + 50 * wave[..., None] * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 24, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def photo(seed: int, size: tuple[int, int] = (320, 320), fmt: str = "PNG", mode: str = "RGB", **save) -> bytes:
    image = Image.fromarray(photo_pixels(seed, size))
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def make_photo_set(count: int, size: int = 320, first_seed: int = 0, fmt: str = "PNG") -> list[tuple[str, bytes]]:
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    return [(f"photo{i}.{ext}", photo(first_seed + i, (size, size), fmt)) for i in range(count)]
