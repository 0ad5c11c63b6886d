"""BOOTHBOT_ADMIN_ROLE, resolved to one role id per server: admins are matched by role id only.

The setting may be a role id or, for convenience, a role name. A name is looked up once per server, when the bot
first sees it (at start), and the id it found is used from then on and logged; renaming another role to that name
later gives nobody admin rights. A name that matches no role, or several, is logged and gives no role admin rights
on that server (Manage Server still does).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger("boothbot")


def resolve_role(setting: str, roles: Iterable[tuple[int, str]]) -> tuple[int | None, str]:
    """(role id or None, why) for the setting among a server's (id, name) roles: an id wins, else one exact name
    (ignoring case)."""
    roles = list(roles)
    if setting.isdigit() and any(role_id == int(setting) for role_id, _ in roles):
        return int(setting), f"role id {setting}"
    named = [role_id for role_id, name in roles if name.casefold() == setting.casefold()]
    if len(named) == 1:
        return named[0], f"role id {named[0]}"
    if named:
        return None, (f"ambiguous: {len(named)} roles are named {setting!r} (ids {', '.join(map(str, named))}), so "
                      "none of them is used; set BOOTHBOT_ADMIN_ROLE to the id of the right one")
    return None, (f"not found: no role has the id or name {setting!r}, so only members with Manage Server are admins "
                  "there")


class AdminRoles:
    def __init__(self, setting: str | None):
        self.setting = setting
        self._by_guild: dict[int, int | None] = {}

    def role_id(self, guild) -> int | None:
        """The admin role's id in this server (a discord.Guild), resolved the first time the server is seen."""
        if not self.setting or guild is None:
            return None
        if guild.id not in self._by_guild:
            role_id, why = resolve_role(self.setting, ((role.id, role.name) for role in guild.roles))
            self._by_guild[guild.id] = role_id
            if role_id is None:
                log.warning("admin role %r in server %s (%s): %s", self.setting, guild.name, guild.id, why)
            else:
                log.info("admin role %r is role id %s in server %s (%s)", self.setting, role_id, guild.name, guild.id)
        return self._by_guild[guild.id]

    def has_role(self, guild, member) -> bool:
        role_id = self.role_id(guild)
        return role_id is not None and any(role.id == role_id for role in getattr(member, "roles", ()))
