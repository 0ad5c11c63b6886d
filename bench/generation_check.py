"""`python -m bench.generation_check`: on a GPU, check the fast generation paths against the plain ones.

- CUDA-graph UNet vs the same UNet eager (one request, its LoRA folded into the weights): max pixel difference.
- the LoRA folded into the weights vs the same LoRA through the slot (both in graphs): max pixel difference, timings,
  and the base weights bit-identical after both.
- imagine_many with 4 different LoRAs in one batch vs each request alone: max pixel difference.
- timings of one request with a LoRA (graphs on / off) and of the mixed batch; the LoRA switch.
On the tiny model (seconds), `--family sdxl` on the tiny SDXL one; `python -m bench` times the full-size
architectures.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.ours import lora_switch


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def main(argv=None) -> dict:
    import trainer.generation.service as generation
    from bench.fixtures import write_random_loras
    from trainer.generation.service import GenerationService, ImagineRequest
    from trainer.models.loading import load_pipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--family", default="sd1", choices=("sd1", "sdxl"))
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="gencheck-"))
    from trainer.models.tiny import make_tiny_model

    model_dir, size = make_tiny_model(root / "model", family=args.family), 64
    pipe = load_pipeline(str(model_dir), "cuda", "auto")
    loras = write_random_loras(pipe, root / "loras", 4, 16, seed=0)
    service = GenerationService(pipe, model_name="check")
    concepts = [{"concept_id": i, "token": f"membr{i}", "class_name": "man", "lora_path": str(p), "weight": 1.0}
                for i, p in enumerate(loras)]

    def req(i, name, seed):
        return ImagineRequest.from_params({"prompt": f"a photo of membr{i} man", "seed": seed, "steps": args.steps,
                                           "cfg": 7, "width": size, "height": size, "out_dir": str(root / name),
                                           "concepts": [concepts[i]]})

    def timed(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, result

    out = {}
    graphs = service.graphs
    timed(lambda: service.imagine(req(0, "warm", 1)))
    runs = [timed(lambda: service.imagine(req(0, f"g{i}", 1)))[0] for i in range(3)]
    fast = service.imagine(req(0, "fast", 1))
    service.graphs = None
    timed(lambda: service.imagine(req(0, "eagerwarm", 1)))
    eager_runs = [timed(lambda: service.imagine(req(0, f"e{i}", 1)))[0] for i in range(2)]
    eager = service.imagine(req(0, "eager", 1))
    service.graphs = graphs
    out["one_image_graph_s"], out["one_image_eager_s"] = sorted(runs)[1], min(eager_runs)
    out["graph_vs_eager_max_pixel_diff"] = int(np.abs(_pixels(fast.images[0]) - _pixels(eager.images[0])).max())

    def base_weights():  # by name without peft's ".base_layer" (the slot wraps more layers)
        return {n.replace(".base_layer", ""): p.detach().clone() for n, p in pipe.unet.named_parameters()
                if ".lora_" not in n}

    weights_before = base_weights()
    folded_runs, slot_runs = service.adapters.runs["unet folded"], service.adapters.runs["unet slot"]
    same_loras = generation.same_loras
    generation.same_loras = lambda groups: False  # every loop through the slot, as a mixed batch goes
    try:
        timed(lambda: service.imagine(req(0, "slotwarm", 1)))
        slot_times = [timed(lambda: service.imagine(req(0, f"s{i}", 1)))[0] for i in range(3)]
        slot = service.imagine(req(0, "slot", 1))
    finally:
        generation.same_loras = same_loras
    out["one_image_slot_graph_s"] = sorted(slot_times)[1]
    out["folded_vs_slot_max_pixel_diff"] = int(np.abs(_pixels(fast.images[0]) - _pixels(slot.images[0])).max())
    out["paths_ran"] = {"unet folded": service.adapters.runs["unet folded"] - folded_runs,
                        "unet slot": service.adapters.runs["unet slot"] - slot_runs}
    weights_after = base_weights()
    out["base_weights_bit_identical"] = weights_after.keys() == weights_before.keys() and all(
        torch.equal(weights_after[n], weights_before[n]) for n in weights_before)
    alone = [service.imagine(req(i, f"alone{i}", 10 + i)) for i in range(4)]
    batch = [req(i % 4, f"mixed{i}", 10 + i % 4) for i in range(8)]
    timed(lambda: service.imagine_many(batch))
    seconds, together = timed(lambda: service.imagine_many(batch))
    out["mixed_8_images_s"] = seconds
    out["mixed_images_per_s"] = 8 / seconds
    out["mixed_vs_alone_max_pixel_diff"] = max(int(np.abs(_pixels(a.images[0]) - _pixels(b.images[0])).max())
                                               for a, b in zip(alone, together[:4]))
    out["lora_on_vs_off_differ"] = bool(np.abs(_pixels(alone[0].images[0]) - _pixels(alone[1].images[0])).max() > 0)
    switch = []
    for i in range(8):
        switch.append(timed(lambda: lora_switch(service, loras[i % 2]))[0] * 1e3)
    out["switch_ms"] = sorted(switch)[len(switch) // 2]
    out["graph_captures"], out["graph_replays"] = graphs.captures, graphs.replays
    out["family"] = service.family.name
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
