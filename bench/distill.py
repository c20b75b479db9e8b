"""The CPU distillation benchmark (issue 26): forward+backward of the distillation loss at
N 2048, V 32000, float32 and bfloat16, in one run:

* ``fused op``: ``fusedloss::ext_distill`` called directly (the kernel: D per row and the
  student's gradient written into a fresh (N, V) buffer, ``row_scale = 1/N``: batchmean);
* ``fl.distill_loss``: the public API (target None, backend "cpu") + ``torch.autograd.grad``,
  when this tree has it;
* ``F.kl_div`` eager and ``torch.compile``d: ``T^2 F.kl_div(F.log_softmax(s / T),
  F.log_softmax(t / T), log_target=True, reduction='batchmean')`` + ``torch.autograd.grad``.

Every time is a multiple of the fastest copy of the two logits tensors seen in the same run
(``(s.clone(), t.clone())``, sampled alternately with every row; the copy each row was
interleaved with is in the JSON too); peak extra memory (``fusedloss.memtrack.PeakMemory``,
fusedloss-bench's measure) is a multiple of one logits tensor. Freed memory is kept in the
process (fusedloss-bench's ``--cpu-allocator warm``), so neither side pays page faults for
its outputs. The share of the cores other processes used during the run is recorded (a
busy core stalls every 2-thread parallel region).

    python bench/distill.py                                   # bench/results/cpu_distill.{json,md}
    python bench/distill.py --shapes 256x32000 --repeat 5 --out /tmp/d
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fusedloss as fl
from fusedloss.bench import allocator, machine, memory, timing
from fusedloss.distill.ops import DIVERGENCES, distill_rows

ROOT = Path(__file__).resolve().parent.parent


def _cpu_busy():
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    own = os.times()
    return time.monotonic(), (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _others_share(start) -> float | None:
    """Percent of all cores other processes kept busy since ``start``."""
    end = _cpu_busy()
    if start is None or end is None or end[0] <= start[0]:
        return None
    others = (end[1] - start[1]) - (end[2] - start[2])
    return round(max(0.0, 100.0 * others / ((end[0] - start[0]) * (os.cpu_count() or 1))), 1)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _rows(s: torch.Tensor, t: torch.Tensor, temperature: float, divergence: str, compile_: bool
          ) -> list[tuple[str, str, Callable[[], object] | None, str | None]]:
    """(key, description, fwd+bwd step or None, why not)."""
    n = s.shape[0]
    div = DIVERGENCES[divergence]
    rs = torch.full((n,), 1.0 / n, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32)
    sd = s.detach()
    op = torch.ops.fusedloss.ext_distill.default

    def fused_op():
        grad = torch.empty_like(sd)
        d = op(sd, t, rs, temperature, div, 0.5, grad, False)
        return d.sum() / n, grad

    rows: list = [("fused_op", "`fusedloss::ext_distill` (the op alone: D rows + gradient buffer)", fused_op, None)]

    if hasattr(fl, "distill_loss"):
        def api():
            loss = fl.distill_loss(s, t, temperature=temperature, divergence=divergence, backend="cpu")
            return torch.autograd.grad(loss, s)

        rows.append(("fl_distill_loss", "`fl.distill_loss(s, t, backend='cpu')` + autograd.grad", api, None))
    else:
        rows.append(("fl_distill_loss", "`fl.distill_loss`", None, "fl.distill_loss is not in this tree"))

    def kl_div(s_, t_):
        return temperature * temperature * F.kl_div(F.log_softmax(s_ / temperature, -1),
                                                    F.log_softmax(t_ / temperature, -1),
                                                    log_target=True, reduction="batchmean")

    def eager():
        return torch.autograd.grad(kl_div(s, t), s)

    rows.append(("kl_div_eager", "`F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True)` eager",
                 eager if divergence == "kl" else None, None if divergence == "kl" else "kl only"))
    if compile_ and divergence == "kl":
        compiled = torch.compile(kl_div, dynamic=False)

        def comp():
            return torch.autograd.grad(compiled(s, t), s)

        rows.append(("kl_div_compiled", "the same, `torch.compile`d", comp, None))
    return rows


def _errors(step_out, s: torch.Tensor, t: torch.Tensor, temperature: float, divergence: str, rows: int = 128
            ) -> dict[str, float]:
    """Against float64 on the first `rows` rows: |loss_rows - D| max and max |grad - dD/ds / N| * N."""
    n = s.shape[0]
    ref_d, ref_g = distill_rows(s.detach()[:rows].double(), t[:rows].double(), temperature,
                                DIVERGENCES[divergence], 0.5, with_grad=True)
    out = {}
    grad = step_out[1] if isinstance(step_out, tuple) and len(step_out) == 2 else step_out[0]
    out["grad_err_xN"] = ((grad[:rows].double() - ref_g / n).abs().max() * n).item()
    return out


def run(args) -> dict:
    alloc = allocator.keep_freed_memory()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    info = machine.describe(cpu)
    info["uptime_start"] = _uptime()
    try:
        import fusedloss._C as _C

        info["cpu_capability"] = _C.cpu_capability()
    except ImportError:
        info["cpu_capability"] = None
    info["cpu_allocator"] = alloc
    busy = _cpu_busy()
    results = []
    for shape in args.shapes:
        n, v = (int(x) for x in shape.lower().split("x"))
        for dtype_s in args.dtypes:
            dtype = getattr(torch, dtype_s)
            g = torch.Generator().manual_seed(0)
            s = torch.randn(n, v, generator=g).to(dtype).requires_grad_()
            t = (s.detach().float() + torch.randn(n, v, generator=g)).to(dtype)
            logits_bytes = s.numel() * s.element_size()

            def copy():
                return s.detach().clone(), t.clone()

            for key, desc, step, why in _rows(s, t, args.temperature, args.divergence, not args.no_compile):
                rec = {"n": n, "v": v, "dtype": dtype_s, "threads": args.threads, "row": key, "what": desc,
                       "logits_bytes": logits_bytes}
                if step is None:
                    rec["skipped"] = why
                    results.append(rec)
                    continue
                print(f"  {key} N={n} V={v} {dtype_s}", file=sys.stderr, flush=True)
                try:
                    out = step()  # warm (and compile)
                    if args.accuracy:
                        rec.update(_errors(out, s, t, args.temperature, args.divergence))
                    del out
                    own, cp = timing.measure_interleaved([step, copy], cpu, args.warmup, args.repeat)
                    rec.update(own.as_dict())
                    rec["copy_interleaved_ms"] = cp.median_ms
                    rec["copy_interleaved_min_ms"] = cp.min_ms
                    rec["peak_extra_bytes"] = memory.peak_extra_bytes(step, cpu)
                    rec["x_logits_memory"] = rec["peak_extra_bytes"] / logits_bytes
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                results.append(rec)
            del s, t
    # Each row against the fastest copy of its (shape, dtype) seen anywhere in the run.
    for rec in results:
        copies = [r["copy_interleaved_ms"] for r in results if "copy_interleaved_ms" in r and
                  (r["n"], r["v"], r["dtype"]) == (rec["n"], rec["v"], rec["dtype"])]
        if "median_ms" in rec and copies:
            rec["fastest_copy_ms"] = min(copies)
            rec["x_fastest_copy"] = rec["median_ms"] / min(copies)
            rec["x_interleaved_copy"] = rec["median_ms"] / rec["copy_interleaved_ms"]
    info["loadavg_1m_end"] = machine.loadavg()
    info["uptime_end"] = _uptime()
    info["others_cpu_percent"] = _others_share(busy)
    return {"machine": info, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "config": {"shapes": args.shapes, "dtypes": args.dtypes, "temperature": args.temperature,
                       "divergence": args.divergence, "threads": args.threads, "repeat": args.repeat,
                       "warmup": args.warmup}, "results": results}


def _fmt(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# CPU distillation benchmark: {m.get('cpu')}", "",
             f"Command: `{doc['command']}` (fusedloss {m.get('fusedloss_commit')}, torch {m.get('torch')}, "
             f"{doc['config']['threads']} threads, CPU kernels {m.get('cpu_capability')}, allocator "
             f"{m.get('cpu_allocator')}).", "",
             f"Load: `{m.get('uptime_start')}` at the start, `{m.get('uptime_end')}` at the end; other processes "
             f"used {m.get('others_cpu_percent')}% of the {m.get('cpu_count')} cores during the run.", "",
             f"Divergence {doc['config']['divergence']}, T = {doc['config']['temperature']}, target None "
             "(distillation alone), N(0, 1) student logits, teacher = student + N(0, 1). Forward + backward "
             "(the student's gradient). **x copy**: median time / the fastest median of `(s.clone(), t.clone())` "
             "(the copy of the two logits tensors) seen in this run for the same shape and dtype; in brackets: / "
             "the copy sampled alternately with that row. **x logits**: peak extra memory / one logits tensor. "
             "Goal (issue 26): <= 1.3x the copy, <= 1.1x one logits tensor.", "",
             "| N x V | dtype | row | median ms | x copy (interleaved) | x logits | grad err x N vs float64 |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        shape = f"{r['n']} x {r['v']}"
        if "skipped" in r or "error" in r:
            lines.append(f"| {shape} | {r['dtype']} | {r['what']} | {r.get('skipped') or r.get('error')} | | | |")
            continue
        lines.append(f"| {shape} | {r['dtype']} | {r['what']} | {_fmt(r['median_ms'])} | "
                     f"{_fmt(r['x_fastest_copy'])} ({_fmt(r['x_interleaved_copy'])}) | {_fmt(r['x_logits_memory'])} | "
                     f"{r.get('grad_err_xN', float('nan')):.1e} |")
    copies = sorted({(r["n"], r["v"], r["dtype"], r["fastest_copy_ms"]) for r in doc["results"]
                     if "fastest_copy_ms" in r})
    lines += ["", "Fastest copy of the two logits tensors: " +
              "; ".join(f"{n} x {v} {d}: {ms:.2f} ms" for n, v, d, ms in copies) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["2048x32000"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--divergence", default="kl", choices=list(DIVERGENCES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_distill"))
    args = p.parse_args(argv)
    doc = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (out.parent / f"{out.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
