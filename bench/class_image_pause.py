"""`python -m bench.class_image_pause`: how long a member's /imagine waits behind a training's class images.

A training asked to yield while it makes class images now pauses between two sampler steps of its batch (before:
at the end of the batch, ≈2.2 s for 8 images at 512² on an H200). On the SD 1.5-size random model (GPU; `--tiny`:
the tiny one, on CPU, for CI), this makes one class-image set uninterrupted and the same set again with a yield
asked at different moments of each batch, the batches kept in between as the worker keeps them, and reports:
- the seconds of one uninterrupted batch (a later one: the first also captures the CUDA graph);
- each wait from the yield request to the batch paused with the GPU idle (p50 and max);
- whether the interrupted set's images are identical to the uninterrupted set's.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _pipeline(tiny: bool, root: Path):
    import torch

    if tiny:
        from trainer.models.loading import load_pipeline
        from trainer.models.tiny import make_tiny_model

        return load_pipeline(str(make_tiny_model(root / "model")), "cpu", "auto"), 32, 2
    from bench.sd15 import SD15_RESOLUTION, build_sd15_pipeline

    return build_sd15_pipeline("cuda").to(dtype=torch.float16), SD15_RESOLUTION, 8


def _sync(pipe) -> None:
    import torch

    if pipe.device.type == "cuda":
        torch.cuda.synchronize()


def _pixels(directory: Path) -> list[bytes]:
    from PIL import Image

    result = []
    for path in sorted(directory.glob("*.png")):
        with Image.open(path) as image:
            result.append(image.convert("RGB").tobytes())
    return result


def main(argv=None) -> dict:
    import torch

    from trainer.contract.train_spec import spec_default
    from trainer.training.images import unet_graphs
    from trainer.training.priors import ClassImageSet, UnfinishedBatches, model_fingerprint

    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU (CI)")
    parser.add_argument("--batches", type=int, default=2, help="at least 2 (a batch's time is between two)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.batches < 2:
        parser.error("--batches must be at least 2")
    root = Path(tempfile.mkdtemp(prefix="class-image-pause-"))
    pipe, side, batch = _pipeline(args.tiny, root)
    fingerprint = model_fingerprint(pipe)

    def class_set(name: str) -> ClassImageSet:
        return ClassImageSet.for_model(root / name, fingerprint, "a photo of a man", side, batch * args.batches,
                                       spec_default("class_image_steps"))

    with unet_graphs(pipe) as graphs:
        whole, batch_ends = class_set("whole"), []
        assert whole.ensure(pipe, batch_size=batch, deadline=None, should_stop=lambda: False, graphs=graphs,
                            on_image=lambda done, count: batch_ends.append(time.monotonic())) == "complete"
        # From the first batch's end to the last's: neither the first batch's graph capture nor the set's latents.
        batch_s = (batch_ends[-1] - batch_ends[0]) / (len(batch_ends) - 1)

        paused_set, unfinished, waits = class_set("paused"), UnfinishedBatches(), []
        offsets = [0.15, 0.45, 0.75]  # of a batch's time, from the start of each run
        while True:
            flip_at = time.monotonic() + offsets[len(waits) % len(offsets)] * batch_s
            status = paused_set.ensure(pipe, batch_size=batch, deadline=None, should_stop=lambda: False,
                                       should_yield=lambda: time.monotonic() >= flip_at, graphs=graphs,
                                       unfinished=unfinished)
            _sync(pipe)  # the GPU idle: what a member's /imagine would start behind
            if status == "complete":
                break
            waits.append(max(0.0, time.monotonic() - flip_at))
    waits.sort()
    result = {
        "device": torch.cuda.get_device_name() if pipe.device.type == "cuda" else "cpu",
        "batch_images": batch, "resolution": side, "batch_s": round(batch_s, 3),
        "pauses": len(waits),
        "wait_p50_s": round(waits[len(waits) // 2], 4) if waits else None,
        "wait_max_s": round(waits[-1], 4) if waits else None,
        "identical_images": _pixels(whole.directory) == _pixels(paused_set.directory),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return result


if __name__ == "__main__":
    main()
