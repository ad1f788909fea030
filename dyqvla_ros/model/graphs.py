"""Decode steps replayed from CUDA graphs, one per activation bit-width.

Batch-1 decode of 7 tokens is bound by weight bytes and, in eager PyTorch, by kernel
launches (32 layers x ~15 kernels x 7 tokens). With a static KV cache every decode
forward reads and writes fixed addresses, so one forward can be captured once and
replayed. Paper §V-B routes decode to a pre-compiled kernel per precision; a graph per
precision is our version: the dispatched b*_t picks which graph is replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

log = logging.getLogger(__name__)


class DecodeGraphs:
    """One captured single-token decode forward per bit-width, sharing one memory pool.

    ``forward(token, position)`` must run the language model on a (1, 1) token at a
    (1,) cache position against a static cache, at the activation bits in force, and
    return the next-token logits (1, V). Capture raises if anything in it is not
    capturable; callers fall back to eager decode.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        bits: Iterable[int],
        precision: Callable[[int], object],
        device: torch.device,
    ) -> None:
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        for b in bits:
            with precision(b):
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # warm-up: allocations, Triton compilation
                    for _ in range(2):
                        forward(self.token, self.position)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[b] = forward(self.token, self.position)
                pool = graph.pool()
                self.graphs[b] = graph
        log.info("captured decode graphs for %s-bit activations", sorted(self.graphs))

    def step(self, bits: int, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits after feeding ``token`` at ``position``, by replaying the graph of ``bits``."""
        self.token.copy_(token)
        self.position.fill_(position)
        self.graphs[bits].replay()
        return self.logits[bits]
