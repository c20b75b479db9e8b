"""The CPU kernel benchmark (issues 5 and 15), in one run.

Forward+backward of every loss at (N, C) in {(4096, 1000), (1024, 8192), (1024, 32000),
(256, 131072)}, float32 and bfloat16, on 1 and 2 threads, for the fused C++ kernel
(backend "cpu"), ``F.cross_entropy`` (ce only) and ``torch.compile`` of the reference
(``--backends`` adds the eager reference). Every time is also a ratio to
``logits.clone()``, sampled alternately with it (the machine may be shared), and its
inverse, the fraction of the copy's bandwidth the loss reaches (it moves the copy's bytes:
one read of the logits, one write of the gradient); peak extra memory comes from
``fusedloss.memtrack.PeakMemory``; errors are against float64. As fusedloss-bench does by
default, freed memory is kept for reuse (``--cpu-allocator warm``), so neither the copy
nor a loss pays page faults for its outputs and the ratios compare compute and memory
traffic.

    python bench/cpu_kernels.py                      # writes bench/results/cpu_kernels.{json,md}
    python bench/cpu_kernels.py --out /tmp/x --repeat 5 --no-accuracy --threads 2

The measuring is fusedloss-bench's (``fusedloss.bench``: sweep, timing, memory,
report); this script only fixes the shapes, which are pairs rather than the CLI's
N x C grid, runs them once per thread count, and adds the summary table.

``--targets soft mixup`` times the modern recipe's targets instead (writes
``bench/results/cpu_targets.{json,md}``), fwd+bwd, every row as a multiple of a copy sampled
alternately with it:

* ``soft``: class-probability targets for every loss, ``fl.softmax_loss(x, probs, loss)`` on the
  fused ``cpu`` backend (the expected loss), and for ce against ``F.cross_entropy(x, probs)``;
* ``mixup``: for every loss ``fl.softmax_loss(x, (y_a, y_b, lam), loss)`` on backend ``cpu``
  (whatever the library does with it: the ops it dispatched are recorded per row), against
  two plain fl calls (``lam * L(y_a) + (1 - lam) * L(y_b)``, ``train_recipe``'s stand-in);
  for ce also PyTorch's ``lam * F.cross_entropy(x, y_a) + (1 - lam) * F.cross_entropy(x, y_b)``
  and the soft-target route (the mixed class probabilities, fused and ``F.cross_entropy``).

    python bench/cpu_kernels.py --targets soft mixup --threads 2 --repeat 15 --shapes 4096x1000 1024x32000
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusedloss as fl
from fusedloss.bench import backends as bk
from fusedloss.bench import machine, memory, report, sweep, timing
from fusedloss.bench.options import parse_args

SHAPES = ((4096, 1000), (1024, 8192), (1024, 32000), (256, 131072))
DTYPES = ("float32", "bfloat16")
THREADS = (1, 2)
BACKENDS = ("cpu", "torch", "compile")
# Summary columns: (backend, header).
SUMMARY = (("cpu", "fused"), ("torch", "F.cross_entropy"), ("reference", "reference"), ("compile", "compiled ref."))


def _summary(records: list[dict], shapes, dtypes) -> str:
    """One row per (shape, dtype, loss, threads): the fused kernel's median time and the
    copy it was sampled with, its ratio to that copy and the fraction of the copy's
    bandwidth it reaches, each other backend's time as a multiple of its copy, and the
    fused kernel's peak extra memory as a multiple of the logits."""
    cell = {(r["n"], r["c"], r["dtype"], r["loss"], r["backend"], r["threads"]): r for r in records}
    backends = {r["backend"] for r in records}
    summary = [(b, h) for b, h in SUMMARY if b in backends]
    header = ["N x C", "dtype", "loss", "threads", "fused ms", "its copy ms", "fused (x copy)",
              "fused (% copy BW)", *(f"{h} (x copy)" for b, h in summary if b != "cpu"),
              "fused peak mem (x logits)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    threads = sorted({r["threads"] for r in records})
    for n, c in shapes:
        for dtype in dtypes:
            for loss in fl.LOSSES:
                for th in threads:
                    fused = cell.get((n, c, dtype, loss, "cpu", th))
                    if fused is None:
                        continue
                    pct = fused.get("copy_bw_pct")
                    row = [f"{n} x {c}", dtype, loss, str(th), _fmt(fused.get("median_ms")),
                           _fmt(fused.get("copy_ms")), _fmt(fused.get("x_copy")),
                           "–" if pct is None else f"{pct:.0f}%"]
                    for backend, _ in summary:
                        if backend != "cpu":
                            row.append(_fmt((cell.get((n, c, dtype, loss, backend, th)) or {}).get("x_copy")))
                    row.append(_fmt(fused.get("x_logits")))
                    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "–" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")


def _write(doc: dict, out: Path) -> str:
    """Writes ``<out>.json`` and ``<out>.md`` (``out`` is a prefix: it may contain dots)."""
    json_path, md_path = out.parent / f"{out.name}.json", out.parent / f"{out.name}.md"
    report.write_json(json_path, doc)
    # Runs before issue 15 had one thread count, in the machine record.
    doc = {**doc, "results": [{"threads": doc["machine"].get("torch_threads"), **r} for r in doc["results"]]}
    summary = _summary(doc["results"], [tuple(s) for s in doc["config"]["shapes"]], doc["config"]["dtypes"])
    parts = []
    for th in sorted({r["threads"] for r in doc["results"]}):
        sub = {**doc, "machine": {**doc["machine"], "torch_threads": th},
               "results": [r for r in doc["results"] if r["threads"] == th]}
        full = report.markdown(sub)
        title, rest = full.split("\n", 1)
        parts.append((title, rest))
    body = "".join(f"\n## {title.lstrip('# ')}\n{rest.replace(chr(10) + '## ', chr(10) + '### ')}"
                   for title, rest in parts)
    md_path.write_text(
        f"# CPU kernel benchmark: {doc['machine'].get('cpu')}\n\n"
        f"Command: `{doc.get('command')}`; load average (1 min) {doc['machine'].get('loadavg_1m')} at the start, "
        f"{doc['machine'].get('loadavg_1m_end')} at the end ({doc['machine'].get('cpu_count')} logical CPUs); "
        f"CPU kernels {doc['machine'].get('cpu_capability')}; CPU allocator {doc['machine'].get('cpu_allocator')}.\n\n"
        f"## Summary: fwd+bwd time, and as a multiple of `logits.clone()` sampled alternately with it"
        f"\n\n{summary}\n{body}")
    return summary


# ---------------------------------------------------------------------------------------------
# --targets soft|mixup: the modern recipe's targets

TARGET_MODES = ("soft", "mixup")
SOFT_ROWS = (("fused", "fl.softmax_loss(x, probs, loss), backend cpu"),
             ("torch", "F.cross_entropy(x, probs)"))  # torch: ce only
# Mixup rows: (key, header, losses it applies to; None = every loss).
MIXUP_ROWS = (("fused", "fl.softmax_loss(x, (y_a, y_b, lam)), backend cpu", None),
              ("two_calls", "two fl calls: lam L(y_a) + (1 - lam) L(y_b)", None),
              ("torch", "lam F.ce(x, y_a) + (1 - lam) F.ce(x, y_b)", ("ce",)),
              ("soft_fused", "fl.cross_entropy(x, mixed probs), backend cpu", ("ce",)),
              ("soft_torch", "F.cross_entropy(x, mixed probs)", ("ce",)))


class _OpsCalled(TorchDispatchMode):
    """The fusedloss ops a call dispatches, in order (what a row actually ran: the fused
    two-target kernel, or the one-target kernel twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("fusedloss."):
            self.names.append(name.split(".", 1)[1])
        return func(*args, **(kwargs or {}))


def _ops_summary(names: list[str]) -> str:
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    return ", ".join(n if k == 1 else f"{n} x{k}" for n, k in counts.items()) or "no fusedloss op"


def _target_inputs(n: int, c: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """N(0, 1) logits; dense class probabilities (a softmax of N(0, 1), in the logits' dtype); and
    a mixup batch: y_a random, y_b the rolled batch's labels (mixup's pairing), a per-row lam in
    [0, 1], and the same mix as class probabilities (what torchvision's MixUp hands ce)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    probs = torch.randn(n, c, generator=g).softmax(1).to(dtype)
    ya = torch.randint(0, c, (n,), generator=g)
    yb = ya.roll(1)
    lam = torch.rand(n, generator=g)
    from fusedloss.train.recipe import MixedTarget

    mixed = MixedTarget(ya, yb, lam.double()).soft(c).to(dtype)
    return {"x": x, "probs": probs, "ya": ya, "yb": yb, "lam": lam, "mixed": mixed}


def _soft_fns(inp: dict[str, torch.Tensor], key: str, loss: str = "ce") -> Callable[[torch.Tensor], torch.Tensor]:
    probs = inp["mixed"] if key.startswith("soft_") else inp["probs"]
    if key in ("fused", "soft_fused"):
        return lambda x: fl.softmax_loss(x, probs, loss, backend="cpu", **bk.HYPER)
    return lambda x: F.cross_entropy(x, probs)


def _mixup_fn(inp: dict[str, torch.Tensor], loss: str, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> mean loss`` of one mixup row."""
    ya, yb, lam = inp["ya"], inp["yb"], inp["lam"]
    if key == "fused":
        return lambda x: fl.softmax_loss(x, (ya, yb, lam), loss, backend="cpu", **bk.HYPER)
    if key == "two_calls":
        from fusedloss.train.recipe import MixedTarget, two_target_by_two_calls

        criterion = fl.SoftmaxLoss(loss, backend="cpu", **bk.HYPER)
        target = MixedTarget(ya, yb, lam.double())
        return lambda x: two_target_by_two_calls(x, target, criterion)
    if key == "torch":
        w = lam.to(torch.promote_types(inp["x"].dtype, torch.float32))

        def torch_mix(x: torch.Tensor) -> torch.Tensor:
            rows = w * F.cross_entropy(x, ya, reduction="none") + (1 - w) * F.cross_entropy(x, yb, reduction="none")
            return rows.mean()

        return torch_mix
    return _soft_fns(inp, key)


def _oracle(inp: dict[str, torch.Tensor], loss: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 loss (mean) and its gradient on the same (rounded) logits: soft rows from
    ``F.cross_entropy`` (PyTorch's math, not ours), mixup rows from two calls of the
    float64 reference backend combined per row."""
    x64 = inp["x"].detach().double().requires_grad_()
    if (key == "soft" or key.startswith("soft_")) and loss != "ce":
        # the expected loss of the other losses: the float64 reference backend
        out = fl.softmax_loss(x64, inp["probs"].double(), loss, backend="reference", **bk.HYPER)
    elif key == "soft" or key.startswith("soft_"):
        probs = (inp["mixed"] if key.startswith("soft_") else inp["probs"]).double()
        out = F.cross_entropy(x64, probs)
    else:
        lam = inp["lam"].double()
        rows = [fl.softmax_loss(x64, inp[t], loss, reduction="none", backend="reference", **bk.HYPER)
                for t in ("ya", "yb")]
        out = (lam * rows[0] + (1 - lam) * rows[1]).mean()
    (grad,) = torch.autograd.grad(out, x64)
    return out.detach(), grad


def _errors(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            ref: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Abs error of the mean loss, and max abs error of N x the gradient (the gradient of the
    rows' sum: the scale of per-row errors) against float64."""
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out, leaf)
    n = x.shape[0]
    return {"loss_err": (out.detach().double() - ref[0]).abs().item(),
            "grad_err": ((grad.double() - ref[1]).abs().max() * n).item()}


def _target_cell(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, warmup: int, repeat: int | None,
                 accuracy_ref: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, object]:
    """One row: what it dispatched (and any warning, e.g. a fallback), fwd+bwd time interleaved
    with a copy, peak extra memory, float64 errors."""
    rec: dict[str, object] = {}

    def step() -> object:
        return torch.autograd.grad(fn(x), x)

    with warnings.catch_warnings(record=True) as caught, _OpsCalled() as ops:
        warnings.simplefilter("always")
        step()
    rec["ops"] = _ops_summary(ops.names)
    if caught:
        rec["warning"] = str(caught[0].message).splitlines()[0][:200]
    own, copy = timing.measure_interleaved([step, x.detach().clone], torch.device("cpu"), warmup,
                                           None if repeat is None else int(repeat))
    rec.update(own.as_dict())
    rec["copy_ms"] = copy.median_ms
    rec["peak_extra_bytes"] = memory.peak_extra_bytes(step, torch.device("cpu"))
    if accuracy_ref is not None:
        rec.update(_errors(fn, x, accuracy_ref))
    return rec


def _run_targets(modes: list[str], shapes, dtypes, threads: list[int], repeat: str | None, warmup: int,
                 accuracy: bool) -> list[dict]:
    records: list[dict] = []
    cpu = torch.device("cpu")
    for th in threads:
        torch.set_num_threads(th)
        for n, c in shapes:
            for dtype_s in dtypes:
                dtype = getattr(torch, dtype_s)
                inp = _target_inputs(n, c, dtype)
                x = inp["x"]
                logits_bytes = x.numel() * x.element_size()
                base = {"n": n, "c": c, "dtype": dtype_s, "threads": th, "logits_bytes": logits_bytes,
                        "target_bytes": inp["probs"].numel() * inp["probs"].element_size()}
                print(f"  {th}T copy N={n} C={c} {dtype_s}", file=sys.stderr, flush=True)
                copy = timing.measure(x.detach().clone, cpu, warmup, None if repeat is None else int(repeat))
                records.append(_finish_target({**base, "mode": "copy", "loss": "-", "row": "copy", **copy.as_dict(),
                                               "copy_ms": copy.median_ms,
                                               "peak_extra_bytes": memory.peak_extra_bytes(x.detach().clone, cpu)}))
                cells = []
                if "soft" in modes:
                    cells += [("soft", loss, key) for loss in fl.LOSSES for key, _ in SOFT_ROWS
                              if key == "fused" or loss == "ce"]
                if "mixup" in modes:  # last: the two-target API is the newest
                    cells += [("mixup", loss, key) for loss in fl.LOSSES for key, _, only in MIXUP_ROWS
                              if only is None or loss in only]
                refs: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
                for mode, loss, key in cells:
                    print(f"  {th}T {mode} {loss} {key} N={n} C={c} {dtype_s}", file=sys.stderr, flush=True)
                    fn = _soft_fns(inp, key, loss) if mode == "soft" else _mixup_fn(inp, loss, key)
                    ref = None
                    if accuracy:
                        ref_key = (mode if mode == "soft" else ("soft_" if key.startswith("soft_") else "mix"), loss)
                        if ref_key not in refs:
                            refs[ref_key] = _oracle(inp, loss, "soft" if mode == "soft" else
                                                    ("soft_mixed" if key.startswith("soft_") else "mix"))
                        ref = refs[ref_key]
                    rec = {**base, "mode": mode, "loss": loss, "row": key}
                    try:
                        rec.update(_target_cell(fn, x, warmup, repeat, ref))
                    except Exception as exc:  # noqa: BLE001 - e.g. the two-target API not there yet
                        rec["error"] = sweep._first_line(exc)
                    records.append(_finish_target(rec))
                del inp, x, refs
                sweep._free(cpu, collect=True)
    return records


def _cpu_busy() -> tuple[float, float, float] | None:
    """(wall s, CPU seconds every process has used, CPU seconds this process has used), for the
    share of the cores other processes took during a run; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return time.monotonic(), (sum(fields[:8]) - idle) / hz, own.user + own.system


def _others_share(start: tuple[float, float, float] | None) -> float | None:
    """Percent of all the machine's cores that other processes kept busy since ``start``."""
    end = _cpu_busy()
    if start is None or end is None or end[0] <= start[0]:
        return None
    others = (end[1] - start[1]) - (end[2] - start[2])
    return round(max(0.0, 100.0 * others / ((end[0] - start[0]) * (os.cpu_count() or 1))), 1)


def _finish_target(rec: dict) -> dict:
    if "median_ms" in rec:
        rec["x_copy"] = rec["median_ms"] / rec["copy_ms"]
    if "peak_extra_bytes" in rec:
        rec["x_logits"] = rec["peak_extra_bytes"] / rec["logits_bytes"]
    return rec


def _targets_markdown(doc: dict) -> str:
    recs = doc["results"]
    info = doc["machine"]
    cell = {(r["n"], r["c"], r["dtype"], r["threads"], r["mode"], r["loss"], r["row"]): r for r in recs}
    keys = list(dict.fromkeys((r["n"], r["c"], r["dtype"], r["threads"]) for r in recs))

    def x_copy(k, mode, loss, row) -> str:
        r = cell.get((*k, mode, loss, row))
        if r is None:
            return "–"
        return "error" if "error" in r else _fmt(r.get("x_copy"))

    out = [f"# CPU benchmark of the recipe's targets: soft-target CE and two-target mixup ({info.get('cpu')})", "",
           f"Command: `{doc.get('command')}`; fusedloss {info.get('fusedloss_commit')}, torch {info.get('torch')}, "
           f"{info.get('date')}; load average (1 min) {info.get('loadavg_1m')} at the start, "
           f"{info.get('loadavg_1m_end')} at the end ({info.get('cpu_count')} logical CPUs, shared; other "
           f"processes used {info.get('other_processes_cpu_pct')}% of them during the run); "
           f"CPU kernels {info.get('cpu_capability')}; CPU allocator {info.get('cpu_allocator')}.", "",
           "Every number is forward+backward (`torch.autograd.grad` of the mean loss) as a multiple of "
           "`logits.clone()` sampled alternately with it (median over the repeats). N(0, 1) logits; targets "
           "in the logits' dtype. A copy reads the logits and writes once; the floor of soft-target CE is "
           "1.5 copies (it also reads the (N, C) targets), of a fused two-target loss 1.0 (two index "
           "targets and lam per row), of two calls 2.0.", ""]
    modes = doc["config"]["targets"]
    if "soft" in modes:
        out += ["## Soft targets (ce, dense class probabilities)", "",
                "| N x C | dtype | threads | copy ms | fused ms | fused (x copy) | F.cross_entropy (x copy) "
                "| F / fused | fused peak mem (x logits) | F peak mem (x logits) | fused loss err / grad err |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in keys:
            fused, torch_ = cell.get((*k, "soft", "ce", "fused")), cell.get((*k, "soft", "ce", "torch"))
            if fused is None:
                continue
            ratio = (torch_["median_ms"] / fused["median_ms"]) if (torch_ and "median_ms" in torch_
                                                                    and "median_ms" in fused) else None
            errs = f"{fused['loss_err']:.1e} / {fused['grad_err']:.1e}" if "loss_err" in fused else "–"
            out.append(f"| {k[0]} x {k[1]} | {k[2]} | {k[3]} | {_fmt(fused.get('copy_ms'))} | "
                       f"{_fmt(fused.get('median_ms'))} | {x_copy(k, 'soft', 'ce', 'fused')} | "
                       f"{x_copy(k, 'soft', 'ce', 'torch')} | {_fmt(ratio)} | {_fmt(fused.get('x_logits'))} | "
                       f"{_fmt((torch_ or {}).get('x_logits'))} | {errs} |")
        out.append("")
        out += ["## Soft targets, every loss (the expected loss, dense class probabilities)", "",
                "| N x C | dtype | threads | " + " | ".join(f"{loss} (x copy)" for loss in fl.LOSSES)
                + " | " + " | ".join(f"{loss} / ce" for loss in fl.LOSSES if loss != "ce")
                + " | loss err / grad err (worst loss) |",
                "|" + "---|" * (3 + 2 * len(fl.LOSSES))]
        for k in keys:
            ce = cell.get((*k, "soft", "ce", "fused"))
            if ce is None or "median_ms" not in ce:
                continue
            rows = {loss: cell.get((*k, "soft", loss, "fused")) for loss in fl.LOSSES}
            ratios = [_fmt(r["median_ms"] / ce["median_ms"]) if r and "median_ms" in r else "–"
                      for loss, r in rows.items() if loss != "ce"]
            worst = max((r for r in rows.values() if r and "loss_err" in r), key=lambda r: r["grad_err"], default=None)
            errs = f"{worst['loss_err']:.1e} / {worst['grad_err']:.1e} ({worst['loss']})" if worst else "–"
            out.append(f"| {k[0]} x {k[1]} | {k[2]} | {k[3]} | "
                       + " | ".join(x_copy(k, "soft", loss, "fused") for loss in fl.LOSSES) + " | "
                       + " | ".join(ratios) + f" | {errs} |")
        out.append("")
    if "mixup" in modes:
        heads = [h for _, h, _ in MIXUP_ROWS]
        out += ["## Two-target mixup `(y_a, y_b, lam)`, per-row lam", "",
                "| N x C | dtype | threads | loss | copy ms | " + " | ".join(f"{h} (x copy)" for h in heads)
                + " | fused / two calls | fused: ops run | fused peak mem (x logits) | two calls peak mem (x logits) "
                  "| fused loss err / grad err |",
                "|" + "---|" * (5 + len(heads) + 5)]
        for k in keys:
            for loss in fl.LOSSES:
                fused = cell.get((*k, "mixup", loss, "fused"))
                two = cell.get((*k, "mixup", loss, "two_calls"))
                if fused is None:
                    continue
                ratio = (fused["median_ms"] / two["median_ms"]) if (two and "median_ms" in two
                                                                    and "median_ms" in fused) else None
                errs = f"{fused['loss_err']:.1e} / {fused['grad_err']:.1e}" if "loss_err" in fused else "–"
                ops_run = fused.get("ops", "–") + (f" (warning: {fused['warning']})" if "warning" in fused else "")
                if "error" in fused:
                    ops_run = f"error: {fused['error']}"
                cols = [x_copy(k, "mixup", loss, key) if only is None or loss in only else "–"
                        for key, _, only in MIXUP_ROWS]
                out.append(f"| {k[0]} x {k[1]} | {k[2]} | {k[3]} | {loss} | {_fmt((two or fused).get('copy_ms'))} | "
                           + " | ".join(cols) + f" | {_fmt(ratio)} | {ops_run} | {_fmt(fused.get('x_logits'))} | "
                           f"{_fmt((two or {}).get('x_logits'))} | {errs} |")
        out.append("")
    out += ["## All rows", "",
            "| mode | loss | row | N x C | dtype | threads | median ms | p25-p75 ms | copy ms | x copy "
            "| peak MiB | x logits | loss err | grad err | ops run / error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        note = r.get("error") or r.get("ops", "")
        if r.get("warning"):
            note += f" (warning: {r['warning']})"
        err = (lambda key: f"{r[key]:.1e}" if key in r else "")
        out.append(f"| {r['mode']} | {r['loss']} | {r['row']} | {r['n']} x {r['c']} | {r['dtype']} | {r['threads']} | "
                   f"{_fmt(r.get('median_ms'))} | "
                   + (f"{_fmt(r['p25_ms'])}-{_fmt(r['p75_ms'])}" if "p25_ms" in r else "–")
                   + f" | {_fmt(r.get('copy_ms'))} | {_fmt(r.get('x_copy'))} | "
                   f"{_fmt(r['peak_extra_bytes'] / 2**20 if 'peak_extra_bytes' in r else None)} | "
                   f"{_fmt(r.get('x_logits'))} | {err('loss_err')} | {err('grad_err')} | {note} |")
    out += ["", "x copy: median of the row's fwd+bwd / median of the `logits.clone()` samples taken alternately "
            "with it (the copy row: timed alone); peak: bytes allocated during one fwd+bwd over the inputs "
            "(`fusedloss.memtrack.PeakMemory`; the gradient is 1.00x the logits); errors against float64 on "
            "the same rounded logits (soft rows: `F.cross_entropy` in float64; mixup rows: the float64 "
            "reference backend, two calls combined per row): abs error of the mean loss, max abs error of "
            "N x the gradient (the per-row scale); ops run: the fusedloss ops one call dispatched."]
    return "\n".join(out) + "\n"


def _targets_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    out = Path(args.out or "bench/results/cpu_targets")
    if args.from_json:
        doc = report.read_json(Path(args.from_json))
    else:
        shapes = TARGET_SHAPES
        if args.shapes:
            shapes = tuple(tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes)
        allocator = "system"
        if args.cpu_allocator == "warm":
            from fusedloss.bench.allocator import keep_freed_memory

            allocator = keep_freed_memory()
        info = machine.describe(torch.device("cpu"))
        info["cpu_allocator"] = allocator
        try:
            from fusedloss import _C

            info["cpu_capability"] = _C.cpu_capability()
        except ImportError as exc:
            print(f"cpu_kernels: the C++ extension is not built ({exc}); the cpu backend is missing",
                  file=sys.stderr)
            return 2
        print(f"machine: {machine.one_line(info)}", file=sys.stderr)
        modes = [m for m in TARGET_MODES if m in args.targets]  # soft first, mixup last
        busy = _cpu_busy()
        records = _run_targets(modes, shapes, list(args.dtypes), list(args.threads), args.repeat, args.warmup,
                               not args.no_accuracy)
        info["loadavg_1m_end"] = machine.loadavg()
        # With 2 threads on 2 cores, any other process stalls the parallel regions: say how much there was.
        info["other_processes_cpu_pct"] = _others_share(busy)
        doc = {"schema": report.SCHEMA,
               "command": "python bench/cpu_kernels.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "machine": info,
               "config": {"targets": modes, "shapes": [list(s) for s in shapes], "dtypes": list(args.dtypes),
                          "threads": list(args.threads), "mode": "fwd+bwd", "repeat": args.repeat,
                          "warmup": args.warmup, "accuracy": not args.no_accuracy,
                          "cpu_allocator": args.cpu_allocator},
               "results": records}
        report.write_json(out.parent / f"{out.name}.json", doc)
    text = _targets_markdown(doc)
    (out.parent / f"{out.name}.md").write_text(text)
    print(text)
    print(f"wrote {out}.json and {out}.md", file=sys.stderr)
    return 1 if any("error" in r for r in doc["results"]) else 0


# The must-show shapes.
TARGET_SHAPES = ((4096, 1000), (1024, 32000))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="path prefix of the .json and .md (default: bench/results/cpu_kernels, "
                                  "with --targets bench/results/cpu_targets)")
    ap.add_argument("--targets", nargs="+", choices=TARGET_MODES,
                    help="time the recipe's targets instead of class indices: soft (probability targets, every loss), "
                         "mixup (the two-target form, every loss); shapes default to 4096x1000 1024x32000")
    ap.add_argument("--warmup", type=int, default=2, help="--targets: untimed calls per row before timing")
    ap.add_argument("--repeat", help="timed repeats per cell (default: fusedloss-bench's time budget)")
    ap.add_argument("--threads", nargs="+", type=int, default=list(THREADS),
                    help="torch CPU thread counts, one sweep each (default: 1 2)")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS),
                    help=f"backends besides the copy (default: {' '.join(BACKENDS)}; 'reference' adds the eager one)")
    ap.add_argument("--shapes", nargs="+", help="N x C pairs, e.g. 4096x1000 (default: the four above)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), help="float32 bfloat16 (default: both)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the float64 error columns")
    ap.add_argument("--cpu-allocator", choices=("warm", "system"), default="warm",
                    help="warm (default, as fusedloss-bench): freed memory is reused, so no call pays page "
                         "faults for its outputs; system: glibc's default (fresh pages above 32 MiB)")
    ap.add_argument("--from-json", help="measure nothing: re-render a previous run's .json to --out")
    args = ap.parse_args(argv)
    if args.targets or (args.from_json and "targets" in report.read_json(Path(args.from_json)).get("config", {})):
        if not args.targets:
            args.targets = list(TARGET_MODES)
        return _targets_main(args, argv)
    args.out = args.out or "bench/results/cpu_kernels"
    if args.from_json:
        print(_write(report.read_json(Path(args.from_json)), Path(args.out)))
        return 0

    shapes = SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes)
    dtypes = tuple(args.dtypes)
    extra = ["--device", "cpu", "--dtype", *dtypes, "--backend", *args.backends, "--loss", "all", "--quiet"]
    if args.repeat is not None:
        extra += ["--repeat", args.repeat]
    if args.no_accuracy:
        extra.append("--no-accuracy")
    configs = [parse_args(["--n", str(n), "--c", str(c), *extra], bk.known_backends()) for n, c in shapes]
    for name in args.backends:
        reason = bk.unavailable_reason(name, torch.device("cpu"))
        if reason is not None:
            print(f"cpu_kernels: backend {name} is unavailable: {reason}", file=sys.stderr)
            return 2
    chosen = [bk.get_backend(name) for name in args.backends]

    allocator = "system"
    if args.cpu_allocator == "warm":
        from fusedloss.bench.allocator import keep_freed_memory

        allocator = keep_freed_memory()
    info = machine.describe(torch.device("cpu"))
    info["cpu_allocator"] = allocator
    from fusedloss import _C  # built, or the "cpu" backend above would be unavailable

    info["cpu_capability"] = _C.cpu_capability()
    print(f"machine: {machine.one_line(info)}", file=sys.stderr)
    records: list[dict] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for cfg in configs:
            for rec in sweep.run(cfg, chosen, on_cell=lambda label: print(f"  {threads}T {label}", file=sys.stderr,
                                                                          flush=True)):
                records.append({**rec, "threads": threads})
    info["loadavg_1m_end"] = machine.loadavg()

    doc = {
        "schema": report.SCHEMA,
        "command": "python bench/cpu_kernels.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "config": {"shapes": [list(s) for s in shapes], "dtypes": list(dtypes), "backends": list(args.backends),
                   "threads": list(args.threads),
                   "mode": "fwd+bwd", "repeat": args.repeat, "accuracy": not args.no_accuracy,
                   "cpu_allocator": args.cpu_allocator},
        "unavailable": {},
        "results": records,
    }
    out = Path(args.out)
    print(_write(doc, out))
    print(f"wrote {out}.json and {out}.md", file=sys.stderr)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
