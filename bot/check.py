"""`python -m bot check`: is this machine ready to run the bot? Prints one line per finding, never touches Discord.

The only place in the bot process that imports torch (to report the GPU); the bot itself leaves torch to the worker.
Exit status 0 when nothing would stop the bot (warnings allowed), 1 otherwise.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bot.errors import SetupError
from bot.settings import DEFAULT_MODEL, Settings, SettingsError, load_settings
from trainer.contract.errors import require_writable_dir

GB = 1024 ** 3
MIN_FREE_DISK_GB = 2.0  # below this the base model download or a training's files will not fit
LOW_FREE_DISK_GB = 10.0
LOW_FREE_VRAM_GB = 8.0  # SD 1.5 LoRA training at 512 px needs about this much
GPU_CHECK_S = 3.0
WORKER_START_TIMEOUT_S = 900.0  # first start may download the base model


@dataclass
class Report:
    lines: list[tuple[str, str, str]] = field(default_factory=list)
    out: object = None
    debug: bool = False  # print the traceback behind a FAIL line too

    def _add(self, status: str, topic: str, text: str) -> None:
        self.lines.append((status, topic, text))
        print(f"{status:<5} {topic:<10} {text}", file=self.out or sys.stdout, flush=True)

    def ok(self, topic: str, text: str) -> None:
        self._add("ok", topic, text)

    def warn(self, topic: str, text: str) -> None:
        self._add("warn", topic, text)

    def fail(self, topic: str, text: str, error: BaseException | str | None = None) -> None:
        """`error`: the exception, or a traceback's text, behind the finding; printed under it with --debug."""
        self._add("FAIL", topic, text)
        if self.debug and error:
            detail = error if isinstance(error, str) else "".join(traceback.format_exception(error))
            print(detail.rstrip(), file=self.out or sys.stdout, flush=True)

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for status, _, _ in self.lines)


def run_check(*, env_file: str | os.PathLike | None = ".env", gpu: bool = False, out=None,
              debug: bool = False) -> int:
    report = Report(out=out, debug=debug)
    settings = check_settings(report, env_file)
    if settings is not None:
        report.debug = debug or settings.log_level == "DEBUG"
        if check_data_dir(report, settings.data_dir):
            asyncio.run(check_database(report, settings))
        check_workers_setting(report, settings)
        for device in worker_devices(settings):
            check_torch(report, device)
        check_packages(report)
        check_models(report, settings)
        if gpu and not report.failed:
            asyncio.run(check_worker(report, settings))
        check_metrics(report, settings)
    failures = sum(status == "FAIL" for status, _, _ in report.lines)
    warnings = sum(status == "warn" for status, _, _ in report.lines)
    summary = (f"not ready: {failures} problem(s) to fix before the bot can run" if failures else
               "ready to run: python -m bot" + (f" ({warnings} warning(s) above)" if warnings else ""))
    print(summary, file=out or sys.stdout, flush=True)
    return 1 if failures else 0


def worker_devices(settings: Settings) -> list[str]:
    """The devices of this machine's workers, each checked once (Ray workers' GPUs are on their own machines)."""
    from bot.dispatch.workers import local_devices, uses_ray

    return [] if uses_ray(settings) else list(dict.fromkeys(local_devices(settings)))


def check_settings(report: Report, env_file) -> Settings | None:
    source = f"environment + {env_file}" if env_file and Path(env_file).is_file() else "environment (no .env file)"
    try:
        settings = load_settings(env_file=env_file)
    except SettingsError as e:
        report.fail("settings", str(e), e)
        return None
    report.ok("settings", f"read from the {source}: model {settings.model}, device {settings.device}, "
                          f"dtype {settings.dtype}, data {settings.data_dir}")
    try:
        token = settings.require_token()
    except SettingsError as e:
        report.fail("token", str(e))
    else:
        if token.count(".") == 2 and len(token) >= 50:
            report.ok("token", "DISCORD_TOKEN is set (not checked against Discord)")
        else:
            report.warn("token", "DISCORD_TOKEN is set but does not look like a bot token (three parts separated "
                                 "by dots); copy it again from Bot -> Reset Token in the developer portal")
    if settings.guild_ids:
        report.ok("commands", f"slash commands sync to {len(settings.guild_ids)} server(s) at once")
    else:
        report.ok("commands", "slash commands sync globally (can take up to an hour to appear); set "
                              "BOOTHBOT_GUILD_IDS for instant sync")
    return settings


def check_data_dir(report: Report, data_dir: Path) -> bool:
    """Whether the bot can write in its data directory (then the free space is reported too)."""
    try:
        path = require_writable_dir(data_dir, "BOOTHBOT_DATA_DIR")
    except SetupError as e:
        report.fail("data", str(e), e)
        return False
    free_gb = shutil.disk_usage(path).free / GB
    text = f"{path} is writable; {free_gb:.1f} GB free"
    if free_gb < MIN_FREE_DISK_GB:
        report.fail("data", f"{text}: the bot needs at least {MIN_FREE_DISK_GB:.0f} GB (base model, LoRAs, images)")
    elif free_gb < LOW_FREE_DISK_GB:
        report.warn("data", f"{text}: low; the base model alone takes about 4-5 GB")
    else:
        report.ok("data", text)
    return True


def check_metrics(report: Report, settings: Settings) -> None:
    """Where the Prometheus metrics will be served, after opening and closing that port once."""
    from bot.metrics_server import start_metrics_server

    try:
        server = start_metrics_server(settings)
    except SetupError as e:
        report.fail("metrics", str(e), e)
        return
    if server is None:
        report.ok("metrics", "off (set BOOTHBOT_METRICS_PORT to serve Prometheus metrics)")
        return
    server.stop()
    report.ok("metrics", f"Prometheus metrics will be served at {server.url}")


async def check_database(report: Report, settings: Settings) -> None:
    from bot.store.backups import Backups
    from bot.store.database import Store

    backups = Backups(settings.db_path, keep=settings.backups_keep)
    try:
        store = await Store.open(settings.db_path, lock_wait_s=settings.db_lock_wait_s, backups=backups)
    except SetupError as e:
        report.fail("database", str(e), e)
        return
    except Exception as e:  # noqa: BLE001 - whatever it is, the operator needs to see it
        report.fail("database", f"{settings.db_path}: {e}", e)
        return
    try:
        applied = await store.applied_migrations()
        mode = await store.fetchval("PRAGMA journal_mode")
        counts = dict(await store.fetchall("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
        latest = applied[-1][1] if applied else "none"
        jobs = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no jobs yet"
        report.ok("database", f"{settings.db_path.resolve()}: {len(applied)} migration(s), latest {latest}; "
                              f"journal {mode}; {jobs}; {backups.describe_newest()}")
    except Exception as e:  # noqa: BLE001
        report.fail("database", f"{settings.db_path}: {e}", e)
    finally:
        await store.close()


def check_torch(report: Report, device: str) -> None:
    try:
        import torch
    except ImportError as e:
        report.fail("torch", f"torch is not installed ({e}); install it: python3 -m pip install -e .")
        return
    text = f"torch {torch.__version__}"
    if not torch.cuda.is_available():
        if device.startswith("cuda"):
            report.fail("gpu", f"{text} sees no CUDA GPU but a worker is to run on {device} (BOOTHBOT_DEVICE / "
                               "BOOTHBOT_WORKERS); install a CUDA build of torch and the NVIDIA driver, or use cpu")
        elif device == "mps" or (device == "auto" and torch.backends.mps.is_available()):
            report.ok("gpu", f"{text}; Apple GPU (mps)")
        else:
            report.warn("gpu", f"{text}; no CUDA GPU: jobs run on the CPU, which is fine for trying things out but "
                               "very slow (minutes per image)")
        return
    index = torch.device(device).index if device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        report.fail("gpu", f"a worker is to run on {device} (BOOTHBOT_DEVICE / BOOTHBOT_WORKERS) but torch sees "
                           f"{torch.cuda.device_count()} GPU(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return
    name = torch.cuda.get_device_name(index)
    free, total = torch.cuda.mem_get_info(index)
    bf16 = "bf16" if torch.cuda.is_bf16_supported() else "fp16 (no bf16)"
    text = f"{text}, CUDA {torch.version.cuda}; cuda:{index} {name}, {free / GB:.1f} of {total / GB:.1f} GB free; {bf16}"
    if free / GB < LOW_FREE_VRAM_GB:
        report.warn("gpu", f"{text}: training needs about {LOW_FREE_VRAM_GB:.0f} GB free; other programs on the "
                           "GPU may cause out-of-memory failures")
    else:
        report.ok("gpu", text)


def check_packages(report: Report) -> None:
    """A one-step LoRA training and load on a tiny CPU model: do the installed packages work together?"""
    from trainer.compat import check_stack
    from trainer.quiet import quiet_libraries

    quiet_libraries(report.debug)
    stack = check_stack()
    if stack.ok:
        report.ok("packages", f"{stack.describe_versions()}: a tiny LoRA trains and loads ({stack.seconds:.1f} s)")
    else:
        report.fail("packages", stack.problem, stack.detail)
    for item in stack.out_of_range:
        report.warn("packages", f"{item} is outside the versions boothbot was tested with")


def check_models(report: Report, settings: Settings) -> None:
    """Every base model the bot offers (BOOTHBOT_MODEL and BOOTHBOT_MODELS) can be found."""
    for name, ref in settings.base_models.items():
        check_model(report, ref, key="BOOTHBOT_MODEL" if ref == settings.model else f"BOOTHBOT_MODELS {name}")


def check_model(report: Report, ref: str, key: str = "BOOTHBOT_MODEL") -> None:
    from trainer.models.loading import require_model

    try:
        source = require_model(ref)
    except SetupError as e:
        report.fail("model", f"{key}: {e}", e)
        return
    except Exception as e:  # noqa: BLE001 - e.g. an unreadable Hugging Face cache
        report.fail("model", f"{key}={ref}: could not look it up ({e})", e)
        return
    if source.kind == "hub" and not source.cached:
        note = "" if ref == DEFAULT_MODEL else " (check the spelling: it is only looked up when downloading)"
        report.warn("model", source.detail + note)
        return
    from trainer.models.detection import detect_family

    try:
        family = detect_family(source)  # read from the model itself: a folder's index, a file's tensor names
    except SetupError as e:
        report.fail("model", f"BOOTHBOT_MODEL: {e}", e)
        return
    report.ok("model", f"{source.detail}: {family.label}")


def check_workers_setting(report: Report, settings: Settings) -> None:
    """Which GPU workers BOOTHBOT_WORKERS asks for; Ray ones need their extra installed."""
    from bot.dispatch.workers import RAY_MISSING, RAY_MODULE, local_devices, uses_ray

    if uses_ray(settings):
        import importlib.util

        if importlib.util.find_spec(RAY_MODULE) is None:
            report.fail("workers", RAY_MISSING.format(value=settings.workers))
        else:
            report.ok("workers", f"BOOTHBOT_WORKERS={settings.workers}: Ray workers (--gpu starts them)")
        return
    devices = local_devices(settings)
    if len(devices) > 1:
        report.ok("workers", f"BOOTHBOT_WORKERS={settings.workers}: {len(devices)} local workers, one lane each "
                             f"({', '.join(devices)})")


async def check_worker(report: Report, settings: Settings) -> None:
    """Start every configured GPU worker side by side, load the model and run the self-test on each."""
    from bot.dispatch.workers import build_workers

    print(f"...   worker     starting the GPU worker{'s' if settings.workers != 'local' else ''} with "
          f"{settings.model} (the first start may download it)", file=report.out or sys.stdout, flush=True)
    try:
        workers = await build_workers(settings, retry_failed_start=False)  # a failed start is reported
    except SetupError as e:
        report.fail("worker", str(e), e)
        return
    if not workers:
        report.fail("worker", f"BOOTHBOT_WORKERS={settings.workers} found no GPU worker to start")
        return
    try:
        for worker in workers:
            await worker.start()
        outcomes = await asyncio.gather(*(_check_one_worker(worker) for worker in workers))
    finally:
        await asyncio.gather(*(worker.stop() for worker in workers), return_exceptions=True)
    for number, (worker, findings) in enumerate(zip(workers, outcomes), start=1):
        which = f"worker {number} of {len(workers)} ({worker.label}): " if len(workers) > 1 else ""
        for status, text, detail in findings:
            if status == "ok":
                report.ok("worker", which + text)
            else:
                report.fail("worker", which + text, detail)


async def _check_one_worker(worker) -> list[tuple[str, str, str | None]]:
    """(status, text, detail) findings of one worker: did it load the model, did its self-test run."""
    try:
        ready = await asyncio.wait_for(worker.wait_first_start(), WORKER_START_TIMEOUT_S)
    except TimeoutError:
        ready = None
    if ready is None:
        fatal = worker.last_fatal or {"error": "it exited before loading the model; see the log lines above"}
        return [("FAIL", f"the GPU worker could not start: {fatal['error']}", fatal.get("detail"))]
    findings = [("ok", f"base model loaded on {ready['device']} ({ready['dtype']}), pid {ready['pid']}", None)]
    end = await worker.run(0, "selftest", {"seconds": GPU_CHECK_S}, timeout_s=GPU_CHECK_S + 60)
    if end["event"] == "done":
        result = end["result"]
        speed = (f"{result['tflops']:.1f} TFLOP/s" if result["tflops"] >= 1 else
                 f"{result['tflops'] * 1000:.0f} GFLOP/s")
        findings.append(("ok", f"{result['seconds']:.1f} s of {result['size']}x{result['size']} matmuls on "
                               f"{result['device']}: {speed}", None))
    else:
        findings.append(("FAIL", f"the GPU self-test failed: {end.get('error')} {end.get('detail', '')}".strip(),
                         None))
    return findings
