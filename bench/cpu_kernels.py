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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/cpu_kernels", help="path prefix of the .json and .md")
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
