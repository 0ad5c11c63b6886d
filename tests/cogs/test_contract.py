"""Contract tier: every slash command's payload (what tree.sync() PUTs) against Discord's OpenAPI description and the
documented limits the schema leaves out (name regex, lower case, 8,000 characters per command, option order)."""
from __future__ import annotations

import asyncio
import json
import types
from pathlib import Path

import discord
import jsonschema
import pytest
import regex
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from bot.client import BoothBot, cog_extensions
from bot.settings import Settings
from cogs.help import help_embed
from trainer.contract import imagine_request
from trainer.contract.aspects import aspect_sizes
from trainer.contract.families import SDXL
from trainer.contract.naming import CLASS_MAX_LENGTH, TOKEN_LENGTH
from trainer.contract.prompts import MAX_PROMPT_CHARS
from trainer.contract.train_spec import MEMBER_OPTIONS

REPO_ROOT = Path(__file__).resolve().parents[2]
OPENAPI = REPO_ROOT / "tests" / "vendor" / "discord" / "openapi.json"  # see the README beside it
# From Discord's docs (the OpenAPI file has no pattern for names).
NAME_RE = regex.compile(r"^[-_'\p{L}\p{N}\p{sc=Deva}\p{sc=Thai}]{1,32}$")
MAX_TOTAL_CHARS = 8000
SUBCOMMAND, GROUP, ATTACHMENT = 1, 2, 11
EXPECTED = {"train", "imagine", "queue", "concepts", "forget", "help"}


@pytest.fixture(scope="module")
def openapi() -> dict:
    if not OPENAPI.is_file():
        pytest.fail(f"Discord's OpenAPI description is missing: expected {OPENAPI} "
                    "(vendored from discord/discord-api-spec; see tests/vendor/discord/README.md)")
    return json.loads(OPENAPI.read_text(encoding="utf-8"))


def validator(openapi: dict, schema_name: str) -> jsonschema.protocols.Validator:
    resource = Resource.from_contents(openapi, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:discord-openapi", resource)
    schema = {"$ref": f"urn:discord-openapi#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


async def _load_the_cogs() -> tuple[list[dict], discord.Embed]:
    services = types.SimpleNamespace(set_notifier=lambda notifier: None, settings=Settings())
    bot = BoothBot(Settings(), services)
    for name in cog_extensions():  # what setup_hook loads
        await bot.load_extension(name)
    try:
        commands = bot.tree.get_commands()
        return [command.to_dict(bot.tree) for command in commands], help_embed(Settings(), commands)
    finally:
        for name in cog_extensions():
            await bot.unload_extension(name)


@pytest.fixture(scope="module")
def loaded() -> tuple[list[dict], discord.Embed]:
    """The commands exactly as the bot would sync them (its extensions loaded by name, as at start), and /help."""
    return asyncio.run(_load_the_cogs())


@pytest.fixture(scope="module")
def payloads(loaded) -> list[dict]:
    return loaded[0]


def walk_options(options: list[dict]):
    for option in options or []:
        yield option
        yield from walk_options(option.get("options") or [])


def total_chars(command: dict) -> int:
    """Discord's count: name, description and value of the command, its options (all levels) and choices."""
    total = len(command["name"]) + len(command.get("description") or "")
    for option in walk_options(command.get("options") or []):
        total += len(option["name"]) + len(option.get("description") or "")
        for choice in option.get("choices") or []:
            total += len(choice["name"]) + len(str(choice["value"]))
    return total


async def test_every_expected_command_is_there(payloads):
    assert {p["name"] for p in payloads} == EXPECTED


def test_the_cogs_loaded_are_the_modules_in_cogs():
    present = {path.stem for path in (REPO_ROOT / "cogs").glob("*.py") if not path.stem.startswith("_")}
    assert set(cog_extensions()) == {f"cogs.{name}" for name in present}
    assert {"cogs.train", "cogs.delivery", "cogs.help"} <= set(cog_extensions())
    assert not any(name.startswith("cogs._") for name in cog_extensions())  # _views, _render, _progress: helpers


async def test_help_lists_every_command_with_its_options(payloads, loaded):
    embed = loaded[1].to_dict()
    text = embed["description"] + "\n".join(f"{f['name']}\n{f['value']}" for f in embed["fields"])
    assert "/train token:squidarth class:man" in text and "/imagine" in text
    for payload in payloads:
        leaves = [o for o in walk_options(payload.get("options") or []) if o["type"] == SUBCOMMAND]
        if not leaves:
            leaves = [payload]
        for leaf in leaves:
            path = _qualified_name(payload, leaf)
            assert f"`/{path}" in text, f"/help does not mention /{path}"
            assert leaf["description"] in text
    imagine = next(line for line in text.splitlines() if line.startswith("`/imagine"))
    assert imagine.startswith("`/imagine prompt [negative] [seed] [steps] [cfg] [size] [count]`")
    # Discord's embed limits: 25 fields, 256 per field name, 1024 per value, 6000 in all.
    assert len(embed["fields"]) <= 25
    assert all(len(f["name"]) <= 256 and len(f["value"]) <= 1024 for f in embed["fields"])
    assert len(embed["title"]) + len(text) <= 6000


def _qualified_name(payload: dict, leaf: dict) -> str:
    if leaf is payload:
        return payload["name"]
    for option in payload.get("options") or []:
        if option is leaf:
            return f"{payload['name']} {leaf['name']}"
        if option["type"] == GROUP and leaf in (option.get("options") or []):
            return f"{payload['name']} {option['name']} {leaf['name']}"
    raise AssertionError(leaf)


@pytest.mark.parametrize("schema_name", ["ApplicationCommandCreateRequest", "ApplicationCommandUpdateRequest"])
async def test_payloads_match_the_openapi_schema(payloads, openapi, schema_name):
    check = validator(openapi, schema_name)
    for payload in payloads:
        errors = sorted(check.iter_errors(payload), key=lambda e: list(e.path))
        assert not errors, f"/{payload['name']}: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message[:300]}" for e in errors[:5])


async def test_names_descriptions_and_sizes_follow_discords_rules(payloads):
    for payload in payloads:
        items = [payload, *walk_options(payload.get("options") or [])]
        for item in items:
            name = item["name"]
            assert NAME_RE.match(name) and name == name.lower(), f"bad name {name!r} in /{payload['name']}"
            assert 1 <= len(item.get("description") or "") <= 100, f"description of {name!r} must be 1-100 chars"
            options = item.get("options") or []
            assert len(options) <= 25, f"{name!r} has {len(options)} options; Discord allows 25"
            required = [o.get("required", False) for o in options if o["type"] not in (SUBCOMMAND, GROUP)]
            assert required == sorted(required, reverse=True), f"{name!r}: required options must come first"
            for option in options:
                assert len(option.get("choices") or []) <= 25
                for choice in option.get("choices") or []:
                    assert 1 <= len(choice["name"]) <= 100
        assert total_chars(payload) <= MAX_TOTAL_CHARS, f"/{payload['name']} is over 8,000 characters"
        assert payload.get("contexts") == [0], f"/{payload['name']} must be usable in servers only"


async def test_train_takes_at_least_ten_photos_and_a_zip(payloads):
    train = next(p for p in payloads if p["name"] == "train")
    attachments = [o["name"] for o in train["options"] if o["type"] == ATTACHMENT]
    assert len(attachments) >= 11 and "zip" in attachments
    names = [o["name"] for o in train["options"]]
    assert names[:2] == ["token", "class"] and {"steps", "style"} <= set(names)


async def test_imagine_ranges_are_enforced_by_discord_too(payloads):
    imagine = next(p for p in payloads if p["name"] == "imagine")
    options = {o["name"]: o for o in imagine["options"]}
    assert (options["steps"]["min_value"], options["steps"]["max_value"]) == (1, 100)
    assert (options["cfg"]["min_value"], options["cfg"]["max_value"]) == (1.0, 20.0)
    assert (options["count"]["min_value"], options["count"]["max_value"]) == (1, 4)
    assert options["seed"]["min_value"] == 0
    assert [c["value"] for c in options["size"]["choices"]] == ["square", "portrait", "landscape", "tall", "wide",
                                                                "very_tall", "very_wide"]
    assert options["prompt"]["required"] and options["prompt"]["max_length"] <= 6000


async def test_option_ranges_are_the_engine_contracts(payloads):
    imagine = {o["name"]: o for o in next(p for p in payloads if p["name"] == "imagine")["options"]}
    assert (imagine["steps"]["min_value"], imagine["steps"]["max_value"]) == imagine_request.STEPS_RANGE
    assert (imagine["cfg"]["min_value"], imagine["cfg"]["max_value"]) == imagine_request.CFG_RANGE
    assert (imagine["count"]["min_value"], imagine["count"]["max_value"]) == imagine_request.COUNT_RANGE
    assert imagine["seed"]["max_value"] == imagine_request.SEED_MAX
    assert imagine["prompt"]["max_length"] == imagine["negative"]["max_length"] == imagine_request.MEMBER_PROMPT_CHARS
    assert imagine_request.MEMBER_PROMPT_CHARS <= MAX_PROMPT_CHARS
    # Shape names, whose pixels follow the model family (trainer/contract/aspects.py); the SDXL family names them all.
    assert {c["value"]: c["name"] for c in imagine["size"]["choices"]} == {
        name: name.replace("_", " ") for name in aspect_sizes(SDXL)}
    train = {o["name"]: o for o in next(p for p in payloads if p["name"] == "train")["options"]}
    steps = MEMBER_OPTIONS["steps"]
    assert (train["steps"]["min_value"], train["steps"]["max_value"]) == (steps.for_members.low,
                                                                          steps.for_members.high) == (1, 3000)
    assert steps.for_members.high <= steps.range.high  # members pick within what the engine accepts
    assert (train["token"]["min_length"], train["token"]["max_length"]) == TOKEN_LENGTH
    assert train["class"]["max_length"] == CLASS_MAX_LENGTH
    assert {name for name in MEMBER_OPTIONS} <= set(train)  # every option members may set is a /train option


async def test_concept_options_autocomplete(payloads):
    concepts = next(p for p in payloads if p["name"] == "concepts")
    subcommands = {o["name"]: o for o in concepts["options"]}
    assert set(subcommands) == {"list", "info", "share", "unshare", "delete", "export", "release"}
    for name in ("info", "share", "unshare", "delete", "export", "release"):
        assert subcommands[name]["options"][0]["autocomplete"] is True


async def test_queue_has_member_and_admin_subcommands(payloads):
    queue = next(p for p in payloads if p["name"] == "queue")
    top = {o["name"]: o for o in queue["options"]}
    assert {"show", "cancel", "admin"} <= set(top)
    admin = {o["name"] for o in top["admin"]["options"]}
    assert {"list", "pause", "resume", "cancel", "bump", "clear", "limits", "ban", "unban", "workers"} <= admin
