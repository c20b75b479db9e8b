"""Launch configurations: a heuristic keyed on the class count C and the element
size of the logits, never on N (so one compiled kernel serves every batch size
and the choice is stable under torch.compile's dynamic shapes).

Two regimes:

* the row fits on chip (next_pow2(C) <= SINGLE_MAX[elem]): one tile per row held
  in registers from the load to the gradient store (traffic = read + write). Small
  C packs several rows per program so a program still moves >= MIN_TILE elements
  (ImageNet's C = 1000: 2 rows of 1024 per program);
* longer rows: column blocks of BLOCK_C streamed twice (stats, then gradient in
  reverse order, L2-warm), one row per program.

The thresholds keep <= 32 float32 row values per thread (16 warps x 32 lanes x 32 =
16384 elements), which ptxas fits without spills for every variant on sm_80 and sm_90
(``python -m fusedloss.triton_kernels.report`` prints the registers; the AOT test
asserts no spills).
"""
from __future__ import annotations

from dataclasses import dataclass

import triton

#: Largest power-of-two row kept whole in registers, per element size of the logits.
SINGLE_MAX = {2: 16384, 4: 16384}
#: Column block of the streamed (multi-block) regime.
STREAM_BLOCK = {2: 4096, 4: 4096}
STREAM_WARPS = 8
#: Minimum elements per program in the on-chip regime (several rows for small C).
MIN_TILE = 2048
#: Target float32 values per thread in the on-chip regime.
VALUES_PER_THREAD = 16
MAX_WARPS = 16


@dataclass(frozen=True)
class Config:
    block_n: int      # rows per program
    block_c: int      # columns per tile
    single: bool      # the whole row is one tile (kept in registers)
    num_warps: int

    @property
    def tile(self) -> int:
        return self.block_n * self.block_c


def _warps_for(tile: int) -> int:
    return max(1, min(MAX_WARPS, tile // (32 * VALUES_PER_THREAD)))


def fwd_config(n_cols: int, elem_size: int) -> Config:
    """Configuration of the forward (and fused-gradient) kernels for rows of ``n_cols``
    logits of ``elem_size`` bytes."""
    bc = max(16, triton.next_power_of_2(int(n_cols)))
    if bc <= SINGLE_MAX[elem_size]:
        tile = max(bc, MIN_TILE)
        return Config(block_n=tile // bc, block_c=bc, single=True, num_warps=_warps_for(tile))
    return Config(block_n=1, block_c=STREAM_BLOCK[elem_size], single=False, num_warps=STREAM_WARPS)


def bwd_config(n_cols: int, elem_size: int) -> Config:
    """The standalone backward streams the row once (twice for bce): column blocks of at
    most STREAM_BLOCK, several rows per program for small C."""
    bc = max(16, min(triton.next_power_of_2(int(n_cols)), STREAM_BLOCK[elem_size]))
    tile = max(bc, MIN_TILE)
    return Config(block_n=tile // bc, block_c=bc, single=False, num_warps=_warps_for(tile))


def scale_config(n_cols: int) -> Config:
    bc = max(16, min(triton.next_power_of_2(int(n_cols)), 4096))
    tile = max(bc, MIN_TILE)
    return Config(block_n=tile // bc, block_c=bc, single=False, num_warps=4)


#: Buckets the heuristic can return, for the AOT compile check: one C per distinct
#: on-chip tile width, plus one streamed C.
def config_buckets(elem_size: int) -> list[int]:
    cs = []
    c = 16
    while c <= SINGLE_MAX[elem_size]:
        cs.append(c)
        c *= 2
    cs.append(SINGLE_MAX[elem_size] * 2 + 1)
    return cs
