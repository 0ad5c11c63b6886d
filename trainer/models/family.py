"""The engine side of a model family: what training and generation do differently for SD 1.x and SDXL.

`family_of(pipe)` answers for a loaded pipeline; the torch-free facts (sizes, labels) are trainer/contract/families.py.
Everything here is data or a small function of the pipeline, so training (trainer/training/*) and serving
(trainer/generation/*) read the same LoRA targets and the same prompt conditioning.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from trainer.contract.families import SD1, SDXL, Family

# One list, used by training (lora_scope.py) and serving (generation/lora_slots.py). diffusers' DreamBooth LoRA
# scripts target the same modules for SD 1.x and SDXL.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class ModelFamily:
    facts: Family
    pipeline_class: str  # the diffusers class names (strings: this module imports no diffusers)
    img2img_class: str
    text_encoders: tuple[str, ...]  # the pipeline's component names, in prompt-embedding order
    tokenizers: tuple[str, ...]  # one per text encoder
    kohya_text_encoder_prefixes: tuple[str, ...]  # one per text encoder
    # SDXL's VAE overflows in fp16 (NaN / black images) unless decoded in fp32; diffusers' SDXL pipelines upcast when
    # vae.config.force_upcast. The fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix) sets it False and decodes in fp16.
    vae_fp16_unsafe: bool
    # SDXL's UNet also takes the pooled embedding of the last text encoder and six size numbers (`add_time_ids`).
    extra_conditioning: bool
    unet_targets: tuple[str, ...] = UNET_TARGETS
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS
    kohya_unet_prefix: str = "lora_unet_"

    @property
    def name(self) -> str:
        return self.facts.name

    def diffusers_class(self, img2img: bool = False):
        import diffusers

        return getattr(diffusers, self.img2img_class if img2img else self.pipeline_class)

    def text_encoder_modules(self, pipe) -> list:
        return [getattr(pipe, name) for name in self.text_encoders]

    def tokenizer_modules(self, pipe) -> list:
        return [getattr(pipe, name) for name in self.tokenizers]

    def vae_decodes_in_fp32(self, vae, dtype) -> bool:
        import torch

        return (self.vae_fp16_unsafe and dtype == torch.float16
                and bool(getattr(vae.config, "force_upcast", True)))


SD1_ENGINE = ModelFamily(SD1, "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", ("text_encoder",),
                         ("tokenizer",), ("lora_te_",), vae_fp16_unsafe=False, extra_conditioning=False)
SDXL_ENGINE = ModelFamily(SDXL, "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                          ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), ("lora_te1_", "lora_te2_"),
                          vae_fp16_unsafe=True, extra_conditioning=True)
ENGINES = {engine.name: engine for engine in (SD1_ENGINE, SDXL_ENGINE)}


def engine_for(family: Family | str) -> ModelFamily:
    return ENGINES[family if isinstance(family, str) else family.name]


def family_of(pipe) -> ModelFamily:
    """The family of a loaded pipeline: SDXL pipelines have a second text encoder, SD 1.x ones do not."""
    return SDXL_ENGINE if getattr(pipe, "text_encoder_2", None) is not None else SD1_ENGINE


@contextmanager
def vae_precision(pipe):
    """The pipeline's VAE in fp32 for the duration (then back) where the family's VAE overflows in fp16 (SDXL's,
    unless it is the fp16-fix one), as diffusers' SDXL pipeline upcasts it to decode and its training script keeps
    it for encoding; otherwise untouched. The VAE is shared, hence back afterwards."""
    vae = pipe.vae
    if not family_of(pipe).vae_decodes_in_fp32(vae, vae.dtype):
        yield vae
        return
    import torch

    original = vae.dtype
    vae.to(torch.float32)
    try:
        yield vae
    finally:
        vae.to(original)


def add_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]):
    """SDXL's size conditioning for one image, as its pipeline and training script build it: (original h, w,
    crop top, left, target h, w) as a [1, 6] float tensor. Sizes are (height, width)."""
    import torch

    return torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)


def encode_prompt_ids(pipe, family: ModelFamily, ids: list, *, grad: bool = False):
    """Token ids (one [N, 77] tensor per text encoder) -> (hidden states, pooled or None), as diffusers' SD 1.x and
    SDXL pipelines and DreamBooth scripts compute them: SD 1.x the last hidden state; SDXL each encoder's
    penultimate hidden state concatenated on the feature axis, pooled from the last (projected) encoder."""
    import contextlib

    import torch

    context = contextlib.nullcontext() if grad else torch.no_grad()
    with context:
        encoders = family.text_encoder_modules(pipe)
        if not family.extra_conditioning:
            return encoders[0](ids[0].to(encoders[0].device))[0], None
        hidden, pooled = [], None
        for encoder, encoder_ids in zip(encoders, ids):
            out = encoder(encoder_ids.to(encoder.device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's wins: CLIPTextModelWithProjection's text_embeds
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled


def tokenize(pipe, family: ModelFamily, prompts: list[str]) -> list:
    """One [len(prompts), max_length] id tensor per tokenizer (padded, truncated, as the pipelines tokenize)."""
    return [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids for tokenizer in family.tokenizer_modules(pipe)]
