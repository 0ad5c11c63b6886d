"""Scores of a concept trained by the bot's engine on the world model, read from its generations by the readers.

- identity: in pictures of prompts with the token, the share of the subject's identity attributes (class, hair,
  eyes, accessory) that appear; `identity_all`: the share of pictures showing all of them.
- following: in prompts with the token that ask for a background or a position, the share that shows it.
- prior_tv: "a photo of {class}" without the token but with the LoRA on (an A1111 `<lora:token:1>` tag; the bot
  never loads a LoRA for a prompt that names neither its token nor its tag, so without the tag these would be the base
  model's pictures by construction): total-variation distance between the identity attributes' value distributions
  and the base model's (mean over attributes, same seeds); `prior_tv_noise` is the base model against itself on other
  seeds, the distance sampling alone gives. `prior_subject`: class pictures showing the subject.
- leak_tv / leak_subject: the same for the other classes' prompts ("a photo of dog <lora:token:1>", …).
- diversity: normalised entropy (0–1) of background × position in pictures of the bare instance prompt.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.quality import world
from bench.quality.generate import Sampling, imagine
from trainer.contract.prompts import ConceptSpec


@dataclass(frozen=True)
class Concept:
    token: str
    subject: dict  # identity attributes: class, hair, eyes, accessory

    @property
    def class_name(self) -> str:
        return self.subject["class"]


DEFAULT_CONCEPT = Concept("squidarth", {"class": "man", "hair": "blue", "eyes": "green", "accessory": "glasses"})
# Subjects a recipe change is checked on (`score --subject`): one per class, identities the base model rarely draws
SUBJECTS = {
    "man": DEFAULT_CONCEPT,
    "woman": Concept("ellatok", {"class": "woman", "hair": "red", "eyes": "brown", "accessory": "hat"}),
    "dog": Concept("rexdog", {"class": "dog", "hair": "yellow", "eyes": "blue", "accessory": "none"}),
    "cat": Concept("mochicat", {"class": "cat", "hair": "white", "eyes": "green", "accessory": "glasses"}),
}


@dataclass(frozen=True)
class Plan:
    """How many pictures each measurement takes."""
    per_prompt: int = 8
    class_images: int = 48
    other_images: int = 16
    seed: int = 1000
    sampling: Sampling = field(default_factory=Sampling)


def write_concept_photos(directory: Path, concept: Concept, count: int = 5, seed: int = 0) -> Path:
    """A member's photos: the subject on varied backgrounds and places (NNN.png, as intake leaves them)."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    attrs = world.sample(count, generator, fixed=concept.subject)
    for i, image in enumerate(world.to_pil(world.render(attrs, generator))):
        image.save(directory / f"{i:03d}.png")
    return directory


def token_prompts(concept: Concept) -> list[tuple[str, dict]]:
    """(prompt, the scene it asks for) — the bare instance prompt first."""
    base = f"a photo of {concept.token} {concept.class_name}"
    prompts = [(base, {})]
    for bg in world.ATTRIBUTES["background"]:
        article = "an" if bg[0] in "aeiou" else "a"
        prompts.append((f"{base} on {article} {bg} background", {"background": bg}))
    prompts.append((f"{base} on the left", {"position": "left"}))
    prompts.append((f"{base} on the right", {"position": "right"}))
    return prompts


def _distribution(found: dict[str, torch.Tensor], name: str) -> list[float]:
    counts = torch.bincount(found[name], minlength=len(world.ATTRIBUTES[name])).float()
    return (counts / counts.sum()).tolist()


def tv_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names=world.IDENTITY) -> float:
    """Mean over attributes of the total-variation distance between the read value distributions."""
    return sum(0.5 * sum(abs(x - y) for x, y in zip(_distribution(a, n), _distribution(b, n))) for n in names) / len(names)


def subject_rate(found: dict[str, torch.Tensor], subject: dict, names=("hair", "eyes", "accessory")) -> float:
    hits = torch.ones_like(found["class"], dtype=torch.bool)
    for name in names:
        hits &= found[name] == world.index_of(name, subject[name])
    return float(hits.float().mean())


def scene_entropy(found: dict[str, torch.Tensor]) -> float:
    pairs = Counter(zip(found["background"].tolist(), found["position"].tolist()))
    total = sum(pairs.values())
    entropy = -sum(c / total * math.log(c / total) for c in pairs.values())
    cells = min(total, len(world.ATTRIBUTES["background"]) * len(world.ATTRIBUTES["position"]))
    return entropy / math.log(cells) if cells > 1 else 0.0


class Reference:
    """The base model's own pictures of the class prompts (made once, shared by every score of a run)."""

    def __init__(self, service, readers, concept: Concept, plan: Plan, out_dir: Path):
        self.classes = list(world.ATTRIBUTES["class"])

        def read(prompt: str, count: int, seed: int) -> dict[str, torch.Tensor]:
            return readers.read(imagine(service, [prompt], count, seed=seed, out_dir=out_dir, sampling=plan.sampling))

        self.found = {c: read(f"a photo of {c}", plan.class_images if c == concept.class_name else plan.other_images,
                              plan.seed) for c in self.classes}
        self.noise_tv = tv_distance(self.found[concept.class_name],
                                    read(f"a photo of {concept.class_name}", plan.class_images, plan.seed + 50_000))


def score(service, readers, concept: Concept, reference: Reference, plan: Plan, out_dir: Path,
          lora_path: str | None) -> dict:
    """Scores of one LoRA (None: the base model itself, the no-training baseline)."""
    spec = ConceptSpec("quality", concept.token, concept.class_name, lora_path) if lora_path else None
    prompts = token_prompts(concept)
    images = imagine(service, [p for p, _ in prompts], plan.per_prompt, seed=plan.seed, out_dir=out_dir, concept=spec,
                     sampling=plan.sampling)
    found = readers.read(images)
    identity_hits, following_hits, following_total = [], 0, 0
    for i, (prompt, asked) in enumerate(prompts):
        rows = slice(i * plan.per_prompt, (i + 1) * plan.per_prompt)
        for name in world.IDENTITY:
            identity_hits.append((found[name][rows] == world.index_of(name, concept.subject[name])).float())
        for name, value in asked.items():
            following_hits += int((found[name][rows] == world.index_of(name, value)).sum())
            following_total += plan.per_prompt
    bare = {n: v[:plan.per_prompt] for n, v in found.items()}
    result = {
        "identity": float(torch.cat(identity_hits).mean()),
        "identity_all": subject_rate(found, concept.subject, ("class", "hair", "eyes", "accessory")),
        "following": following_hits / following_total,
        "diversity": scene_entropy(bare),
    }
    lora_on = f" <lora:{concept.token}:1>"
    class_prompt = f"a photo of {concept.class_name}{lora_on}"
    if lora_path is None:
        class_found = reference.found[concept.class_name]
    else:
        class_found = readers.read(imagine(service, [class_prompt], plan.class_images, seed=plan.seed, out_dir=out_dir,
                                           concept=spec, sampling=plan.sampling))
    result["prior_tv"] = tv_distance(class_found, reference.found[concept.class_name])
    result["prior_tv_noise"] = reference.noise_tv
    result["prior_subject"] = subject_rate(class_found, concept.subject)
    leak_tv, leak_subject = [], []
    for other in reference.classes:
        if other == concept.class_name:
            continue
        other_found = reference.found[other] if lora_path is None else readers.read(imagine(
            service, [f"a photo of {other}{lora_on}"], plan.other_images, seed=plan.seed, out_dir=out_dir, concept=spec,
            sampling=plan.sampling))
        leak_tv.append(tv_distance(other_found, reference.found[other], ("hair", "eyes", "accessory")))
        leak_subject.append(subject_rate(other_found, concept.subject))
    result["leak_tv"] = sum(leak_tv) / len(leak_tv)
    result["leak_subject"] = sum(leak_subject) / len(leak_subject)
    return {k: round(v, 3) for k, v in result.items()}


def prompt_following(service, readers, count: int, *, seed: int, out_dir: Path, sampling: Sampling = Sampling()) -> dict:
    """The world model itself: for `count` random subjects, one picture of the full caption each; per attribute the
    share read back as asked, with chance (1 / number of values) beside it."""
    generator = torch.Generator().manual_seed(seed)
    attrs = world.sample(count, generator)
    prompts = [world.caption(world.row(attrs, i)) for i in range(count)]
    found = readers.read(imagine(service, prompts, 1, seed=seed, out_dir=out_dir, sampling=sampling))
    return {name: {"accuracy": round(float((found[name] == attrs[name]).float().mean()), 3),
                   "chance": round(1 / len(values), 3)} for name, values in world.ATTRIBUTES.items()}
