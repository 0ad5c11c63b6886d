"""The deep cache (trainer/generation/deep_cache.py): the UNet cut at its shallowest skip, the head run from a kept
deep feature between whole forwards. Real tiny diffusers pipelines on the CPU; the CUDA graphs' side is
tests/trainer/test_deep_cache_cuda.py."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from bot.dispatch.worker_client import worker_command
from bot.settings import SettingsError, load_settings
from tests.trainer.test_generation import pixels, request
from trainer.contract.imagine_request import DEFAULT_DEEP_CACHE, check_deep_cache
from trainer.generation.deep_cache import HEAD, WHOLE, DeepCache, EagerParts, reusing
from trainer.generation.schedulers import make_scheduler
from trainer.generation.service import GenerationService
from trainer.worker import add_arguments


def unet_inputs(pipe, rows: int = 2, seed: int = 0):
    unet, generator = pipe.unet, torch.Generator().manual_seed(seed)
    side = unet.config.sample_size
    sample = torch.randn(rows, unet.config.in_channels, side, side, generator=generator)
    hidden = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator)
    added = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled embedding and the size numbers
        added = {"text_embeds": torch.randn(rows, pipe.text_encoder_2.config.projection_dim, generator=generator),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(rows, -1)}
    return sample, torch.tensor(500), hidden, added


class CountingParts(EagerParts):
    """The eager parts, noting in `calls` which one ran."""

    def __init__(self, unet, calls: list):
        super().__init__(unet)
        self.calls = calls

    def whole(self, *args):
        self.calls.append(WHOLE)
        return super().whole(*args)

    def head(self, *args):
        self.calls.append(HEAD)
        return super().head(*args)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_head_from_the_whole_forwards_own_feature_is_the_whole_forward(family, tiny_pipeline, tiny_sdxl_pipeline):
    pipe = tiny_pipeline if family == "sd1" else tiny_sdxl_pipeline
    assert DeepCache.supported(pipe.unet)
    cache = DeepCache(pipe.unet)
    sample, timestep, hidden, added = unet_inputs(pipe)
    with torch.no_grad():
        reference = pipe.unet(sample, timestep, hidden, added_cond_kwargs=added or None).sample
        noise, feature = cache.whole(sample, timestep, hidden, added)
        head = cache.head(sample, timestep, hidden, added, feature)
        later = cache.head(sample, torch.tensor(450), hidden, added, feature)
    assert torch.equal(noise, reference)  # the whole forward is the UNet's own
    assert feature.shape[:2] == (2, pipe.unet.config.block_out_channels[0])
    torch.testing.assert_close(head, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(later, reference)  # the head does depend on this step's own inputs


def test_a_unet_with_freeu_on_is_not_cut(tiny_pipeline):
    unet = tiny_pipeline.unet
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        assert not DeepCache.supported(unet)
    finally:
        unet.disable_freeu()
    assert DeepCache.supported(unet)


def test_reusing_runs_the_whole_forward_every_nth_step_and_the_head_between(tiny_pipeline):
    components = {**tiny_pipeline.components, "scheduler": make_scheduler("dpmpp_2m_karras",
                                                                          tiny_pipeline.scheduler.config)}
    pipe = type(tiny_pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)

    def picture(every: int, steps: int = 7):
        with reusing(pipe.unet, every, EagerParts(pipe.unet)) as reuse:
            image = pipe("a red dog", num_inference_steps=steps, guidance_scale=7.0, width=64, height=64,
                         generator=torch.Generator().manual_seed(3), output_type="np").images[0]
        assert "forward" not in vars(pipe.unet)  # given back
        return image, reuse.counts

    whole, counts = picture(1)
    assert counts == {WHOLE: 0, HEAD: 0}  # off: the UNet's own forward, untouched
    plain = pipe("a red dog", num_inference_steps=7, guidance_scale=7.0, width=64, height=64,
                 generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert np.array_equal(whole, plain)
    cached, counts = picture(3)
    assert counts == {WHOLE: 3, HEAD: 4}  # steps 0, 3 and 6 whole
    other_seed = pipe("a red dog", num_inference_steps=7, guidance_scale=7.0, width=64, height=64,
                      generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    drift, apart = np.abs(cached - whole).mean(), np.abs(other_seed - whole).mean()
    assert 0 < drift < apart / 4, (drift, apart)  # near the whole steps' picture, not another picture


def test_a_call_that_is_not_a_plain_step_runs_the_unets_own_forward_and_starts_afresh(tiny_pipeline):
    unet, calls = tiny_pipeline.unet, []

    sample, timestep, hidden, _ = unet_inputs(tiny_pipeline)
    with torch.no_grad(), reusing(unet, 3, CountingParts(unet, calls)):
        unet(sample, timestep, hidden)
        unet(sample, timestep, hidden)
        scaled = unet(sample, timestep, hidden, cross_attention_kwargs={"scale": 1.0}).sample  # not plain
        unet(sample, timestep, hidden)  # a head step, but the kept feature was dropped: whole
    assert calls == [WHOLE, HEAD, WHOLE]
    with torch.no_grad():
        torch.testing.assert_close(scaled, unet(sample, timestep, hidden).sample)


def test_a_kept_feature_of_another_batch_or_latent_size_is_not_used(tiny_pipeline):
    """A Reuse carried from one call to another (a paused batch's) with a feature that does not fit the sample runs
    the whole forward again rather than feed the head another picture's feature."""
    from trainer.generation.deep_cache import Reuse

    unet, calls = tiny_pipeline.unet, []

    sample, timestep, hidden, _ = unet_inputs(tiny_pipeline)
    smaller = torch.nn.functional.interpolate(sample, scale_factor=0.5)
    with torch.no_grad(), reusing(unet, 3, CountingParts(unet, calls), Reuse()) as reuse:
        unet(sample, timestep, hidden)  # step 0: whole
        unet(smaller, timestep, hidden)  # step 1, a head step, but another latent size: whole
        unet(smaller, timestep, hidden)  # step 2: the head, from step 1's feature
        unet(sample, timestep, hidden)  # step 3: whole
        unet(sample[:1], timestep, hidden[:1])  # step 4, a head step, but other rows: whole
    assert calls == [WHOLE, WHOLE, HEAD, WHOLE, WHOLE]
    assert reuse.step == 5


def test_the_service_writes_the_setting_into_the_pictures_and_stays_close(tiny_pipeline, tmp_path):
    def make(every, name, seed=11):
        service = GenerationService(tiny_pipeline, model_name="tiny", deep_cache_every=every)
        return service.imagine(request(tmp_path, name, prompt="a photo of a dog", seed=seed, steps=9))

    default, off = make(DEFAULT_DEEP_CACHE, "default"), make(1, "off")
    assert f"Deep cache: every {DEFAULT_DEEP_CACHE} steps" in default.parameters
    assert "Deep cache" not in off.parameters
    other = make(1, "other-seed", seed=12)
    drift = np.abs(pixels(default.images[0]) - pixels(off.images[0])).mean()
    apart = np.abs(pixels(other.images[0]) - pixels(off.images[0])).mean()
    assert 0 < drift < apart / 4, (drift, apart)
    with pytest.raises(ValueError, match="from 1 to 10"):
        GenerationService(tiny_pipeline, model_name="tiny", deep_cache_every=0)


def test_the_operators_setting_reaches_the_worker_and_bad_values_are_named(tmp_path):
    settings = load_settings({"DISCORD_TOKEN": "x"}, env_file=None)
    assert settings.deep_cache == DEFAULT_DEEP_CACHE
    assert "--deep-cache" not in worker_command(model="m", data_dir=tmp_path, deep_cache=settings.deep_cache)
    off = load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_DEEP_CACHE": "1"}, env_file=None)
    argv = worker_command(model="m", data_dir=tmp_path, deep_cache=off.deep_cache)
    assert argv[argv.index("--deep-cache") + 1] == "1"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--data-dir", str(tmp_path), "--deep-cache", "1"]).deep_cache == 1
    assert parser.parse_args(["--data-dir", str(tmp_path)]).deep_cache == DEFAULT_DEEP_CACHE
    with pytest.raises(SettingsError, match="BOOTHBOT_DEEP_CACHE"):
        load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_DEEP_CACHE": "0"}, env_file=None)
    with pytest.raises(ValueError, match="whole number from 1 to 10"):
        check_deep_cache(11)
