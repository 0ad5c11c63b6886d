"""BOOTHBOT_TRAIN_MEMORY (the worker's --train-memory): which trainings use gradient checkpointing, and the setting's
way from the bot's settings to the worker."""
from __future__ import annotations

import pytest

from bot.dispatch.worker_client import worker_command
from bot.settings import SettingsError, load_settings
from trainer.training.memory import gradient_checkpointing_for


def test_low_and_fast_decide_and_auto_keeps_speed_off_the_gpu(tiny_pipeline, tiny_sdxl_pipeline):
    for pipe in (tiny_pipeline, tiny_sdxl_pipeline):
        assert gradient_checkpointing_for("low", pipe) is True
        assert gradient_checkpointing_for("fast", pipe) is False
        assert gradient_checkpointing_for("auto", pipe) is False  # on a CPU memory is not the GPU's
    with pytest.raises(ValueError, match="auto, low, fast"):
        gradient_checkpointing_for("tiny", tiny_pipeline)


def test_the_setting_reaches_the_worker_and_a_typo_is_refused_by_name(tmp_path):
    settings = load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_TRAIN_MEMORY": "low"}, env_file=None)
    assert settings.train_memory == "low"
    argv = worker_command(model="m", data_dir=tmp_path, train_memory=settings.train_memory)
    assert argv[argv.index("--train-memory") + 1] == "low"
    assert "--train-memory" not in worker_command(model="m", data_dir=tmp_path)  # auto: the worker's default
    with pytest.raises(SettingsError, match="BOOTHBOT_TRAIN_MEMORY"):
        load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_TRAIN_MEMORY": "small"}, env_file=None)
