"""Deep features reused across sampler steps (DeepCache: Ma, Fang and Wang, 2023, arXiv:2312.00858).

Between two neighbouring sampler steps the UNet's deep features barely change; its shallow layers carry what does.
So the UNet is cut at its shallowest skip connection: the *whole* forward also hands back the feature that enters
the last (resnet, attention) pair of the last up block, and on the steps in between only the *head* runs: the
timestep embedding, `conv_in`, that last pair (fed the kept feature and the fresh `conv_in` output, the skip it
always takes) and `conv_out`. For SD 1.5 the head is about a twelfth of the whole forward's arithmetic. Given the
feature of the same inputs, the head reproduces the whole forward exactly (tests/trainer/test_deep_cache.py); the
approximation is only that a kept feature comes from an earlier step.

`every`: a whole forward on every `every`-th step (the first step always), the head on the others; 1 is off. The
default, 3, and the quality yardstick behind it: trainer/contract/imagine_request.py DEFAULT_DEEP_CACHE. /imagine and
a training's samples use it (trainer/training/images.py carries a paused batch's kept feature); class images and
previews do not.

`reusing(unet, every, parts)` points `unet.forward` at the step counter for one pipeline call (a diffusers pipeline
calls the UNet once per sampler step); `parts` runs the two halves: trainer/generation/fast_unet.py's UNetGraphs (CUDA
graphs, forwards compiled ahead of time), or by default `EagerParts`. Calls that are not a plain sampler step (gradients on,
extra conditioning) run the whole forward as it is, and the next step starts afresh.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

WHOLE, HEAD = "whole", "head"
ADDED_CONDITIONING = ("text_embeds", "time_ids")  # SDXL's, the only added_cond_kwargs the parts take


class DeepCache:
    """The UNet cut at its shallowest skip: `keeping()` collects the feature a whole forward computes on the way,
    `head()` finishes a forward from such a feature."""

    def __init__(self, unet):
        block = unet.up_blocks[-1]
        self.unet = unet
        self.resnet = block.resnets[-1]
        attentions = getattr(block, "attentions", None)
        self.attention = attentions[-1] if attentions else None
        self.skip_channels = unet.conv_in.out_channels  # the skip the last pair takes: conv_in's output

    @staticmethod
    def supported(unet) -> bool:
        """A UNet2DConditionModel whose forward is the plain SD 1.x / SDXL one (no class labels, no FreeU, no extra
        conditioning the head would have to repeat)."""
        config = getattr(unet, "config", None)
        blocks = getattr(unet, "up_blocks", None)
        if config is None or not blocks or not hasattr(blocks[-1], "resnets") or not hasattr(unet, "conv_in"):
            return False
        if getattr(blocks[-1], "upsamplers", None) or any(getattr(block, "s1", None) for block in blocks):
            return False  # an upsampler after the last pair, or FreeU on
        return (config.get("class_embed_type") is None and config.get("addition_embed_type") in (None, "text_time")
                and config.get("encoder_hid_dim_type") is None and not config.get("center_input_sample")
                and config.get("time_cond_proj_dim") is None)

    @contextmanager
    def keeping(self):
        """Within: each forward of the UNet appends its deep feature to the yielded list."""
        kept: list[torch.Tensor] = []

        def hook(module, args, kwargs):
            joined = args[0] if args else kwargs["input_tensor"]
            kept.append(joined[:, :joined.shape[1] - self.skip_channels])

        handle = self.resnet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield kept
        finally:
            handle.remove()

    def whole(self, sample, timestep, hidden, added: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's own forward, and its deep feature."""
        with self.keeping() as kept:
            noise = type(self.unet).forward(self.unet, sample, timestep, hidden, added_cond_kwargs=added or None,
                                            return_dict=False)[0]
        return noise, kept[-1]

    def head(self, sample, timestep, hidden, added: dict | None, feature: torch.Tensor) -> torch.Tensor:
        """The forward's output from `feature` (a whole forward's, `keeping`) and this step's inputs."""
        unet = self.unet
        added = added or {}
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        extra = unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=added)
        if extra is not None:
            emb = emb + extra
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.process_encoder_hidden_states(encoder_hidden_states=hidden, added_cond_kwargs=added)
        h = self.resnet(torch.cat([feature, unet.conv_in(sample)], dim=1), emb)
        if self.attention is not None:
            h = self.attention(h, encoder_hidden_states=hidden, return_dict=False)[0]
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)


class EagerParts:
    """The two parts run as they are (no graphs, nothing compiled)."""

    def __init__(self, unet):
        self.cache = DeepCache(unet)

    def whole(self, sample, timestep, hidden, added: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.whole(sample, timestep, hidden, added)

    def head(self, sample, timestep, hidden, added: dict, feature: torch.Tensor) -> torch.Tensor:
        return self.cache.head(sample, timestep, hidden, added, feature)


def plain_step(sample, timestep, timestep_cond, cross_attention_kwargs, added: dict, kwargs: dict) -> bool:
    """Whether a UNet call is a plain sampler step the parts (and CUDA graphs) can serve: no gradients, no extra
    conditioning beyond SDXL's, one timestep for the batch, not inside another graph's capture."""
    return (timestep_cond is None and not cross_attention_kwargs and not kwargs
            and set(added) <= set(ADDED_CONDITIONING) and all(torch.is_tensor(v) for v in added.values())
            and not torch.is_grad_enabled() and torch.is_tensor(timestep) and timestep.numel() == 1
            and not (sample.is_cuda and torch.cuda.is_current_stream_capturing()))


def effective_every(unet, every: int) -> int:
    """`every` where the cut fits `unet`, else 1 (off): what runs, and so what a picture's parameters name."""
    return every if every > 1 and DeepCache.supported(unet) else 1


class Reuse:
    """Where a denoising loop stands with the deep cache: the next step's index, the kept feature, the parts run.
    A loop paused between two steps keeps its Reuse, so that going on gives the images of an uninterrupted one."""

    def __init__(self, step: int = 0, feature: torch.Tensor | None = None):
        self.step, self.feature = step, feature
        self.counts = {WHOLE: 0, HEAD: 0}


@contextmanager
def reusing(unet, every: int, parts=None, going_on: Reuse | None = None):
    """For one pipeline call: `unet.forward` runs a whole forward on every `every`-th sampler step (the first
    always) and the head from the kept feature on the others; nothing changes when `every` is 1 or the UNet is not
    one the cut fits. `parts`: what runs the two halves (default: `EagerParts`). Yields the loop's Reuse
    (`going_on`: a paused loop's, to go on with)."""
    reuse = going_on or Reuse()
    if effective_every(unet, every) == 1:
        yield reuse
        return
    parts = parts or EagerParts(unet)
    had_own = "forward" in vars(unet)
    inner = unet.forward  # the CUDA graphs' runner when installed, else the UNet's own

    def forward(sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict: bool = True, **kwargs):
        added = dict(added_cond_kwargs or {})
        if not plain_step(sample, timestep, timestep_cond, cross_attention_kwargs, added, kwargs):
            reuse.feature = None
            return inner(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                         return_dict=return_dict, **kwargs)
        step, reuse.step = reuse.step, reuse.step + 1
        feature = reuse.feature
        if feature is None or step % every == 0 or not _fits(feature, sample):
            noise, reuse.feature = parts.whole(sample, timestep, encoder_hidden_states, added)
            reuse.counts[WHOLE] += 1
        else:
            noise = parts.head(sample, timestep, encoder_hidden_states, added, feature)
            reuse.counts[HEAD] += 1
        return output(noise, return_dict)

    unet.forward = forward
    try:
        yield reuse
    finally:
        if had_own:
            unet.forward = inner
        else:
            del unet.forward


def _fits(feature, sample) -> bool:
    """Whether a kept feature can be the head's for `sample`: the same rows and latent size (the last up block runs at
    the latent's resolution)."""
    return feature.shape[0] == sample.shape[0] and feature.shape[-2:] == sample.shape[-2:]


def output(sample: torch.Tensor, return_dict: bool):
    """What the UNet's forward returns for `sample`."""
    if not return_dict:
        return (sample,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)
