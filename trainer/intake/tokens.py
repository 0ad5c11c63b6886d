"""A concept's token: the made-up word a member types in /imagine to call up what they trained.

A token has to be a word that means nothing yet, for two reasons: the model must learn it from the photos alone
(a word it already knows drags its old meaning along), and it must never turn up in someone else's prompt by
accident. So `check_token` refuses
- a class word (man, dog, style…: that goes in class:),
- a common English word (the shipped list in trainer/intake/data/, the 30,000 most frequent English words),
- a word the base model's tokenizer keeps as one *common* whole-word token, when its vocabulary is at hand.

"Common" is measured on the tokenizer itself: CLIP's BPE vocabulary (SD 1.x, 2.x and XL) is ordered by merge, so
frequent words come first. Of its 49,408 entries, a whole-word token in the first 90% (id < 44,467) is common;
the classic DreamBooth tokens sit in the last 3% (ohwx 47,993, sks 48,136), which is why guides use them, and stay
allowed. Torch-free: the bot checks tokens at submit time.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from pathlib import Path

from trainer.contract.errors import UserError
from trainer.contract.naming import CLASS_KINDS, SYNONYMS, TOKEN_LENGTH, TOKEN_PATTERN, load_vocab

log = logging.getLogger(__name__)

COMMON_TOKEN_SHARE = 0.9  # of the tokenizer's vocabulary, counted from the most frequent entry
WORD_LIST = Path(__file__).with_name("data") / "common_english_words.txt"
MADE_UP_EXAMPLES = "sks, ohwx or squidarth"
_ENDINGS = ("x", "zy", "qa", "vo", "ix")  # added to a member's word to suggest a made-up one


def check_token(token: str, vocab: Mapping[str, int] | object | None = None) -> str:
    """Return the token in its canonical form, or raise UserError saying why not and what to pick instead.

    `vocab`: the base model's tokenizer vocabulary ({entry: id}, see `load_vocab`) or a tokenizer with
    `get_vocab()`; None when it is not at hand (then the common-token rule is skipped).
    """
    cleaned = (token or "").strip().lower()
    if not TOKEN_PATTERN.match(cleaned):
        raise UserError(
            f"“{(token or '').strip()[:40]}” can't be used as a token. A token is one made-up word of "
            f"{TOKEN_LENGTH[0]} to {TOKEN_LENGTH[1]} letters, digits or underscores, with no spaces, such as "
            f"{MADE_UP_EXAMPLES}."
        )
    if cleaned.isdigit():
        raise UserError(f"“{cleaned}” is only digits; use a made-up word such as {MADE_UP_EXAMPLES}.")
    vocab = _as_vocab(vocab)
    problem = _problem(cleaned, vocab)
    if problem is not None:
        raise UserError(_explain(cleaned, problem, suggest_token(cleaned, vocab)))
    return cleaned


def suggest_token(word: str, vocab: Mapping[str, int] | None = None) -> str:
    """A made-up word built from the member's own word ("photo" → "photox") that passes every rule."""
    stem = re.sub(r"[^a-z]", "", word.lower())[:12] or "squid"
    for candidate in (*(stem + ending for ending in _ENDINGS), *(stem[:4] + ending for ending in _ENDINGS)):
        if len(candidate) >= TOKEN_LENGTH[0] and _problem(candidate, vocab) is None:
            return candidate
    return "squidarth"


def is_common_token(word: str, vocab: Mapping[str, int] | object | None) -> bool:
    """True when the tokenizer keeps `word` as one whole-word entry among its most frequent ones."""
    vocab = _as_vocab(vocab)
    if not vocab:
        return False
    entry = vocab.get(f"{word}</w>")
    return entry is not None and entry < COMMON_TOKEN_SHARE * len(vocab)


@functools.cache
def english_words() -> frozenset[str]:
    """The shipped list of common English words, read on first use."""
    return frozenset(WORD_LIST.read_text(encoding="utf-8").split())


@functools.lru_cache(maxsize=4)
@functools.lru_cache(maxsize=4)
def model_vocab(model: str) -> dict[str, int] | None:
    """The tokenizer vocabulary of the base model: a local folder, or a hub id already in the Hugging Face cache (the
    worker downloads it at its first start). None when neither has one (a single checkpoint file, a model not
    downloaded yet); the English word list still applies then."""
    try:
        if Path(model).is_dir():
            return load_vocab(model)
        return _cached_hub_vocab(model)
    except (OSError, ValueError, KeyError):
        log.warning("could not read the tokenizer vocabulary of %s", model, exc_info=True)
        return None


def _cached_hub_vocab(repo_id: str) -> dict[str, int] | None:
    if Path(repo_id).suffix or repo_id.count("/") != 1:
        return None  # a file, or not a hub id
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "tokenizer/vocab.json")
    return load_vocab(Path(found).parent.parent) if isinstance(found, str) else None


def _problem(word: str, vocab: Mapping[str, int] | None) -> str | None:
    if word in CLASS_KINDS or word in SYNONYMS:
        return "class"
    if word in english_words():
        return "english"
    if is_common_token(word, vocab):
        return "known"
    return None


def _explain(word: str, problem: str, suggestion: str) -> str:
    what = {"class": "a class word (it goes in `class:`, which says what your photos show)",
            "english": "a common English word",
            "known": "a word the image model already knows well"}[problem]
    example = f"/train token:{suggestion} class:{SYNONYMS.get(word, word)}" if problem == "class" else suggestion
    return (f"“{word}” is {what}, so it can't be your token. The token is the name you'll type in /imagine to call "
            "up what you trained: it must be a made-up word the model has no meaning for yet, or your photos get "
            f"mixed up with what the word already means. Try `{example}`, or any invented word such as "
            f"{MADE_UP_EXAMPLES}.")


def _as_vocab(vocab) -> Mapping[str, int] | None:
    if vocab is None or isinstance(vocab, Mapping):
        return vocab
    get_vocab = getattr(vocab, "get_vocab", None)
    if not callable(get_vocab):
        raise TypeError(f"expected a vocabulary or a tokenizer with get_vocab(), not {type(vocab).__name__}")
    return get_vocab()
