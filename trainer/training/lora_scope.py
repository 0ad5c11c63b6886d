"""Borrow the shared, resident pipeline for training and give it back exactly as it was found.

Generation keeps its own LoRAs loaded in the same pipeline (peft adapters with their own names and scales), so
training must not unload them, must not leave its adapter behind, and must not leave anything trainable. On entry
we record, per component (UNet, the family's text encoders: one for SD 1.x, two for SDXL): whether peft layers
exist at all, which adapters are active and whether they are enabled, which parameters require grad, train/eval mode
and gradient checkpointing. On exit, however we leave (done, paused, cancelled or an exception), we delete our
adapter, or remove the peft layers entirely when the component had none before, and put every recorded flag back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer.models.family import TEXT_ENCODER_TARGETS, UNET_TARGETS, family_of

_MISSING = object()


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@dataclass
class _ComponentState:
    had_peft: bool
    peft_flag: object  # the instance's own `_hf_peft_config_loaded`, or _MISSING when it only had the class default
    active: list[str] = field(default_factory=list)
    disabled: bool = False
    trainable: set[str] = field(default_factory=set)
    training: bool = False
    gradient_checkpointing: bool = False

    @classmethod
    def record(cls, model) -> "_ComponentState":
        layers = _tuner_layers(model)
        state = cls(
            had_peft=bool(layers) or bool(getattr(model, "peft_config", None)),
            peft_flag=model.__dict__.get("_hf_peft_config_loaded", _MISSING),
            trainable={name for name, p in model.named_parameters() if p.requires_grad},
            training=model.training,
            gradient_checkpointing=_gradient_checkpointing_on(model),
        )
        if layers:
            state.active = list(layers[0].active_adapters)
            state.disabled = bool(layers[0].disable_adapters)
        return state


class LoraTrainingScope:
    """`with LoraTrainingScope(pipe, adapter_name) as scope:` — the pipeline is restored on exit.

    Inside: `scope.base_model_only()` switches any adapters the pipeline already had off (class images and cached
    embeddings must come from the base model); `scope.add_adapters(rank, train_text_encoder)` adds ours, makes it the
    only active one and returns its trainable parameters.
    """

    def __init__(self, pipe, adapter_name: str):
        self.pipe = pipe
        self.adapter_name = adapter_name
        self.text_encoders = family_of(pipe).text_encoders
        self.components = {"unet": pipe.unet, **{name: getattr(pipe, name) for name in self.text_encoders},
                           "vae": pipe.vae}
        self.states: dict[str, _ComponentState] = {}
        self.added: set[str] = set()
        self.unet_was_channels_last = False

    def __enter__(self) -> "LoraTrainingScope":
        self.states = {name: _ComponentState.record(model) for name, model in self.components.items()}
        for model in self.components.values():
            model.requires_grad_(False)
        return self

    def _training_layout(self) -> None:
        """Generation keeps the UNet channels_last (faster inference, class images included); a training step is
        a little slower that way (H200, CUDA graph: batch 8 11.9 vs 11.0 s for 50 steps; the default batch 4 0.123
        vs 0.120 s a step through the bot), so it trains in the default layout and gets channels_last back on exit.
        Not when compiled forwards read the weights by reference (trainer/generation/aot_kernels.py: re-allocating
        them would leak the bound ones), nor where generation's CUDA graphs stay through a training
        (memory.keeps_generation_memory): moving the weights would drop them, and the first /imagine beside the
        training would wait for a new capture (1.07 s in the engine instead of 0.45 s, H200)."""
        import torch

        from trainer.generation.aot_shapes import WEIGHTS_BOUND_ATTR, channels_last
        from trainer.training.memory import keeps_generation_memory

        if getattr(self.pipe.unet, WEIGHTS_BOUND_ATTR, False) or keeps_generation_memory(self.pipe):
            return
        if channels_last(self.pipe.unet):
            self.unet_was_channels_last = True
            self.pipe.unet.to(memory_format=torch.contiguous_format)

    def base_model_only(self) -> None:
        for model in self.components.values():
            for layer in _tuner_layers(model):
                layer.enable_adapters(False)

    def add_adapters(self, rank: int, train_text_encoder: bool, seed: int) -> list:
        """Add our LoRA (lora_alpha = rank, gaussian init seeded by `seed`) and return its parameters (fp32)."""
        import torch
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self._training_layout()
        targets = {"unet": UNET_TARGETS}
        if train_text_encoder:
            targets.update({name: TEXT_ENCODER_TARGETS for name in self.text_encoders})
        # The gaussian init draws from the global generator: fork it so the worker's own RNG stream is untouched.
        devices = [self.pipe.unet.device] if self.pipe.unet.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for name, target_modules in targets.items():
                model = self.components[name]
                config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=list(target_modules))
                self.added.add(name)  # first: a failure half-way through add_adapter is still cleaned up
                model.add_adapter(config, adapter_name=self.adapter_name)
                for layer in _tuner_layers(model):
                    layer.set_adapter([self.adapter_name])
                    layer.enable_adapters(True)
        trained = [self.components[name] for name in sorted(self.added)]
        # Only our adapter's weights train; set_adapter above already marked exactly those, re-assert it anyway.
        for model in trained:
            for pname, param in model.named_parameters():
                param.requires_grad_(f".{self.adapter_name}." in pname)
        cast_training_params(trained, dtype=torch.float32)
        return [p for model in trained for p in model.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory on small GPUs; switched back off on exit if it was off."""
        for name in self.added:
            _set_gradient_checkpointing(self.components[name], True)

    def adapter_config(self, component: str) -> dict | None:
        if component not in self.added:
            return None
        return self.components[component].peft_config[self.adapter_name].to_dict()

    def __exit__(self, *exc) -> None:
        import torch

        for name, model in self.components.items():
            self._restore(model, self.states[name], name in self.added)
        if self.unet_was_channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)

    def _restore(self, model, state: _ComponentState, added: bool) -> None:
        from diffusers.utils import recurse_remove_peft_layers

        if state.had_peft:
            for layer in _tuner_layers(model):
                layer.set_adapter(state.active)  # before deleting ours, so peft has no active adapter to replace
                layer.enable_adapters(not state.disabled)
        if added and state.had_peft:
            for layer in _tuner_layers(model):
                layer.delete_adapter(self.adapter_name)
            getattr(model, "peft_config", {}).pop(self.adapter_name, None)
        elif added:
            recurse_remove_peft_layers(model)
            if hasattr(model, "peft_config"):
                del model.peft_config
        if state.peft_flag is _MISSING:
            model.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            model._hf_peft_config_loaded = state.peft_flag
        for pname, param in model.named_parameters():
            param.requires_grad_(pname in state.trainable)
        if _gradient_checkpointing_on(model) != state.gradient_checkpointing:
            _set_gradient_checkpointing(model, state.gradient_checkpointing)
        model.train(state.training)


def _gradient_checkpointing_on(model) -> bool:
    # transformers 5 renamed the flag (the old name warns); diffusers models keep `is_gradient_checkpointing`.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False


# Non-reentrant checkpointing (autograd's saved-tensor hooks) without saving and restoring the RNG state: nothing in
# a LoRA step draws random numbers inside the models (no dropout), and reading the CUDA RNG state is not allowed while
# a CUDA graph is captured, so this is what lets the low-memory step replay from a graph too (trainer/training/graph.py).
CHECKPOINT_OPTIONS = {"use_reentrant": False, "preserve_rng_state": False}


def _checkpointed_call(module, *args):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module.__call__, *args, **CHECKPOINT_OPTIONS)


def _set_gradient_checkpointing(model, enabled: bool) -> None:
    # diffusers models and transformers models name these switches differently (transformers 5.2x renamed its own).
    if hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing(_checkpointed_call) if enabled else model.disable_gradient_checkpointing()
    elif hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_OPTIONS)
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_OPTIONS)
    else:
        model.gradient_checkpointing_disable()


def _layer_states(model) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: (list(m.active_adapters), bool(m.disable_adapters)) for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer)}


@dataclass
class _Suspended:
    layers: dict  # module name -> (active adapters, disabled) while training
    trainable: set[str]
    training: bool


def suspend(scope: LoraTrainingScope) -> None:
    """Between a yield and the resume: the pipeline behaves as the scope found it (the adapters it found active, ours
    off, nothing trainable, the train/eval modes it found) while our adapter's weights stay where they are, so a
    captured training graph stays valid. The UNet keeps the training layout (changing it would move the weights)."""
    scope.suspended = {}
    for name, model in scope.components.items():
        state = scope.states[name]
        scope.suspended[name] = _Suspended(_layer_states(model),
                                           {n for n, p in model.named_parameters() if p.requires_grad},
                                           model.training)
        for layer in _tuner_layers(model):
            layer.set_adapter(state.active, inference_mode=True)
            layer.enable_adapters(not state.disabled)
        for pname, param in model.named_parameters():
            param.requires_grad_(pname in state.trainable)
        model.train(state.training)


def resume(scope: LoraTrainingScope) -> None:
    """Undo `suspend`: exactly the adapter states, trainable parameters and modes the training had. Layers added
    meanwhile (a LoRA generation loaded) stay off."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, model in scope.components.items():
        saved: _Suspended = scope.suspended[name]
        for layer_name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer):
                active, disabled = saved.layers.get(layer_name, ([], True))
                layer.set_adapter(active, inference_mode=True)
                layer.enable_adapters(not disabled)
        for pname, param in model.named_parameters():
            param.requires_grad_(pname in saved.trainable)
        model.train(saved.training)
    scope.suspended = {}
