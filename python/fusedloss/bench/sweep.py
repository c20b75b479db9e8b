"""Walk the grid (dtype x N x C x loss x backend) and measure every cell.

Per (dtype, N, C) the logits are made once and a ``copy`` row (``logits.clone()``:
one read and one write of the logits) is timed first, in the same process and
on the same tensor. Every other row is given as a ratio to a copy too: one
sampled alternately with that row's own samples, so both saw the same load. Per loss
the float64 oracle is computed once and shared by all backends. A backend that
raises in one cell gets an ``error`` entry for that cell; the sweep goes on.
"""

from __future__ import annotations

import gc
from typing import Callable, Iterator

import torch

from . import accuracy, memory, timing
from .backends import Backend, LossFn
from .options import BenchConfig, dtype_name

MIB = 2**20


def _inputs(cfg: BenchConfig, n: int, c: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded logits (a leaf that requires grad) and int64 targets on the device."""
    if cfg.logits == "extreme":
        from fusedloss.reference import extreme_logits

        # extreme_logits draws on the CPU and moves the result: a CPU generator.
        g = torch.Generator().manual_seed(cfg.seed)
        x, t = extreme_logits(n, c, dtype=dtype, device=cfg.device, generator=g)
    else:
        g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        x = torch.randn(n, c, generator=g, device=cfg.device, dtype=torch.float32).to(dtype)
        t = torch.randint(0, c, (n,), generator=g, device=cfg.device)
    return x.detach().requires_grad_(), t


def make_step(fn: LossFn, x: torch.Tensor, t: torch.Tensor, mode: str) -> Callable[[], object]:
    """The thing to time, for ``mode``.

    ``fwd`` runs the forward as in training (logits require grad, so a backend
    saves what its backward needs). ``bwd`` runs the forward once, outside the
    timing, and times only the backward through the retained graph.
    ``fwd+bwd`` is one training step of the loss. Gradients come from
    ``torch.autograd.grad`` so nothing accumulates in ``x.grad`` between calls.
    """
    if mode == "fwd":
        return lambda: fn(x, t, "mean")
    if mode == "bwd":
        out = fn(x, t, "mean")
        return lambda: torch.autograd.grad(out, x, retain_graph=True)

    def step() -> object:
        return torch.autograd.grad(fn(x, t, "mean"), x)

    return step


def bytes_moved(logits_bytes: int, mode: str) -> int:
    """Minimal DRAM traffic of the mode, used for the effective GB/s column.

    fwd reads the logits once; bwd rereads them and writes the gradient;
    fwd+bwd is both (3x). The copy reads and writes once (2x). An
    implementation that keeps nothing but per-row statistics between the
    passes cannot do with less.
    """
    return logits_bytes * {"copy": 2, "fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _free(device: torch.device, collect: bool = False) -> None:
    # Autograd graphs are freed by reference counting; a full collection is
    # only worth its ~0.15 s once per shape, before the next big allocation.
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_cell(
    cfg: BenchConfig, fn: LossFn, x: torch.Tensor, t: torch.Tensor, mode: str, ref: accuracy.Oracle | None
) -> dict[str, object]:
    out: dict[str, object] = {}
    step = make_step(fn, x, t, mode)
    # The copy this row is divided by is sampled between this row's own
    # samples (see timing.measure_interleaved), not only once per shape.
    own, copy = timing.measure_interleaved([step, x.detach().clone], cfg.device, cfg.warmup, cfg.repeat)
    out.update(own.as_dict())
    out["copy_ms"] = copy.median_ms
    del step
    if cfg.check_memory:
        try:
            out["peak_extra_bytes"] = memory.peak_extra_bytes(make_step(fn, x, t, "fwd+bwd"), cfg.device)
        except Exception as exc:  # noqa: BLE001 - keep the timing, say why memory is missing
            out["memory_error"] = _first_line(exc)
    if ref is not None:
        out.update(accuracy.check(fn, x, t, ref).as_dict())
    return out


def cells(cfg: BenchConfig, backends: list[Backend]) -> int:
    """Number of progress steps the sweep will take (copy rows included)."""
    per_shape = 1 + sum(b.supports(loss) for loss in cfg.losses for b in backends)
    return len(cfg.dtypes) * len(cfg.ns) * len(cfg.cs) * per_shape


def run(
    cfg: BenchConfig, backends: list[Backend], on_cell: Callable[[str], None] | None = None
) -> Iterator[dict[str, object]]:
    """Yield one result record per cell; ``on_cell(label)`` is called before each."""
    notify = on_cell or (lambda _label: None)
    for dtype in cfg.dtypes:
        for n in cfg.ns:
            for c in cfg.cs:
                x, t = _inputs(cfg, n, c, dtype)
                logits_bytes = x.numel() * x.element_size()
                base = {"n": n, "c": c, "dtype": dtype_name(dtype), "mode": cfg.mode,
                        "logits": cfg.logits, "logits_bytes": logits_bytes}

                notify(f"copy N={n} C={c} {dtype_name(dtype)}")
                plain = x.detach()
                copy_rec = {**base, "loss": "-", "backend": "copy", "label": "copy", "kind": "copy",
                            **timing.measure(plain.clone, cfg.device, cfg.warmup, cfg.repeat).as_dict(),
                            "bytes_moved": bytes_moved(logits_bytes, "copy")}
                if cfg.check_memory:
                    copy_rec["peak_extra_bytes"] = memory.peak_extra_bytes(plain.clone, cfg.device)
                copy_ms = float(copy_rec["median_ms"])
                yield _finish(copy_rec, copy_ms)

                for loss in cfg.losses:
                    ref = accuracy.oracle(loss, x, t) if cfg.check_accuracy else None
                    for backend in backends:
                        if not backend.supports(loss):
                            continue
                        notify(f"{loss} {backend.name} N={n} C={c} {dtype_name(dtype)}")
                        rec = {**base, "loss": loss, "backend": backend.name, "label": backend.label,
                               "kind": backend.kind, "bytes_moved": bytes_moved(logits_bytes, cfg.mode)}
                        try:
                            rec.update(_measure_cell(cfg, backend.build(loss), x, t, cfg.mode, ref))
                        except Exception as exc:  # noqa: BLE001 - one broken cell must not end the sweep
                            rec["error"] = _first_line(exc)
                        _free(cfg.device)
                        yield _finish(rec, copy_ms)
                    del ref
                del x, t, plain
                _free(cfg.device, collect=True)


def _finish(rec: dict[str, object], copy_ms: float) -> dict[str, object]:
    """Add the derived columns: ratio to copy, GB/s, MiB and multiple of the logits.

    ``copy_ms`` (the shape's copy row) is the fallback divisor for a row that
    has no interleaved copy of its own (one whose measurement failed)."""
    rec.setdefault("copy_ms", copy_ms)
    copy_ms = float(rec["copy_ms"])  # type: ignore[arg-type]
    if "median_ms" in rec:
        ms = float(rec["median_ms"])
        rec["x_copy"] = ms / copy_ms if copy_ms > 0 else None
        # The fraction of the copy's bandwidth this row reaches if it moves the copy's
        # bytes (one read of the logits, one write of the gradient: the floor of fwd+bwd).
        rec["copy_bw_pct"] = 100 * copy_ms / ms if ms > 0 else None
        rec["gbps"] = int(rec["bytes_moved"]) / (ms * 1e-3) / 1e9 if ms > 0 else None
    if rec.get("peak_extra_bytes") is not None:
        peak = int(rec["peak_extra_bytes"])
        rec["peak_extra_mib"] = peak / MIB
        rec["x_logits"] = peak / int(rec["logits_bytes"])
    return rec
