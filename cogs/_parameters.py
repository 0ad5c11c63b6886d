"""The ℹ️ Parameters button's text: the result's A1111 parameters, minus other members' private LoRAs.

The text names each LoRA a job used (`<lora:token:weight>` in the prompt, `Lora hashes: "token: hash, ..."`). The
job's owner sees all of it (they could use every one of those concepts). Anyone else sees a LoRA's name and hash only
for a concept that is shared on the server now, or their own; every other one reads "a private concept".
"""
from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable

PRIVATE = "a private concept"
_LORA_TAG = re.compile(r"<lora:([^:>]+):[^>]*>")
_LORA_HASHES = re.compile(r'(, )?Lora hashes: ("(?:\\.|[^\\"])*"|[^,\n]*)')


def lora_names(parameters: str) -> list[str]:
    return list(dict.fromkeys(match[1] for match in _LORA_TAG.finditer(parameters)))


def hide_loras(parameters: str, hidden: Iterable[str]) -> str:
    """`parameters` with the names and hashes of the `hidden` LoRAs (tokens, any case) taken out."""
    hidden = {name.casefold() for name in hidden}
    if not hidden:
        return parameters
    text = _LORA_TAG.sub(lambda m: f"<lora:{PRIVATE}>" if m[1].casefold() in hidden else m[0], parameters)

    def without_hidden(match: re.Match) -> str:
        value = match[2]
        value = json.loads(value) if value.startswith('"') else value
        kept = [entry for entry in value.split(", ") if entry.split(":")[0].strip().casefold() not in hidden]
        if not kept:
            return ""
        return f"{match[1] or ''}Lora hashes: {json.dumps(', '.join(kept), ensure_ascii=False)}"

    return _LORA_HASHES.sub(without_hidden, text)


async def visible_parameters(parameters: str, *, viewer_id: int, owner_id: int,
                             concept_by_token: Callable[[str], Awaitable[object | None]]) -> str:
    """What `viewer_id` may see of a job's parameters (see the module docstring)."""
    if viewer_id == owner_id:
        return parameters
    hidden = []
    for name in lora_names(parameters):
        concept = await concept_by_token(name)
        may_see = concept is not None and (concept.owner_id == viewer_id
                                           or (concept.shared and concept.status == "ready"))
        if not may_see:
            hidden.append(name)
    return hide_loras(parameters, hidden)
