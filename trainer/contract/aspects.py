"""The picture shapes /imagine offers, by name, mapped to each model family's own sizes. Pure Python (no torch).

Discord fixes a command's choices when the commands sync, but the size that makes a good picture depends on the
model (SD 1.x 512×768, SDXL 896×1152 for the same shape), and with several base models the model is only known
once the prompt's concepts are. So members pick a shape name and the bot turns it into the family's size when the
job is queued. The names are derived from the family's own list (trainer/contract/families.py): its square size,
then its upright sizes from the least to the most elongated as portrait, tall, very tall (sideways: landscape,
wide, very wide). A family with fewer sizes does not offer the later names, and asking for one says which it does.
"""
from __future__ import annotations

from trainer.contract.errors import UserError
from trainer.contract.families import Family

SQUARE = "square"
UPRIGHT = ("portrait", "tall", "very_tall")
SIDEWAYS = ("landscape", "wide", "very_wide")
ASPECTS = (SQUARE, UPRIGHT[0], SIDEWAYS[0], UPRIGHT[1], SIDEWAYS[1], UPRIGHT[2], SIDEWAYS[2])


def label(aspect: str) -> str:
    return aspect.replace("_", " ")


def aspect_sizes(family: Family) -> dict[str, tuple[int, int]]:
    """{shape name: (width, height)} this family offers, in ASPECTS order."""
    upright = sorted((s for s in family.sizes if s[1] > s[0]), key=lambda s: s[1] / s[0])
    sideways = sorted((s for s in family.sizes if s[0] > s[1]), key=lambda s: s[0] / s[1])
    named = dict(zip(UPRIGHT, upright)) | dict(zip(SIDEWAYS, sideways))
    square = [s for s in family.sizes if s[0] == s[1]]
    if square:
        named[SQUARE] = square[0]
    return {name: named[name] for name in ASPECTS if name in named}


def offered(family: Family) -> str:
    """"square 1024×1024, portrait 896×1152, …" for messages."""
    return ", ".join(f"{label(name)} {w}×{h}" for name, (w, h) in aspect_sizes(family).items())


def size_for(family: Family, aspect: str) -> tuple[int, int]:
    """The (width, height) of a shape name for this family; UserError listing the shapes it offers otherwise."""
    sizes = aspect_sizes(family)
    if aspect in sizes:
        return sizes[aspect]
    known = aspect in ASPECTS
    what = f"The {label(aspect)} shape" if known else f"{aspect!r}"
    raise UserError(f"{what} is not a size {family.label} models offer{'' if known else ' (unknown shape)'}. "
                    f"Pick one of: {offered(family)}.")
