"""Picture shape names → each family's sizes (trainer/contract/aspects.py), and the engine-side size message."""
from __future__ import annotations

import pytest

from trainer.contract.aspects import ASPECTS, aspect_sizes, size_for
from trainer.contract.errors import UserError
from trainer.contract.families import SD1, SDXL, FAMILIES
from trainer.contract.imagine_request import check_size


def test_sd1_keeps_todays_three_shapes():
    assert aspect_sizes(SD1) == {"square": (512, 512), "portrait": (512, 768), "landscape": (768, 512)}


def test_sdxl_names_its_buckets_from_the_least_to_the_most_elongated():
    assert aspect_sizes(SDXL) == {"square": (1024, 1024), "portrait": (896, 1152), "landscape": (1152, 896),
                                  "tall": (832, 1216), "wide": (1216, 832), "very_tall": (768, 1344),
                                  "very_wide": (1344, 768)}


@pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
def test_every_offered_size_has_a_name(family):
    assert set(aspect_sizes(family).values()) == set(family.sizes)
    assert set(aspect_sizes(family)) <= set(ASPECTS)


def test_a_shape_the_family_does_not_offer_lists_the_ones_it_does():
    assert size_for(SDXL, "tall") == (832, 1216)
    with pytest.raises(UserError) as refused:
        size_for(SD1, "tall")
    assert str(refused.value) == ("The tall shape is not a size Stable Diffusion 1.x models offer. Pick one of: "
                                  "square 512×512, portrait 512×768, landscape 768×512.")
    with pytest.raises(UserError, match=r"'huge' is not a size SDXL models offer \(unknown shape\)\. Pick one of: "
                                        r"square 1024×1024, portrait 896×1152"):
        size_for(SDXL, "huge")


def test_a_size_out_of_range_names_the_familys_sizes_that_fit():
    with pytest.raises(UserError, match=r"from 512 to 2048 px\. Of the offered sizes these fit: square 1024×1024, "
                                        r"portrait 896×1152, .*very wide 1344×768\."):
        check_size(256, 256, 1024, SDXL)
    assert check_size(None, None, 1024, SDXL) == (1024, 1024)
