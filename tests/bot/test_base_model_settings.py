"""BOOTHBOT_MODELS and BOOTHBOT_RESIDENT_MODELS: the base models the bot offers and which one is the default."""
from __future__ import annotations

import pytest

from bot.settings import DEFAULT_MODEL, SettingsError, load_settings


def load(env: dict):
    return load_settings(env, env_file=None)


def test_boothbot_model_alone_keeps_working_as_the_only_model():
    settings = load({"BOOTHBOT_MODEL": "/models/dreamshaper_8.safetensors"})
    assert settings.model == "/models/dreamshaper_8.safetensors"
    assert settings.base_models == {"dreamshaper_8": "/models/dreamshaper_8.safetensors"}
    assert load({}).base_models == {"stable-diffusion-v1-5": DEFAULT_MODEL}
    assert load({}).resident_models == 1


def test_listed_models_with_the_default_named_or_first():
    listed = "sd15=stable-diffusion-v1-5/stable-diffusion-v1-5, Pony=/models/pony.safetensors"
    first = load({"BOOTHBOT_MODELS": listed})
    assert first.model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and first.default_model_name == "sd15"
    named = load({"BOOTHBOT_MODELS": listed, "BOOTHBOT_MODEL": "pony", "BOOTHBOT_RESIDENT_MODELS": "2"})
    assert named.model == "/models/pony.safetensors" and named.resident_models == 2
    assert list(named.base_models) == ["pony", "sd15"]  # the default first
    by_reference = load({"BOOTHBOT_MODELS": listed, "BOOTHBOT_MODEL": "/models/other"})
    assert by_reference.base_models == {"other": "/models/other", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                        "pony": "/models/pony.safetensors"}


@pytest.mark.parametrize("raw, says", [
    ("sd15", "has no reference after a name="),
    ("=/models/a", "a name is 1-40 lowercase letters"),
    ("my model=/models/a", "a name is 1-40 lowercase letters"),
    ("a=/models/a,a=/models/b", "names 'a' twice"),
])
def test_a_bad_model_list_is_a_clear_error(raw, says):
    with pytest.raises(SettingsError, match=says) as error:
        load({"BOOTHBOT_MODELS": raw})
    assert "BOOTHBOT_MODELS" in str(error.value)


def test_the_resident_count_has_a_range():
    with pytest.raises(SettingsError, match="BOOTHBOT_RESIDENT_MODELS=0 is out of range"):
        load({"BOOTHBOT_RESIDENT_MODELS": "0"})


def test_bot_check_looks_up_every_listed_model(tmp_path, tiny_model_dir):
    import io

    from bot.check import Report, check_models

    out = io.StringIO()
    report = Report(out=out)
    missing = tmp_path / "pony.safetensors"
    check_models(report, load({"BOOTHBOT_MODELS": f"tiny={tiny_model_dir},pony={missing}"}))
    lines = out.getvalue().splitlines()
    assert report.failed and len([line for line in lines if "model" in line]) == 2
    assert any(f"BOOTHBOT_MODELS pony: {missing} does not exist" in line for line in lines)
