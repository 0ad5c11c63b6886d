"""BOOTHBOT_ADMIN_ROLE resolved to one role id per server, once, with a log line saying what it became."""
from __future__ import annotations

import logging
from types import SimpleNamespace

from bot.admin_roles import AdminRoles, resolve_role

ROLES = [(10, "@everyone"), (11, "Booth Admin"), (12, "mods"), (13, "MODS")]


def guild(roles, guild_id=555):
    return SimpleNamespace(id=guild_id, name="Test Server", roles=[SimpleNamespace(id=i, name=n) for i, n in roles])


def member(*role_ids):
    return SimpleNamespace(roles=[SimpleNamespace(id=i) for i in role_ids])


def test_an_id_or_one_name_resolves_ambiguous_or_missing_names_do_not():
    assert resolve_role("11", ROLES)[0] == 11
    assert resolve_role("booth admin", ROLES)[0] == 11
    role_id, why = resolve_role("Mods", ROLES)
    assert role_id is None and "ambiguous" in why and "12, 13" in why and "id of the right one" in why
    role_id, why = resolve_role("Moderators", ROLES)
    assert role_id is None and "not found" in why and "Manage Server" in why


def test_the_name_is_resolved_once_and_logged_later_renames_change_nothing(caplog):
    admin_roles = AdminRoles("Booth Admin")
    server = guild(ROLES)
    with caplog.at_level(logging.INFO, logger="boothbot"):
        assert admin_roles.role_id(server) == 11
    assert "admin role 'Booth Admin' is role id 11 in server Test Server (555)" in caplog.text
    server.roles[2].name = "booth admin"  # someone renames "mods" to the admin role's name
    assert admin_roles.has_role(server, member(11)) and not admin_roles.has_role(server, member(12))


def test_an_ambiguous_name_is_logged_and_makes_no_one_admin(caplog):
    admin_roles = AdminRoles("mods")
    with caplog.at_level(logging.WARNING, logger="boothbot"):
        assert not admin_roles.has_role(guild(ROLES), member(12, 13))
    assert "ambiguous: 2 roles are named 'mods'" in caplog.text
