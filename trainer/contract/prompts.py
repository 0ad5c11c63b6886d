"""Prompt parsing for /imagine: which concepts a prompt uses, with what weight, and the text the model should see.

Pure Python (no torch): the bot imports this at submit time to reject bad prompts before they reach the queue.

Rules:
- A concept's token written plainly ("portrait of squidarth as a jedi") activates that concept's LoRA at the
  concept's weight, and the class word is added after the token the way training captioned the photos
  ("squidarth man") unless the prompt already says it.
- A1111's `<lora:name>` / `<lora:name:0.8>` is accepted too: `name` is the concept's token; the tag activates the
  LoRA at that weight and is removed from the text (as in A1111, the tag alone does not add the token to the text).
- Only the concepts passed in exist for this prompt. Any other word is plain text, another member's private token
  included (so it can neither block a prompt nor reveal that it exists); a `<lora:...>` naming nothing the member
  can use is an error that names it, the same one for a typo and for a concept that isn't theirs.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from trainer.contract.errors import UserError

WEIGHT_RANGE = (0.0, 2.0)
MAX_PROMPT_CHARS = 1500

_TAG = re.compile(r"<\s*([A-Za-z_]+)\s*:([^<>]*)>")
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+([,.;:!?)])")


@dataclass(frozen=True)
class ConceptSpec:
    """A concept the requester may use, as the bot passes it in the imagine params."""

    concept_id: int | str | None
    token: str
    class_name: str = ""
    lora_path: str = ""
    weight: float = 1.0

    @classmethod
    def from_dict(cls, raw: dict) -> "ConceptSpec":
        token = str(raw.get("token") or "").strip()
        if not token:
            raise ValueError(f"concept {raw!r} has no token")
        weight = check_weight(raw.get("weight", 1.0), token)
        return cls(raw.get("concept_id"), token, str(raw.get("class_name") or "").strip(),
                   str(raw.get("lora_path") or ""), weight)


@dataclass(frozen=True)
class ConceptUse:
    concept: ConceptSpec
    weight: float


@dataclass(frozen=True)
class ParsedPrompt:
    text: str                      # what the text encoder sees: tags removed, class words added
    uses: tuple[ConceptUse, ...]   # the concepts to activate, sorted by token (a canonical adapter order)
    notices: tuple[str, ...] = field(default=())

    def a1111_prompt(self) -> str:
        """The prompt as A1111 would need it to reproduce the image: the text plus one <lora:token:weight> per use."""
        tags = " ".join(f"<lora:{use.concept.token}:{use.weight:g}>" for use in self.uses)
        return f"{self.text} {tags}".strip() if tags else self.text


def number_in_range(raw, label: str, lo: float, hi: float) -> float:
    """`raw` as a float in [lo, hi], or a UserError that names `label`, the range and what was given."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UserError(f"{label} must be a number from {lo:g} to {hi:g} (got {raw!r}).") from None
    if not lo <= value <= hi:
        raise UserError(f"{label} must be from {lo:g} to {hi:g} (got {value:g}).")
    return value


def check_weight(raw, name: str) -> float:
    return number_in_range(raw, f"The weight for {name}", *WEIGHT_RANGE)


def _token_pattern(token: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(token) + r"(?!\w)", re.IGNORECASE)


def _names(items: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(items))


def parse_prompt(prompt: str, concepts: Sequence[ConceptSpec] = ()) -> ParsedPrompt:
    """Resolve concept tokens and <lora:...> tags in `prompt`. Raises UserError naming a tag that names no concept."""
    prompt = (prompt or "").replace("\r", "")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"Your prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    by_token: dict[str, ConceptSpec] = {}
    for concept in concepts:
        by_token.setdefault(concept.token.lower(), concept)
    unknown: list[str] = []
    tag_weights: dict[str, float] = {}

    def take_tag(match: re.Match) -> str:
        kind, args = match.group(1).lower(), match.group(2).split(":")
        if kind != "lora":
            raise UserError(f"Only <lora:name:weight> tags are supported; remove <{match.group(1)}:{match.group(2)}>.")
        name = args[0].strip()
        if len(args) > 2:
            raise UserError(f"Write <lora:{name}:weight> with a single weight (got <lora:{match.group(2)}>).")
        if name.lower() not in by_token:
            unknown.append(name or "(empty)")
        else:
            weight = check_weight(args[1].strip(), name) if len(args) == 2 and args[1].strip() else 1.0
            tag_weights[name.lower()] = weight
        return " "

    text = _TAG.sub(take_tag, prompt)
    if unknown:
        usable = _names(sorted(c.token for c in by_token.values()))
        hint = f" Concepts you can use: {usable}." if usable else " You have no trained concepts to use yet."
        raise UserError(f"There is no concept called {_names(unknown)} here.{hint}")

    plain: set[str] = set()
    for key, concept in by_token.items():
        matches = list(_token_pattern(key).finditer(text))
        if matches:
            plain.add(key)
        for match in reversed(matches):
            text = _add_class_word(text, match.end(), concept.class_name)

    notices = []
    uses = []
    for key in sorted(plain | set(tag_weights)):
        concept = by_token[key]
        uses.append(ConceptUse(concept, tag_weights.get(key, concept.weight)))
        if key not in plain:
            notices.append(f"<lora:{concept.token}> is on, but the word {concept.token} is not in your prompt; "
                           f"write it to get {concept.token} themselves.")
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", text)).strip()
    return ParsedPrompt(text, tuple(uses), tuple(notices))


def _add_class_word(text: str, end: int, class_name: str) -> str:
    if not class_name:
        return text
    if re.match(r"[ \t]+" + re.escape(class_name) + r"(?!\w)", text[end:], re.IGNORECASE):
        return text
    return f"{text[:end]} {class_name}{text[end:]}"


def check_negative_prompt(negative: str) -> str:
    negative = (negative or "").replace("\r", "").strip()
    if len(negative) > MAX_PROMPT_CHARS:
        raise UserError(f"Your negative prompt is {len(negative)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    if _TAG.search(negative):
        raise UserError("<lora:...> tags go in the prompt, not in the negative prompt.")
    return negative


def find_blocked_words(text: str, blocked_words: Iterable[str]) -> list[str]:
    """The blocked words or phrases that occur in `text` as whole words (case-insensitive), in list order."""
    found = []
    for word in blocked_words:
        word = (word or "").strip()
        if word and _token_pattern(word).search(text or ""):
            found.append(word)
    return found
