"""boothbot: a Discord bot that shares one GPU for DreamBooth LoRA training and image generation.

  python -m bot                  run the bot (settings -> logging -> database -> GPU worker -> Discord)
  python -m bot run --no-discord run the job queue without connecting to Discord (finished jobs are only logged)
  python -m bot check [--gpu]    check settings, data directory, database, torch/GPU and the base model; no Discord

Settings come from the environment and .env; see .env.example for every key.
A setup problem (base model, data directory, database, network, Discord token) stops the bot with one plain line
and exit status 2; --debug (or BOOTHBOT_LOG_LEVEL=debug) adds its traceback.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from bot.errors import SetupError
from bot.settings import SettingsError, load_settings, setting_names
from trainer.contract.errors import print_setup_error

log = logging.getLogger("boothbot")
COMMANDS = ("run", "check")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__.splitlines()[0],
                                     epilog="settings: " + ", ".join(setting_names()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the bot (the default command)",
                         description="Run the bot: open the database, start the GPU worker, connect to Discord.")
    run.add_argument("--no-discord", action="store_true",
                     help="run the job queue without Discord (for trying the GPU setup): finished jobs are written "
                          "to the log and count as announced")
    check = sub.add_parser("check", help="check the setup without connecting to Discord",
                           description="Check settings, data directory, database, torch/GPU and the base model, "
                                       "print what was found, and exit non-zero if something would stop the bot.")
    check.add_argument("--gpu", action="store_true",
                       help="also start the GPU worker: loads the base model and runs a few seconds of GPU work")
    debug_help = {run: "log at debug level, with the traceback behind a setup problem",
                  check: "print the traceback behind each FAIL line"}
    for p in (run, check):
        p.add_argument("--env-file", default=".env", help="settings file read under the environment (default .env)")
        p.add_argument("--debug", action="store_true", help=debug_help[p] + " (as BOOTHBOT_LOG_LEVEL=debug does)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "check":
        from bot.check import run_check

        return run_check(env_file=args.env_file, gpu=args.gpu, debug=args.debug)
    try:
        settings = load_settings(env_file=args.env_file)
        if not args.no_discord:
            settings.require_token()
    except SettingsError as e:
        print_setup_error(e, prefix="boothbot cannot start: ", debug=args.debug)
        return 2
    from bot.logs import setup_logging

    setup_logging("DEBUG" if args.debug else settings.log_level, secrets=[settings.discord_token])
    try:
        return asyncio.run(serve(settings, discord=not args.no_discord))
    except SetupError as error:
        log.debug("the traceback behind the error below:", exc_info=error)  # through the log: the token stays hidden
        print(f"boothbot cannot start: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


async def serve(settings, *, discord: bool) -> int:
    from bot.app import start_services
    from bot.dispatch.announcer import LogNotifier
    from trainer.models.loading import require_model

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("starting: data directory %s, base model %s", settings.data_dir.resolve(), settings.model)
    require_model(settings.model)  # a wrong BOOTHBOT_MODEL stops the start here, not later in the GPU worker
    services = await start_services(settings)
    worker_start = asyncio.create_task(_stop_unless_worker_starts(services.workers, stop), name="worker-start")
    try:
        if discord:
            code = await _run_discord_until(stop, settings, services)
        else:
            services.set_notifier(LogNotifier(services.ledger))
            log.info("running without Discord; stop with Ctrl-C")
            await stop.wait()
            code = 0
        if worker_start.done() and worker_start.result() is not None:
            raise worker_start.result()
        return code
    finally:
        worker_start.cancel()
        log.info("shutting down")
        await services.stop()


async def _stop_unless_worker_starts(workers, stop: asyncio.Event) -> SetupError | None:
    """Stop the bot when no GPU worker can load the base model: no job could ever run. With several workers the bot
    serves as soon as one is ready (bot/dispatch/workers.py); those that fail keep being retried, with the error in
    the log, and so do later restarts after a crash."""
    from bot.dispatch.workers import first_ready

    error = await first_ready(workers)
    if error is not None:
        stop.set()
    return error


async def _run_discord_until(stop: asyncio.Event, settings, services) -> int:
    import aiohttp
    import discord

    from bot.client import run_discord

    client_task = asyncio.create_task(run_discord(settings, services), name="discord")
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({client_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    if not client_task.done():
        client_task.cancel()
    try:
        await client_task
    except asyncio.CancelledError:
        return 0
    except discord.LoginFailure as e:
        raise SetupError("Discord refused DISCORD_TOKEN (401 Unauthorized): reset the token in the developer portal "
                         "(https://discord.com/developers/applications -> your app -> Bot -> Reset Token) and put "
                         "the new one in .env as DISCORD_TOKEN=...") from e
    except discord.PrivilegedIntentsRequired as e:
        raise SetupError("Discord refused a privileged intent this bot asked for; enable it under Bot -> "
                         "Privileged Gateway Intents in the developer portal") from e
    except aiohttp.ClientConnectorError as e:
        refused = isinstance(getattr(e, "os_error", None), ConnectionRefusedError)
        reason = "connection refused" if refused else e.strerror or str(e)
        raise SetupError(f"cannot reach Discord at {e.host}:{e.port} ({reason}): check this machine's internet "
                         "connection, firewall or proxy, then start the bot again") from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
