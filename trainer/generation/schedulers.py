"""The samplers /imagine offers, built fresh per request from the pipeline's own scheduler config."""
from __future__ import annotations

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

# name -> (A1111 sampler name for the `parameters` text, factory)
SCHEDULERS = {
    "dpmpp_2m_karras": ("DPM++ 2M Karras", lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "euler_a": ("Euler a", EulerAncestralDiscreteScheduler.from_config),
    # SD was trained without sample clipping; DDIM's class default (True) would be wrong for it.
    "ddim": ("DDIM", lambda config: DDIMScheduler.from_config(config, clip_sample=False)),
}


def make_scheduler(name: str, base_config):
    """A new scheduler (no state shared with other requests) for `name`, from the model's scheduler config."""
    return SCHEDULERS[name][1](base_config)


def sampler_label(name: str) -> str:
    return SCHEDULERS[name][0]
