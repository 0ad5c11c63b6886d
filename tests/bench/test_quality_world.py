"""The procedural world (bench/quality/world.py): deterministic, every attribute visible, captions that tell the
truth in the bot's prompt style, and a tokenizer that knows every caption word."""
from __future__ import annotations

import random

import pytest
import torch

from bench.quality import world


def _render(fixed: dict, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return world.render(world.sample(1, generator, fixed=fixed), generator)[0]


def test_a_seed_gives_the_same_subjects_and_pictures():
    def make(seed):
        generator = torch.Generator().manual_seed(seed)
        attrs = world.sample(8, generator)
        return attrs, world.render(attrs, generator)

    (a1, i1), (a2, i2), (_, i3) = make(5), make(5), make(6)
    assert all(torch.equal(a1[k], a2[k]) for k in world.ATTRIBUTES)
    assert torch.equal(i1, i2)
    assert not torch.equal(i1, i3)
    assert i1.shape == (8, 3, world.SIZE, world.SIZE) and 0 <= float(i1.min()) and float(i1.max()) <= 1


def test_fixed_attributes_are_kept_and_the_others_vary():
    attrs = world.sample(64, torch.Generator().manual_seed(0), fixed={"class": "cat", "hair": "blue"})
    assert set(attrs["class"].tolist()) == {world.index_of("class", "cat")}
    assert set(attrs["hair"].tolist()) == {world.index_of("hair", "blue")}
    assert len(set(attrs["background"].tolist())) == len(world.ATTRIBUTES["background"])


@pytest.mark.parametrize("name", list(world.ATTRIBUTES))
def test_changing_one_attribute_changes_the_picture(name):
    subject = {"class": "man", "hair": "red", "eyes": "blue", "accessory": "none", "background": "gray",
               "position": "middle"}
    for value in world.ATTRIBUTES[name]:
        if value == subject[name]:
            continue
        changed = (_render({**subject, name: value}) - _render(subject)).abs().amax(dim=0)
        assert int((changed > 0.2).sum()) >= 8, f"{name}={value} is not visible"


def test_the_background_colour_is_in_the_corners():
    for bg, rgb in world.BACKGROUND_RGB.items():
        picture = _render({"background": bg})
        corner = picture[:, :4, :4].mean(dim=(1, 2))
        assert torch.allclose(corner, torch.tensor(rgb) / 255.0, atol=0.06)


def test_the_full_caption_says_every_attribute_in_the_bots_prompt_style():
    subject = {"class": "dog", "hair": "white", "eyes": "green", "accessory": "hat", "background": "orange",
               "position": "left"}
    assert world.caption(subject) == ("a photo of a dog with white fur and green eyes wearing a hat on the left "
                                      "on an orange background")
    person = {**subject, "class": "man", "accessory": "none"}
    assert world.caption(person).startswith("a photo of a man with white hair")
    assert "wearing" not in world.caption(person)


def test_random_captions_start_with_the_class_and_only_say_what_is_true():
    import re

    generator = torch.Generator().manual_seed(1)
    attrs = world.sample(200, generator)
    rng = random.Random(0)
    bare = 0
    for i in range(200):
        subject = world.row(attrs, i)
        text = world.caption(subject, rng)
        assert text.startswith((f"a photo of a {subject['class']}", f"a photo of {subject['class']}")), text
        said = {
            "hair": re.findall(r"(\w+) (?:hair|fur)", text),
            "eyes": re.findall(r"(\w+) eyes", text),
            "background": re.findall(r"(\w+) background", text),
            "accessory": ["glasses"] * ("wearing glasses" in text) + ["hat"] * ("wearing a hat" in text),
            "position": [p for p in ("left", "middle", "right") if p in text.split()],
        }
        for name, values in said.items():
            assert values in ([], [subject[name]]), (text, name)
        bare += text == f"a photo of {subject['class']}"
    assert bare > 0  # the bot's class prompt ("a photo of man") occurs as a caption


def test_every_caption_word_is_one_token_of_the_world_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    from trainer.models.tiny import KNOWN_WORDS, write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path, words=tuple(dict.fromkeys(KNOWN_WORDS + world.WORDS)))
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=77)
    for word in world.WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tokenizer("squidarth", add_special_tokens=False).input_ids) > 1  # a member's token is not a word
