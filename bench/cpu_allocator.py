"""What glibc's allocator costs a CPU training step, and the setting that removes it (issue 15).

A training step frees the previous step's gradient (``optimizer.zero_grad()`` sets
``.grad`` to None) and the fused forward allocates the next one. glibc serves every
block above its mmap threshold (at most 32 MiB on 64-bit) with a fresh ``mmap`` and
returns it with ``munmap`` on free, so each step page-faults the whole gradient in
again: one fault per 4 KiB page, each zeroing its page. The copy (``logits.clone()``)
pays the same for its output.

This script runs the same loop in a fresh process per setting (glibc reads these
settings once, at start-up):

* ``system``: glibc's defaults;
* ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=…``: no mmap for large blocks, no trimming:
  freed blocks stay in the heap and the next step reuses them (what a training user
  sets; ``fusedloss-bench --cpu-allocator warm`` does the same with ``mallopt``);

and reports per step: the time of ``loss.backward()`` with the fused CPU kernel and of a
copy, sampled alternately, and the minor page faults (``getrusage``).

    python bench/cpu_allocator.py            # writes bench/results/cpu_allocator.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "glibc defaults": {},
    "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296": {"MALLOC_MMAP_MAX_": "0",
                                                              "MALLOC_TRIM_THRESHOLD_": "4294967296"},
}
SHAPES = ((4096, 1000), (1024, 32000))
DTYPES = ("float32", "bfloat16")

CHILD = r"""
import json, resource, statistics, sys, time
import torch
import fusedloss as fl
torch.set_num_threads(int(sys.argv[1]))
steps, out = int(sys.argv[2]), []
for n, c in json.loads(sys.argv[3]):
    for dtype in json.loads(sys.argv[4]):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, generator=g).to(getattr(torch, dtype)).requires_grad_()
        t = torch.randint(0, c, (n,), generator=g)
        def step():
            x.grad = None  # optimizer.zero_grad(set_to_none=True)
            fl.softmax_loss(x, t, "ce", backend="cpu").backward()
        copy = x.detach().clone
        for _ in range(3):
            step(); copy()
        ts, tc, fs, fc = [], [], [], []
        for _ in range(steps):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter(); step(); t1 = time.perf_counter()
            f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            y = copy(); t2 = time.perf_counter(); del y
            f2 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            ts.append(t1 - t0); tc.append(t2 - t1); fs.append(f1 - f0); fc.append(f2 - f1)
        out.append({"n": n, "c": c, "dtype": dtype, "step_ms": 1e3 * statistics.median(ts),
                    "copy_ms": 1e3 * statistics.median(tc), "step_faults": statistics.median(fs),
                    "copy_faults": statistics.median(fc), "logits_pages": x.numel() * x.element_size() / 4096})
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/cpu_allocator.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=21)
    args = ap.parse_args(argv)
    rows = []
    for name, extra in SETTINGS.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(extra)
        res = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), str(args.steps), json.dumps(SHAPES),
                              json.dumps(DTYPES)], env=env, capture_output=True, text=True, check=True)
        for r in json.loads(res.stdout.strip().splitlines()[-1]):
            rows.append({"setting": name, **r})
    load = os.getloadavg()[0]
    lines = ["# CPU allocator and the fused kernel's gradient buffer", "",
             f"`python bench/cpu_allocator.py` ({args.threads} threads, {args.steps} steps, medians; "
             f"load average (1 min) {load:.2f} at the end). A step is `x.grad = None; "
             "fl.softmax_loss(x, t, 'ce').backward()`; the copy is `x.clone()`, sampled after each step. "
             "Faults: minor page faults per step, against the logits' size in 4 KiB pages.", "",
             "| allocator setting | N x C | dtype | step ms | copy ms | step (x copy) | step faults | copy faults | logits pages |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['n']} x {r['c']} | {r['dtype']} | {r['step_ms']:.2f} | {r['copy_ms']:.2f} | "
                     f"{r['step_ms'] / r['copy_ms']:.2f} | {r['step_faults']:.0f} | {r['copy_faults']:.0f} | "
                     f"{r['logits_pages']:.0f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
