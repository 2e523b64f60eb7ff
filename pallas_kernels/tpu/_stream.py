"""The page loop shared by the TPU kernels: a data-dependent number of pages, prefetched num_slots - 1 ahead.

    for u in range(n):               # n is a traced scalar (from SMEM): a fori_loop, not a grid axis
        wait for page u (its DMAs were started num_slots - 1 iterations earlier)
        start the DMAs of page u + num_slots - 1 into the slot page u - 1 used (already consumed)
        compute(u, slot of page u)

`copies(u, slot)` returns the DMA descriptors of page u into buffer slot `slot`; it must build identical
descriptors every time it is called (start and wait are separate calls on separate descriptor objects).
With num_slots = 2 this is the classic double buffer; more slots keep more small DMAs in flight, which is
what decode needs (a 32 KiB page moves in tens of ns, far less than one DMA's latency).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.experimental import pallas as pl


def stream_pages(n, num_slots: int, copies: Callable[[object, object], Sequence],
                 compute: Callable[[object, object], None]) -> None:
    if num_slots < 2:
        raise ValueError(f"num_slots must be >= 2, got {num_slots}")
    for j in range(num_slots - 1):                      # prologue: the first num_slots - 1 pages

        @pl.when(j < n)
        def _():
            for c in copies(j, j):
                c.start()

    def body(u, carry):
        slot = jax.lax.rem(u, num_slots)
        ahead = u + (num_slots - 1)

        @pl.when(ahead < n)
        def _():
            for c in copies(ahead, jax.lax.rem(ahead, num_slots)):
                c.start()

        for c in copies(u, slot):
            c.wait()
        compute(u, slot)
        return carry

    jax.lax.fori_loop(0, n, body, 0)
