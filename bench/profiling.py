"""Where the time goes: component timings and GPU-busy fractions on the resident pipeline (the `profile` section).

Every probe leaves the pipeline as it found it (its own adapters deleted, none active, no requires_grad), since
the engines share it. `busy` = seconds the GPU spent in kernels / wall seconds: far below 1 means Python and kernel
launches, not the GPU, set the pace, so CUDA graphs / compile / bigger batches pay; near 1 means only less
arithmetic pays. `*_graph_ms` replays the same work captured in a CUDA graph: the time with launch overhead gone.
"""
from __future__ import annotations

import io

from bench.fixtures import TEXT_LORA_TARGETS, UNET_LORA_TARGETS
from bench.timing import gpu_kernel_seconds, median, repeat, timed

PROBE = "bench_probe"
PROMPT = "a portrait photo of sks man"


def _busy(device, fn) -> dict:
    wall, kernel = gpu_kernel_seconds(device, fn)
    return {"wall_ms": wall * 1e3, "kernel_ms": None if kernel is None else kernel * 1e3,
            "busy": None if kernel is None else kernel / wall}


def _ms(device, fn, repeats) -> float:
    return median(repeat(device, fn, warmup=1, repeats=repeats)) * 1e3


def _graph_ms(device, fn, repeats) -> float | str | None:
    """Milliseconds per replay of `fn` captured in a CUDA graph (call under no_grad), or why it couldn't be captured."""
    if not device.startswith("cuda"):
        return None
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        result = _ms(device, graph.replay, repeats)
        del graph
        return result
    except Exception as exc:  # noqa: BLE001 - a probe that can't capture says why instead of stopping the bench
        return f"not capturable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _deactivate_all(pipe) -> None:
    """peft makes a remaining adapter active when the active one is deleted; leave none active, as we found it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in (pipe.unet, pipe.text_encoder):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter([])


def _delete_probe_adapters(pipe, names) -> None:
    present = {n for names_ in pipe.get_list_adapters().values() for n in names_}
    doomed = [n for n in names if n in present]
    if doomed:
        pipe.delete_adapters(doomed)
    _deactivate_all(pipe)


def profile_generation(pipe, device: str, loras, *, steps: int, size: int, cfg: float, repeats: int) -> dict:
    import torch

    out: dict = {"peft_layers_before": bool(getattr(pipe.unet, "peft_config", None))}
    latent = size // pipe.vae_scale_factor
    dtype = pipe.unet.dtype
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    names = [f"{PROBE}{i}" for i in range(min(8, len(loras)))]
    with torch.no_grad():
        ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        ctx = pipe.text_encoder(ids)[0]

        def unet_step():
            pipe.unet(x, t, encoder_hidden_states=ctx, return_dict=False)

        def full_call():
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size,
                 generator=torch.Generator(device).manual_seed(0))

        out["unet_cfg_step_ms"] = _ms(device, unet_step, repeats)
        out["unet_cfg_step_profile"] = _busy(device, unet_step)
        out["unet_cfg_step_graph_ms"] = _graph_ms(device, unet_step, repeats)
        if device.startswith("cuda"):
            pipe.unet.to(memory_format=torch.channels_last)
            out["unet_cfg_step_channels_last_graph_ms"] = _graph_ms(device, unet_step, repeats)
            pipe.unet.to(memory_format=torch.contiguous_format)
        out["tokenize_2_prompts_ms"] = _ms(device, lambda: pipe.tokenizer(
            [PROMPT, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"), repeats)
        out["text_encoder_2_prompts_ms"] = _ms(device, lambda: pipe.text_encoder(ids), repeats)
        lat = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
        out["vae_decode_ms"] = _ms(device, lambda: pipe.vae.decode(lat), repeats)
        image = pipe.image_processor.postprocess(pipe.vae.decode(lat).sample, output_type="pil")[0]
        out["png_encode_ms"] = _ms(device, lambda: image.save(io.BytesIO(), format="PNG"), repeats)
        out["png_encode_level1_ms"] = _ms(device, lambda: image.save(io.BytesIO(), format="PNG", compress_level=1),
                                          repeats)
        out["full_call_ms"] = _ms(device, full_call, 1)
        out["full_call_profile"] = _busy(device, full_call)

        try:
            for name, path in zip(names, loras):  # as many adapters as the service's cache holds
                pipe.load_lora_weights(str(path), adapter_name=name)
            _deactivate_all(pipe)
            out["unet_cfg_step_8_loaded_none_active_ms"] = _ms(device, unet_step, repeats)
            pipe.set_adapters([names[0]])
            out["unet_cfg_step_1_active_ms"] = _ms(device, unet_step, repeats)
            out["unet_cfg_step_1_active_graph_ms"] = _graph_ms(device, unet_step, repeats)
            out["full_call_1_active_ms"] = _ms(device, full_call, 1)
            switches = [timed(device, pipe.set_adapters, [names[i % 2]])[0] for i in range(1, 2 * repeats + 1)]
            out["set_adapters_switch_ms"] = median(switches) * 1e3
            out["fuse_lora_ms"] = timed(device, pipe.fuse_lora, adapter_names=[names[0]])[0] * 1e3
            out["unet_cfg_step_fused_ms"] = _ms(device, unet_step, repeats)
            out["unfuse_lora_ms"] = timed(device, pipe.unfuse_lora)[0] * 1e3
        finally:
            _delete_probe_adapters(pipe, names)
    return out


def profile_train_step(pipe, device: str, *, rank: int, size: int, batches=(1, 8), repeats: int = 5) -> dict:
    """fwd+bwd+fused AdamW of UNet+text-encoder LoRA on cached latents, per batch of (instance, class) pairs."""
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
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=UNET_LORA_TARGETS), adapter_name=PROBE)
    pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                             target_modules=TEXT_LORA_TARGETS), adapter_name=PROBE)
    try:
        params = [p for m in (pipe.unet, pipe.text_encoder) for n, p in m.named_parameters() if f".{PROBE}." in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True if device.startswith("cuda") else None)
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

            key = f"step_pairs{pairs}"
            out[key + "_ms"] = _ms(device, step, repeats)
            out[key + "_samples_per_s"] = 2 * pairs / (out[key + "_ms"] / 1e3)
            out[key + "_profile"] = _busy(device, step)
    finally:
        _delete_probe_adapters(pipe, [PROBE])
        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
    return out
