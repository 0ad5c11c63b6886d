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


def draw_face(image: Image.Image, centre: tuple[int, int], radius: int) -> Image.Image:
    """Draw a flat cartoon face (hair, skin, eyes, brows, nose, mouth) that OpenCV's frontal-face detector finds.

    Verified with haarcascade_frontalface_default.xml for radii 40 to 120 px on plain and striped backgrounds.
    """
    from PIL import ImageDraw, ImageFilter

    cx, cy, r = centre[0], centre[1], radius
    layer = image.copy()
    draw = ImageDraw.Draw(layer)
    draw.ellipse([cx - r * 1.05, cy - r * 1.45, cx + r * 1.05, cy + r * 0.2], fill=(50, 35, 25))
    draw.ellipse([cx - r * 0.85, cy - r * 1.15, cx + r * 0.85, cy + r * 1.2], fill=(225, 185, 155))
    eye_y, eye_x = cy - r * 0.25, r * 0.38
    for side in (-1, 1):
        x = cx + side * eye_x
        draw.ellipse([x - r * 0.2, eye_y - r * 0.09, x + r * 0.2, eye_y + r * 0.09], fill=(245, 245, 245))
        draw.ellipse([x - r * 0.09, eye_y - r * 0.09, x + r * 0.09, eye_y + r * 0.09], fill=(40, 30, 20))
        draw.rectangle([x - r * 0.24, eye_y - r * 0.32, x + r * 0.24, eye_y - r * 0.22], fill=(60, 40, 30))
    draw.polygon([(cx, eye_y + r * 0.05), (cx - r * 0.12, cy + r * 0.3), (cx + r * 0.12, cy + r * 0.3)],
                 fill=(200, 150, 120))
    draw.ellipse([cx - r * 0.3, cy + r * 0.5, cx + r * 0.3, cy + r * 0.7], fill=(150, 60, 60))
    return layer.filter(ImageFilter.GaussianBlur(max(1, r / 40)))


def face_photo(size: tuple[int, int] = (640, 400), faces: tuple[tuple[int, int, int], ...] = ((320, 200, 80),),
               background: tuple[int, int, int] = (70, 110, 160), fmt: str = "PNG") -> bytes:
    """A photo of one or more drawn faces, each (centre x, centre y, radius), on a plain background."""
    image = Image.new("RGB", size, background)
    for cx, cy, radius in faces:
        image = draw_face(image, (cx, cy), radius)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def zip_of(entries: list[tuple[str, bytes]], links: tuple[str, ...] = ()) -> bytes:
    """A zip (deflated) of (path inside, content) entries; names in `links` are stored as symbolic links."""
    import stat
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data, zipfile.ZIP_DEFLATED)
    return out.getvalue()
