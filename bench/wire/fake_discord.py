"""A small fake Discord on 127.0.0.1: REST API, gateway websocket and attachment CDN in one aiohttp app.

Enough of Discord for discord.py's own login, gateway handshake, command sync, interaction dispatch, interaction
callbacks, webhook follow-ups and channel messages (JSON and multipart) to run unchanged. Everything the bot sends is
recorded in `requests`; channel messages live in `messages`, follow-ups in `followups`.

Like Discord, a message created with a `nonce` and `enforce_nonce` (discord.py sends both on every send) is created
once: the same nonce from the same author in the same channel within `nonce_window_s` answers with the existing
message (counted in `nonce_repeats`). DMs: POST /users/@me/channels opens one channel per user; its messages are in
`messages` too (`dm_messages(member)`), while `channel_messages()` lists the server channel's.

Knobs for tests: `rate_limit_once(method, path_re)` answers the next matching request with a 429 (retry_after);
`fail_next(method, path_re, status, times)` answers the next `times` matching requests with that error (403 Missing
Access, 404 Unknown Channel, 5xx) without doing anything; `hold(method, path_re)` keeps the next matching request
waiting until `release(create=...)`: created, the message exists although the bot, killed meanwhile, never saw the
answer; not created, Discord never got it. `expire_interaction_tokens()` makes every interaction token issued so far
behave as one older than 15 minutes. Rules may also `match` on the Recorded request (its JSON body).
`delay_answers(method, path_re, before_s=, after_s=)` holds matching requests (e.g. channel-message POSTs) so that a
kill -9 of the bot can land while one is in flight: a request whose sender went away during `before_s` is dropped
unhandled (recorded in `abandoned`), as one that never reached Discord; `after_s` holds the answer after handling it.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
TOKEN_LIFETIME_S = 15 * 60
MANAGE_GUILD = 1 << 5
MEMBER_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 15) | (1 << 16) | (1 << 31)  # view, send, attach, history, app cmds
API_PREFIX = "/api/v10"
NONCE_WINDOW_S = 5 * 60  # Discord: a repeated enforced nonce is caught "in the past few minutes"
ERRORS = {  # what Discord answers, per status
    403: {"message": "Missing Access", "code": 50001},
    404: {"message": "Unknown Channel", "code": 10003},
    500: {"message": "500: Internal Server Error", "code": 0},
    502: {"message": "502: Bad Gateway", "code": 0},
    503: {"message": "503: Service Unavailable", "code": 0},
}


def snowflake(counter=itertools.count(1)) -> int:
    return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(counter) & 0x3FFFFF)


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    # discord.py parses a body only when Content-Type is exactly application/json (no charset suffix).
    return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json",
                                                                                **(headers or {})})


@dataclass
class FakeMember:
    id: int
    name: str
    role_ids: tuple[int, ...] = ()
    permissions: int = MEMBER_PERMISSIONS

    def user_payload(self) -> dict:
        return {"id": str(self.id), "username": self.name, "discriminator": "0", "global_name": self.name,
                "avatar": None, "bot": False}

    def member_payload(self) -> dict:
        return {"user": self.user_payload(), "roles": [str(r) for r in self.role_ids], "joined_at": iso_now(),
                "deaf": False, "mute": False, "flags": 0, "nick": None, "pending": False,
                "permissions": str(self.permissions)}


@dataclass
class Recorded:
    method: str
    path: str
    json: Any = None
    files: list[tuple[str, bytes]] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)


@dataclass
class SentInteraction:
    """One INTERACTION_CREATE the fake dispatched, and what the bot answered to it."""
    id: int
    token: str
    payload: dict
    callbacks: list[dict] = field(default_factory=list)        # interaction callback bodies (type + data)
    original: dict | None = None                               # the original response message, as last edited
    followups: list[dict] = field(default_factory=list)        # follow-up messages, as last edited

    @property
    def ephemeral(self) -> bool:
        """Whether everything the member was told with text was ephemeral (flag 64)."""
        told = [m for m in self.replies if message_text(m)]
        return bool(told) and all((m.get("flags") or 0) & 64 for m in told)

    @property
    def replies(self) -> list[dict]:
        """Every message body the member saw for this interaction: callback data, original, follow-ups."""
        out = [c.get("data") or {} for c in self.callbacks if c.get("type") in (4, 7)]
        if self.original is not None:
            out.append(self.original)
        return out + self.followups

    def text(self) -> str:
        """All the text (content + embeds) the member saw, for assertions."""
        return "\n".join(message_text(m) for m in self.replies)


Match = Callable[[Recorded], bool]


@dataclass
class Failure:
    method: str
    path: re.Pattern
    status: int
    times: int
    match: Match | None = None


@dataclass
class Hold:
    """A request kept waiting: `arrived` is set when it comes; `release(create=)` lets it go on (or drops it)."""
    method: str
    path: re.Pattern
    match: Match | None = None
    request: Recorded | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    create: bool = True

    def release(self, *, create: bool = True) -> None:
        self.create = create
        self._released.set()


def _matches(rule, method: str, path: str, record: Recorded) -> bool:
    return rule.method == method and bool(rule.path.search(path)) and (rule.match is None or rule.match(record))


def message_text(message: dict) -> str:
    parts = [message.get("content") or ""]
    for embed in message.get("embeds") or []:
        parts += [embed.get("title") or "", embed.get("description") or ""]
        parts += [f"{f.get('name')}: {f.get('value')}" for f in embed.get("fields") or []]
        if embed.get("footer"):
            parts.append(embed["footer"].get("text") or "")
    return "\n".join(p for p in parts if p)


class FakeDiscord:
    def __init__(self) -> None:
        self.app_id = snowflake()
        self.bot_user = {"id": str(snowflake()), "username": "boothbot", "discriminator": "0", "global_name": None,
                         "avatar": None, "bot": True, "flags": 0, "verified": True, "mfa_enabled": False}
        self.guild_id = snowflake()
        self.channel_id = snowflake()
        self.owner = FakeMember(snowflake(), "guildowner", permissions=0xFFFFFFFFFFFF)
        self.admin_role_id = snowflake()
        self.roles = [
            {"id": str(self.guild_id), "name": "@everyone", "permissions": str(MEMBER_PERMISSIONS)},
            {"id": str(self.admin_role_id), "name": "Booth Admin", "permissions": str(MEMBER_PERMISSIONS)},
        ]
        self.requests: list[Recorded] = []
        self.messages: dict[int, dict] = {}                # channel message id -> message payload (latest edit)
        self.deleted_messages: set[int] = set()
        self.interactions: dict[str, SentInteraction] = {}  # token -> interaction
        self.commands: dict[str, list[dict]] = {}          # "global" | guild id -> last PUT body
        self.cdn: dict[str, tuple[bytes, str]] = {}        # path -> (bytes, content type)
        self.cdn_downloads: list[str] = []                 # paths the bot fetched from the CDN
        self.expired_tokens: set[str] = set()
        self._rate_limits: list[tuple[str, re.Pattern, float]] = []
        self._failures: list[Failure] = []
        self._holds: list[Hold] = []
        self.failed: list[Recorded] = []                   # requests answered by a fail_next rule
        self.nonce_window_s = NONCE_WINDOW_S
        self._nonces: dict[tuple[int, int, str], tuple[int, float]] = {}  # (author, channel, nonce) -> message, time
        self.nonce_repeats: list[str] = []                 # nonces answered with the message they created
        self.dm_channels: dict[int, int] = {}              # user id -> DM channel id
        self.known_users: dict[int, FakeMember] = {}
        self.rate_limited: list[Recorded] = []
        self._delays: list[tuple[str, re.Pattern, float, float]] = []
        self.abandoned: list[Recorded] = []
        self._ws: list[web.WebSocketResponse] = []
        self._seq = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # ----- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway-ws", self._gateway)
        app.router.add_get("/attachments/{rest:.*}", self._cdn)
        app.router.add_route("*", API_PREFIX + "/{rest:.*}", self._api)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    @property
    def api_base(self) -> str:
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/gateway-ws"

    async def close(self) -> None:
        for ws in list(self._ws):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ----- test knobs --------------------------------------------------------------------------------------------
    def member(self, name: str, *, admin_role: bool = False, manage_guild: bool = False) -> FakeMember:
        perms = MEMBER_PERMISSIONS | (MANAGE_GUILD if manage_guild else 0)
        roles = (self.admin_role_id,) if admin_role else ()
        member = FakeMember(snowflake(), name, roles, perms)
        self.known_users[member.id] = member
        return member

    def rate_limit_once(self, method: str, path_pattern: str, retry_after: float = 0.3) -> None:
        self._rate_limits.append((method.upper(), re.compile(path_pattern), retry_after))

    def fail_next(self, method: str, path_pattern: str, status: int, times: int = 1, *,
                  match: Match | None = None) -> None:
        """Answer the next `times` matching requests with `status` (ERRORS), changing nothing."""
        self._failures.append(Failure(method.upper(), re.compile(path_pattern), status, times, match))

    def clear_failures(self) -> None:
        """Forget every fail_next rule not used up yet."""
        self._failures.clear()

    def hold(self, method: str, path_pattern: str, *, match: Match | None = None) -> Hold:
        """Keep the next matching request waiting until the returned Hold is released."""
        held = Hold(method.upper(), re.compile(path_pattern), match)
        self._holds.append(held)
        return held

    @property
    def channel_messages_path(self) -> str:
        """The path pattern of posts in the server channel (for fail_next / hold)."""
        return rf"^/channels/{self.channel_id}/messages$"

    def dm_messages(self, member: FakeMember, containing: str = "") -> list[dict]:
        channel_id = self.dm_channels.get(member.id)
        return [m for m in self.messages.values()
                if channel_id is not None and int(m["channel_id"]) == channel_id and containing in message_text(m)]

    def delay_answers(self, method: str, path_pattern: str, *, before_s: float = 0.0, after_s: float = 0.0) -> None:
        """From now on, hold every matching request `before_s` before handling it and `after_s` before answering."""
        self._delays.append((method.upper(), re.compile(path_pattern), before_s, after_s))

    def expire_interaction_tokens(self) -> None:
        self.expired_tokens.update(self.interactions)

    def add_attachment(self, filename: str, data: bytes, content_type: str = "image/png") -> dict:
        attachment_id = snowflake()
        path = f"/attachments/{self.channel_id}/{attachment_id}/{filename}"
        self.cdn[path] = (data, content_type)
        return {"id": str(attachment_id), "filename": filename, "size": len(data), "content_type": content_type,
                "url": self.base_url + path, "proxy_url": self.base_url + path, "ephemeral": True}

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
        """Wait until predicate() is truthy (re-checked whenever the bot sends anything); return its value."""
        async def check():
            async with self._changed:
                while not (value := predicate()):
                    await self._changed.wait()
                return value
        try:
            return await asyncio.wait_for(check(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"fake Discord: timed out after {timeout}s waiting for {what}") from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def channel_messages(self, containing: str = "") -> list[dict]:
        """The server channel's messages (not deleted) whose text contains `containing`."""
        return [m for mid, m in self.messages.items()
                if mid not in self.deleted_messages and int(m["channel_id"]) == self.channel_id
                and containing in message_text(m)]

    # ----- interactions ------------------------------------------------------------------------------------------
    def _base_interaction(self, type_: int, member: FakeMember, data: dict, *, in_dm: bool = False,
                          upload_limit: int = 10 * 1024 * 1024) -> dict:
        interaction_id = snowflake()
        token = f"itoken-{interaction_id}"
        payload = {
            "id": str(interaction_id), "application_id": str(self.app_id), "type": type_, "data": data,
            "token": token, "version": 1, "locale": "en-US", "entitlements": [],
            "app_permissions": str(MEMBER_PERMISSIONS | (1 << 14)), "attachment_size_limit": upload_limit,
            "authorizing_integration_owners": {"0": str(self.guild_id)},
        }
        if in_dm:
            payload.update(user=member.user_payload(), context=1,
                           channel={"id": str(snowflake()), "type": 1, "recipients": [member.user_payload()]})
            payload["channel_id"] = payload["channel"]["id"]
        else:
            payload.update(guild_id=str(self.guild_id), guild_locale="en-US", channel_id=str(self.channel_id),
                           member=member.member_payload(), context=0,
                           guild={"id": str(self.guild_id), "locale": "en-US", "features": []},
                           channel=self._channel_payload())
        self.interactions[token] = SentInteraction(interaction_id, token, payload)
        return payload

    async def command(self, member: FakeMember, name: str, options: list[dict] | None = None, *,
                      subcommand: list[str] = (), attachments: list[dict] = (), in_dm: bool = False,
                      upload_limit: int = 10 * 1024 * 1024) -> SentInteraction:
        """Dispatch a slash command. `subcommand` is the path below `name`, e.g. ["admin", "pause"].
        An option whose value is a FakeMember becomes a user option with its resolved user and member."""
        resolved: dict = {}
        opts = []
        for option in options or []:
            value = option.get("value")
            if isinstance(value, FakeMember):
                resolved.setdefault("users", {})[str(value.id)] = value.user_payload()
                resolved_member = value.member_payload()
                resolved_member.pop("user")
                resolved.setdefault("members", {})[str(value.id)] = resolved_member
                option = {**option, "type": 6, "value": str(value.id)}
            opts.append(option)
        for depth in reversed(range(len(subcommand))):
            kind = 1 if depth == len(subcommand) - 1 else 2  # the last is the subcommand, the others groups
            opts = [{"type": kind, "name": subcommand[depth], "options": opts}]
        data: dict = {"id": str(snowflake()), "name": name, "type": 1, "options": opts}
        if attachments:
            resolved["attachments"] = {a["id"]: a for a in attachments}
        if resolved:
            data["resolved"] = resolved
        payload = self._base_interaction(2, member, data, in_dm=in_dm, upload_limit=upload_limit)
        await self.dispatch("INTERACTION_CREATE", payload)
        return self.interactions[payload["token"]]

    async def autocomplete(self, member: FakeMember, name: str, options: list[dict], *,
                           subcommand: list[str] = ()) -> SentInteraction:
        """Dispatch an autocomplete request; one option must carry "focused": True."""
        opts = options
        for depth in reversed(range(len(subcommand))):
            kind = 1 if depth == len(subcommand) - 1 else 2
            opts = [{"type": kind, "name": subcommand[depth], "options": opts}]
        data = {"id": str(snowflake()), "name": name, "type": 1, "options": opts}
        payload = self._base_interaction(4, member, data)
        await self.dispatch("INTERACTION_CREATE", payload)
        return self.interactions[payload["token"]]

    async def click(self, member: FakeMember, message: dict, custom_id: str) -> SentInteraction:
        """Press a button on a message (channel message or interaction reply)."""
        data = {"custom_id": custom_id, "component_type": 2}
        payload = self._base_interaction(3, member, data)
        payload["message"] = message
        await self.dispatch("INTERACTION_CREATE", payload)
        return self.interactions[payload["token"]]

    async def dispatch(self, event: str, data: dict) -> None:
        if not self._ws:
            raise AssertionError("fake Discord: no gateway connection to dispatch to")
        for ws in self._ws:
            await self._send(ws, {"op": 0, "t": event, "d": data})

    # ----- gateway -----------------------------------------------------------------------------------------------
    async def _send(self, ws: web.WebSocketResponse, payload: dict) -> None:
        if payload.get("op") == 0:
            self._seq += 1
            payload["s"] = self._seq
        await ws.send_str(json.dumps(payload))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await self._send(ws, {"op": 10, "d": {"heartbeat_interval": 41250}})
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                if frame["op"] == 1:
                    await ws.send_str(json.dumps({"op": 11}))
                elif frame["op"] in (2, 6):  # IDENTIFY, or RESUME (answered as a fresh session)
                    await self._send(ws, {"op": 0, "t": "READY", "d": {
                        "v": 10, "user": self.bot_user, "guilds": [{"id": str(self.guild_id), "unavailable": True}],
                        "session_id": f"session-{snowflake()}", "resume_gateway_url": self.gateway_url,
                        "application": {"id": str(self.app_id), "flags": 0}, "private_channels": [],
                        "relationships": [], "presences": [], "shard": [0, 1]}})
                    await self._send(ws, {"op": 0, "t": "GUILD_CREATE", "d": self._guild_payload()})
                    self._ws.append(ws)
                    await self._notify()
        finally:
            if ws in self._ws:
                self._ws.remove(ws)
        return ws

    async def wait_connected(self, timeout: float = 30.0) -> None:
        await self.wait_for(lambda: bool(self._ws), timeout, "the bot to connect to the gateway")

    def _channel_payload(self) -> dict:
        return {"id": str(self.channel_id), "type": 0, "guild_id": str(self.guild_id), "name": "booth",
                "position": 0, "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None,
                "last_message_id": None, "rate_limit_per_user": 0}

    def _guild_payload(self) -> dict:
        return {
            "id": str(self.guild_id), "name": "Booth Test Server", "icon": None, "splash": None,
            "discovery_splash": None, "owner_id": str(self.owner.id), "afk_channel_id": None, "afk_timeout": 300,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "roles": [{**r, "color": 0, "hoist": False, "position": i, "managed": False, "mentionable": False,
                       "flags": 0} for i, r in enumerate(self.roles)],
            "emojis": [], "stickers": [], "features": [], "mfa_level": 0, "system_channel_id": None,
            "system_channel_flags": 0, "rules_channel_id": None, "vanity_url_code": None, "description": None,
            "banner": None, "premium_tier": 0, "premium_subscription_count": 0, "preferred_locale": "en-US",
            "public_updates_channel_id": None, "nsfw_level": 0, "premium_progress_bar_enabled": False,
            "joined_at": iso_now(), "large": False, "unavailable": False, "member_count": 4,
            "voice_states": [], "members": [], "channels": [self._channel_payload()], "threads": [],
            "presences": [], "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
        }

    # ----- CDN ---------------------------------------------------------------------------------------------------
    async def _cdn(self, request: web.Request) -> web.Response:
        found = self.cdn.get(request.path)
        self.cdn_downloads.append(request.path)
        if found is None:
            return web.Response(status=404, text="Not Found")
        data, content_type = found
        return web.Response(body=data, content_type=content_type)

    # ----- REST --------------------------------------------------------------------------------------------------
    async def _read_body(self, request: web.Request) -> tuple[Any, list[tuple[str, bytes]]]:
        if request.content_type == "multipart/form-data":
            payload, files = None, []
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                data = await part.read()
                if part.name == "payload_json":
                    payload = json.loads(data)
                else:
                    files.append((part.filename or part.name, bytes(data)))
            return payload, files
        raw = await request.read()
        return (json.loads(raw) if raw else None), []

    async def _api(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["rest"]
        body, files = await self._read_body(request)
        record = Recorded(request.method, path, body, files)
        for i, (method, pattern, retry_after) in enumerate(self._rate_limits):
            if method == request.method and pattern.search(path):
                del self._rate_limits[i]
                self.rate_limited.append(record)
                return json_response({"message": "You are being rate limited.", "retry_after": retry_after,
                                      "global": False, "code": 0}, 429,
                                     {"Via": "1.1 google", "Retry-After": str(max(1, int(retry_after))),
                                      "X-RateLimit-Scope": "user"})
        for failure in self._failures:
            if _matches(failure, request.method, path, record):
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                self.failed.append(record)
                await self._notify()
                return json_response(ERRORS.get(failure.status, {"message": str(failure.status), "code": 0}),
                                     failure.status)
        self.requests.append(record)
        held = next((h for h in self._holds if _matches(h, request.method, path, record)), None)
        if held is not None:
            self._holds.remove(held)
            held.request = record
            held.arrived.set()
            await self._notify()
            await held._released.wait()
            if not held.create:
                return json_response(ERRORS[503], 503)
        before_s, after_s = next(((b, a) for method, pattern, b, a in self._delays
                                  if method == request.method and pattern.search(path)), (0.0, 0.0))
        try:
            if before_s or after_s:
                await self._notify()  # it has arrived: watchers may act while it is held
            if before_s:
                await asyncio.sleep(before_s)
                if request.transport is None or request.transport.is_closing():
                    self.abandoned.append(record)
                    return web.Response(status=499)
            response = await self._route(request.method, path, body, files, request)
            if after_s:
                await self._notify()
                await asyncio.sleep(after_s)
            return response
        finally:
            await self._notify()

    async def _route(self, method: str, path: str, body: Any, files: list, request: web.Request) -> web.Response:
        parts = path.strip("/").split("/")
        if path == "/users/@me":
            return json_response(self.bot_user)
        if path == "/oauth2/applications/@me":
            return json_response({"id": str(self.app_id), "name": "boothbot", "description": "", "icon": None,
                                  "bot_public": True, "bot_require_code_grant": False,
                                  "owner": self.owner.user_payload(),
                                  "verify_key": "0" * 64, "flags": 0, "summary": "", "team": None,
                                  "interactions_endpoint_url": None})
        if path in ("/gateway", "/gateway/bot"):
            return json_response({"url": self.gateway_url, "shards": 1,
                                  "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0,
                                                          "max_concurrency": 1}})
        if parts[0] == "applications" and parts[-1] == "commands" and method == "PUT":
            scope = parts[3] if len(parts) == 5 else "global"
            self.commands[scope] = body
            return json_response([{**c, "id": str(snowflake()), "application_id": str(self.app_id), "version": "1",
                                   **({"guild_id": scope} if scope != "global" else {})} for c in body])
        if parts[0] == "interactions" and parts[-1] == "callback":
            return self._callback(parts[2], body, files)
        if parts[0] == "webhooks":
            return self._webhook(method, parts, body, files, request)
        if parts[0] == "channels" and len(parts) >= 3 and parts[2] == "messages":
            return self._channel_message(method, int(parts[1]), parts[3:], body, files)
        if path == "/users/@me/channels" and method == "POST":
            return self._open_dm(int(body["recipient_id"]))
        return json_response({"message": f"fake Discord has no route {method} {path}", "code": 0}, 404)

    def _interaction(self, token: str) -> SentInteraction | None:
        return self.interactions.get(token)

    def _callback(self, token: str, body: dict, files: list) -> web.Response:
        interaction = self._interaction(token)
        if interaction is None or token in self.expired_tokens:
            return json_response({"message": "Unknown interaction", "code": 10062}, 404)
        if interaction.callbacks:
            return json_response({"message": "Interaction has already been acknowledged.", "code": 40060}, 400)
        interaction.callbacks.append(body)
        data = body.get("data") or {}
        response: dict = {"interaction": {"id": str(interaction.id), "type": interaction.payload["type"],
                                          "response_message_loading": body["type"] == 5,
                                          "response_message_ephemeral": bool((data.get("flags") or 0) & 64)}}
        if body["type"] in (4, 5):
            message = self._make_message(data, files, interaction_id=interaction.id)
            interaction.original = message
            response["interaction"]["response_message_id"] = message["id"]
            response["resource"] = {"type": body["type"], "message": message}
        elif body["type"] in (6, 7):  # (deferred) update of the message the component was on: it becomes @original
            message = dict(interaction.payload.get("message") or {})
            message.update({k: v for k, v in data.items() if k in ("content", "embeds", "components")})
            if int(message.get("id", 0)) in self.messages:
                self.messages[int(message["id"])] = message
            interaction.original = message
            response["interaction"]["response_message_id"] = message.get("id")
            if body["type"] == 7:
                response["resource"] = {"type": 7, "message": self._make_message(message, [], keep=message)}
        return json_response(response)

    def _webhook(self, method: str, parts: list[str], body: Any, files: list, request: web.Request) -> web.Response:
        token = parts[2]
        interaction = self._interaction(token)
        if interaction is None or token in self.expired_tokens:
            return json_response({"message": "Invalid Webhook Token", "code": 50027}, 401)
        if len(parts) == 3 and method == "POST":
            message = self._make_message(body or {}, files)
            interaction.followups.append(message)
            return json_response(message)
        if len(parts) == 5 and parts[3] == "messages":
            target = parts[4]
            if target == "@original" or (interaction.original and interaction.original["id"] == target):
                current = interaction.original
            else:
                current = next((m for m in interaction.followups if m["id"] == target), None)
            if current is None:
                return json_response({"message": "Unknown Message", "code": 10008}, 404)
            if method == "GET":
                return json_response(current)
            if method == "DELETE":
                current["deleted"] = True
                return web.Response(status=204)
            if method == "PATCH":
                current.update(self._make_message(body or {}, files, keep=current))
                return json_response(current)
        return json_response({"message": "fake Discord: unsupported webhook call", "code": 0}, 405)

    def _open_dm(self, user_id: int) -> web.Response:
        channel_id = self.dm_channels.setdefault(user_id, snowflake())
        known = self.known_users.get(user_id)
        user = known.user_payload() if known else {"id": str(user_id), "username": f"user{user_id}",
                                                   "discriminator": "0", "global_name": None, "avatar": None}
        return json_response({"id": str(channel_id), "type": 1, "last_message_id": None, "recipients": [user]})

    def _channel_message(self, method: str, channel_id: int, rest: list[str], body: Any, files: list) -> web.Response:
        if channel_id != self.channel_id and channel_id not in self.dm_channels.values():
            return json_response({"message": "Unknown Channel", "code": 10003}, 404)
        if not rest and method == "POST":
            body = body or {}
            key = (int(self.bot_user["id"]), channel_id, str(body.get("nonce")))
            if body.get("enforce_nonce") and body.get("nonce") is not None and key in self._nonces:
                message_id, at = self._nonces[key]
                if time.monotonic() - at <= self.nonce_window_s:
                    self.nonce_repeats.append(key[2])
                    return json_response(self.messages[message_id])
            message = self._make_message(body, files, channel_id=channel_id)
            self.messages[int(message["id"])] = message
            if body.get("enforce_nonce") and body.get("nonce") is not None:
                self._nonces[key] = (int(message["id"]), time.monotonic())
            return json_response(message)
        if len(rest) == 1:
            message_id = int(rest[0])
            current = self.messages.get(message_id)
            if current is None or message_id in self.deleted_messages:
                return json_response({"message": "Unknown Message", "code": 10008}, 404)
            if method == "GET":
                return json_response(current)
            if method == "DELETE":
                self.deleted_messages.add(message_id)
                return web.Response(status=204)
            if method == "PATCH":
                updated = self._make_message(body or {}, files, keep=current)
                self.messages[message_id] = updated
                return json_response(updated)
        return json_response({"message": "fake Discord: unsupported channel call", "code": 0}, 405)

    def _make_message(self, body: dict, files: list[tuple[str, bytes]], *, keep: dict | None = None,
                      interaction_id: int | None = None, channel_id: int | None = None) -> dict:
        """A full message payload from a create/edit body; uploaded files become CDN attachments."""
        channel_id = channel_id or self.channel_id
        message = dict(keep) if keep else {
            "id": str(snowflake()), "channel_id": str(channel_id),
            **({"guild_id": str(self.guild_id)} if channel_id == self.channel_id else {}),
            "author": self.bot_user, "content": "", "timestamp": iso_now(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": False, "type": 0 if interaction_id is None else 20, "flags": 0, "components": [],
            **({"nonce": str(body["nonce"])} if body.get("nonce") is not None else {}),
        }
        for key in ("content", "embeds", "components", "flags"):
            if key in body and body[key] is not None:
                message[key] = body[key]
        if keep is not None:
            message["edited_timestamp"] = iso_now()
        uploaded = []
        for index, (filename, data) in enumerate(files):
            path = f"/attachments/{self.channel_id}/{snowflake()}/{filename}"
            self.cdn[path] = (data, "application/octet-stream")
            uploaded.append({"id": str(snowflake()), "filename": filename, "size": len(data),
                             "url": self.base_url + path, "proxy_url": self.base_url + path})
        if "attachments" in body or files:
            # Kept attachments are listed by id in the body; new uploads are appended.
            kept_ids = {str(a.get("id")) for a in body.get("attachments") or [] if "id" in a}
            old = [a for a in message.get("attachments", []) if a["id"] in kept_ids]
            message["attachments"] = old + uploaded
        return message

    def file_bytes(self, message: dict) -> dict[str, bytes]:
        """The files attached to a message, by file name (read back from the fake CDN)."""
        out = {}
        for attachment in message.get("attachments") or []:
            path = attachment["url"][len(self.base_url):]
            out[attachment["filename"]] = self.cdn[path][0]
        return out
