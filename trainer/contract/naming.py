"""A concept's names: its token (the made-up word that calls it up), its class word, and its instance prompt.

Torch-free: the bot checks these at submit time.
"""
from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path

from trainer.contract.errors import UserError

TOKEN_LENGTH = (3, 24)
CLASS_MAX_LENGTH = 24
TOKEN_PATTERN = re.compile(rf"^[a-z0-9_]{{{TOKEN_LENGTH[0]},{TOKEN_LENGTH[1]}}}$")
CLASS_PATTERN = re.compile(rf"^[a-z][a-z \-]{{1,{CLASS_MAX_LENGTH - 1}}}$")

# class word -> kind. The kind decides cropping (faces), the instance prompt (styles) and the class images.
CLASS_KINDS = {
    "man": "person", "woman": "person", "person": "person", "boy": "person", "girl": "person",
    "child": "person", "baby": "person", "face": "person",
    "dog": "animal", "cat": "animal", "pet": "animal", "puppy": "animal", "kitten": "animal", "bird": "animal",
    "horse": "animal", "rabbit": "animal", "animal": "animal",
    "object": "object", "toy": "object", "car": "object", "plush": "object", "figure": "object",
    "style": "style", "art": "style", "painting": "style", "illustration": "style", "drawing": "style",
}
SYNONYMS = {
    "men": "man", "guy": "man", "male": "man", "women": "woman", "lady": "woman", "female": "woman",
    "people": "person", "human": "person", "me": "person", "selfie": "person", "kid": "child", "children": "child",
    "boys": "boy", "girls": "girl", "dogs": "dog", "cats": "cat", "pets": "pet", "puppies": "puppy",
    "kittens": "kitten", "objects": "object", "thing": "object", "toys": "toy", "cars": "car", "styles": "style",
    "artstyle": "style", "art style": "style", "paintings": "painting", "drawings": "drawing",
}


def check_token(token: str) -> str:
    """Return the token in its canonical form, or raise UserError saying what a token must look like."""
    cleaned = (token or "").strip().lower()
    if not TOKEN_PATTERN.match(cleaned):
        raise UserError(
            f"“{token.strip()[:40]}” can't be used as a token. A token is one made-up word of {TOKEN_LENGTH[0]} to "
            f"{TOKEN_LENGTH[1]} letters, digits or underscores, with no spaces, such as squidarth or rex_the_dog."
        )
    if cleaned.isdigit():
        raise UserError(f"“{cleaned}” is only digits; use a made-up word such as squidarth.")
    return cleaned


def token_warnings(token: str, vocab: Collection[str] | object | None) -> list[str]:
    """Warn when the model already knows the token as a word: a real name mixes the concept up with everyone else's.

    `vocab` is the tokenizer's vocabulary (a set or mapping of entries such as "sid</w>", see `load_vocab`) or a
    tokenizer object with `get_vocab()` (a CLIPTokenizer); a word is known when it is one whole-word entry.
    """
    warnings = []
    if vocab is not None and not isinstance(vocab, Collection):
        get_vocab = getattr(vocab, "get_vocab", None)
        if not callable(get_vocab):
            raise TypeError(f"expected a vocabulary or a tokenizer with get_vocab(), not {type(vocab).__name__}")
        vocab = get_vocab()
    if vocab is not None and f"{token}</w>" in vocab:
        warnings.append(f"The model already knows “{token}” as a word, so your concept may get mixed up with it. "
                        "A made-up word (like squidarth) works better.")
    if token in CLASS_KINDS or token in SYNONYMS:
        warnings.append(f"“{token}” is a class word; a made-up token keeps your concept apart from every {token}.")
    return warnings


def normalise_class(text: str) -> str:
    """'a Dog' → 'dog', 'men' → 'man'; unknown class words are fine (DreamBooth's class is free text)."""
    cleaned = " ".join((text or "").strip().lower().split())
    for article in ("a ", "an ", "the ", "my "):
        if cleaned.startswith(article):
            cleaned = cleaned[len(article):]
    cleaned = SYNONYMS.get(cleaned, cleaned)
    if not CLASS_PATTERN.match(cleaned):
        raise UserError(
            f"“{(text or '').strip()[:40]}” isn't a class. Say in a word or two what the photos show, "
            "such as man, woman, person, dog, cat, toy or style."
        )
    return cleaned


def class_kind(class_name: str) -> str:
    """person | animal | object | style."""
    return CLASS_KINDS.get(class_name, "object")


def instance_prompt(token: str, class_name: str, kind: str | None = None) -> str:
    if (kind or class_kind(class_name)) == "style":
        return f"{token} style"
    return f"a photo of {token} {class_name}"


def load_vocab(model_dir: str | Path) -> set[str] | None:
    """The tokenizer's vocabulary from a diffusers model directory, read as JSON (no torch, no tokenizer library)."""
    tokenizer_dir = Path(model_dir) / "tokenizer"
    vocab_file = tokenizer_dir / "vocab.json"
    if vocab_file.is_file():
        return set(json.loads(vocab_file.read_text(encoding="utf-8")))
    fast_file = tokenizer_dir / "tokenizer.json"
    if fast_file.is_file():
        return set(json.loads(fast_file.read_text(encoding="utf-8"))["model"]["vocab"])
    return None
