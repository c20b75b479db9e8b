"""Memory: peak extra bytes of one fwd+bwd, and the up-front "will it fit" check.

"Extra" means over the inputs: the logits and targets exist before the step
and are not counted; everything the step allocates is, including the gradient
it returns (one logits-sized tensor, so an ideal fused loss shows about 1.0x
the logits' size).
"""

from __future__ import annotations

from typing import Callable

import torch


def peak_extra_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``step()`` over what was live before it.

    CUDA: the caching allocator's own counters (exact, per device).
    CPU: ``fusedloss.memtrack.PeakMemory``, a dispatch mode that adds up the
    bytes of live tensors; the CPU allocator keeps no such statistics.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from fusedloss.memtrack import PeakMemory

    with PeakMemory() as tracker:
        out = step()
    del out
    return int(tracker.peak_bytes)


def available_bytes(device: torch.device) -> int | None:
    """Bytes we may allocate on ``device`` now, or ``None`` when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bytes_needed(n: int, c: int, dtype: torch.dtype, check_accuracy: bool) -> int:
    """A deliberately generous estimate of the peak for one (N, C) cell.

    Inputs, the gradient and a copy (3 logits-sized tensors), plus the unfused
    baselines' temporaries: they materialise softmax, log-softmax and their
    gradients in float32 (about 4 float32 tensors of N x C). The accuracy
    oracle runs in float64 and holds the float64 logits, gradient and its own
    temporaries (about 4 more float64 tensors).
    """
    elems = n * c
    size = torch.empty((), dtype=dtype).element_size()
    need = elems * (3 * size + 4 * 4)
    if check_accuracy:
        need += elems * 4 * 8
    return need
