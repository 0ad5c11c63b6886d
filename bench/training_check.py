"""`python -m bench.training_check`: on a GPU, check the CUDA-graph training step against the eager one.

Tiny model, 120 steps at batch 2 with prior preservation and the text-encoder LoRA, deterministic kernels
(`--gradient-checkpointing`: every run with it, as BOOTHBOT_TRAIN_MEMORY=low trains):
- the LoRA trained with the step replayed from a CUDA graph vs the eager step (max difference of every tensor);
- the same graph training cut into slices and resumed vs uninterrupted (the checkpoint path with graphs);
- how many steps were replayed, and the seconds per phase of each run.
The SD 1.5-size timings come from `python -m bench --only train`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def _tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def _max_difference(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(argv=None) -> dict:
    from bench.fixtures import write_photos
    from trainer.models.loading import load_pipeline
    from trainer.models.tiny import make_tiny_model
    from trainer.training.engine import TrainSpec, train_concept

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="train every run with it (low memory)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="traincheck-"))
    pipe = load_pipeline(str(make_tiny_model(root / "model")), "cuda", "auto")
    photos = root / "photos"
    write_photos(photos, 4, 64, seed=0)

    def spec(name: str, graphs: bool, slice_s=None) -> TrainSpec:
        return TrainSpec(concept_id=name, token="squidarth", class_name="man", photos_dir=photos,
                         out_dir=root / name, steps=args.steps, seed=3, batch_size=args.batch, class_images=4,
                         sample_count=0, cuda_graphs=graphs, slice_s=slice_s,
                         gradient_checkpointing=args.gradient_checkpointing)

    def train(name: str, graphs: bool, slice_s=None) -> tuple[dict, int]:
        slices = 0
        while True:
            outcome = train_concept(pipe, spec(name, graphs, slice_s), cache_dir=root / "cache")
            slices += 1
            if outcome.status == "done":
                return outcome.result, slices
            if outcome.status != "paused":
                raise RuntimeError(f"training ended {outcome.status}")

    eager, _ = train("eager", graphs=False)
    graph, _ = train("graph", graphs=True)
    # Slices as long as about 5 eager steps: each slice has its 3 eager warm-up steps, a capture and replays.
    eager_step_s = eager["timings"]["steps"] / args.steps
    sliced, slices = train("sliced", graphs=True, slice_s=5 * eager_step_s)
    out = {
        "device": __import__("torch").cuda.get_device_name(), "gradient_checkpointing": args.gradient_checkpointing,
        "graph_steps": graph["graph_steps"], "steps": graph["steps"],
        "graph_vs_eager_max_abs_diff": _max_difference(_tensors(graph["lora"]), _tensors(eager["lora"])),
        "sliced_graph_vs_uninterrupted_max_abs_diff": _max_difference(_tensors(sliced["lora"]),
                                                                      _tensors(graph["lora"])),
        "sliced_runs": slices, "sliced_last_slice_graph_steps": sliced["graph_steps"],
        "timings_eager": eager["timings"], "timings_graph": graph["timings"],
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
