"""Wall-clock timing: warm-up, many repeats, median and quartiles.

CPU: ``time.perf_counter`` around each call (CPU ops are synchronous), with the
garbage collector paused so a collection never lands inside a sample.
CUDA: a pair of CUDA events around each call, and the L2 cache flushed before
each one by overwriting a buffer larger than any L2 made so far, the method
``triton.testing.do_bench`` uses; otherwise a kernel that rereads the logits
its predecessor just wrote would be timed from cache, not from HBM.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

# Per-cell time budget when --repeat is not given: enough samples for a stable
# median without letting one slow backend dominate the run.
BUDGET_S = {"cpu": 1.0, "cuda": 0.5}
REPEAT_RANGE = {"cpu": (5, 50), "cuda": (20, 200)}
# 256 MiB: H100's L2 is 50 MiB, B200's 126 MiB.
_L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Timing:
    """Summary of the samples, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    repeats: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _summarise(samples_ms: list[float]) -> Timing:
    q = statistics.quantiles(samples_ms, n=4, method="inclusive") if len(samples_ms) > 1 else [samples_ms[0]] * 3
    return Timing(statistics.median(samples_ms), q[0], q[2], min(samples_ms), len(samples_ms))


def _repeats(first_ms: float, device: torch.device, repeat: int | None) -> int:
    if repeat is not None:
        return repeat
    lo, hi = REPEAT_RANGE[device.type]
    fit = int(BUDGET_S[device.type] * 1e3 / max(first_ms, 1e-3))
    return max(lo, min(hi, fit))


class _CpuClock:
    """``time.perf_counter`` around a call: CPU ops return when they are done."""

    def sample(self, fn: Callable[[], object]) -> Callable[[], float]:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return lambda: ms

    def sync(self) -> None:
        pass


class _CudaClock:
    """CUDA events around a call, after overwriting a buffer larger than L2."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def sample(self, fn: Callable[[], object]) -> Callable[[], float]:
        self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        # Read only after sync(): an event's time is undefined until it completed.
        return lambda: start.elapsed_time(end)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)


def measure_interleaved(
    fns: Sequence[Callable[[], object]], device: torch.device, warmup: int, repeat: int | None
) -> list[Timing]:
    """Time several callables with their samples interleaved: f0, f1, f0, f1, ...

    Used to pair each loss with the copy it is divided by: on a shared machine
    the load changes from second to second, and interleaving makes both see
    the same conditions, so their ratio stays meaningful when the absolute
    times do not. The repeat count is chosen from the first round's total.
    """
    clock: _CpuClock | _CudaClock = _CudaClock(device) if device.type == "cuda" else _CpuClock()
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        for fn in fns:
            for _ in range(warmup):
                fn()
        clock.sync()
        # No gc.collect() here: with Dynamo imported the heap is large and one
        # collection costs ~0.15 s, more than a whole small cell. Pausing the
        # collector is what keeps it out of the samples.
        gc.disable()
        try:
            rounds = [[clock.sample(fn) for fn in fns]]
            clock.sync()
            first = sum(read() for read in rounds[0])
            for _ in range(_repeats(first, device, repeat) - 1):
                rounds.append([clock.sample(fn) for fn in fns])
            # One synchronisation for the whole batch: a sync per sample would
            # add launch gaps between samples but not change the event times.
            clock.sync()
        finally:
            gc.enable()
    return [_summarise([r[i]() for r in rounds]) for i in range(len(fns))]


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int | None) -> Timing:
    """Time ``fn()`` on ``device``; ``repeat=None`` picks the count from the time budget."""
    return measure_interleaved([fn], device, warmup, repeat)[0]
