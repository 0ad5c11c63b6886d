"""BOOTHBOT_TRAIN_MEMORY (the worker's --train-memory): which trainings use gradient checkpointing, and the setting's
way from the bot's settings to the worker."""
from __future__ import annotations

import pytest

from bot.dispatch.worker_client import worker_command
from bot.settings import SettingsError, load_settings
from trainer.training.memory import gradient_checkpointing_for


def test_low_and_fast_decide_and_auto_keeps_speed_off_the_gpu(tiny_pipeline, tiny_sdxl_pipeline):
    for pipe in (tiny_pipeline, tiny_sdxl_pipeline):
        assert gradient_checkpointing_for("low", pipe) is True
        assert gradient_checkpointing_for("fast", pipe) is False
        assert gradient_checkpointing_for("auto", pipe) is False  # on a CPU memory is not the GPU's
    with pytest.raises(ValueError, match="auto, low, fast"):
        gradient_checkpointing_for("tiny", tiny_pipeline)


def test_the_setting_reaches_the_worker_and_a_typo_is_refused_by_name(tmp_path):
    settings = load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_TRAIN_MEMORY": "low"}, env_file=None)
    assert settings.train_memory == "low"
    argv = worker_command(model="m", data_dir=tmp_path, train_memory=settings.train_memory)
    assert argv[argv.index("--train-memory") + 1] == "low"
    assert "--train-memory" not in worker_command(model="m", data_dir=tmp_path)  # auto: the worker's default
    with pytest.raises(SettingsError, match="BOOTHBOT_TRAIN_MEMORY"):
        load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_TRAIN_MEMORY": "small"}, env_file=None)


def test_generation_keeps_its_graphs_through_a_training_only_on_a_gpu_with_room(tiny_pipeline, monkeypatch):
    import types

    import torch

    import trainer.training.memory as memory

    assert memory.keeps_generation_memory(tiny_pipeline) is False  # a CPU has no graphs to keep
    on_cuda = types.SimpleNamespace(unet=types.SimpleNamespace(device=torch.device("cuda", 0)))
    for total, keeps in ((11.6, False), (23.6, False), (39.5, False), (79.1, True), (139.8, True)):
        monkeypatch.setattr(memory, "total_gib", lambda device, total=total: total)
        assert memory.keeps_generation_memory(on_cuda) is keeps, total


def test_the_vae_decodes_whole_batches_only_on_a_gpu_with_room_for_them(tiny_pipeline, monkeypatch):
    import types

    import torch

    import trainer.training.memory as memory

    assert memory.vae_decodes_whole_batches(tiny_pipeline.vae, 8, 64 * 64) is False  # a CPU decodes image by image

    def vae(dtype, force_upcast=False):
        return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype,
                                     config=types.SimpleNamespace(force_upcast=force_upcast))

    side = 512 * 512
    monkeypatch.setattr(memory, "total_gib", lambda device: 23.6)
    assert memory.vae_decodes_whole_batches(vae(torch.bfloat16), 8, side) is False  # a 24 GB card
    monkeypatch.setattr(memory, "total_gib", lambda device: 139.8)
    assert memory.vae_decodes_whole_batches(vae(torch.bfloat16), 8, side) is True  # 4 GB more: measured on the H200
    assert memory.vae_decodes_whole_batches(vae(torch.bfloat16), 16, side) is False
    assert memory.vae_decodes_whole_batches(vae(torch.float32), 8, side) is False
    assert memory.vae_decodes_whole_batches(vae(torch.float16, force_upcast=True), 4, 4 * side) is False  # SDXL
    assert memory.vae_decodes_whole_batches(vae(torch.bfloat16), 2, 4 * side) is True
    assert memory.vae_decodes_whole_batches(vae(torch.bfloat16, force_upcast=True), 8, side) is True  # never upcast
    assert memory.vae_decodes_whole_batches(vae(torch.float16, force_upcast=True), 8, side) is False
    assert memory.vae_decodes_whole_batches(vae(torch.float16), 8, side) is True


def test_a_trainings_adapters_leave_the_weights_where_generations_graphs_read_them(tiny_model_dir):
    """What decides whether generation's CUDA graphs survive a training (trainer/generation/fast_unet.py): the UNet's
    own weights' places. peft wrapping layers for a training keeps them; a new memory layout moves them."""
    import torch

    from trainer.generation.fast_unet import own_weights_key
    from trainer.models.loading import load_pipeline
    from trainer.training.lora_scope import LoraTrainingScope

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")  # its own: the layout is changed below
    unet = pipe.unet
    before, every_param = own_weights_key(unet), len(list(unet.parameters()))
    with LoraTrainingScope(pipe, "probe") as scope:
        scope.add_adapters(rank=4, train_text_encoder=False, seed=0)
        assert len(list(unet.parameters())) > every_param  # the training's LoRA weights came
        assert own_weights_key(unet) == before
    assert len(list(unet.parameters())) == every_param and own_weights_key(unet) == before
    unet.to(memory_format=torch.channels_last)
    assert own_weights_key(unet) != before


@pytest.mark.parametrize("keeps", [False, True])
def test_a_training_moves_the_weights_to_its_layout_only_where_generations_graphs_are_not_kept(tiny_model_dir,
                                                                                               monkeypatch, keeps):
    """Where generation's graphs stay through a training, the training keeps generation's channels_last weights:
    re-laying them out would drop those graphs (the first /imagine beside the training would capture anew)."""
    import torch

    import trainer.training.memory as memory
    from trainer.generation.aot_shapes import channels_last
    from trainer.generation.fast_unet import own_weights_key
    from trainer.models.loading import load_pipeline
    from trainer.training.lora_scope import LoraTrainingScope

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")
    pipe.unet.to(memory_format=torch.channels_last)  # as the generation service lays it out
    monkeypatch.setattr(memory, "keeps_generation_memory", lambda pipe: keeps)
    before = own_weights_key(pipe.unet)
    with LoraTrainingScope(pipe, "probe") as scope:
        scope.add_adapters(rank=4, train_text_encoder=False, seed=0)
        assert channels_last(pipe.unet) is keeps
        assert (own_weights_key(pipe.unet) == before) is keeps
    assert channels_last(pipe.unet)  # generation's layout back either way


def test_a_gpu_memory_limit_reaches_the_worker_and_a_bad_one_is_refused_by_name(tmp_path):
    settings = load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_GPU_MEMORY_GIB": "11.5"}, env_file=None)
    assert settings.gpu_memory_gib == 11.5
    argv = worker_command(model="m", data_dir=tmp_path, gpu_memory_gib=settings.gpu_memory_gib)
    assert argv[argv.index("--gpu-memory-gib") + 1] == "11.5"
    unset = load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_GPU_MEMORY_GIB": ""}, env_file=None)
    assert unset.gpu_memory_gib is None
    assert "--gpu-memory-gib" not in worker_command(model="m", data_dir=tmp_path, gpu_memory_gib=None)
    for wrong in ("12GB", "1"):
        with pytest.raises(SettingsError, match="BOOTHBOT_GPU_MEMORY_GIB"):
            load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_GPU_MEMORY_GIB": wrong}, env_file=None)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_memory_limit_is_what_the_auto_settings_see_and_the_allocator_keeps(monkeypatch):
    import types

    import torch

    import trainer.training.memory as memory

    device = torch.device("cuda", 0)
    monkeypatch.setattr(memory, "_limit_gib", None)
    real = memory.total_gib(device)
    try:
        memory.limit_gpu_memory(torch.device("cuda"), 2.0)  # as the worker passes it: no index
        assert memory.total_gib(device) == 2.0
        on_cuda = types.SimpleNamespace(unet=types.SimpleNamespace(device=device))
        assert memory.keeps_generation_memory(on_cuda) is False  # as on a small card
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(3 * 2**30), dtype=torch.uint8, device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert real > 2.0
