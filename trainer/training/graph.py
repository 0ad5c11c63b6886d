"""Replay a whole training step (forward, backward, clipping, optimiser) from one CUDA graph.

At the recipe's batch sizes a LoRA step is bound by Python and kernel launches, not by the GPU (docs/BENCHMARKS.md:
the GPU is busy 12 % of a batch-1 step, 69 % at batch 8). Captured once per training slice after a few eager
warm-up steps, the step is then one launch. This follows PyTorch's "whole network capture" recipe: warm-up on a
side stream, gradients set to None before the capture (the graph's backward then writes them into its own static
buffers), a capturable optimiser, no host syncs inside. Everything random is drawn outside the graph into static
buffers by the caller, so a replayed step does the eager step's math (its rounding differs slightly on the GPU:
docs/TRAINING.md).

Anything that cannot be captured (a library op that syncs with the host, for example) makes the capture fail; the
step then runs eagerly for the rest of the job and the reason is logged.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class GraphedStep:
    def __init__(self, compute: Callable[[bool], None], before_capture: Callable[[], None], *, warmup: int = 3):
        """`compute(zero_grad)` runs one step on the caller's static inputs (zero_grad: set grads to None after the
        optimiser step, as the eager loop does); `before_capture()` sets the gradients to None."""
        self.compute = compute
        self.before_capture = before_capture
        self.warmup = warmup
        self.graph = None
        self.failure: str | None = None
        self.eager_steps = 0
        self.replays = 0
        self._side = None  # ONE warm-up stream: the allocator caches blocks per stream, a new one each step would
                           # hold a whole step's activations per warm-up step (measured: 87 GB reserved at batch 8)

    def __call__(self) -> None:
        import torch

        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            return
        if self.failure is not None:
            self.compute(True)
            return
        if self.eager_steps < self.warmup:
            self._side = self._side or torch.cuda.Stream()
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                self.compute(True)
            torch.cuda.current_stream().wait_stream(self._side)
            self.eager_steps += 1
            return
        self._capture()
        self()

    def _capture(self) -> None:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up steps' cached blocks: the graph's own pool takes their place
        self.before_capture()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.compute(False)
        except Exception as exc:  # noqa: BLE001 - any failure to capture means: go on eagerly
            self.failure = f"{type(exc).__name__}: {exc}"
            log.warning("training step could not be captured in a CUDA graph; running it eagerly (%s)", self.failure)
            torch.cuda.synchronize()
            self.before_capture()  # gradients the aborted capture may have attached point into its pool
            return
        self.graph = graph

    def close(self) -> None:
        """Free the graph and its memory pool (the step's activations) now rather than at garbage collection."""
        had_graph = self.graph is not None
        self.graph = self._side = None
        if had_graph:
            import torch

            torch.cuda.empty_cache()  # a freed graph pool is only usable by others once handed back to the driver
