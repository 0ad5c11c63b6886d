"""Prompt parsing and imagine options: pure Python, no model."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from trainer.contract.errors import UserError
from trainer.contract.imagine_request import ImagineRequest
from trainer.contract.prompts import ConceptSpec, check_negative_prompt, find_blocked_words, parse_prompt

SQUID = ConceptSpec(1, "squidarth", "man", "/data/concepts/1/lora.safetensors")
REX = ConceptSpec(2, "rexdog", "dog", "/data/concepts/2/lora.safetensors", weight=0.7)
STYLE = ConceptSpec(3, "inkwash", "", "/data/concepts/3/lora.safetensors")


def test_plain_token_activates_concept_and_adds_class_word():
    parsed = parse_prompt("portrait of squidarth as a jedi", [SQUID, REX])
    assert parsed.text == "portrait of squidarth man as a jedi"
    assert [(u.concept.token, u.weight) for u in parsed.uses] == [("squidarth", 1.0)]
    assert parsed.notices == ()


def test_class_word_not_doubled_and_token_matched_as_whole_word_any_case():
    assert parse_prompt("Squidarth man riding", [SQUID]).text == "Squidarth man riding"
    assert parse_prompt("squidarth's hat", [SQUID]).text == "squidarth man's hat"
    parsed = parse_prompt("squidarthian empire", [SQUID])
    assert parsed.uses == () and parsed.text == "squidarthian empire"
    assert parse_prompt("an inkwash painting", [STYLE]).text == "an inkwash painting"  # no class word: nothing added


def test_every_occurrence_gets_the_class_word():
    parsed = parse_prompt("squidarth and squidarth", [SQUID])
    assert parsed.text == "squidarth man and squidarth man"
    assert len(parsed.uses) == 1


def test_two_concepts_each_with_its_weight_in_token_order():
    parsed = parse_prompt("rexdog next to squidarth", [SQUID, REX])
    assert [(u.concept.token, u.weight) for u in parsed.uses] == [("rexdog", 0.7), ("squidarth", 1.0)]
    assert parsed.text == "rexdog dog next to squidarth man"


def test_lora_tag_sets_weight_and_is_removed():
    parsed = parse_prompt("squidarth in the rain <lora:squidarth:0.8>, detailed", [SQUID])
    assert parsed.text == "squidarth man in the rain, detailed"
    assert [(u.concept.token, u.weight) for u in parsed.uses] == [("squidarth", 0.8)]
    assert parsed.a1111_prompt() == "squidarth man in the rain, detailed <lora:squidarth:0.8>"


def test_lora_tag_without_weight_and_without_token_in_text():
    parsed = parse_prompt("<lora:SQUIDARTH> a castle", [SQUID])
    assert parsed.text == "a castle"
    assert [(u.concept.token, u.weight) for u in parsed.uses] == [("squidarth", 1.0)]
    assert "squidarth" in parsed.notices[0]


@pytest.mark.parametrize("tag, needle", [
    ("<lora:squidarth:3>", "from 0 to 2"),
    ("<lora:squidarth:lots>", "must be a number from 0 to 2"),
    ("<lora:squidarth:0.5:0.5>", "single weight"),
    ("<hypernet:thing:1>", "Only <lora:name:weight>"),
])
def test_bad_tags_are_explained(tag, needle):
    with pytest.raises(UserError, match=needle):
        parse_prompt(f"a photo {tag}", [SQUID])


def test_unknown_lora_tag_is_named_with_what_can_be_used():
    with pytest.raises(UserError) as error:
        parse_prompt("a photo <lora:nobody:1>", [SQUID, REX])
    assert "nobody" in str(error.value) and "rexdog, squidarth" in str(error.value)
    with pytest.raises(UserError, match="no trained concepts"):
        parse_prompt("a photo <lora:nobody>", [])


def test_negative_prompt_and_blocked_words():
    assert check_negative_prompt("  blurry ") == "blurry"
    with pytest.raises(UserError, match="negative prompt"):
        check_negative_prompt("<lora:squidarth:1>")
    assert find_blocked_words("A Gory scene, very gory", ["gory", "gore", "blood bath"]) == ["gory"]
    assert find_blocked_words("a blood bath", ["blood bath"]) == ["blood bath"]
    assert find_blocked_words("gorgeous", ["gore"]) == []


def test_prompt_length_limit():
    with pytest.raises(UserError, match="characters long"):
        parse_prompt("a" * 5000)


def _params(**overrides):
    return {"prompt": "a photo", "out_dir": "/tmp/x", **overrides}


def test_request_defaults():
    request = ImagineRequest.from_params(_params())
    assert (request.seed, request.steps, request.cfg, request.count, request.scheduler) == (None, 20, 7.0, 1, "dpmpp_2m_karras")
    assert request.width is None and request.height is None and request.strength == 0.6


@pytest.mark.parametrize("key, value, needle", [
    ("steps", 0, "from 1 to 100"), ("steps", 101, "from 1 to 100"), ("steps", 2.5, "whole number from 1 to 100"),
    ("cfg", 0.5, "from 1 to 20"), ("cfg", "high", "number from 1 to 20"),
    ("count", 5, "from 1 to 4"), ("seed", -1, f"from 0 to {2**32 - 1}"),
    ("width", 100, "multiple of 8"), ("height", 4096, "from 64 to 2048"),
    ("scheduler", "plms", "dpmpp_2m_karras, euler_a, ddim"), ("strength", 0, "from 0.05 to 1"),
])
def test_out_of_range_options_name_the_range(key, value, needle):
    with pytest.raises(UserError, match=needle):
        ImagineRequest.from_params(_params(**{key: value}))


def test_request_rejects_tokens_at_submit_time():
    concepts = [{"concept_id": 1, "token": "squidarth", "class_name": "man", "lora_path": "/x", "weight": 1}]
    request = ImagineRequest.from_params(_params(prompt="squidarth", concepts=concepts))
    assert request.parsed.text == "squidarth man"
    with pytest.raises(UserError, match="no concept called bobcat"):
        ImagineRequest.from_params(_params(prompt="<lora:bobcat> a cat", concepts=concepts))
    with pytest.raises(UserError, match="weight for squidarth"):
        ImagineRequest.from_params(_params(concepts=[{**concepts[0], "weight": 9}]))


def test_modules_the_bot_imports_stay_torch_free():
    code = ("import sys, trainer.contract.prompts, trainer.contract.imagine_request, trainer.contract.files, "
            "trainer.contract.durations; "
            "bad = [m for m in ('torch', 'diffusers', 'PIL') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
