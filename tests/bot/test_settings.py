"""Settings: defaults, parsing, and that every wrong value names the key, the value and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest

from bot.settings import DEFAULT_MODEL, Settings, SettingsError, load_settings, setting_names

REPO_ROOT = Path(__file__).resolve().parents[2]


def load(env: dict[str, str], env_file=None) -> Settings:
    return load_settings(env, env_file=env_file)


def test_defaults_match_env_example():
    settings = load({})
    assert settings.model == DEFAULT_MODEL
    assert settings.data_dir == Path("data")
    assert settings.db_path == Path("data") / "boothbot.sqlite3"
    assert settings.discord_token is None
    # .env.example documents every key with its default; loading it gives exactly the defaults.
    example = load_settings({}, env_file=REPO_ROOT / ".env.example")
    assert example == Settings()
    documented = {line.split("=", 1)[0] for line in (REPO_ROOT / ".env.example").read_text().splitlines()
                  if "=" in line and not line.startswith("#")}
    assert documented == set(setting_names())


def test_values_are_parsed_into_types():
    settings = load({
        "DISCORD_TOKEN": " abc.def.ghi ", "BOOTHBOT_GUILD_IDS": "123456789012345678, 223456789012345678",
        "BOOTHBOT_DATA_DIR": "/srv/boothbot", "BOOTHBOT_DEVICE": "CUDA:1", "BOOTHBOT_DTYPE": "bf16",
        "BOOTHBOT_MAX_QUEUED_JOBS": "7", "BOOTHBOT_FAIR_WINDOW_HOURS": "1.5", "BOOTHBOT_SAFETY": "yes",
        "BOOTHBOT_LOG_LEVEL": "debug", "BOOTHBOT_ADMIN_ROLE": "  ", "BOOTHBOT_TRAIN_SLICE_S": "2.5",
        "BOOTHBOT_TRAIN_CHECKPOINT_S": "4",
    })
    assert settings.discord_token == "abc.def.ghi"
    assert settings.guild_ids == (123456789012345678, 223456789012345678)
    assert settings.data_dir == Path("/srv/boothbot")
    assert settings.device == "cuda:1"
    assert settings.dtype == "bf16"
    assert settings.max_queued_jobs == 7
    assert settings.fair_window_hours == 1.5
    assert settings.safety is True
    assert settings.log_level == "DEBUG"
    assert settings.admin_role is None
    assert settings.train_slice_s == 2.5
    assert settings.train_checkpoint_s == 4.0
    assert load({"BOOTHBOT_TRAIN_SLICE_S": ""}).train_slice_s is None  # no upper bound: trainings yield on demand


@pytest.mark.parametrize("key, value, allowed", [
    ("BOOTHBOT_MAX_QUEUED_JOBS", "lots", "1..100"),
    ("BOOTHBOT_MAX_QUEUED_JOBS", "0", "1..100"),
    ("BOOTHBOT_TRAININGS_PER_DAY", "101", "0..100"),
    ("BOOTHBOT_IMAGINE_TIMEOUT_S", "2", "5..3600"),
    ("BOOTHBOT_FAIR_WINDOW_HOURS", "soon", "0.1..720"),
    ("BOOTHBOT_TRAIN_SLICE_S", "0.1", "0.5..3600"),
    ("BOOTHBOT_BATCH_WINDOW_MS", "5000", "0..1000"),
    ("BOOTHBOT_DEVICE", "gpu", "auto, cpu, cuda, cuda:N, mps"),
    ("BOOTHBOT_DTYPE", "half", "auto, bf16, fp16, fp32"),
    ("BOOTHBOT_SAFETY", "maybe", "true, false"),
    ("BOOTHBOT_LOG_LEVEL", "loud", "debug, info, warning, error"),
    ("BOOTHBOT_GUILD_IDS", "my-server", "comma-separated ids"),
    ("BOOTHBOT_MODEL", "  ", "hub id"),
    ("BOOTHBOT_DATA_DIR", "", "directory path"),
])
def test_wrong_value_names_key_value_and_allowed(key, value, allowed):
    with pytest.raises(SettingsError) as caught:
        load({key: value})
    message = str(caught.value)
    assert key in message
    if value.strip():
        assert value.strip() in message
    assert allowed in message


def test_unknown_boothbot_key_is_an_error_naming_it():
    with pytest.raises(SettingsError, match="BOOTHBOT_MAX_QUEUED_JOB") as caught:
        load({"BOOTHBOT_MAX_QUEUED_JOB": "3"})
    assert "BOOTHBOT_MAX_QUEUED_JOBS" in str(caught.value)  # the list of allowed keys shows the right spelling


def test_min_photos_above_max_photos_is_refused():
    with pytest.raises(SettingsError, match="BOOTHBOT_MIN_PHOTOS=10 is more than BOOTHBOT_MAX_PHOTOS=5"):
        load({"BOOTHBOT_MIN_PHOTOS": "10", "BOOTHBOT_MAX_PHOTOS": "5"})


def test_missing_token_says_how_to_get_one():
    settings = load({})
    with pytest.raises(SettingsError) as caught:
        settings.require_token()
    message = str(caught.value)
    assert "DISCORD_TOKEN" in message
    assert "https://discord.com/developers/applications" in message
    assert "Reset Token" in message and ".env" in message
    assert load({"DISCORD_TOKEN": "a.b.c"}).require_token() == "a.b.c"


def test_token_never_appears_in_repr():
    settings = load({"DISCORD_TOKEN": "super-secret-token-value"})
    assert "super-secret-token-value" not in repr(settings)


def test_env_file_is_read(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nDISCORD_TOKEN=from.the.file\nBOOTHBOT_MAX_PHOTOS=12\n"
                        "BOOTHBOT_MODEL='/models/my model'\n")
    settings = load({}, env_file=env_file)
    assert settings.discord_token == "from.the.file"
    assert settings.max_photos == 12
    assert settings.model == "/models/my model"


def test_environment_wins_over_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("BOOTHBOT_MAX_PHOTOS=12\nBOOTHBOT_DEVICE=cpu\n")
    settings = load({"BOOTHBOT_MAX_PHOTOS": "20"}, env_file=env_file)
    assert settings.max_photos == 20
    assert settings.device == "cpu"


def test_wrong_value_in_env_file_is_reported(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("BOOTHBOT_MAX_PHOTOS=many\n")
    with pytest.raises(SettingsError, match="BOOTHBOT_MAX_PHOTOS='many' is not a whole number"):
        load({}, env_file=env_file)


def test_missing_env_file_is_fine(tmp_path):
    assert load({}, env_file=tmp_path / "nope.env") == Settings()


def test_process_environment_is_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("BOOTHBOT_MAX_QUEUED_JOBS", "9")
    assert load_settings(env_file=tmp_path / "none").max_queued_jobs == 9


def test_compile_unet_setting_reaches_the_worker_command_line(tmp_path):
    from bot.dispatch.worker_client import WorkerClient

    on = load_settings({"BOOTHBOT_COMPILE_UNET": "true", "BOOTHBOT_DATA_DIR": str(tmp_path)}, env_file=None)
    off = load_settings({"BOOTHBOT_DATA_DIR": str(tmp_path)}, env_file=None)
    assert on.compile_unet and not off.compile_unet
    assert "--compile-unet" in WorkerClient.from_settings(on).argv
    assert "--compile-unet" not in WorkerClient.from_settings(off).argv


def test_debug_log_level_reaches_the_worker_command_line(tmp_path):
    from bot.dispatch.worker_client import WorkerClient

    debug = load_settings({"BOOTHBOT_LOG_LEVEL": "debug", "BOOTHBOT_DATA_DIR": str(tmp_path)}, env_file=None)
    info = load_settings({"BOOTHBOT_DATA_DIR": str(tmp_path)}, env_file=None)
    assert "--debug" in WorkerClient.from_settings(debug).argv  # the libraries' own warnings reach the log then
    assert "--debug" not in WorkerClient.from_settings(info).argv


def test_workers_name_one_lane_per_device_or_a_ray_cluster():
    assert load({}).workers == "local"
    assert load({"BOOTHBOT_WORKERS": " Local:CUDA:0, cuda:1 "}).workers == "local:cuda:0,cuda:1"
    assert load({"BOOTHBOT_WORKERS": "local:cpu,cpu"}).workers == "local:cpu,cpu"
    assert load({"BOOTHBOT_WORKERS": "ray://10.0.0.5:10001"}).workers == "ray://10.0.0.5:10001"
    assert load({"BOOTHBOT_WORKERS": "AUTO"}).workers == "auto"


@pytest.mark.parametrize("raw, says", [
    ("gpus", "choose one of: local (one worker on BOOTHBOT_DEVICE)"),
    ("local:cuda:0,gpu1", "names 'gpu1', which is not a device"),
    ("local:cuda:0,", "names '(empty)', which is not a device"),
    ("ray://10.0.0.5", "write ray://HOST:PORT"),
    ("ray://:10001", "write ray://HOST:PORT"),
])
def test_a_malformed_workers_value_says_what_is_allowed(raw, says):
    with pytest.raises(SettingsError) as caught:
        load({"BOOTHBOT_WORKERS": raw})
    assert f"BOOTHBOT_WORKERS={raw!r}" in str(caught.value) and says in str(caught.value)
