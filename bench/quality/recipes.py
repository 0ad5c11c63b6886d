"""Train a concept with the bot's engine (trainer.training.engine.train_concept) under named recipe variants and score
each one beside the base model (the no-training baseline)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from bench.quality import scores
from trainer.contract.train_spec import TrainSpec
from trainer.training.data import find_photos
from trainer.training.engine import default_steps, recipe_at_batch, train_concept


def batch_4_share(steps_share: float, rate: float) -> Callable[[TrainSpec], TrainSpec]:
    """Batch 1's default recipe at batch 4: `steps_share` of its samples, both learning rates × `rate` (share 1, rate
    4: `batch-4-linear`, the linear scaling rule). Made from `default_steps`, not `recipe_at_batch`, so a variant
    stays the same recipe whatever the worker's default becomes."""
    def recipe(spec: TrainSpec) -> TrainSpec:
        at_1 = default_steps(len(find_photos(spec.photos_dir)), spec.class_name)
        return replace(spec, batch_size=4, steps=max(1, round(at_1 / 4 * steps_share)),
                       learning_rate=spec.learning_rate * rate,
                       text_encoder_learning_rate=spec.text_encoder_learning_rate * rate)
    return recipe


def seeded(name: str, seed: int) -> Callable[[TrainSpec], TrainSpec]:
    """Recipe `name` (defined in RECIPES before this is called) with another training seed."""
    def recipe(spec: TrainSpec) -> TrainSpec:
        spec, base = replace(spec, seed=seed), RECIPES[name]
        return base(spec) if callable(base) else replace(spec, **base)
    return recipe


def class_images_at_batch_4(count: int, steps: int) -> Callable[[TrainSpec], TrainSpec]:
    """The batch-4 default with `count` class images made at `steps` sampler steps each (100 at 20: the default
    until session 16)."""
    return lambda spec: recipe_at_batch(replace(spec, class_images=count, class_image_steps=steps), 4)


CLASS_IMAGE_VARIANTS = ((100, 20), (48, 10), (100, 10), (48, 20), (48, 14))

# name -> TrainSpec overrides of the bot's default recipe (docs/TRAINING.md), or a function of the default's spec
RECIPES: dict[str, dict | Callable[[TrainSpec], TrainSpec]] = {
    "default": {},
    # what the worker trains on a GPU with room for it (trainer/training/memory.py `default_batch_for`): since session
    # 15 a third of the samples at the rates × 12 (`batch-4-third-lr-x12`); before, `batch-4-linear`
    "default-batch-4": lambda spec: recipe_at_batch(spec, 4),
    "batch-8": {"batch_size": 8},
    "no-text-encoder": {"train_text_encoder": False},
    "no-prior": {"prior_preservation": False},
    "steps-200": {"steps": 200},
    "steps-400": {"steps": 400},
    "steps-800": {"steps": 800},
    "eager": {"cuda_graphs": False},
    # a batch of B at a B-th of the default's 800 steps: the same samples, far fewer (and faster per sample) steps
    "batch-4-steps-200": {"batch_size": 4, "steps": 200},
    "batch-8-steps-100": {"batch_size": 8, "steps": 100},
    "batch-8-steps-200": {"batch_size": 8, "steps": 200},
    # the same, with the learning rates doubled (fewer updates of a less noisy gradient)
    "batch-4-steps-200-lr-x2": {"batch_size": 4, "steps": 200, "learning_rate": 2e-4,
                                "text_encoder_learning_rate": 1e-4},
    "batch-8-steps-100-lr-x2": {"batch_size": 8, "steps": 100, "learning_rate": 2e-4,
                                "text_encoder_learning_rate": 1e-4},
    "batch-8-steps-100-lr-x3": {"batch_size": 8, "steps": 100, "learning_rate": 3e-4,
                                "text_encoder_learning_rate": 1.5e-4},
    "batch-4-steps-200-lr-x4": {"batch_size": 4, "steps": 200, "learning_rate": 4e-4,
                                "text_encoder_learning_rate": 2e-4},
    "batch-8-steps-100-lr-x4": {"batch_size": 8, "steps": 100, "learning_rate": 4e-4,
                                "text_encoder_learning_rate": 2e-4},
    "batch-8-steps-100-lr-x6": {"batch_size": 8, "steps": 100, "learning_rate": 6e-4,
                                "text_encoder_learning_rate": 3e-4},
    # half the steps at twice the learning rates, batch 1
    "steps-400-lr-x2": {"steps": 400, "learning_rate": 2e-4, "text_encoder_learning_rate": 1e-4},
    "class-images-50": {"class_images": 50},
    # all of batch 1's samples at batch 4, the rates × 4 (the linear scaling rule): the batch-4 default until session 15
    "batch-4-linear": batch_4_share(1, 4),
    # half or a third of batch-4-linear's steps (issue 15: /train in seconds), at the same or higher rates
    "batch-4-half": batch_4_share(0.5, 4),
    "batch-4-half-lr-x6": batch_4_share(0.5, 6),
    "batch-4-half-lr-x8": batch_4_share(0.5, 8),
    "batch-4-third-lr-x8": batch_4_share(1 / 3, 8),
    "batch-4-third-lr-x12": batch_4_share(1 / 3, 12),
    # the same with other training seeds, and with half the class images
    **{f"{name}-seed-{seed}": seeded(name, seed) for name in ("batch-4-linear", "default-batch-4", "batch-4-half-lr-x8")
       for seed in (1, 2)},
    "default-batch-4-class-50": lambda spec: recipe_at_batch(replace(spec, class_images=50), 4),
    # fewer class images, fewer sampler steps each (issue 15: cold /train), at batch 4 and batch 1
    "batch-1-class-100-steps-20": {"class_images": 100, "class_image_steps": 20},
    "batch-1-class-48-steps-10": {"class_images": 48, "class_image_steps": 10},
    **{f"class-{count}-steps-{steps}": class_images_at_batch_4(count, steps) for count, steps in CLASS_IMAGE_VARIANTS},
}
RECIPES.update({f"class-{count}-steps-{steps}-seed-{seed}": seeded(f"class-{count}-steps-{steps}", seed)
                for count, steps in CLASS_IMAGE_VARIANTS for seed in (1, 2)})


def train(pipe, concept: scores.Concept, photos: Path, work: Path, name: str,
          recipe: dict | Callable[[TrainSpec], TrainSpec]) -> dict:
    spec = TrainSpec(concept_id=f"quality-{name}", token=concept.token, class_name=concept.class_name,
                     photos_dir=photos, out_dir=work / "concepts" / name, seed=0, sample_count=0,
                     **(recipe if isinstance(recipe, dict) else {}))
    if callable(recipe):
        spec = recipe(spec)
    started = time.monotonic()
    outcome = train_concept(pipe, spec, cache_dir=work / "cache")
    if outcome.status != "done":
        raise RuntimeError(f"training {name} ended {outcome.status}")
    return {"lora": outcome.result["lora"], "steps": outcome.result["steps"],
            "train_s": round(time.monotonic() - started, 1), "graph_steps": outcome.result.get("graph_steps", 0)}


def run(pipe, readers, names: list[str], work: Path, *, concept: scores.Concept = scores.DEFAULT_CONCEPT,
        plan: scores.Plan = scores.Plan(), extra: dict | None = None, log=print,
        deep_caches: tuple[int, ...] = ()) -> dict[str, dict]:
    """{"base": scores of the untrained model, name: training facts + scores, …}. `extra` adds recipes.
    `deep_caches`: the pictures' BOOTHBOT_DEEP_CACHE settings (default: the bot's); the rows of every setting after
    the first are named "<row> @ deep cache N" and score the same LoRAs."""
    from bench.quality.generate import make_service

    table = {**RECIPES, **(extra or {})}
    work.mkdir(parents=True, exist_ok=True)
    photos = scores.write_concept_photos(work / "photos", concept)
    services = [(make_service(pipe, n), f" @ deep cache {n}" if i else "") for i, n in enumerate(deep_caches)]
    services = services or [(make_service(pipe), "")]
    references = [scores.Reference(service, readers, concept, plan, work / "images") for service, _ in services]
    rows = {}

    def score_all(name: str, lora: str | None, facts: dict) -> None:
        for (service, suffix), reference in zip(services, references):
            rows[name + suffix] = {**facts, **scores.score(service, readers, concept, reference, plan,
                                                           work / "images", lora)}
            log(f"{name + suffix}: {rows[name + suffix]}")

    score_all("base", None, {})
    for name in names:
        facts = train(pipe, concept, photos, work, name, table[name])
        score_all(name, facts["lora"], facts)
    return rows


COLUMNS = ("identity", "identity_all", "following", "prior_tv", "prior_tv_noise", "prior_subject", "leak_tv",
           "leak_subject", "diversity")


def markdown(rows: dict[str, dict]) -> str:
    head = "| recipe | steps | train s | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (3 + len(COLUMNS))]
    for name, row in rows.items():
        lines.append(f"| {name} | {row.get('steps', '—')} | {row.get('train_s', '—')} | "
                     + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)
