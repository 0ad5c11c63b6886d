"""The procedural world: cartoon men, women, dogs and cats with attributes a program can read back, and captions in
the bot's prompt style ("a photo of a man with red hair and blue eyes wearing glasses on an orange background").

Everything is drawn from a torch.Generator, so a seed gives the same pictures on any machine (up to float rounding
at soft edges between CPU and GPU). Rendering is vectorised in torch (signed distances, soft edges): a batch of 256
pictures is one pass, on the CPU or the GPU.

A subject is one value per attribute (ATTRIBUTES); `hair` is the fur of dogs and cats. Pictures are `SIZE` px.
"""
from __future__ import annotations

import random

import torch

SIZE = 64
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "class": ("man", "woman", "dog", "cat"),
    "hair": ("black", "white", "red", "yellow", "blue", "green"),
    "eyes": ("brown", "blue", "green"),
    "accessory": ("none", "glasses", "hat"),
    "background": ("orange", "purple", "pink", "gray"),
    "position": ("left", "middle", "right"),
}
# What a concept is (its identity) versus what a prompt may ask of it (the scene).
IDENTITY = ("class", "hair", "eyes", "accessory")
SCENE = ("background", "position")
PEOPLE = ("man", "woman")

HAIR_RGB = {"black": (30, 30, 30), "white": (235, 235, 235), "red": (210, 40, 40), "yellow": (235, 200, 40),
            "blue": (40, 80, 210), "green": (40, 160, 60)}
EYES_RGB = {"brown": (110, 60, 20), "blue": (40, 110, 240), "green": (30, 180, 60)}
BACKGROUND_RGB = {"orange": (245, 150, 60), "purple": (150, 90, 200), "pink": (245, 170, 200), "gray": (150, 150, 150)}
SKIN_RGB = (240, 200, 160)
HAT_RGB = (60, 40, 30)
POSITION_X = {"left": -12.0, "middle": 0.0, "right": 12.0}
# Every word a caption can use: the world model's tokenizer gives each its own token.
WORDS = tuple(dict.fromkeys(
    "a an photo of with and wearing on the in background hair fur eyes glasses hat left middle right".split()
    + [v for values in ATTRIBUTES.values() for v in values if v != "none"]))


def index_of(attribute: str, value: str) -> int:
    return ATTRIBUTES[attribute].index(value)


def sample(count: int, generator: torch.Generator, fixed: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """`count` subjects, each attribute uniform over its values unless `fixed` names it: {attribute: LongTensor}."""
    fixed = fixed or {}
    out = {}
    for name, values in ATTRIBUTES.items():
        drawn = torch.randint(len(values), (count,), generator=generator)
        out[name] = torch.full((count,), index_of(name, fixed[name])) if name in fixed else drawn
    return out


def row(attrs: dict[str, torch.Tensor], i: int) -> dict[str, str]:
    """Subject `i` of a batch as names: {"class": "man", "hair": "red", ...}."""
    return {name: ATTRIBUTES[name][int(attrs[name][i])] for name in ATTRIBUTES}


# --- captions --------------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(subject: dict[str, str], rng: random.Random | None = None, keep: float = 0.6) -> str:
    """The subject's caption. With `rng`, each phrase after the class is kept with probability `keep` and the
    article before the class word is there half the time ("a photo of man", as the bot's class prompt says); without,
    the full caption."""
    def kept() -> bool:
        return rng is None or rng.random() < keep

    cls = subject["class"]
    article = "a " if rng is None or rng.random() < 0.5 else ""
    parts = [f"a photo of {article}{cls}"]
    traits = []
    if kept():
        traits.append(f"{subject['hair']} {'hair' if cls in PEOPLE else 'fur'}")
    if kept():
        traits.append(f"{subject['eyes']} eyes")
    if traits:
        parts.append("with " + " and ".join(traits))
    if subject["accessory"] != "none" and kept():
        parts.append("wearing glasses" if subject["accessory"] == "glasses" else "wearing a hat")
    if kept():
        parts.append({"left": "on the left", "middle": "in the middle", "right": "on the right"}[subject["position"]])
    if kept():
        parts.append(f"on {_article(subject['background'])} {subject['background']} background")
    return " ".join(parts)


# --- rendering -------------------------------------------------------------------------------------------------
def _rgb(table: dict[str, tuple[int, int, int]], attribute: str, indexes: torch.Tensor) -> torch.Tensor:
    palette = torch.tensor([table[v] for v in ATTRIBUTES[attribute]], dtype=torch.float32, device=indexes.device)
    return palette[indexes] / 255.0  # [B, 3]


class _Canvas:
    """A batch of pictures painted layer by layer; coordinates are in 64-px units whatever the size."""

    def __init__(self, background: torch.Tensor, size: int):
        device = background.device
        self.scale = SIZE / size
        coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * self.scale
        self.y = coords.view(1, size, 1)
        self.x = coords.view(1, 1, size)
        self.image = background.view(-1, 3, 1, 1).expand(-1, 3, size, size).clone()

    def paint(self, distance: torch.Tensor, colour: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Cover the points where the signed distance is negative (soft edge of about a pixel) with `colour` [B,3]."""
        alpha = torch.sigmoid(-distance / (0.5 * self.scale)).unsqueeze(1)
        if where is not None:
            alpha = alpha * where.view(-1, 1, 1, 1).float()
        self.image = self.image * (1 - alpha) + colour.view(-1, 3, 1, 1) * alpha

    def circle(self, cx, cy, r):
        return torch.sqrt((self.x - cx) ** 2 + (self.y - cy) ** 2) - r

    def ellipse(self, cx, cy, rx, ry):
        return (torch.sqrt(((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2) - 1) * torch.minimum(
            torch.as_tensor(rx), torch.as_tensor(ry))

    def box(self, cx, cy, hw, hh):
        return torch.maximum((self.x - cx).abs() - hw, (self.y - cy).abs() - hh)

    def triangle(self, ax, ay, left, right, base_y):
        """Apex (ax, ay) above a horizontal base from x=left to x=right at y=base_y."""
        def side(x0, y0, x1, y1):  # distance to the line, positive on the right of (x0,y0)->(x1,y1)
            nx, ny = y1 - y0, -(x1 - x0)
            norm = torch.sqrt(nx ** 2 + ny ** 2)
            return ((self.x - x0) * nx + (self.y - y0) * ny) / norm
        return torch.maximum(torch.maximum(side(left, base_y, ax, ay), side(ax, ay, right, base_y)), self.y - base_y)


def render(attrs: dict[str, torch.Tensor], generator: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """Pictures of the subjects [B, 3, size, size] in [0, 1]; small random jitter of place, size and colour."""
    count = attrs["class"].shape[0]
    device = attrs["class"].device

    def jitter(spread: float) -> torch.Tensor:
        return ((torch.rand(count, generator=generator) * 2 - 1) * spread).to(device).view(-1, 1, 1)

    def tint(colour: torch.Tensor) -> torch.Tensor:
        shift = (torch.rand(count, 3, generator=generator) * 2 - 1).to(device) * 0.04
        return (colour + shift).clamp(0, 1)

    position = torch.tensor([POSITION_X[v] for v in ATTRIBUTES["position"]], device=device)[attrs["position"]]
    cx = 32 + position.view(-1, 1, 1) + jitter(1.5)
    cy = 36 + jitter(1.5)
    r = 13 + jitter(1.0)
    cls = attrs["class"]
    man, woman, dog, cat = (cls == index_of("class", c) for c in ATTRIBUTES["class"])
    person = man | woman
    hair = tint(_rgb(HAIR_RGB, "hair", attrs["hair"]))
    eyes = _rgb(EYES_RGB, "eyes", attrs["eyes"])
    ones = torch.ones(count, 3, device=device)
    skin = tint(ones * torch.tensor(SKIN_RGB, device=device) / 255.0)
    black, white = ones * 0.08, ones * 0.97

    canvas = _Canvas(tint(_rgb(BACKGROUND_RGB, "background", attrs["background"])), size)
    # behind the face: long hair (woman), floppy ears (dog), pointed ears (cat)
    long_hair = torch.minimum(canvas.circle(cx, cy - 2, r + 3), canvas.box(cx, cy + 8, r + 3, 10))
    canvas.paint(long_hair, hair, woman)
    for side in (-1, 1):
        canvas.paint(canvas.ellipse(cx + side * (r - 1), cy + 3, 4.5, 9.0), hair * 0.6, dog)
        canvas.paint(canvas.triangle(cx + side * 9, cy - r - 7, cx + side * 9 - 5, cx + side * 9 + 5, cy - r * 0.4),
                     hair, cat)
    # the face: skin for people, fur for animals; short hair on top for men
    face_colour = torch.where(person.view(-1, 1), skin, hair)
    canvas.paint(torch.maximum(canvas.circle(cx, cy - 2, r + 2), canvas.y - cy), hair, man)
    canvas.paint(canvas.circle(cx, cy + 1, r), face_colour)
    canvas.paint(torch.maximum(canvas.circle(cx, cy - 1, r + 0.5), canvas.y - (cy - r * 0.55)), hair, person)
    # eyes
    for side in (-1, 1):
        canvas.paint(canvas.circle(cx + side * 5, cy - 1, 3.2), white)
        canvas.paint(canvas.circle(cx + side * 5, cy - 1, 2.0), eyes)
    # nose and mouth
    canvas.paint(canvas.ellipse(cx, cy + 6.5, 6.0, 4.5), hair * 0.5 + 0.5, dog)
    canvas.paint(canvas.circle(cx, cy + 4, 2.2), black, dog)
    canvas.paint(canvas.circle(cx, cy + 4, 1.5), ones * torch.tensor([0.95, 0.5, 0.6], device=device), cat)
    for side in (-1, 1):
        canvas.paint(canvas.box(cx + side * 8, cy + 5.5, 3.5, 0.4), black, cat)
    canvas.paint(canvas.box(cx, cy + 8, 3.0, 0.7), ones * torch.tensor([0.6, 0.2, 0.2], device=device), person)
    # accessories
    glasses = attrs["accessory"] == index_of("accessory", "glasses")
    hat = attrs["accessory"] == index_of("accessory", "hat")
    for side in (-1, 1):
        canvas.paint(torch.abs(canvas.circle(cx + side * 5, cy - 1, 4.0)) - 0.8, black, glasses)
    canvas.paint(canvas.box(cx, cy - 1.5, 1.2, 0.6), black, glasses)
    hat_colour = ones * torch.tensor(HAT_RGB, device=device) / 255.0
    canvas.paint(canvas.box(cx, cy - r + 0.5, r + 3, 1.6), hat_colour, hat)
    canvas.paint(canvas.box(cx, cy - r - 5, r * 0.6, 5.5), hat_colour, hat)
    return canvas.image.clamp(0, 1)


def to_pil(images: torch.Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> PIL images."""
    from PIL import Image

    array = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def from_pil(images: list, size: int = SIZE) -> torch.Tensor:
    """PIL images -> [B, 3, size, size] in [0, 1] (resized when they are not `size` px)."""
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                         if im.size != (size, size) else im.convert("RGB")) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
