"""fl.linear_distill_loss on the CPU: peak extra memory (fusedloss.memtrack, forward + backward, d weight
and d hidden counted) as a multiple of one (N, V) float32 logits tensor, and the time of one forward +
backward, for several block sizes, beside eager fl.distill_loss on the materialized logits.

    python bench/distill_linear.py --n 2048 --v 32000 --d 256 512 --chunks 0 96 --repeat 3 \\
        --out bench/results/cpu_distill_linear

(chunk 0: the default block size, ``distill.linear.default_chunk_rows`` with the gradients counted;
96 rows: the default before the gradients were counted.) The runs of one D are interleaved (every
method once, then again) so that the machine's load falls on all of them alike. Prints a Markdown
table; ``--out PATH`` also writes ``PATH.md`` and ``PATH.json``."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import fusedloss as fl
from fusedloss.distill.linear import default_chunk_rows, held_grad_bytes
from fusedloss.distill.ops import DistillOps
from fusedloss.memtrack import PeakMemory


def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--d", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 96])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    a = ap.parse_args()
    from fusedloss import dispatch
    be = dispatch.resolve(a.backend, torch.device("cpu"))
    fused = be.family(DistillOps) is not None
    kernel = "fused kernel" if fused else "reference op (no DistillOps in this backend)"
    lines = []

    def out(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    command = "python " + " ".join(sys.argv)
    load_start = _load()
    out("# fl.linear_distill_loss on the CPU: peak memory and time\n")
    out(f"Command: `{command}` (fusedloss {commit}, torch {torch.__version__}, {torch.get_num_threads()} threads).\n")
    out(f"N {a.n}, V {a.v}, float32, backend {a.backend} ({kernel}), T {a.temperature}, target: ce. "
        "Forward + backward; **best s**: the fastest of the interleaved repeats; **peak**: "
        "`fusedloss.memtrack.PeakMemory` around one forward + backward, everything counted (d weight, "
        "d hidden, the blocks, the ops' temporaries); **x logits**: / one (N, V) float32 logits tensor.\n")
    out(f"Load at the start: `{load_start}`.\n")
    out("| D | method | rows/block | best s | peak MiB | x logits | x logits without d weight, d hidden |")
    out("|---|---|---|---|---|---|---|")
    logits = a.n * a.v * 4
    results = []
    torch.manual_seed(0)
    for d in a.d:
        hs = torch.randn(a.n, d, requires_grad=True)
        ws = (0.05 * torch.randn(a.v, d)).requires_grad_()
        ht, wt = torch.randn(a.n, d), 0.05 * torch.randn(a.v, d)
        t = torch.randint(0, a.v, (a.n,))
        grads = (a.v * d + a.n * d) * 4
        runs = [("eager fl.distill_loss(h @ W.T)", None,
                 lambda: fl.distill_loss(hs @ ws.T, ht @ wt.T, t, backend=a.backend, temperature=a.temperature))]
        for c in a.chunks:
            rows = c or default_chunk_rows(a.n, a.v, 4, fused, held_grad_bytes(hs, ws, None))
            name = "fl.linear_distill_loss" + (" (default)" if not c else "")
            runs.append((name, rows,
                         lambda rows=rows: fl.linear_distill_loss(hs, ws, ht, wt, t, backend=a.backend,
                                                                  temperature=a.temperature, chunk_rows=rows)))
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(a.repeat):
            for i, (_, _, f) in enumerate(runs):
                t0 = time.perf_counter()
                f().backward()
                times[i].append(time.perf_counter() - t0)
                hs.grad = ws.grad = None
        for i, (name, rows, f) in enumerate(runs):
            with PeakMemory() as m:
                f().backward()
            hs.grad = ws.grad = None
            results.append(dict(d=d, method=name, rows=rows, times_s=times[i], best_s=min(times[i]),
                                peak_bytes=m.peak_bytes, x_logits=m.peak_bytes / logits,
                                x_logits_without_grads=(m.peak_bytes - grads) / logits))
            out(f"| {d} | {name} | {rows or '-'} | {min(times[i]):.2f} | {m.peak_bytes / 2**20:.1f} | "
                f"{m.peak_bytes / logits:.3f} | {(m.peak_bytes - grads) / logits:.3f} |")
    load_end = _load()
    out(f"\nLoad at the end: `{load_end}`.")
    if a.out:
        with open(a.out + ".md", "w") as fh:
            fh.write("\n".join(lines) + "\n")
        with open(a.out + ".json", "w") as fh:
            json.dump(dict(command=command, commit=commit, torch=torch.__version__, threads=torch.get_num_threads(),
                           config=vars(a), kernel=kernel, load_start=load_start, load_end=load_end,
                           logits_bytes=logits, results=results), fh, indent=1)


if __name__ == "__main__":
    main()
