"""A concept's names: its token (the made-up word that calls it up), its class word, and its instance prompt.

Torch-free: the bot checks these at submit time. What a token may be: trainer/intake/tokens.py.
"""
from __future__ import annotations

import json
import re
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


def load_vocab(model_dir: str | Path) -> dict[str, int] | None:
    """The tokenizer's vocabulary ({entry: id}) from a diffusers model directory, read as JSON (no torch, no
    tokenizer library). Token rules: trainer/intake/tokens.py."""
    tokenizer_dir = Path(model_dir) / "tokenizer"
    vocab_file = tokenizer_dir / "vocab.json"
    if vocab_file.is_file():
        return dict(json.loads(vocab_file.read_text(encoding="utf-8")))
    fast_file = tokenizer_dir / "tokenizer.json"
    if fast_file.is_file():
        return dict(json.loads(fast_file.read_text(encoding="utf-8"))["model"]["vocab"])
    return None
