"""The CPU kernel benchmark (issue 5), in one run.

Forward+backward of every loss at (N, C) in {(4096, 1000), (1024, 32000), (256, 131072)},
float32 and bfloat16, for the fused C++ kernel (backend "cpu"), ``F.cross_entropy``
(ce only), the reference backend eager, and ``torch.compile`` of the reference. Every
time is also a ratio to ``logits.clone()``, sampled alternately with it (the machine may
be shared); peak extra memory comes from ``fusedloss.memtrack.PeakMemory``; errors are
against float64. As fusedloss-bench does by default, freed memory is kept for reuse
(``--cpu-allocator warm``), so neither the copy nor a loss pays page faults for its
outputs and the ratios compare compute and memory traffic.

    python bench/cpu_kernels.py                      # writes bench/results/cpu_kernels.{json,md}
    python bench/cpu_kernels.py --out /tmp/x --repeat 5 --no-accuracy

The measuring is fusedloss-bench's (``fusedloss.bench``: sweep, timing, memory,
report); this script only fixes the shapes, which are pairs rather than the CLI's
N x C grid, and adds the summary table for docs/cpp_cuda.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

import fusedloss as fl
from fusedloss.bench import backends as bk
from fusedloss.bench import machine, report, sweep
from fusedloss.bench.options import parse_args

SHAPES = ((4096, 1000), (1024, 32000), (256, 131072))
DTYPES = ("float32", "bfloat16")
BACKENDS = ("cpu", "torch", "reference", "compile")
# Summary columns: (backend, header).
SUMMARY = (("cpu", "fused"), ("torch", "F.cross_entropy"), ("reference", "reference"), ("compile", "compiled ref."))


def _summary(records: list[dict]) -> str:
    """One row per (shape, dtype, loss): the fused kernel's median time and the copy it
    was sampled with, then each backend's time as a multiple of its copy, and the fused
    kernel's peak extra memory as a multiple of the logits."""
    cell = {(r["n"], r["c"], r["dtype"], r["loss"], r["backend"]): r for r in records}
    header = ["N x C", "dtype", "loss", "fused ms", "its copy ms", *(f"{h} (x copy)" for _, h in SUMMARY),
              "fused peak mem (x logits)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n, c in SHAPES:
        for dtype in DTYPES:
            for loss in fl.LOSSES:
                fused = cell.get((n, c, dtype, loss, "cpu")) or {}
                row = [f"{n} x {c}", dtype, loss, _fmt(fused.get("median_ms")), _fmt(fused.get("copy_ms"))]
                for backend, _ in SUMMARY:
                    row.append(_fmt((cell.get((n, c, dtype, loss, backend)) or {}).get("x_copy")))
                row.append(_fmt(fused.get("x_logits")))
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "–" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")


def _write(doc: dict, out: Path) -> str:
    """Writes ``<out>.json`` and ``<out>.md`` (``out`` is a prefix: it may contain dots)."""
    json_path, md_path = out.parent / f"{out.name}.json", out.parent / f"{out.name}.md"
    report.write_json(json_path, doc)
    summary = _summary(doc["results"])
    full = report.markdown(doc)
    title, rest = full.split("\n", 1)
    md_path.write_text(
        f"{title}\n\n## Summary: fwd+bwd time, and as a multiple of `logits.clone()` sampled alternately with it"
        f"\n\n{summary}\n{rest}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/cpu_kernels", help="path prefix of the .json and .md")
    ap.add_argument("--repeat", help="timed repeats per cell (default: fusedloss-bench's time budget)")
    ap.add_argument("--threads", help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the float64 error columns")
    ap.add_argument("--cpu-allocator", choices=("warm", "system"), default="warm",
                    help="warm (default, as fusedloss-bench): freed memory is reused, so no call pays page "
                         "faults for its outputs; system: glibc's default (fresh pages above 32 MiB)")
    ap.add_argument("--from-json", help="measure nothing: re-render a previous run's .json to --out")
    args = ap.parse_args(argv)
    if args.from_json:
        print(_write(report.read_json(Path(args.from_json)), Path(args.out)))
        return 0

    extra = ["--device", "cpu", "--dtype", *DTYPES, "--backend", *BACKENDS, "--loss", "all", "--quiet"]
    for flag in ("repeat", "threads"):
        if getattr(args, flag) is not None:
            extra += [f"--{flag}", getattr(args, flag)]
    if args.no_accuracy:
        extra.append("--no-accuracy")
    configs = [parse_args(["--n", str(n), "--c", str(c), *extra], bk.known_backends()) for n, c in SHAPES]
    if configs[0].threads is not None:
        torch.set_num_threads(configs[0].threads)
    for name in BACKENDS:
        reason = bk.unavailable_reason(name, torch.device("cpu"))
        if reason is not None:
            print(f"cpu_kernels: backend {name} is unavailable: {reason}", file=sys.stderr)
            return 2
    chosen = [bk.get_backend(name) for name in BACKENDS]

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
    for cfg in configs:
        for rec in sweep.run(cfg, chosen, on_cell=lambda label: print(f"  {label}", file=sys.stderr, flush=True)):
            records.append(rec)
    info["loadavg_1m_end"] = machine.loadavg()

    doc = {
        "schema": report.SCHEMA,
        "command": "python bench/cpu_kernels.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "config": {"shapes": [list(s) for s in SHAPES], "dtypes": list(DTYPES), "backends": list(BACKENDS),
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
