"""Wall-clock timing of one callable: warm-up, many repeats, median and spread.

CPU: ``time.perf_counter`` around each call (CPU ops are synchronous), with the
garbage collector paused so a collection never lands inside a sample.
CUDA: a pair of CUDA events around each call, and the L2 cache flushed before
each one by overwriting a buffer larger than any L2 made so far, the method
``triton.testing.do_bench`` uses; otherwise a kernel that rereads the logits
its predecessor just wrote would be timed from cache, not from HBM.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

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

    @property
    def spread(self) -> float:
        """Half the inter-quartile range relative to the median (0.05 = +-5%)."""
        return (self.p75_ms - self.p25_ms) / (2 * self.median_ms) if self.median_ms > 0 else 0.0

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


def _time_cpu(fn: Callable[[], object], warmup: int, repeat: int | None) -> Timing:
    for _ in range(warmup):
        fn()
    # No gc.collect() here: with Dynamo imported the heap is large and one
    # collection costs ~0.15 s, more than a whole small cell. Pausing the
    # collector is what keeps it out of the samples.
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        samples = [(time.perf_counter() - t0) * 1e3]
        for _ in range(_repeats(samples[0], torch.device("cpu"), repeat) - 1):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return _summarise(samples)


def _time_cuda(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int | None) -> Timing:
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def sample() -> tuple[torch.cuda.Event, torch.cuda.Event]:
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        s, e = sample()
        torch.cuda.synchronize()
        first = s.elapsed_time(e)
        events = [sample() for _ in range(_repeats(first, device, repeat) - 1)]
        # One synchronisation for the whole batch: a sync per sample would add
        # launch gaps but not change the event times; never read events unsynced.
        torch.cuda.synchronize()
    return _summarise([first] + [s.elapsed_time(e) for s, e in events])


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int | None) -> Timing:
    """Time ``fn()`` on ``device``; ``repeat=None`` picks the count from the time budget."""
    if device.type == "cuda":
        return _time_cuda(fn, device, warmup, repeat)
    return _time_cpu(fn, warmup, repeat)
