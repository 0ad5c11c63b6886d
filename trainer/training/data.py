"""Training inputs: the prepared photos (from intake) as pixels, and their VAE latents.

Photos arrive already checked and cropped by `trainer.intake.photos` as NNN.png (+ optional NNN.txt caption). Here they are
only resized to the training resolution (square centre fit) and encoded once; the latents of the mirrored image are
encoded too, because mirroring a latent is not the same as encoding a mirrored photo.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from trainer.contract.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Photo:
    path: Path
    caption: str | None


def find_photos(photos_dir: Path) -> list[Photo]:
    photos_dir = Path(photos_dir)
    if not photos_dir.is_dir():
        raise UserError("The photos for this training are missing (the upload may have been deleted); "
                        "please start the training again with your photos.")
    photos = []
    for path in sorted(photos_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith("."):
            caption_path = path.with_suffix(".txt")
            caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else None
            photos.append(Photo(path, caption or None))
    if not photos:
        raise UserError("No usable photos were found to train on. Upload a few clear photos (JPEG, PNG or WebP) "
                        "and try again.")
    return photos


def photos_digest(photos: list[Photo]) -> str:
    digest = hashlib.sha256()
    for photo in photos:
        digest.update(photo.path.name.encode())
        digest.update(photo.path.read_bytes())
        digest.update((photo.caption or "").encode())
    return digest.hexdigest()


def load_pixels(paths: list[Path], resolution: int):
    """[N, 3, R, R] float tensor in [-1, 1]: each image scaled to cover R×R and centre-cropped."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = ImageOps.fit(image.convert("RGB"), (resolution, resolution),
                                     method=Image.Resampling.LANCZOS)
        except OSError as error:
            raise UserError(f"The photo {Path(path).name} could not be read ({error}); "
                            "please upload it again or leave it out.") from error
        arrays.append(np.asarray(image, dtype=np.uint8))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0


def encode_latents(vae, pixels, batch_size: int = 8):
    """(mean, std), each [2, N, C, h, w] float32 on the CPU, already shifted and scaled for the UNet.

    Index 0 along the first axis is the photo, 1 its mirror image. A training step draws `mean + std * noise`,
    which is what sampling the VAE's latent distribution every step would give, without running the VAE.
    """
    import torch

    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds = [], []
    with torch.no_grad():
        for mirrored in (False, True):
            batch_means, batch_stds = [], []
            for start in range(0, len(pixels), batch_size):
                chunk = pixels[start:start + batch_size]
                if mirrored:
                    chunk = torch.flip(chunk, dims=[3])
                dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
                batch_means.append(((dist.mean.float() - shift) * scale).cpu())
                batch_stds.append((dist.std.float() * scale).cpu())
            means.append(torch.cat(batch_means))
            stds.append(torch.cat(batch_stds))
    return torch.stack(means), torch.stack(stds)


def size_conditioning(paths: list[Path], resolution: int):
    """SDXL's `add_time_ids` per photo, [N, 6] float32: its size before resizing (h, w), where `load_pixels`'
    centre crop starts in the resized image (top, left), and the training size (h, w), as diffusers' SDXL DreamBooth
    script conditions each photo."""
    import torch
    from PIL import Image

    from trainer.models.family import add_time_ids

    rows = []
    for path in paths:
        with Image.open(path) as image:
            width, height = image.size
        scale = resolution / min(width, height)
        top, left = (round(height * scale) - resolution) // 2, (round(width * scale) - resolution) // 2
        rows.append(add_time_ids((height, width), (top, left), (resolution, resolution)))
    return torch.cat(rows)
