"""Write a trained LoRA twice: diffusers/peft format (`pipe.load_lora_weights`) and kohya format (A1111, ComfyUI).

Both files carry the training metadata (token, class, base model, steps, rank, lr, photo count, seconds) in the
safetensors header. diffusers does the packing and the key conversions; this module only adds the metadata, the
atomic write and the naming details diffusers leaves to the caller: SD 1.x's `lora_te_` (see
`_kohya_sd1_text_encoder_prefix`) and SDXL's original UNet block names (`_kohya_sgm_unet_names`). The kohya file's
`ss_base_model_version` says which family it is for.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

from trainer.contract.files import write_atomic

LORA_FILE = "lora.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
METADATA_PREFIX = "boothbot."


def training_metadata(**fields) -> dict[str, str]:
    """`boothbot.<name>` -> str(value) for the safetensors header (which holds strings only)."""
    return {METADATA_PREFIX + key: str(value) for key, value in fields.items() if value is not None}


def _kohya_metadata(meta: dict[str, str]) -> dict[str, str]:
    # The `ss_*` names are the ones kohya's sd-scripts write and A1111 / Civitai display.
    get = lambda key: meta.get(METADATA_PREFIX + key)  # noqa: E731
    pairs = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": get("rank"),
        "ss_network_alpha": get("rank"),
        "ss_learning_rate": get("learning_rate"),
        "ss_max_train_steps": get("steps"),
        "ss_num_train_images": get("photo_count"),
        "ss_sd_model_name": get("base_model"),
        "ss_output_name": get("token"),
    }
    return {key: value for key, value in pairs.items() if value is not None}


def save_file_atomic(tensors: dict, path: Path, metadata: dict[str, str]) -> Path:
    """safetensors.torch.save_file to a temporary name in the same directory, then rename over `path`."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_lora_files(out_dir: Path, *, family, unet_state: dict, text_encoder_states: dict[str, dict],
                     unet_config: dict, text_encoder_configs: dict[str, dict], metadata: dict[str, str],
                     unet_layers_per_block: int = 2) -> tuple[Path, Path]:
    """Write out_dir/lora.safetensors and out_dir/lora_kohya.safetensors from peft state dicts (CPU tensors).

    `family`: the pipeline's ModelFamily (trainer/models/family.py). `unet_state` and each of `text_encoder_states`
    (keyed by the pipeline's component name, "text_encoder" / "text_encoder_2"; empty when the text encoders did not
    train) are what `peft.get_peft_model_state_dict(model, adapter_name=...)` returns; the configs are the adapters'
    `LoraConfig.to_dict()` (diffusers stores them so loading restores rank and alpha). `unet_layers_per_block`: the
    UNet config's, which the original (SGM) block numbering of SDXL's kohya names depends on.
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors import safe_open

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_encoder_states = {name: _canonical_clip_keys(state) for name, state in text_encoder_states.items() if state}
    encoder_layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(state)
                      for name, state in text_encoder_states.items()}
    encoder_configs = {f"{name}_lora_adapter_metadata": text_encoder_configs[name] for name in text_encoder_states}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".lora-") as tmp:
        family.diffusers_class().save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(unet_state), weight_name=LORA_FILE,
            unet_lora_adapter_metadata=unet_config, **encoder_layers, **encoder_configs)
        with safe_open(str(Path(tmp) / LORA_FILE), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    lora_path = save_file_atomic(tensors, out_dir / LORA_FILE, {**header, **metadata})

    peft_state = {f"unet.{key}": value for key, value in unet_state.items()}
    for name, state in text_encoder_states.items():
        peft_state.update({f"{name}.{key}": value for key, value in state.items()})
    kohya = convert_state_dict_to_kohya(peft_state)
    if family.extra_conditioning:
        kohya = _kohya_sgm_unet_names(kohya, unet_layers_per_block)
    else:
        kohya = _kohya_sd1_text_encoder_prefix(kohya)
    # fp16 is what A1111/ComfyUI LoRAs are usually shipped in: half the size, no visible difference.
    kohya = {key: (value.half() if value.is_floating_point() else value) for key, value in kohya.items()}
    kohya_meta = {**metadata, **_kohya_metadata(metadata), "ss_base_model_version": family.facts.base_model_version}
    kohya_path = save_file_atomic(kohya, out_dir / KOHYA_FILE, kohya_meta)
    return lora_path, kohya_path


def _canonical_clip_keys(state: dict) -> dict:
    # transformers 5 dropped CLIPTextModel's `text_model.` level from module names; LoRA files everywhere else (older
    # transformers, A1111's `lora_te_text_model_...`) have it. diffusers loads both, so write the portable one.
    return {(key if key.startswith("text_model.") else f"text_model.{key}"): value for key, value in state.items()}


def _kohya_sgm_unet_names(state: dict, layers_per_block: int) -> dict:
    # kohya's sd-scripts name SDXL UNet layers after the original (SGM) model, `input_blocks.N.1`, not diffusers'
    # `down_blocks.i.attentions.j` (for SD 1.x they use diffusers' names); A1111, Forge and ComfyUI expect those, and
    # diffusers maps them back when loading. Each down level has layers_per_block resnets + a downsampler (input
    # block 0 is conv_in), each up level one block more.
    def rename(match: re.Match) -> str:
        where, level, index = match.group(1), int(match.group(2)), int(match.group(3))
        if where == "down":
            return f"lora_unet_input_blocks_{1 + level * (layers_per_block + 1) + index}_1_"
        return f"lora_unet_output_blocks_{level * (layers_per_block + 1) + index}_1_"

    renamed = {}
    for key, value in state.items():
        key = _DIFFUSERS_UNET_BLOCK.sub(rename, key, count=1)
        renamed[key.replace("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_", 1)] = value
    return renamed


_DIFFUSERS_UNET_BLOCK = re.compile(r"^lora_unet_(down|up)_blocks_(\d+)_attentions_(\d+)_")


def _kohya_sd1_text_encoder_prefix(state: dict) -> dict:
    # diffusers names text-encoder keys `lora_te1_` (the SDXL convention, where there are two encoders). An SD 1.x
    # model has one, and kohya's sd-scripts and A1111 (`lora_te_text_model_encoder_layers_N_...`) call it `lora_te_`.
    if any(key.startswith("lora_te2_") for key in state):
        return state
    return {("lora_te_" + key[len("lora_te1_"):] if key.startswith("lora_te1_") else key): value
            for key, value in state.items()}


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
