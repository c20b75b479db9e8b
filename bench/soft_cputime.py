"""CPU time of the soft-target (class-probability) ops, every loss against soft ce.

Times ``torch.ops.fusedloss.ext_soft_fwd`` (ce) and ``ext_soft_loss_fwd`` (bce, nllr, crl, lace,
focal) with the fused gradient (``--nograd``: the forward passes alone), interleaved across the
losses round by round, on one thread with ``time.thread_time`` (CPU time: on a shared machine it
moves far less with the load than wall-clock time does). Prints, per shape and dtype, the minimum
and median ms of each loss and min(loss) / min(ce). N(0, 1) logits, softmax(N(0, 1)) targets in the
logits' dtype, no weights, no smoothing, reduction 'mean'.

    python bench/soft_cputime.py --rounds 9 [--nograd] [--shapes 4096x1000 1024x32000]

Run two builds back to back (PYTHONPATH pointing at each) to compare them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fusedloss  # noqa: F401  (registers the ops)
import fusedloss._C  # noqa: F401

VARIANT = {"bce": 1, "nllr": 2, "crl": 3, "lace": 4, "focal": 5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x1000", "1024x32000"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--nograd", action="store_true", help="forward passes only (no gradient pass)")
    ap.add_argument("--losses", nargs="+", default=["ce", "bce", "nllr", "crl", "lace", "focal"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    ops = torch.ops.fusedloss
    for shape in a.shapes:
        n, c = map(int, shape.split("x"))
        for dt in a.dtypes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, generator=g).to(getattr(torch, dt))
            y = torch.softmax(torch.randn(n, c, generator=g), 1).to(x.dtype)

            def call(loss):
                if loss == "ce":
                    return ops.ext_soft_fwd(x, y, None, 1, 0.0, not a.nograd)
                return ops.ext_soft_loss_fwd(x, y, None, VARIANT[loss], 1, 0.0, 0.25, 1.0, 2.0, not a.nograd)

            times = {loss: [] for loss in a.losses}
            for loss in a.losses:
                call(loss)
            for _ in range(a.rounds):
                for loss in a.losses:
                    t0 = time.thread_time()
                    out = call(loss)
                    times[loss].append(time.thread_time() - t0)
                    del out
            ce = min(times["ce"]) if "ce" in times else None
            line = f"{shape} {dt:8s}"
            for loss in a.losses:
                line += f" | {loss} {min(times[loss]) * 1e3:6.2f}/{statistics.median(times[loss]) * 1e3:6.2f}"
                if ce:
                    line += f" ({min(times[loss]) / ce:.2f})"
            print(line, flush=True)


if __name__ == "__main__":
    main()
