"""Launch configurations: a heuristic keyed on the class count C, the element size of
the logits and the kernel family (target-only or bce), never on N, so one compiled
kernel serves every batch size and the choice is stable under torch.compile's dynamic
shapes.

Two regimes:

* the row fits on chip (next_pow2(C) <= single_max): one tile per row held in
  registers from the load to the gradient store (traffic = read + write). Small C
  packs several rows per program so a program still moves >= min_tile elements
  (C = 16: 64 rows per program; ImageNet's C = 1000: one row of 1024, 2 warps);
* longer rows: column blocks of stream_block streamed twice (stats, then gradient in
  reverse order, L2-warm; bce three times) by a persistent grid of stream_programs()
  programs, each looping over rows, so that the rows in flight fit in L2.

Why these numbers (from the AOT check, ``tests/test_triton_aot.py`` and ``report --all``):
ptxas (sm_90 especially) spills a few bytes rather than use more registers in several
configurations: 16-warp tiles of 8192 elements, small-C tiles holding more than 8 rows
per warp (the per-row variant math is replicated per row a thread holds), bce streamed
with 8 warps. The shipped numbers are the ones with which every specialization compiles
without spills on sm_80 and sm_90: <= 16 float32 row values per thread for the
target-only kernels and <= 8 for bce on chip (three reductions, more live temporaries);
on-chip rows up to 4096 classes (bce 2048), >= 1024 elements and <= 8 rows per warp per
program; streamed
blocks of 4096 with 8 warps (bce: 2048, 4 warps). Longer on-chip rows would also leave
one program per SM, with no overlap of one program's loads and another's arithmetic,
while the streamed regime's re-read is served by L2.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import triton

#: Variant id of bce (fusedloss.variants.Variant.BCE): its kernels hold more per element.
_BCE = 1


@dataclass(frozen=True)
class Family:
    single_max: int         # largest power-of-two row kept whole in registers
    values_per_thread: int  # row values per thread in the on-chip regime
    stream_block: int       # column block of the streamed regime
    stream_warps: int
    min_tile: int = 1024    # minimum elements per program (several rows for small C)
    # Software pipelining (cp.async) of the streamed loops: 1 = off. On, the AOT check showed
    # +100 registers or spills (the staged tiles live in shared memory *and* registers) and
    # bf16 loads were not pipelined at all; worth re-measuring on a GPU.
    stream_stages: int = 1
    #: streamed programs: None = from the device (stream_programs()); the tests set it
    stream_programs: int | None = None


TARGET = Family(single_max=4096, values_per_thread=16, stream_block=4096, stream_warps=8)
BCE = Family(single_max=2048, values_per_thread=8, stream_block=2048, stream_warps=4)
MIN_BLOCK_C = 16
ROWS_PER_WARP = 4
#: Streamed regime: the rows in flight (one per program) should fit in this part of L2.
#: The first pass loads with priority evict_last and the gradient stores / last reads with
#: evict_first, so most of L2 can hold them.
L2_FRACTION = 0.75
MAX_WARPS = 16


@dataclass(frozen=True)
class Config:
    block_n: int      # rows per program
    block_c: int      # columns per tile
    single: bool      # the whole row is one tile (kept in registers)
    num_warps: int
    num_stages: int = 1

    @property
    def tile(self) -> int:
        return self.block_n * self.block_c


_FAMILIES = {"target": TARGET, "bce": BCE}


def family(variant: int) -> Family:
    return _FAMILIES["bce" if int(variant) == _BCE else "target"]


@contextmanager
def override(**changes):
    """Temporarily change both families' limits (e.g. ``single_max=32, stream_block=16``):
    the interpreter tests use it so that rows of a few dozen classes already span several
    column blocks with a ragged tail, in both regimes, at interpreter speed."""
    saved = dict(_FAMILIES)
    try:
        for k in _FAMILIES:
            _FAMILIES[k] = replace(_FAMILIES[k], **changes)
        yield
    finally:
        _FAMILIES.update(saved)


def _warps_for(tile: int, values_per_thread: int) -> int:
    return max(1, min(MAX_WARPS, tile // (32 * values_per_thread)))


def fwd_config(n_cols: int, elem_size: int, variant: int = 0) -> Config:
    """Forward (and fused-gradient) kernel configuration for rows of ``n_cols`` logits of
    ``elem_size`` bytes. (The element size does not change the choice today: the limits
    are on float32 values held per thread, whatever the storage type.)"""
    f = family(variant)
    bc = max(MIN_BLOCK_C, triton.next_power_of_2(int(n_cols)))
    if bc <= f.single_max:
        tile = max(bc, f.min_tile)
        block_n = tile // bc
        # at most ROWS_PER_WARP rows per warp (more warps for small C): a thread runs the per-row variant math once for
        # every row it holds, and more rows per thread made ptxas spill (C = 16..128)
        warps = max(_warps_for(tile, f.values_per_thread), min(8, block_n // ROWS_PER_WARP))
        return Config(block_n=block_n, block_c=bc, single=True, num_warps=warps)
    return Config(block_n=1, block_c=f.stream_block, single=False, num_warps=f.stream_warps,
                  num_stages=f.stream_stages)


def stream_programs(n_cols: int, elem_size: int, variant: int, sm_count: int, l2_bytes: int) -> int:
    """Programs of a streamed forward: a persistent grid, each program looping over rows.

    The second (bce: also third) pass re-reads a row from L2 only if the rows in flight,
    one per program, still sit there: P * C * E <= L2_FRACTION * L2. DRAM also needs bytes
    in flight (~20 KB per SM on an H100: 3.35 TB/s x ~0.8 us / 132 SMs) and one 8-warp
    program keeps one block (8 KB bf16, 16 KB fp32) in flight, so P stays within
    [2, 4] x SMs. Rows up to ~64k bf16 / ~48k fp32 classes then fit; longer rows trade part
    of the L2 hits for bandwidth (the report predicts how much). Keyed on C, the dtype and
    the device, never on N."""
    f = family(variant)
    if f.stream_programs is not None:
        return f.stream_programs
    fit = int(L2_FRACTION * l2_bytes) // max(1, int(n_cols) * elem_size)
    return max(2 * sm_count, min(4 * sm_count, fit))


def bwd_config(n_cols: int, elem_size: int, variant: int = 0) -> Config:
    """The standalone backward (gradient from saved stats) streams column blocks of at
    most stream_block, several rows per program for small C."""
    f = family(variant)
    bc = max(MIN_BLOCK_C, min(triton.next_power_of_2(int(n_cols)), f.stream_block))
    tile = max(bc, f.min_tile)
    # >= 4 warps: with 2 (fp16, C = 256, weights + smoothing) ptxas spilled 4 bytes on sm_80
    return Config(block_n=tile // bc, block_c=bc, single=False,
                  num_warps=max(4, _warps_for(tile, f.values_per_thread)))


def scale_config(n_cols: int) -> Config:
    bc = max(MIN_BLOCK_C, min(triton.next_power_of_2(int(n_cols)), 4096))
    tile = max(bc, TARGET.min_tile)
    return Config(block_n=tile // bc, block_c=bc, single=False, num_warps=4)


def fwd_buckets(variant: int) -> list[int]:
    """One C per distinct forward configuration: each on-chip tile width, and one streamed C."""
    f = family(variant)
    cs, c = [], MIN_BLOCK_C
    while c <= f.single_max:
        cs.append(c)
        c *= 2
    return cs + [f.single_max * 2 + 1]


def bwd_buckets(variant: int) -> list[int]:
    f = family(variant)
    cs, c = [], MIN_BLOCK_C
    while c <= f.stream_block:
        cs.append(c)
        c *= 2
    return cs + [f.stream_block * 2 + 1]
