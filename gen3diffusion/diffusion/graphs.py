"""CUDA graphs for the fixed-shape parts of a sampling step.

At batch 1 a joint step launches a few thousand small kernels (MV UNet, VAE, 3D U-Net); on an H100 the CPU cannot
issue them as fast as the GPU runs them. A CUDA graph records one step's launches once and replays them with a
single call, with the same kernels and so the same numbers as eager execution.

A graph replays fixed memory addresses, so everything it reads must live at the same place on every replay:

* per-step inputs (``x_t``, the timestep, ...) are passed to :meth:`CUDAGraphs.run`, which copies them into the
  graph's own input buffers;
* per-call constants (the conditioning, the Plücker maps) go through :meth:`CUDAGraphs.pin` first, which copies them
  into persistent buffers that the captured graphs keep reading on later calls.

Graphs are cached by name and input shapes, so a second call with the same batch size replays without capturing.
Captured graphs bake in the model weights' addresses: call :meth:`CUDAGraphs.clear` after replacing a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor

__all__ = ["CUDAGraphs"]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]  # the buffers the graph reads
    outputs: list[Tensor]  # the buffers the graph writes


class CUDAGraphs:
    """Captures and replays tensor functions as CUDA graphs; all graphs share one memory pool."""

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup  # eager runs on a side stream before capture (cuDNN/cuBLAS choose their kernels)
        self._graphs: dict[Hashable, _Graph] = {}
        self._pinned: dict[Hashable, Tensor] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Forget every captured graph and pinned buffer (needed after a model is replaced or moved)."""
        self._graphs.clear()
        self._pinned.clear()
        self._pool = None

    def pin(self, name: str, tensor: Tensor) -> Tensor:
        """A persistent buffer holding a copy of ``tensor`` (one per name, shape, dtype and layout), for graphs to
        read: channels_last if ``tensor`` is (so an activation's readers take the path they take on the original),
        else contiguous."""
        channels_last = tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(
            memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        key = (name, tuple(tensor.shape), layout, tensor.dtype, tensor.device)
        buffer = self._pinned.get(key)
        if buffer is None:
            buffer = self._pinned[key] = torch.empty_like(tensor, memory_format=layout)
        return buffer.copy_(tensor)

    def run(self, name: Hashable, fn: Callable[..., Tensor | Sequence[Tensor]], *inputs: Tensor) -> tuple[Tensor, ...]:
        """``fn(*inputs)`` as a tuple of tensors, replayed from the graph captured for ``name`` and these shapes.

        ``fn`` must be a pure function of ``inputs`` and of pinned or constant tensors, return only tensors, and not
        synchronise with the CPU. The results are fresh copies, safe to keep across later calls.
        """
        key = (name, tuple((tuple(x.shape), x.dtype, x.device) for x in inputs))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(fn, inputs)
        for buffer, x in zip(entry.inputs, inputs):
            buffer.copy_(x)
        entry.graph.replay()
        return tuple(out.clone() for out in entry.outputs)

    def _capture(self, fn: Callable[..., Tensor | Sequence[Tensor]], inputs: Sequence[Tensor]) -> _Graph:
        static_inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # the outputs of every graph stay referenced here, so graphs sharing the pool never overwrite each other's
        # results; their temporaries are reused, which is safe because the graphs never run concurrently
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(*static_inputs)
        outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        return _Graph(graph, static_inputs, outputs)
