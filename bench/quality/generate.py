"""Pictures from the bot's own generation engine (GenerationService.imagine_many, the PNGs it writes), read back."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from bench.quality import world
from trainer.contract.imagine_request import DEFAULT_DEEP_CACHE, ImagineRequest
from trainer.contract.prompts import ConceptSpec

_counter = itertools.count()


@dataclass(frozen=True)
class Sampling:
    """How pictures are made: the bot's /imagine defaults unless a test shortens them."""
    steps: int = 30
    cfg: float = 7.0
    scheduler: str = "dpmpp_2m_karras"


def make_service(pipe, deep_cache: int = DEFAULT_DEEP_CACHE):
    """The bot's generation engine on `pipe`; `deep_cache`: its BOOTHBOT_DEEP_CACHE (the bot's default unless asked)."""
    from trainer.generation.service import GenerationService

    return GenerationService(pipe, model_name="world-model", max_batch_images=64, deep_cache_every=deep_cache)


def imagine(service, prompts: list[str], per_prompt: int, *, seed: int, out_dir: Path,
            concept: ConceptSpec | None = None, sampling: Sampling = Sampling()) -> torch.Tensor:
    """`per_prompt` pictures of each prompt (seeds seed, seed+1, …, the same for every prompt), as [N, 3, 64, 64] in
    prompt order."""
    requests = []
    for p, prompt in enumerate(prompts):
        for start in range(0, per_prompt, 4):
            requests.append(ImagineRequest(
                prompt=prompt, out_dir=Path(out_dir) / f"r{next(_counter)}", seed=seed + start,
                steps=sampling.steps, cfg=sampling.cfg, scheduler=sampling.scheduler,
                count=min(4, per_prompt - start), concepts=(concept,) if concept else ()))
    results = service.imagine_many(requests)
    images = [Image.open(path) for result in results for path in result.images]
    return world.from_pil(images)
