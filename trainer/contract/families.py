"""The model families boothbot runs, as facts both processes share (torch-free: the bot imports it).

A family is detected from the model itself (trainer/models/detection.py), never from its name; the worker reports it
in its `ready` event and the bot offers /imagine sizes from here. The engine-side half (pipeline classes, encoders,
LoRA targets) is trainer/models/family.py.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sdxl": what the worker's ready event and the database carry
    label: str  # what members and admins read
    native_side: int  # the side of the square the family's real models were trained at
    sizes: tuple[tuple[int, int], ...]  # the (width, height) pairs /imagine offers, square first
    base_model_version: str  # kohya's `ss_base_model_version`, which A1111 / ComfyUI / Civitai read

    def offers(self, width: int, height: int) -> bool:
        return (width, height) in self.sizes


SD1 = Family("sd1", "Stable Diffusion 1.x", 512, ((512, 512), (512, 768), (768, 512)), "sd_v1")
# SDXL's training buckets near one megapixel (the SDXL paper's appendix), the shapes SDXL UIs offer.
SDXL = Family("sdxl", "SDXL", 1024,
              ((1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768)),
              "sdxl_base_v1-0")
FAMILIES: dict[str, Family] = {family.name: family for family in (SD1, SDXL)}


class UnknownFamily(KeyError):
    pass


def family_named(name: str) -> Family:
    """The family called `name` ("sd1" | "sdxl"); UnknownFamily (a KeyError) names the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamily(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
