"""The UNet forward compiled ahead of time (trainer/generation/aot_kernels.py, aot_compile.py), on the CPU.

Real parts: the compiling process is the real `python -m trainer.generation.aot_compile` (torch.export + AOTInductor
into a package, ~1 minute per shape here), the package is loaded with torch's loader and its weights are pointed at
the live UNet's. What a CPU cannot show is the CUDA graph captured around it (bench/compile_modes.py `--mode ahead`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.generation.service as generation
from tests.trainer.test_generation import concept, make_lora, pixels
from tests.trainer.test_generation import request as full_request
from trainer.contract.imagine_request import DEFAULT_DEEP_CACHE
from trainer.generation.aot_kernels import AotKernels, compiles_ahead, live_constants
from trainer.generation.aot_shapes import PREFIX, ForwardShape, architecture_key
from trainer.generation.service import GenerationService
from trainer.models.loading import load_pipeline

COMPILE_TIMEOUT_S = 900
STEPS = 3
# The sampler steps of a request that run the whole (compiled) forward: the deep cache's default runs its head, eagerly,
# on the others (trainer/generation/deep_cache.py).
WHOLE_STEPS = len(range(0, STEPS, DEFAULT_DEEP_CACHE))


def same_image(a, b) -> bool:
    """Equal up to the rounding of other kernels (inductor's fp32 CPU kernels vs eager's: measured at most 1 of 255,
    as the folded LoRA vs the slot; a LoRA at weight 0.9 changes the mean by 10.7)."""
    return np.abs(pixels(a) - pixels(b)).max() <= 1


def request(tmp_path, name, **params):
    return full_request(tmp_path, name, **{"steps": STEPS, "count": 1, **params})


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("aot-lora") / "sid.safetensors", 4, text_encoder=True)


@pytest.fixture(scope="module")
def compiled(tiny_model_dir, lora, tmp_path_factory):
    """A service on its own tiny pipeline that served the same requests before and after its one shape was compiled
    ahead of time: {name: (eager result, compiled result)}, plus the service and what the kernels counted."""
    root = tmp_path_factory.mktemp("aot")
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")
    service = GenerationService(pipe, model_name="tiny", aot_dir=root / "aot", max_batch_images=1)
    sid = [concept({"sid": lora}, "sid", weight=0.9)]
    cases = {"plain": {}, "lora": {"concepts": sid}}

    def serve(label):
        return {name: service.imagine(request(root, f"{label}-{name}", **params)) for name, params in cases.items()}

    def serve_through_the_slot(label):
        with pytest.MonkeyPatch.context() as patch:  # every row through the mixed-batch slot, an active adapter
            patch.setattr(generation, "same_loras", lambda groups: False)
            return service.imagine(request(root, f"{label}-slot", concepts=sid))

    eager = serve("eager")
    wanted_first = list(service.aot.wanted.values())
    eager_slot = serve_through_the_slot("eager")  # also wraps the UNet's layers in peft's: base weights renamed
    wanted = list(service.aot.wanted.values())
    started = service.aot.compiles_started  # by the requests themselves
    for _ in range(2):  # the requests' process compiles the bare forward; the next idle moment starts the slot's
        service.aot.wait(COMPILE_TIMEOUT_S)
        service.aot.loader_ready.wait(COMPILE_TIMEOUT_S)  # an idle worker adopts once torch's loader is prepared
        service.idle()
    calls = service.aot.calls
    ahead = serve("ahead")
    facts = {"wanted": wanted, "wanted_first": wanted_first, "started": started, "calls_before": calls,
             "calls_after": service.aot.calls}
    slot_calls = service.aot.calls
    ahead_slot = serve_through_the_slot("ahead")
    facts["slot_calls"] = service.aot.calls - slot_calls
    yield {"service": service, "eager": eager, "ahead": ahead, "slots": (eager_slot, ahead_slot), "facts": facts,
           "root": root}
    service.stop_compiling()


def bare_shape(compiled) -> ForwardShape:
    return next(shape for shape in compiled["facts"]["wanted"] if shape.slot is None)


def test_a_served_shape_is_compiled_in_another_process_and_then_serves_the_same_images(compiled):
    facts, kernels = compiled["facts"], compiled["service"].aot
    # 1 image with CFG: 2 rows of 8x8 latents, bare (the LoRA folded) and through the slot
    assert [shape.slot is None for shape in facts["wanted"]] == [True, False] and facts["started"] == 1
    assert kernels.compiles_started == 1  # both in one process: the slotted one was planned from the first request
    shape = bare_shape(compiled)
    assert shape.sample[0] == 2 and shape.name in kernels.loaded, kernels.refused
    assert (kernels.dir / f"{shape.name}.pt2").is_file() and "done in" in (kernels.dir / "compile.log").read_text()
    # The compiling process loaded and checked it before saying it is done; its marker is gone.
    assert json.loads((kernels.dir / f"{shape.name}.json").read_text())["check_s"] >= 0
    assert not list(kernels.dir.glob("*.checking"))
    # Adopting ran each once, to check it against the eager forward; then both requests' whole steps.
    assert facts["calls_before"] == 2 and facts["calls_after"] == 2 + 2 * WHOLE_STEPS
    for name in ("plain", "lora"):
        for eager, ahead in zip(compiled["eager"][name].images, compiled["ahead"][name].images):
            assert same_image(eager, ahead), name
    # The LoRA was folded into the very weights the compiled code reads, and taken out again after.
    lora_image, plain_image = compiled["ahead"]["lora"].images[0], compiled["ahead"]["plain"].images[0]
    assert np.abs(pixels(lora_image) - pixels(plain_image)).mean() > 5


def test_the_compiled_forward_reads_the_live_weights_and_their_changes_in_place(compiled):
    """The package was compiled from random weights in another process: every weight must come from the live UNet
    (a value compiled in would show here, not necessarily in a tiny model's images), changes in place included."""
    service = compiled["service"]
    kernels, unet = service.aot, service.pipe.unet
    shape = bare_shape(compiled)
    generator = torch.Generator().manual_seed(3)
    sample, timestep, hidden, added = shape.example_inputs("cpu", channels_last=False)
    sample.normal_(generator=generator)
    hidden.normal_(generator=generator)
    timestep.fill_(500)

    def relative_error() -> float:
        with torch.no_grad():
            eager = type(unet).forward(unet, sample, timestep, hidden, return_dict=False)[0]
            ahead = kernels.run(kernels.loaded[shape.name], sample, timestep, hidden, added)[0]
        return ((ahead - eager).norm() / eager.norm()).item()

    assert relative_error() < 1e-4
    bias = unet.conv_out.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.add_(0.5)
        assert relative_error() < 1e-4
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def test_rows_with_different_loras_run_the_forward_compiled_with_the_slot(compiled):
    """Members' LoRAs mixed in one batch go through generation's slot (an active adapter): a forward compiled with
    the slot (its weights and mask read from the live UNet) serves them, with the images of the eager slot."""
    service = compiled["service"]
    eager, ahead = compiled["slots"]
    assert compiled["facts"]["slot_calls"] == WHOLE_STEPS
    assert same_image(eager.images[0], ahead.images[0])
    slotted = next(shape for shape in compiled["facts"]["wanted"] if shape.slot is not None)
    assert slotted.slot == service.adapters.layout() and slotted.slot.rank == service.adapters.rank
    assert slotted.name in service.aot.checked and "mixed" in slotted.describe()
    assert np.abs(pixels(ahead.images[0]) - pixels(compiled["ahead"]["plain"].images[0])).mean() > 5  # the LoRA acts


def test_the_slotted_forward_is_wanted_from_the_first_request_with_the_layout_the_first_mixed_batch_makes(compiled):
    """The slot exists only once members' different LoRAs share a batch, but its layout is known before (the usual
    attention layers, rank 128): the first plain request already asks for its compiled forward at the largest
    batch, so the first mixed bursts do not wait minutes for it."""
    service = compiled["service"]
    first = compiled["facts"]["wanted_first"]
    assert [shape.slot is None for shape in first] == [True, False]
    assert first[1].slot == service.adapters.layout() == service.adapters.planned_layout()
    assert first[1].sample[0] == 2 * service.max_batch_images
    assert compiled["facts"]["wanted"] == first  # the mixed batch wanted nothing new


def test_another_active_adapter_keeps_the_eager_forward(compiled):
    """An adapter other than the slot alone (a training's) is in no compiled forward."""
    from peft import LoraConfig

    service = compiled["service"]
    unet, graphs = service.pipe.unet, service.graphs
    inputs = bare_shape(compiled).random_inputs("cpu", channels_last=False)
    assert graphs._compiled_ahead(*inputs) is not None
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="members_training")
    try:
        graphs._check_params()
        assert graphs._adapter_active() and graphs._compiled_ahead(*inputs) is None
    finally:
        service.pipe.delete_adapters(["members_training"])
        service.adapters.deactivate()  # peft made the slot active in its place
        graphs._check_params()
    assert graphs._compiled_ahead(*inputs) is not None


def test_weights_in_another_layout_use_the_eager_forward_until_the_layout_comes_back(compiled, tmp_path):
    """As while a training holds the UNet in its own layout (trainer/training/lora_scope.py) and an /imagine comes."""
    service = compiled["service"]
    kernels, unet = service.aot, service.pipe.unet
    unet.to(memory_format=torch.channels_last)  # compiled for the contiguous layout of a CPU pipeline
    try:
        calls = kernels.calls
        other_layout = service.imagine(request(tmp_path, "other-layout"))
        assert kernels.calls == calls and kernels.unbound == set(kernels.loaded) and not kernels.refused
    finally:
        unet.to(memory_format=torch.contiguous_format)
    back = service.imagine(request(tmp_path, "back"))
    assert kernels.calls == calls + WHOLE_STEPS and not kernels.unbound
    reference = compiled["eager"]["plain"].images[0]
    assert same_image(other_layout.images[0], reference) and same_image(back.images[0], reference)


def test_a_restarted_worker_uses_the_packages_from_its_first_request_without_compiling(compiled, tmp_path):
    service = compiled["service"]
    again = GenerationService(service.pipe, model_name="tiny", aot_dir=compiled["root"] / "aot", max_batch_images=1)
    assert not again.aot.loaded  # adopting is idle work (the worker: before its warm-up), not a request's
    again.aot.loader_ready.wait(COMPILE_TIMEOUT_S)
    again.idle()
    assert again.aot.dir == service.aot.dir and set(again.aot.loaded) == set(service.aot.loaded)
    first = again.imagine(request(tmp_path, "first"))
    assert again.aot.calls == 1 + WHOLE_STEPS and not again.aot.wanted and again.aot.compiles_started == 0
    assert same_image(first.images[0], compiled["eager"]["plain"].images[0])


def test_an_idle_worker_adopts_only_once_the_loader_is_prepared_off_the_job_thread(compiled, monkeypatch):
    """torch's loader first works out the CPU's vector ISA by compiling and loading test programs (~50 s on the
    H200, once per process): a thread does it when the kernels are made. Until then an idle (or starting) worker
    adopts nothing, so nobody waits behind it; the next idle moment after it adopts."""
    import threading

    import torch._inductor.codecache as codecache

    release = threading.Event()
    real = codecache.get_device_information
    monkeypatch.setattr(codecache, "get_device_information", lambda device: release.wait(60) and real(device))
    service = GenerationService(compiled["service"].pipe, model_name="tiny", aot_dir=compiled["root"] / "aot",
                                max_batch_images=1)
    began = time.monotonic()
    service.idle()
    assert time.monotonic() - began < 5 and not service.aot.loaded and not service.aot.loader_ready.is_set()
    release.set()
    assert service.aot.loader_ready.wait(60)
    service.idle()
    assert set(service.aot.loaded) == set(compiled["service"].aot.loaded)


def test_a_package_compiled_for_other_strides_is_refused_not_run(compiled, tmp_path):
    service = compiled["service"]
    copy = tmp_path / "aot"
    shutil.copytree(compiled["root"] / "aot", copy)
    kernels = AotKernels(service.pipe.unet, copy)
    metas = sorted(kernels.dir.glob("*.json"))
    assert len(metas) == 2  # the bare forward and the slotted one
    for meta_path in metas:
        meta = json.loads(meta_path.read_text())
        name = PREFIX + "conv_in.weight"
        meta["constants"][name][1] = list(reversed(meta["constants"][name][1]))
        meta_path.write_text(json.dumps(meta))
    assert kernels.adopt() == [] and not kernels.loaded
    for meta_path in metas:
        assert "conv_in.weight" in kernels.refused[meta_path.stem]
        kernels.want(ForwardShape.from_json(json.loads(meta_path.read_text())["shape"]))
    assert not kernels.wanted  # refused: not compiled again and again


def test_a_package_that_computes_something_else_is_refused_when_adopted(compiled, tiny_model_dir, tmp_path):
    """Compiled for another activation (the same weights, other arithmetic): adoption compares it with the eager
    forward on random inputs and refuses it, so no member gets its images."""
    import subprocess
    import sys

    from trainer.generation.aot_shapes import architecture

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")
    directory = AotKernels(pipe.unet, tmp_path / "aot").dir
    facts = architecture(pipe.unet)
    assert facts["config"]["act_fn"] == "silu"
    spec = {"config": {**facts["config"], "act_fn": "gelu"}, "dtype": facts["dtype"], "channels_last": False,
            "device": "cpu", "out_dir": str(directory), "shapes": [bare_shape(compiled).to_json()]}
    directory.mkdir(parents=True, exist_ok=True)  # made with its facts
    (directory / "compile.spec").write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "trainer.generation.aot_compile", str(directory / "compile.spec")],
                   check=True, timeout=COMPILE_TIMEOUT_S, capture_output=True)
    service = GenerationService(pipe, model_name="tiny", aot_dir=tmp_path / "aot", max_batch_images=1)
    service.aot.loader_ready.wait(COMPILE_TIMEOUT_S)
    service.idle()
    name = bare_shape(compiled).name
    assert not service.aot.loaded and "off the eager forward" in service.aot.refused[name]
    service.imagine(request(tmp_path, "eager"))
    assert service.aot.calls == 1 and name not in service.aot.wanted  # the one call: the check; not compiled again


def test_no_compile_starts_while_a_training_holds_the_unet_in_another_layout(tiny_pipeline, tmp_path):
    """A card that trains in the default layout (under 40 GB) serves /imagine beside a held training eagerly; a
    shape first served then waits for the training's end to be compiled, for the served (channels_last) layout
    rather than the training's, whose package would never bind and never be compiled again."""
    unet = tiny_pipeline.unet
    unet.to(memory_format=torch.channels_last)
    try:
        kernels = AotKernels(unet, tmp_path / "aot")
        assert kernels.channels_last
        kernels.want(ForwardShape((2, 4, 8, 8), (2, 77, 32), "float32", "float32", "int64"))
        unet.to(memory_format=torch.contiguous_format)  # the training's layout
        assert not kernels.compile_wanted() and kernels.compiles_started == 0
        unet.to(memory_format=torch.channels_last)  # the training ended
        assert kernels.compile_wanted() and kernels.compiles_started == 1
        spec = json.loads(next(kernels.dir.glob("compile-*.spec")).read_text())
        assert spec["channels_last"] is True
    finally:
        kernels.close()
        unet.to(memory_format=torch.contiguous_format)


def test_a_shape_that_cannot_compile_is_recorded_and_not_asked_for_again(tiny_pipeline, tmp_path):
    kernels = AotKernels(tiny_pipeline.unet, tmp_path / "aot")
    hidden = tiny_pipeline.unet.config.cross_attention_dim + 3  # text embeddings the UNet cannot take
    shape = ForwardShape((2, 4, 8, 8), (2, 77, hidden), "float32", "float32", "int64")
    kernels.want(shape)
    assert kernels.compile_wanted()
    kernels.wait(COMPILE_TIMEOUT_S)
    assert kernels.adopt() == []
    assert shape.name in kernels.refused and (kernels.dir / f"{shape.name}.failed").is_file()
    kernels.want(shape)
    assert not kernels.wanted and not kernels.compile_wanted()


def test_wanted_shapes_include_the_largest_batch_once(tiny_pipeline, tmp_path):
    kernels = AotKernels(tiny_pipeline.unet, tmp_path / "aot", batch_rows=(16,))
    shape = ForwardShape((2, 4, 8, 8), (2, 77, 32), "float32", "float32", "int64", (("time_ids", (2, 6), "float32"),))
    kernels.want(shape)
    kernels.want(shape.with_batch(4))
    rows = [(s.sample[0], s.hidden[0], s.added[0][1][0]) for s in kernels.wanted.values()]
    assert rows == [(2, 2, 2), (16, 16, 16), (4, 4, 4)]
    assert ForwardShape.from_json(json.loads(json.dumps(shape.to_json()))) == shape


def test_the_architecture_key_follows_what_the_kernels_depend_on(tiny_pipeline):
    unet = tiny_pipeline.unet
    key = architecture_key(unet)
    assert architecture_key(unet) == key
    unet.to(memory_format=torch.channels_last)
    try:
        assert architecture_key(unet) != key
    finally:
        unet.to(memory_format=torch.contiguous_format)
    assert architecture_key(unet) == key


def test_live_constants_with_the_slot_are_what_the_slotted_compile_reads(compiled):
    """The worker's names for its tensors (the slot's layers keep peft's `base_layer`, the slot's weights are in)
    are exactly the constants of the UNet the compiling process builds with that slot."""
    from trainer.generation.aot_compile import UNetForward, build_unet, constants_layout
    from trainer.generation.aot_shapes import architecture

    service = compiled["service"]
    unet, layout = service.pipe.unet, service.adapters.layout()
    facts = architecture(unet)
    module = UNetForward(build_unet({**facts, "device": "cpu"}), layout)
    assert set(live_constants(unet, layout)) == set(constants_layout(module))
    assert any(".lora_A.gen_slot." in name for name in constants_layout(module))


def test_a_restarted_worker_binds_the_slotted_forward_when_its_slot_appears_and_checks_it_first(
        compiled, lora, tiny_model_dir, tmp_path):
    """After a restart the slot is made by the first batch of mixed LoRAs: until then the slotted package waits
    unbound; that batch runs eagerly (the package is not checked in this process yet), the next idle moment checks
    it, and the batches after it run compiled."""
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")
    service = GenerationService(pipe, model_name="tiny", aot_dir=compiled["root"] / "aot", max_batch_images=1)
    service.aot.loader_ready.wait(COMPILE_TIMEOUT_S)
    service.idle()
    slotted = next(shape.name for shape in compiled["facts"]["wanted"] if shape.slot is not None)
    assert slotted in service.aot.loaded and slotted in service.aot.unbound and not service.aot.refused

    def mixed(name):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(generation, "same_loras", lambda groups: False)
            return service.imagine(request(tmp_path, name, concepts=[concept({"sid": lora}, "sid", weight=0.9)]))

    calls = service.aot.calls
    first = mixed("first")
    assert service.aot.calls == calls and slotted not in service.aot.unbound and slotted not in service.aot.checked
    service.idle()
    assert slotted in service.aot.checked and service.aot.calls == calls + 1
    second = mixed("second")
    assert service.aot.calls == calls + 1 + WHOLE_STEPS and service.aot.compiles_started == 0
    reference = compiled["slots"][0].images[0]
    assert same_image(first.images[0], reference) and same_image(second.images[0], reference)


def test_live_constants_name_base_weights_as_the_bare_unet_does(compiled):
    from diffusers import UNet2DConditionModel

    unet = compiled["service"].pipe.unet
    assert any(".base_layer." in name for name, _ in unet.named_parameters())  # peft's wrapped layers: the slot
    bare = UNet2DConditionModel.from_config(unet.config)
    assert set(live_constants(unet)) == {PREFIX + name for name, _ in [*bare.named_parameters(), *bare.named_buffers()]}


def test_the_setting(tiny_pipeline):
    assert compiles_ahead("on", tiny_pipeline) and not compiles_ahead("off", tiny_pipeline)
    assert not compiles_ahead("auto", tiny_pipeline)  # a CPU: a compile a shape would take longer than it saves
    assert not compiles_ahead("auto", tiny_pipeline, may_evict=True)
    with pytest.raises(ValueError, match="auto, on, off"):
        compiles_ahead("sometimes", tiny_pipeline)


def test_the_setting_is_auto_by_default_and_reaches_the_worker(tmp_path):
    """auto by default (measured through the bot on an H200, docs/BENCHMARKS.md); an operator's choice reaches the
    worker's command line, whose own default is the same."""
    import argparse

    from bot.dispatch.worker_client import worker_command
    from bot.settings import SettingsError, load_settings
    from trainer.worker import add_arguments

    assert load_settings({"DISCORD_TOKEN": "x"}, env_file=None).compile_ahead == "auto"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--data-dir", str(tmp_path)]).compile_ahead == "auto"
    assert "--compile-ahead" not in worker_command(model="m", data_dir=tmp_path)
    for value in ("off", "on"):
        settings = load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_COMPILE_AHEAD": value}, env_file=None)
        argv = worker_command(model="m", data_dir=tmp_path, compile_ahead=settings.compile_ahead)
        assert argv[argv.index("--compile-ahead") + 1] == value
    with pytest.raises(SettingsError, match="BOOTHBOT_COMPILE_AHEAD"):
        load_settings({"DISCORD_TOKEN": "x", "BOOTHBOT_COMPILE_AHEAD": "yes"}, env_file=None)


def test_sdxl_compiled_ahead_serves_the_same_images(tiny_sdxl_model_dir, tmp_path):
    pipe = load_pipeline(str(tiny_sdxl_model_dir), device="cpu", dtype="fp32")
    service = GenerationService(pipe, model_name="tiny-xl", aot_dir=tmp_path / "aot", max_batch_images=1)
    try:
        eager = service.imagine(request(tmp_path, "eager"))
        shape = next(iter(service.aot.wanted.values()))
        assert [name for name, _, _ in shape.added] == ["text_embeds", "time_ids"]
        service.aot.wait(COMPILE_TIMEOUT_S)
        service.aot.loader_ready.wait(COMPILE_TIMEOUT_S)
        service.idle()
        assert shape.name in service.aot.loaded, service.aot.refused
        ahead = service.imagine(request(tmp_path, "ahead"))
        assert service.aot.calls == 1 + WHOLE_STEPS
        assert same_image(eager.images[0], ahead.images[0])
    finally:
        service.stop_compiling()


def test_the_worker_serves_with_the_packages_compiles_what_is_missing_and_stops_the_compiler_on_exit(
        compiled, tiny_model_dir, tmp_path):
    from tests.trainer.test_worker_run_many import Events
    from trainer.contract import protocol
    from trainer.generation.aot_kernels import AOT_CACHE
    from trainer.worker import EventWriter, JobControl, Worker

    shutil.copytree(compiled["root"] / "aot", tmp_path / "data" / AOT_CACHE)  # what an earlier run compiled
    events = Events()
    worker = Worker(EventWriter(events), JobControl(), pipe=load_pipeline(str(tiny_model_dir), "cpu", "fp32"),
                    device="cpu", model=str(tiny_model_dir), data_dir=tmp_path / "data", compile_ahead="on")
    worker.warm_up()  # as the worker starts: not waiting for the loader's preparation (aot_kernels.py)
    kernels = worker.generation.aot
    assert kernels.loader_ready.wait(COMPILE_TIMEOUT_S)
    worker.idle()  # its first idle moment adopts the packages on disk
    assert kernels.loaded and not kernels.refused
    before = kernels.calls
    params = {"prompt": "a photo of sid", "seed": 11, "steps": 3, "width": 64, "height": 64,
              "out_dir": str(tmp_path / "images")}
    worker.control.submit(protocol.run(1, "imagine", params))
    worker.control.jobs.put(None)
    worker.serve()
    assert [e["event"] for e in events.ends()[1]] == ["done"]
    assert kernels.calls == before + WHOLE_STEPS  # the member's job ran compiled from its first step
    # The same forward at the largest batch (a burst of 8 members), bare and with members' concepts mixed through
    # the slot, was wanted, and its compiling process started; the worker's exit ended it.
    assert kernels.compiles_started == 1 and not kernels.compiling
    assert [(shape.sample[0], shape.slot is None) for shape in kernels.wanted.values()] == [(16, True), (16, False)]


def test_a_compiling_process_that_dies_is_not_started_again_and_again(tiny_pipeline, tmp_path, monkeypatch):
    """Outside any one shape (here: a config it cannot build; in life a crash or the GPU's memory), the process ends
    without packages or `.failed` files: its shapes are refused for this run instead of a new process every idle
    moment."""
    import trainer.generation.aot_kernels as aot_kernels

    real = aot_kernels.architecture
    monkeypatch.setattr(aot_kernels, "architecture",
                        lambda unet: {**real(unet), "config": {**real(unet)["config"], "down_block_types": ["Nope"]}})
    kernels = AotKernels(tiny_pipeline.unet, tmp_path / "aot")
    shape = ForwardShape((2, 4, 8, 8), (2, 77, 32), "float32", "float32", "int64")
    kernels.want(shape)
    assert kernels.compile_wanted()
    kernels.wait(COMPILE_TIMEOUT_S)
    assert not kernels.compile_wanted() and kernels.compiles_started == 1
    assert "ended (1)" in kernels.refused[shape.name] and not list(kernels.dir.glob("*.failed"))
    assert "Nope" in (kernels.dir / "compile.log").read_text()


CRASH_ON_LOADING = """
import os
import signal

import torch._inductor


def crash(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGSEGV)


torch._inductor.aoti_load_package = crash
"""


def test_a_package_whose_loading_crashes_is_never_loaded_by_the_worker(tiny_pipeline, tmp_path, monkeypatch):
    """On an H200 loading the SD 1.5 package segfaulted inside torch's loader (docs/BENCHMARKS.md). Here the loader
    of the compiling process really dies of SIGSEGV (a sitecustomize on its path replaces it): the worker never
    loads that package, refuses the shape for this run, and after a restart it is recorded as failed without being
    compiled again."""
    crash_path = tmp_path / "crash"
    crash_path.mkdir()
    (crash_path / "sitecustomize.py").write_text(CRASH_ON_LOADING)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(crash_path), os.environ.get("PYTHONPATH", "")]))
    unet = tiny_pipeline.unet
    shape = ForwardShape((2, 4, 8, 8), (2, 77, unet.config.cross_attention_dim), "float32", "float32", "int64")
    kernels = AotKernels(unet, tmp_path / "aot")
    kernels.want(shape)
    assert kernels.compile_wanted()
    kernels.wait(COMPILE_TIMEOUT_S)
    assert kernels.adopt() == [] and not kernels.loaded
    assert (kernels.dir / f"{shape.name}.pt2").is_file() and not (kernels.dir / f"{shape.name}.json").exists()
    assert (kernels.dir / f"{shape.name}.checking").is_file()
    assert not kernels.compile_wanted()
    assert f"ended ({-signal.SIGSEGV})" in kernels.refused[shape.name]

    monkeypatch.undo()  # the worker restarts; its compiling process would load normally now
    restarted = AotKernels(unet, tmp_path / "aot")
    restarted.want(shape)
    assert restarted.compile_wanted()
    restarted.wait(COMPILE_TIMEOUT_S)
    assert restarted.adopt() == [] and not restarted.loaded
    assert "crashed the process that checked it" in restarted.refused[shape.name]
    assert not (restarted.dir / f"{shape.name}.checking").exists()
    assert (restarted.dir / "compile.log").read_text().count("done in") == 0  # not compiled a second time
    restarted.want(shape)
    assert not restarted.wanted and not restarted.compile_wanted()


def test_a_training_keeps_the_layout_of_weights_compiled_forwards_read(tiny_model_dir):
    from trainer.generation.aot_shapes import WEIGHTS_BOUND_ATTR, channels_last
    from trainer.training.lora_scope import LoraTrainingScope

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")
    pipe.unet.to(memory_format=torch.channels_last)
    LoraTrainingScope(pipe, "test")._training_layout()
    assert not channels_last(pipe.unet)  # as before: trained in the default layout
    pipe.unet.to(memory_format=torch.channels_last)
    setattr(pipe.unet, WEIGHTS_BOUND_ATTR, True)
    pointers = [p.data_ptr() for p in pipe.unet.parameters()]
    LoraTrainingScope(pipe, "test")._training_layout()
    assert channels_last(pipe.unet) and [p.data_ptr() for p in pipe.unet.parameters()] == pointers


def test_an_idle_worker_adopts_packages_that_appear(compiled, tiny_model_dir, tmp_path, monkeypatch, capfd):
    import threading
    import time

    import trainer.worker as worker_module
    from tests.trainer.test_worker_run_many import Events
    from trainer.generation.aot_kernels import AOT_CACHE
    from trainer.worker import EventWriter, JobControl, Worker

    monkeypatch.setattr(worker_module, "IDLE_POLL_S", 0.05)
    worker = Worker(EventWriter(Events()), JobControl(), pipe=load_pipeline(str(tiny_model_dir), "cpu", "fp32"),
                    device="cpu", model=str(tiny_model_dir), data_dir=tmp_path / "data", compile_ahead="on")
    worker.imagine_request({"prompt": "", "out_dir": str(tmp_path / "unused")})  # the service, nothing compiled yet
    kernels = worker.generation.aot
    assert not kernels.loaded
    shutil.copytree(compiled["root"] / "aot", tmp_path / "data" / AOT_CACHE, dirs_exist_ok=True)  # a compile ends
    serving = threading.Thread(target=worker.serve)
    serving.start()
    try:
        deadline = time.monotonic() + 60
        while not kernels.loaded and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.control.jobs.put(None)
        serving.join(60)
    assert set(kernels.loaded) == set(compiled["service"].aot.loaded) and not serving.is_alive()
    assert "worker: compiled UNet forward in use for 2 rows of 32x32 latents" in capfd.readouterr().err


def test_folders_compiled_by_another_torch_or_diffusers_are_removed_when_kernels_are_made(tiny_pipeline, tmp_path):
    """Each torch or diffusers upgrade leaves a folder of packages (a few hundred MB) that no worker of this
    installation can load again; other base models' folders of the same versions stay (another worker sharing the
    data directory may serve them), and so does any folder written to within a day."""
    from trainer.generation.aot_kernels import FACTS_FILE, STALE_AFTER_S
    from trainer.generation.aot_shapes import architecture

    root, facts = tmp_path / "aot", architecture(tiny_pipeline.unet)
    long_ago = time.time() - STALE_AFTER_S - 60

    def folder(key: str, recorded: dict | None, *, written: float = long_ago) -> Path:
        path = root / key
        path.mkdir(parents=True)
        (path / "bare-2x4x8x8.pt2").write_bytes(b"package")
        if recorded is not None:
            (path / FACTS_FILE).write_text(json.dumps(recorded))
        for entry in [*path.iterdir(), path]:
            os.utime(entry, (written, written))
        return path

    old_torch = folder("0000000000000001", {**facts, "torch": "2.10.0"})
    old_diffusers = folder("0000000000000002", {**facts, "diffusers": "0.41.0"})
    unrecorded = folder("0000000000000003", None)  # made before the facts were recorded
    other_model = folder("0000000000000004", {**facts, "config": {**facts["config"], "sample_size": 128}})
    other_gpu = folder("0000000000000005", {**facts, "gpu": ["NVIDIA GeForce RTX 3060", [8, 6]]})
    just_made = folder("0000000000000006", None, written=time.time())  # another worker, before it writes its facts
    compiling = folder("0000000000000007", {**facts, "torch": "2.10.0"}, written=time.time())  # an older install's
    not_a_dict = folder("0000000000000008", None)
    (not_a_dict / FACTS_FILE).write_text("[1, 2]")
    os.utime(not_a_dict / FACTS_FILE, (long_ago, long_ago))
    not_ours = folder("inductor", None)
    (root / "0000000000000009").write_text("a file, not a folder")

    kernels = AotKernels(tiny_pipeline.unet, root)
    assert json.loads((kernels.dir / FACTS_FILE).read_text()) == json.loads(json.dumps(facts, default=str))
    assert not old_torch.exists() and not old_diffusers.exists() and not unrecorded.exists()
    kept = [other_model, other_gpu, just_made, compiling, not_a_dict, not_ours]
    assert all(path.is_dir() for path in kept) and (root / "0000000000000009").is_file()
    assert kernels.dir.is_dir()

    again = AotKernels(tiny_pipeline.unet, root)  # a restart keeps its own folder and its packages
    assert again.dir == kernels.dir and all(path.is_dir() for path in kept)


def test_a_folder_whose_facts_cannot_be_read_is_left_alone(tmp_path):
    from trainer.generation.aot_kernels import FACTS_FILE, STALE_AFTER_S, prune_stale

    torn = tmp_path / "00000000000000aa"
    torn.mkdir()
    (torn / FACTS_FILE).write_text("{not json")
    later = time.time() + 2 * STALE_AFTER_S
    assert prune_stale(tmp_path, {"torch": "2.13.0", "diffusers": "0.42.1"}, now=later) == [] and torn.is_dir()
    assert prune_stale(tmp_path / "missing", {"torch": "2.13.0", "diffusers": "0.42.1"}) == []
