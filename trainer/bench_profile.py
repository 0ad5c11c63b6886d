"""Where the time goes: component timings and GPU-busy fractions on the resident pipeline (the `profile` section).

Every probe leaves the pipeline as it found it (no adapters, no requires_grad), since the engines share it.
`busy` = seconds the GPU spent in kernels / wall seconds: far below 1 means Python and kernel launches, not the GPU,
set the pace, so CUDA graphs / compile / bigger batches pay; near 1 means only less arithmetic pays.
"""
from __future__ import annotations

from trainer.bench_fixtures import TEXT_LORA_TARGETS, UNET_LORA_TARGETS
from trainer.bench_timing import gpu_kernel_seconds, median, repeat, timed


def _busy(device, fn) -> dict:
    wall, kernel = gpu_kernel_seconds(device, fn)
    return {"wall_ms": wall * 1e3, "kernel_ms": None if kernel is None else kernel * 1e3,
            "busy": None if kernel is None else kernel / wall}


def _ms(device, fn, repeats) -> float:
    return median(repeat(device, fn, warmup=1, repeats=repeats)) * 1e3


def profile_generation(pipe, device: str, lora_path, *, steps: int, size: int, cfg: float, repeats: int) -> dict:
    import torch

    out: dict = {}
    latent = size // pipe.vae_scale_factor
    dtype = pipe.unet.dtype
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    with torch.no_grad():
        text = pipe.encode_prompt("a portrait photo of sks man", device, 1, True, "")
        ctx = torch.cat([text[1], text[0]])

        def unet_step():
            pipe.unet(x, t, encoder_hidden_states=ctx, return_dict=False)

        def full_call():
            pipe("a portrait photo of sks man", num_inference_steps=steps, guidance_scale=cfg, height=size,
                 width=size, generator=torch.Generator(device).manual_seed(0))

        out["unet_cfg_step_ms"] = _ms(device, unet_step, repeats)
        out["unet_cfg_step_profile"] = _busy(device, unet_step)
        out["encode_prompt_ms"] = _ms(device, lambda: pipe.encode_prompt("a photo", device, 1, True, ""), repeats)
        lat = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
        out["vae_decode_ms"] = _ms(device, lambda: pipe.vae.decode(lat / pipe.vae.config.scaling_factor), repeats)
        image = pipe.image_processor.postprocess(pipe.vae.decode(lat).sample, output_type="pil")[0]
        import io

        out["png_encode_ms"] = _ms(device, lambda: image.save(io.BytesIO(), format="PNG"), repeats)
        out["full_call_no_lora_ms"] = _ms(device, full_call, max(2, repeats // 2))
        out["full_call_no_lora_profile"] = _busy(device, full_call)

        pipe.load_lora_weights(str(lora_path), adapter_name="bench_probe")
        pipe.set_adapters(["bench_probe"])
        try:
            out["unet_cfg_step_lora_unfused_ms"] = _ms(device, unet_step, repeats)
            out["full_call_lora_unfused_ms"] = _ms(device, full_call, max(2, repeats // 2))
            out["full_call_lora_unfused_profile"] = _busy(device, full_call)
            out["fuse_lora_ms"] = timed(device, pipe.fuse_lora, adapter_names=["bench_probe"])[0] * 1e3
            out["unet_cfg_step_lora_fused_ms"] = _ms(device, unet_step, repeats)
            out["unfuse_lora_ms"] = timed(device, pipe.unfuse_lora)[0] * 1e3
            out["set_adapters_ms"] = _ms(device, lambda: pipe.set_adapters(["bench_probe"], [0.8]), repeats)
        finally:
            pipe.delete_adapters("bench_probe")  # only ours: the generation service may keep its own adapters
            _deactivate_all(pipe)
    return out


def profile_train_step(pipe, device: str, *, rank: int, size: int, batches=(1, 8), repeats: int = 5) -> dict:
    """fwd+bwd+AdamW of UNet+text-encoder LoRA on cached latents, per batch of (instance, class) pairs."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    out: dict = {}
    dtype = pipe.unet.dtype
    autocast = device.startswith("cuda") and dtype != torch.float32
    latent = size // pipe.vae_scale_factor
    pixels = torch.randn(2, 3, size, size, device=device, dtype=pipe.vae.dtype)
    ids = pipe.tokenizer(["a photo of sks man", "a photo of man"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out["vae_encode_pair_ms"] = _ms(device, lambda: pipe.vae.encode(pixels).latent_dist.sample(), repeats)
        out["text_encoder_pair_ms"] = _ms(device, lambda: pipe.text_encoder(ids), repeats)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=UNET_LORA_TARGETS), adapter_name="bench_probe")
    pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                             target_modules=TEXT_LORA_TARGETS), adapter_name="bench_probe")
    try:
        params = [p for m in (pipe.unet, pipe.text_encoder) for n, p in m.named_parameters() if "bench_probe" in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        for fused in (False, True) if device.startswith("cuda") else (False,):
            optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused)
            for pairs in batches:
                x = torch.randn(2 * pairs, 4, latent, latent, device=device, dtype=dtype)
                t = torch.randint(0, 1000, (2 * pairs,), device=device)
                batch_ids = ids.repeat(pairs, 1)

                def step():
                    with torch.autocast(device.split(":")[0], dtype=dtype, enabled=autocast):
                        ctx = pipe.text_encoder(batch_ids, return_dict=False)[0]
                        pred = pipe.unet(x, t, ctx, return_dict=False)[0]
                    F.mse_loss(pred.float(), x.float()).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                key = f"step_{'fused' if fused else 'foreach'}_adamw_pairs{pairs}"
                out[key + "_ms"] = _ms(device, step, repeats)
                out[key + "_samples_per_s"] = 2 * pairs / (out[key + "_ms"] / 1e3)
                if pairs == batches[0]:
                    out[key + "_profile"] = _busy(device, step)
    finally:
        pipe.unet.delete_adapters("bench_probe")
        pipe.text_encoder.delete_adapter("bench_probe")
        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        _deactivate_all(pipe)
    return out


def _deactivate_all(pipe) -> None:
    """peft makes a remaining adapter active when the active one is deleted; leave none active, as we found it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in (pipe.unet, pipe.text_encoder):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter([])
