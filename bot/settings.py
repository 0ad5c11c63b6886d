"""Settings: read once from the environment and `.env`, validated into one typed object that is passed down.

Nothing else in the project reads `os.environ`; every key is documented in `.env.example`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from dotenv import dotenv_values

from trainer.contract.imagine_request import DEEP_CACHE_RANGE, DEFAULT_DEEP_CACHE

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TOKEN_HELP = (
    "DISCORD_TOKEN is not set. Create an application at https://discord.com/developers/applications, "
    "open Bot -> Reset Token, and put the token in .env as DISCORD_TOKEN=... (see .env.example)."
)


class SettingsError(ValueError):
    """A setting has a value the bot cannot use; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Settings:
    discord_token: str | None = field(default=None, repr=False)
    guild_ids: tuple[int, ...] = ()
    model: str = DEFAULT_MODEL  # the default base model's reference (BOOTHBOT_MODEL, or the first of BOOTHBOT_MODELS)
    models: tuple[tuple[str, str], ...] = ()  # BOOTHBOT_MODELS: (name, reference) of every further base model
    resident_models: int = 1  # how many base models the worker may keep loaded at once (memory permitting)
    data_dir: Path = Path("data")
    backups_keep: int = 7
    db_lock_wait_s: float = 120.0
    metrics_port: int | None = None  # the Prometheus endpoint (bot/metrics_server.py); None: off
    metrics_host: str = "127.0.0.1"
    device: str = "auto"
    workers: str = "local"  # bot/dispatch/workers.py: "local", "local:cuda:0,cuda:1", "ray://HOST:PORT", "auto"
    dtype: str = "auto"
    admin_role: str | None = None
    max_queued_jobs: int = 3
    trainings_per_day: int = 2
    min_photos: int = 3
    max_photos: int = 30
    max_photo_mb: int = 20
    photo_retention_days: int = 7
    train_timeout_s: int = 3600
    imagine_timeout_s: int = 300
    fair_window_hours: float = 24.0
    train_slice_s: float | None = None  # an upper bound on a training's run; by default it yields only when someone waits
    train_checkpoint_s: float = 10.0  # a running training's crash checkpoint, this often
    imagine_between_slices_s: float = 10.0
    batch_window_ms: float = 50.0
    safety: bool = False
    compile_unet: bool = False
    compile_ahead: str = "auto"  # trainer/generation/aot_kernels.py
    deep_cache: int = DEFAULT_DEEP_CACHE  # trainer/generation/deep_cache.py: a whole UNet forward every n-th step
    train_memory: str = "auto"  # trainer/training/memory.py
    gpu_memory_gib: float | None = None  # at most this much of the GPU (trainer/training/memory.py limit_gpu_memory)
    log_level: str = "INFO"
    ray_cpu_workers: int = 0  # Ray without GPUs (tests, trying it out): this many CPU actors instead of one per GPU
    ray_fallback: str = "none"  # "local": Ray unreachable at start -> one local worker instead of a SetupError

    @property
    def db_path(self) -> Path:
        return self.data_dir / "boothbot.sqlite3"

    @property
    def base_models(self) -> dict[str, str]:
        """Every base model the bot offers, name -> reference: BOOTHBOT_MODELS, plus BOOTHBOT_MODEL when it is not
        one of them (named after its folder, file or hub id). The first is the default."""
        catalog = dict(self.models)
        if self.model in catalog.values():
            default = next(name for name, ref in catalog.items() if ref == self.model)
        else:
            default = model_name_for(self.model)
            if default in catalog:
                default = "default"
        return {default: self.model, **{name: ref for name, ref in catalog.items() if name != default}}

    @property
    def default_model_name(self) -> str:
        return next(iter(self.base_models))

    def require_token(self) -> str:
        if not self.discord_token:
            raise SettingsError(TOKEN_HELP)
        return self.discord_token


# environment key -> (field name, parser)
def _number(convert, what: str, lo, hi):
    def parse(key: str, raw: str):
        try:
            value = convert(raw.strip())
        except ValueError:
            raise SettingsError(f"{key}={raw!r} is not {what}; allowed: {lo}..{hi}") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{key}={value} is out of range; allowed: {lo}..{hi}")
        return value
    return parse


def _int(lo: int, hi: int):
    return _number(int, "a whole number", lo, hi)


def _float(lo: float, hi: float):
    return _number(float, "a number", lo, hi)


def _optional(parse):
    """Empty means unset (None)."""
    def wrapped(key: str, raw: str):
        return None if not raw.strip() else parse(key, raw)
    return wrapped


def _choice(*allowed: str):
    def parse(key: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise SettingsError(f"{key}={raw!r} is not allowed; choose one of: {', '.join(allowed)}")
        return value
    return parse


def _is_device(value: str) -> bool:
    return value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit())


def _device(key: str, raw: str) -> str:
    value = raw.strip().lower()
    if _is_device(value):
        return value
    raise SettingsError(f"{key}={raw!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps")


WORKERS_ALLOWED = ("local (one worker on BOOTHBOT_DEVICE), local:DEVICE,DEVICE,... (one worker per device, e.g. "
                   "local:cuda:0,cuda:1), ray://HOST:PORT (a Ray cluster), auto (Ray, as `ray start` left it)")


def _workers(key: str, raw: str) -> str:
    value = raw.strip()
    lowered = value.lower()
    if lowered in ("local", "auto"):
        return lowered
    if lowered.startswith("local:"):
        devices = [d.strip() for d in lowered[len("local:"):].split(",")]
        bad = [d or "(empty)" for d in devices if not _is_device(d)]
        if bad:
            raise SettingsError(f"{key}={raw!r} names {bad[0]!r}, which is not a device (allowed: cpu, cuda, "
                                f"cuda:N, mps, auto); write one device per worker, e.g. local:cuda:0,cuda:1")
        return "local:" + ",".join(devices)
    if lowered.startswith("ray://"):
        host, _, port = value[len("ray://"):].rpartition(":")
        if host and port.isdigit() and 1 <= int(port) <= 65535:
            return value
        raise SettingsError(f"{key}={raw!r} is not a Ray address; write ray://HOST:PORT, e.g. ray://10.0.0.5:10001")
    raise SettingsError(f"{key}={raw!r} is not allowed; choose one of: {WORKERS_ALLOWED}")


def _bool(key: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{key}={raw!r} is not a yes/no value; allowed: true, false, 1, 0, yes, no, on, off")


def _guild_ids(key: str, raw: str) -> tuple[int, ...]:
    ids = []
    for part in raw.replace(" ", ",").split(","):
        if not part:
            continue
        if not part.isdigit() or not 15 <= len(part) <= 21:
            raise SettingsError(
                f"{key} has {part!r}, which is not a Discord server id; allowed: comma-separated ids "
                "(right-click the server with Developer Mode on -> Copy Server ID), or empty to sync globally"
            )
        ids.append(int(part))
    return tuple(ids)


def _port_or_off(key: str, raw: str) -> int | None:
    if not raw.strip():
        return None
    try:
        return _int(1, 65535)(key, raw)
    except SettingsError as e:
        raise SettingsError(f"{e}, or empty to serve no metrics") from None


def _host(key: str, raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise SettingsError(f"{key}={raw!r} is not a host to listen on; allowed: an address of this machine such as "
                            "127.0.0.1 (this machine only) or 0.0.0.0 (every interface), or a host name")
    return value.strip("[]")


def _text(key: str, raw: str) -> str | None:
    return raw.strip() or None


def _model(key: str, raw: str) -> str:
    value = raw.strip()
    if not value:
        raise SettingsError(f"{key} is empty; allowed: a hub id such as {DEFAULT_MODEL}, a local diffusers "
                            "directory, or a .safetensors/.ckpt file")
    return value


MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,39}$")


def model_name_for(ref: str) -> str:
    """A name for a base model listed without one: its folder, file (without suffix) or hub repository name."""
    base = Path(ref.rstrip("/\\")).name
    stem = Path(base).stem if Path(base).suffix.lower() in (".safetensors", ".ckpt") else base
    name = re.sub(r"[^a-z0-9_.-]+", "-", stem.lower()).strip("-._")[:40]
    return name if MODEL_NAME.match(name) else "default"


def _models(key: str, raw: str) -> tuple[tuple[str, str], ...]:
    how = ("allowed: comma-separated name=reference pairs, e.g. "
           "sd15=stable-diffusion-v1-5/stable-diffusion-v1-5,pony=/models/pony.safetensors")
    found: dict[str, str] = {}
    for part in raw.split(","):
        if not part.strip():
            continue
        name, equals, ref = part.partition("=")
        name, ref = name.strip().lower(), ref.strip()
        if not equals or not ref:
            raise SettingsError(f"{key} has {part.strip()!r}, which has no reference after a name=; {how}")
        if not MODEL_NAME.match(name):
            raise SettingsError(f"{key} has the name {name!r}: a name is 1-40 lowercase letters, digits, '-', '_' "
                                f"or '.', starting with a letter or digit; {how}")
        if name in found:
            raise SettingsError(f"{key} names {name!r} twice ({found[name]} and {ref}); give each model its own name")
        found[name] = ref
    return tuple(found.items())


def _path(key: str, raw: str) -> Path:
    if not raw.strip():
        raise SettingsError(f"{key} is empty; allowed: a directory path such as ./data")
    return Path(raw.strip()).expanduser()


_KEYS: dict[str, tuple[str, object]] = {
    "DISCORD_TOKEN": ("discord_token", _text),
    "BOOTHBOT_GUILD_IDS": ("guild_ids", _guild_ids),
    "BOOTHBOT_MODEL": ("model", _model),
    "BOOTHBOT_MODELS": ("models", _models),
    "BOOTHBOT_RESIDENT_MODELS": ("resident_models", _int(1, 16)),
    "BOOTHBOT_DATA_DIR": ("data_dir", _path),
    "BOOTHBOT_BACKUPS_KEEP": ("backups_keep", _int(1, 1000)),
    "BOOTHBOT_DB_LOCK_WAIT_S": ("db_lock_wait_s", _float(1, 3600)),
    "BOOTHBOT_METRICS_PORT": ("metrics_port", _port_or_off),
    "BOOTHBOT_METRICS_HOST": ("metrics_host", _host),
    "BOOTHBOT_DEVICE": ("device", _device),
    "BOOTHBOT_WORKERS": ("workers", _workers),
    "BOOTHBOT_DTYPE": ("dtype", _choice("auto", "bf16", "fp16", "fp32")),
    "BOOTHBOT_ADMIN_ROLE": ("admin_role", _text),
    "BOOTHBOT_MAX_QUEUED_JOBS": ("max_queued_jobs", _int(1, 100)),
    "BOOTHBOT_TRAININGS_PER_DAY": ("trainings_per_day", _int(0, 100)),
    "BOOTHBOT_MIN_PHOTOS": ("min_photos", _int(1, 100)),
    "BOOTHBOT_MAX_PHOTOS": ("max_photos", _int(1, 200)),
    "BOOTHBOT_MAX_PHOTO_MB": ("max_photo_mb", _int(1, 100)),
    "BOOTHBOT_PHOTO_RETENTION_DAYS": ("photo_retention_days", _int(0, 3650)),
    "BOOTHBOT_TRAIN_TIMEOUT_S": ("train_timeout_s", _int(10, 86400)),
    "BOOTHBOT_IMAGINE_TIMEOUT_S": ("imagine_timeout_s", _int(5, 3600)),
    "BOOTHBOT_FAIR_WINDOW_HOURS": ("fair_window_hours", _float(0.1, 24 * 30)),
    "BOOTHBOT_TRAIN_SLICE_S": ("train_slice_s", _optional(_float(0.5, 3600))),
    "BOOTHBOT_TRAIN_CHECKPOINT_S": ("train_checkpoint_s", _float(1, 3600)),
    "BOOTHBOT_IMAGINE_BETWEEN_SLICES_S": ("imagine_between_slices_s", _float(0.5, 3600)),
    "BOOTHBOT_BATCH_WINDOW_MS": ("batch_window_ms", _float(0, 1000)),
    "BOOTHBOT_SAFETY": ("safety", _bool),
    "BOOTHBOT_COMPILE_UNET": ("compile_unet", _bool),
    "BOOTHBOT_COMPILE_AHEAD": ("compile_ahead", _choice("auto", "on", "off")),
    "BOOTHBOT_DEEP_CACHE": ("deep_cache", _int(*DEEP_CACHE_RANGE)),
    "BOOTHBOT_TRAIN_MEMORY": ("train_memory", _choice("auto", "low", "fast")),
    "BOOTHBOT_GPU_MEMORY_GIB": ("gpu_memory_gib", _optional(_float(4, 4096))),
    "BOOTHBOT_LOG_LEVEL": ("log_level", _choice("debug", "info", "warning", "error")),
    "BOOTHBOT_RAY_CPU_WORKERS": ("ray_cpu_workers", _int(0, 256)),
    "BOOTHBOT_RAY_FALLBACK": ("ray_fallback", _choice("none", "local")),
}


def load_settings(env: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = ".env") -> Settings:
    """Build Settings from `env` (default: the process environment) over the values in `env_file`.

    The environment wins over the file, as python-dotenv does by default. Unknown BOOTHBOT_* keys are an error, so
    a typo never silently falls back to a default.
    """
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if env is None else env)

    unknown = sorted(k for k in merged if k.startswith("BOOTHBOT_") and k not in _KEYS)
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]}; allowed keys: {', '.join(sorted(_KEYS))}")

    values: dict[str, object] = {}
    for key, (name, parse) in _KEYS.items():
        if key in merged:
            values[name] = parse(key, merged[key])
    if "models" in values:
        values["model"] = _default_model(merged.get("BOOTHBOT_MODEL"), values.get("model"), values["models"])
    if "log_level" in values:
        values["log_level"] = str(values["log_level"]).upper()
    settings = Settings(**values)
    if settings.min_photos > settings.max_photos:
        raise SettingsError(
            f"BOOTHBOT_MIN_PHOTOS={settings.min_photos} is more than BOOTHBOT_MAX_PHOTOS={settings.max_photos}; "
            "the minimum must not exceed the maximum"
        )
    return settings


def _default_model(raw: str | None, model: str | None, models: tuple[tuple[str, str], ...]) -> str:
    """BOOTHBOT_MODEL may name one of BOOTHBOT_MODELS or be a reference of its own; unset, the first listed one is
    the default."""
    listed = dict(models)
    if raw is None:
        if not listed:
            return DEFAULT_MODEL
        return next(iter(listed.values()))
    return listed.get(model.lower(), model)


def setting_names() -> list[str]:
    """Every key the bot reads, for .env.example and `--help`."""
    return list(_KEYS)


assert {name for name, _ in _KEYS.values()} == {f.name for f in fields(Settings)}
