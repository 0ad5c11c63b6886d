"""TrainSpec's option table (trainer/contract/train_spec.py): every field decides whether it is part of the checkpoint
fingerprint, validation and submit-time checks come from the declared ranges, and the module stays torch-free."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from trainer.contract.errors import UserError
from trainer.contract.train_spec import MEMBER_OPTIONS, TRAIN_OPTIONS, TrainSpec, checked_params, option, options_of

# The checkpoint contract, spelled out: changing one of these makes a different training (the checkpoint and a
# finished training.json no longer match); the others do not. A new field goes into exactly one of the two sets.
FINGERPRINTED = {"concept_id", "token", "class_name", "style", "steps", "seed", "train_text_encoder", "rank",
                 "learning_rate", "text_encoder_learning_rate", "batch_size", "resolution", "prior_preservation",
                 "class_images", "class_image_steps", "prior_loss_weight", "snr_gamma", "flip", "max_grad_norm",
                 "gradient_checkpointing", "deterministic"}
NOT_FINGERPRINTED = {"photos_dir", "out_dir", "slice_s", "cuda_graphs", "sample_count", "sample_deep_cache",
                     "preview_every", "preview_path", "base_model"}


def spec(**changes) -> TrainSpec:
    required = {"concept_id": 7, "token": "squidarth", "class_name": "man", "photos_dir": "photos", "out_dir": "out"}
    return TrainSpec(**{**required, **changes})


def test_every_field_is_decided_and_the_fingerprint_covers_exactly_the_marked_ones():
    assert set(TRAIN_OPTIONS) == FINGERPRINTED | NOT_FINGERPRINTED and not FINGERPRINTED & NOT_FINGERPRINTED
    assert {name for name, rules in TRAIN_OPTIONS.items() if rules.fingerprint} == FINGERPRINTED
    assert set(spec().fingerprint_fields()) == FINGERPRINTED


def test_a_field_declared_without_deciding_is_refused():
    @dataclasses.dataclass
    class Extended(TrainSpec):
        noise_offset: float = 0.0

    with pytest.raises(TypeError, match="Extended.noise_offset"):
        options_of(Extended)
    with pytest.raises(TypeError):
        option(0.0, help="no fingerprint decision")


def test_validation_follows_the_declared_ranges():
    for name, rules in TRAIN_OPTIONS.items():
        if rules.range is None:
            continue
        low, high = rules.range.low, rules.range.high
        inside = [value for value in (high, None if rules.range.above else low) if value is not None]
        for value in inside:
            spec(**{name: value}).validate()
        outside = [value for value in ((high * 2) if high else None, (low - 1) if low is not None else None)
                   if value is not None]
        for value in outside:
            with pytest.raises(UserError, match=rf"Training settings: {re.escape(rules.label or name)} (must|cannot)"):
                spec(**{name: value}).validate()
    with pytest.raises(UserError, match="steps must be between 1 and 20000"):
        spec(steps=20_001).validate()
    with pytest.raises(UserError, match="the learning rate must be above 0 and at most 0.01"):
        spec(learning_rate=0.0).validate()
    spec(class_name="style", class_images=0).validate()  # no prior preservation: class images do not matter


def test_members_pick_steps_and_style_within_their_narrower_range():
    assert set(MEMBER_OPTIONS) == {"style", "steps"}
    assert (MEMBER_OPTIONS["steps"].for_members.low, MEMBER_OPTIONS["steps"].for_members.high) == (1, 3000)
    assert checked_params({"steps": 3000, "style": None}, by_member=True) == {"steps": 3000}
    with pytest.raises(UserError, match="steps must be between 1 and 3000"):
        checked_params({"steps": 3001}, by_member=True)
    with pytest.raises(ValueError, match="rank"):
        checked_params({"rank": 8}, by_member=True)
    assert checked_params({"rank": 8, "sample_count": 1}) == {"rank": 8, "sample_count": 1}
    with pytest.raises(UserError, match="rank must be between 1 and 256"):
        checked_params({"rank": 0})
    with pytest.raises(ValueError, match="noise"):
        checked_params({"noise": 1})


def test_worker_params_become_a_spec():
    made = TrainSpec.from_params({"concept_id": 3, "token": "zq", "class_name": "dog", "photos_dir": "p",
                                  "out_dir": "o", "steps": None, "rank": 4, "cache_dir": "ignored"})
    assert made.concept_id == "3" and made.steps is None and made.rank == 4
    with pytest.raises(ValueError, match="photos_dir"):
        TrainSpec.from_params({"concept_id": 3, "token": "zq", "class_name": "dog", "out_dir": "o"})


def test_the_spec_is_torch_free():
    code = ("import sys, trainer.contract.train_spec; "
            "bad = [m for m in ('torch', 'diffusers', 'PIL') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
