"""The score arithmetic of bench/quality/scores.py on hand-made readings."""
from __future__ import annotations

import math

import torch

from bench.quality import scores, world


def _readings(**values) -> dict[str, torch.Tensor]:
    count = len(next(iter(values.values())))
    out = {name: torch.zeros(count, dtype=torch.long) for name in world.ATTRIBUTES}
    for name, names in values.items():
        out[name] = torch.tensor([world.index_of(name, v) for v in names])
    return out


def test_tv_distance_is_zero_for_equal_distributions_and_one_for_disjoint_ones():
    a = _readings(hair=["red", "blue", "red", "blue"])
    b = _readings(hair=["blue", "red", "blue", "red"])
    c = _readings(hair=["green"] * 4)
    assert scores.tv_distance(a, b, ("hair",)) == 0
    assert scores.tv_distance(a, c, ("hair",)) == 1
    assert math.isclose(scores.tv_distance(a, c, ("hair", "eyes")), 0.5)


def test_subject_rate_counts_pictures_with_every_named_attribute():
    found = _readings(hair=["blue", "blue", "red", "blue"], eyes=["green", "brown", "green", "green"],
                      accessory=["glasses", "glasses", "glasses", "none"])
    subject = {"class": "man", "hair": "blue", "eyes": "green", "accessory": "glasses"}
    assert scores.subject_rate(found, subject) == 0.25


def test_scene_entropy_is_one_for_all_different_scenes_and_zero_for_one_scene():
    backgrounds = list(world.ATTRIBUTES["background"])
    spread = _readings(background=backgrounds, position=["left", "middle", "right", "left"])
    same = _readings(background=["pink"] * 4, position=["left"] * 4)
    assert math.isclose(scores.scene_entropy(spread), 1.0)
    assert scores.scene_entropy(same) == 0


def test_token_prompts_put_the_token_before_the_class_as_the_instance_prompt_does():
    from trainer.contract.naming import instance_prompt

    concept = scores.DEFAULT_CONCEPT
    prompts = scores.token_prompts(concept)
    assert prompts[0] == (instance_prompt(concept.token, concept.class_name, None), {})
    assert all(p.startswith(prompts[0][0]) for p, _ in prompts)
    asked = [a for _, a in prompts[1:]]
    assert {a["background"] for a in asked if "background" in a} == set(world.ATTRIBUTES["background"])


def test_concept_photos_show_the_subject_on_varied_scenes(tmp_path):
    from PIL import Image

    photos = scores.write_concept_photos(tmp_path / "photos", scores.DEFAULT_CONCEPT, count=5)
    files = sorted(photos.glob("*.png"))
    assert [f.name for f in files] == [f"{i:03d}.png" for i in range(5)]
    pictures = world.from_pil([Image.open(f) for f in files])
    assert pictures.shape == (5, 3, world.SIZE, world.SIZE)
    assert len({tuple((p[:, :4, :4].mean(dim=(1, 2)) * 10).round().tolist()) for p in pictures}) > 1
