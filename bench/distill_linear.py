"""fl.linear_distill_loss on the CPU: peak extra memory (fusedloss.memtrack, forward + backward, d weight
and d hidden counted) as a multiple of one (N, V) float32 logits tensor, and the time of one forward +
backward, for several block sizes, beside eager fl.distill_loss on the materialized logits.

    python bench/distill_linear.py --n 2048 --v 32000 --d 256 512 --chunks 0 32 128 512 --repeat 2

(chunk 0: the default block size.) Prints a Markdown table; nothing is written."""
from __future__ import annotations

import argparse
import time

import torch

import fusedloss as fl
from fusedloss.distill.linear import default_chunk_rows
from fusedloss.distill.ops import DistillOps
from fusedloss.memtrack import PeakMemory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--d", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 128])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--temperature", type=float, default=2.0)
    a = ap.parse_args()
    from fusedloss import dispatch
    be = dispatch.resolve(a.backend, torch.device("cpu"))
    kernel = "fused kernel" if be.family(DistillOps) is not None else "reference op (no DistillOps in this backend)"
    print(f"N {a.n}, V {a.v}, float32, backend {a.backend} ({kernel}), T {a.temperature}, target: ce, "
          f"{torch.get_num_threads()} threads\n")
    print("| D | method | rows/block | best s | peak MiB | x logits | x logits without d weight, d hidden |")
    print("|---|---|---|---|---|---|---|")
    logits = a.n * a.v * 4
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
            rows = c or default_chunk_rows(a.n, a.v, 4, be.family(DistillOps) is not None)
            runs.append(("fl.linear_distill_loss", rows,
                         lambda rows=rows: fl.linear_distill_loss(hs, ws, ht, wt, t, backend=a.backend,
                                                                  temperature=a.temperature, chunk_rows=rows)))
        for name, rows, f in runs:
            times = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                f().backward()
                times.append(time.perf_counter() - t0)
                hs.grad = ws.grad = None
            with PeakMemory() as m:
                f().backward()
            hs.grad = ws.grad = None
            print(f"| {d} | {name} | {rows or '-'} | {min(times):.2f} | {m.peak_bytes / 2**20:.1f} | "
                  f"{m.peak_bytes / logits:.3f} | {(m.peak_bytes - grads) / logits:.3f} |", flush=True)


if __name__ == "__main__":
    main()
