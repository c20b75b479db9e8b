"""Print registers, spills and bytes moved per logit byte of the Triton kernels.

    python -m fusedloss.triton_kernels.report            # the table (sm_90, bf16 and fp32)
    python -m fusedloss.triton_kernels.report --arch 80
    python -m fusedloss.triton_kernels.report --all      # + every shipped specialization, sm_80 and sm_90

No GPU needed: registers and spills come from ahead-of-time compilation (Triton's
bundled ptxas/cuobjdump), bytes from the kernels' loop structure (``traffic.py``;
checked against the interpreter's count of every load and store by the tests), and
the PyTorch reference's bytes from counting its aten ops on CPU.

"fwd+bwd B/logit B" is DRAM bytes / (N C E) for a training step's loss forward and
backward with grad_output = 1; a copy of the logits (read + write) is 2.00, the floor
of any loss that writes its gradient, and "x copy" is that figure / 2 (the time ratio
to a copy if both run at DRAM bandwidth). For streamed rows (C above the on-chip limit)
it is a *prediction*: the first pass loads with L2 priority evict_last, the last pass
and the gradient stores evict_first, and the second pass runs in reverse, so the part
of each row still in L2 is its most recently read part. With P rows in flight
(the persistent grid of heuristics.stream_programs, at most the programs resident per SM
from the AOT register count x 132 SMs) of R bytes, the
model counts min(1, L2 / (P R)) of the re-read as L2 hits and the rest as DRAM reads.
"""
from __future__ import annotations

import argparse
import sys

import torch

from fusedloss.variants import Reduction, Variant

from . import aot, traffic
from .one_target import aot_specs
from .heuristics import fwd_config, stream_programs

#: The H100 SXM the issue's targets refer to.
SMS = 132
L2_BYTES = 50 * 2 ** 20
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
#: C -> N of the issue's table (131072 stands for Llama-3's 128256).
SHAPES = {1000: 4096, 32000: 8192, 131072: 8192, 262144: 4096}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resident_programs(registers: int, num_warps: int) -> int:
    threads = 32 * num_warps
    regs = max(registers, 1) * threads
    return max(1, min(REGS_PER_SM // regs, THREADS_PER_SM // threads, MAX_CTAS_PER_SM))


def predicted_dram_per_logit_byte(m: traffic.KernelTraffic, programs: int) -> tuple[float, float]:
    """(DRAM bytes per logit byte, fraction of the re-reads predicted to miss L2) with
    ``programs`` rows in flight."""
    extra = m.logit_passes - 1
    if extra == 0:
        return m.per_logit_byte, 0.0
    in_flight = programs * m.n_cols * m.elem
    miss = max(0.0, 1.0 - L2_BYTES / in_flight)
    return m.per_logit_byte + extra * miss, miss


def rows(arch: int = 90):
    out = []
    for v in Variant:
        for dt_name, dt in DTYPES.items():
            for c, n in SHAPES.items():
                es = dt.itemsize
                spec = aot.Spec("fwd", int(v), dt_name, c, has_weight=False, smoothing=False, compute_grad=True)
                u = aot.resource_usage(spec, arch)
                cfg = fwd_config(c, es, int(v))
                m = traffic.kernel_traffic(int(v), n, c, es, reduction=Reduction.MEAN)
                progs = resident_programs(u.registers, cfg.num_warps)
                in_flight = SMS * progs
                if not cfg.single:  # the persistent grid (heuristics.stream_programs)
                    in_flight = min(in_flight, stream_programs(c, es, int(v), SMS, L2_BYTES))
                dram, miss = predicted_dram_per_logit_byte(m, in_flight)
                ref = traffic.reference_traffic(v.name.lower(), 2, c, dt)["per_logit_byte"]
                out.append(dict(loss=v.name.lower(), dtype=dt_name, C=c, N=n,
                                config=f"{cfg.block_n}x{cfg.block_c}{'' if cfg.single else ' streamed'}, {cfg.num_warps}w",
                                registers=u.registers, spills=u.spill_stores + u.spill_loads + u.local_bytes,
                                programs_per_sm=progs, in_flight=in_flight, passes=m.logit_passes, l2_miss=miss,
                                requested=m.requested_per_logit_byte, dram=dram, reference=ref))
    return out


def markdown(table) -> str:
    head = ("| loss | dtype | C | config | regs | spills | CTAs/SM | rows in flight | row reads "
            "| fwd+bwd B/logit B, DRAM (predicted) | x copy | requested (L1/L2) | PyTorch reference B/logit B |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in table:
        note = ""
        if r["passes"] > 1:
            note = " (re-reads from L2)" if r["l2_miss"] == 0 else f" ({r['l2_miss']:.0%} of re-reads from DRAM)"
        lines.append(f"| {r['loss']} | {r['dtype']} | {r['C']} | {r['config']} | {r['registers']} | {r['spills']} "
                     f"| {r['programs_per_sm']} | {r['in_flight']} | {r['passes']} | {r['dram']:.2f}{note} | {r['dram'] / 2:.2f} "
                     f"| {r['requested']:.2f} | {r['reference']:.1f} |")
    return head + "\n".join(lines)


def check_all() -> int:
    bad = 0
    specs = aot_specs.shipped_specs()
    for arch in aot.ARCHS:
        regs = []
        for s in specs:
            u = aot.resource_usage(s, arch)
            regs.append(u.registers)
            if u.spills or u.stack_bytes:
                bad += 1
                print(f"SPILL {s.label()} sm_{arch}: {u}")
        print(f"sm_{arch}: {len(specs)} shipped specializations compiled, registers {min(regs)}..{max(regs)}, "
              f"{sum(1 for s in specs if aot.resource_usage(s, arch).spills)} with spills")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=aot.ARCHS)
    p.add_argument("--all", action="store_true", help="also compile every shipped specialization for sm_80 and sm_90")
    a = p.parse_args(argv)
    print(f"Triton kernels, sm_{a.arch} (ahead-of-time; H100 model: {SMS} SMs, {L2_BYTES >> 20} MB L2). "
          "B/logit B = bytes moved / (N C E); a copy of the logits is 2.00.\n")
    print(markdown(rows(a.arch)))
    if a.all:
        print()
        return 1 if check_all() else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
