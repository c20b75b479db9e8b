"""Worst error of the reference backend (and of the textbook formulas) against float64, on
the extreme logits of the tests: the target leading by 20, 100 and 1000, a wrong class
leading by 50, -inf masked classes, all-equal rows, and ordinary rows.

    python bench/reference_accuracy.py [--md bench/results/reference_accuracy.md]

The float64 oracle is the tests' own (tests/oracle.py), independent of the code measured.
Loss error: max over rows of |a - r| / max(|r|, FLT_MIN). Gradient error: max over rows of
max_j |g_j - r_j| / max(max_j |r_j|, FLT_MIN), and the target-class component on its own,
relative to its own size. FLT_MIN (1.2e-38, float32's and bfloat16's smallest normal number)
floors the denominators: below it values are subnormal and carry no relative precision
(the target leading by 100 puts whole gradient rows there).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

TINY = torch.finfo(torch.float32).tiny

import fusedloss as fl
from fusedloss.reference import extreme_logits, naive_loss

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from oracle import oracle_loss_and_grad  # noqa: E402


def rel_loss(a: torch.Tensor, r: torch.Tensor) -> float:
    a, r = a.double(), r.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - r).abs() / r.abs().clamp_min(TINY)).max().item()


def rel_grad(g: torch.Tensor, r: torch.Tensor) -> float:
    g, r = g.double(), r.double()
    if not torch.isfinite(g).all():
        return float("nan")
    scale = r.abs().amax(1).clamp_min(TINY)
    return ((g - r).abs().amax(1) / scale).max().item()


def rel_target(g, r, t) -> float:
    rows = torch.arange(len(t))
    gc, rc = g.double()[rows, t], r[rows, t]
    return ((gc - rc).abs() / rc.abs().clamp_min(TINY)).max().item()


def finite_rows(metric, a, r) -> str:
    """The metric over the rows where the naive result is finite (its NaN rows are counted apart)."""
    ok = torch.isfinite(a) if a.dim() == 1 else torch.isfinite(a).all(1)
    return f"{metric(a[ok], r[ok]):.1e}" if ok.any() else "-"


def run(fn, x, t):
    xx = x.detach().clone().requires_grad_(True)
    out = fn(xx, t)
    out.sum().backward()
    return out.detach(), xx.grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=70)
    ap.add_argument("--c", type=int, default=1000)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    x32, t = extreme_logits(args.n, args.c, generator=torch.Generator().manual_seed(0))
    lines = ["Command: `python bench/reference_accuracy.py`; inputs: `fusedloss.reference.extreme_logits"
             f"({args.n}, {args.c})` (7 row kinds).", "",
             "| loss | dtype | reference: loss rel. err | grad rel. err (row-wise) | target-class grad rel. err "
             "| naive: non-finite losses | non-finite grad rows | naive loss rel. err (finite rows) | naive grad rel. err (finite rows) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for loss in fl.LOSSES:
        for dtype in (torch.float32, torch.bfloat16):
            x = x32.to(dtype)
            ref, ref_g = oracle_loss_and_grad(x, t, loss, reduction="none")
            out, g = run(lambda a, b: fl.softmax_loss(a, b, loss, reduction="none", backend="reference"), x, t)
            nout, ng = run(lambda a, b: naive_loss(a, b, loss, reduction="none"), x, t)
            lines.append(f"| {loss} | {str(dtype)[6:]} | {rel_loss(out, ref):.1e} | {rel_grad(g, ref_g):.1e} | "
                         f"{rel_target(g, ref_g, t):.1e} | {(~torch.isfinite(nout)).sum().item()}/{len(t)} | "
                         f"{(~torch.isfinite(ng).all(1)).sum().item()}/{len(t)} | {finite_rows(rel_loss, nout, ref)} | "
                         f"{finite_rows(rel_grad, ng, ref_g)} |")
            print(lines[-1], flush=True)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
