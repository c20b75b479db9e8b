"""A Hugging Face causal LM's training step, stock vs ``fusedloss.hf.patch_causal_lm``.

A tiny ``LlamaForCausalLM`` built from a config (random weights, nothing downloaded) whose head
is the benchmark's head: hidden 512, vocabulary 32000, batch 4 x 1024 tokens (N = 4096 rows),
one decoder layer (so the head dominates). One step is ``model(input_ids, labels=labels)`` then
``loss.backward()`` with the parameters' gradients cleared (set to None) before it, so both
models allocate their gradients inside the step. Rows, timed interleaved (stock, patched ce,
patched crl, ...) on the same model weights:

* ``stock``: transformers' forward, ``lm_head`` logits (N, V) and ``ForCausalLMLoss``;
* ``patched <loss>``: the same forward with the fused head (no logits).

Peak extra memory of one step from ``fusedloss.memtrack.PeakMemory`` (every tensor the step
allocates: the decoder's activations and the gradients too, the same in every row), beside
the (N, V) float32 logits' bytes.

    python bench/hf_head.py --markdown bench/results/hf_head_cpu.md
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch

import fusedloss as fl
from fusedloss.bench import machine, memory, timing
from fusedloss.hf import patch_causal_lm

MIB = 2**20


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--loss", default="ce,crl", help="patched losses, comma-separated")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p.parse_args(argv)


def build(args):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                   max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return model, ids, ids.clone()


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=".*no fused kernel.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    info = machine.describe(device)
    stock, ids, labels = build(args)
    rows = [("stock (lm_head logits + ForCausalLMLoss)", "ce", stock)]
    for loss in args.loss.split(","):
        rows.append((f"patched {loss} (fused head)", loss, patch_causal_lm(copy.deepcopy(stock), loss)))

    def step_of(model):
        def step():
            for p in model.parameters():
                p.grad = None
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            return out.loss.detach()
        return step

    steps = [step_of(m) for _, _, m in rows]
    values = [s().item() for s in steps]
    times = timing.measure_interleaved(steps, device, args.warmup, args.repeat)
    peaks = [memory.peak_extra_bytes(s, device) for s in steps]
    n = args.batch * args.seq
    logits_bytes = n * args.vocab * 4
    info["loadavg_1m_end"] = machine.loadavg()
    results = [dict(method=name, loss=loss, value=v, **t.as_dict(), peak_extra_bytes=pk)
               for (name, loss, _), v, t, pk in zip(rows, values, times, peaks)]
    report = dict(machine=info, shape=dict(n=n, d=args.hidden, v=args.vocab, batch=args.batch, seq=args.seq,
                                           layers=args.layers), backend=fl.available_backends(),
                  logits_bytes=logits_bytes, results=results)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report, argv if argv is not None else sys.argv[1:])
    if args.markdown:
        args.markdown.write_text(md)
    print(md)
    return 0


def markdown(report, argv) -> str:
    m, s = report["machine"], report["shape"]
    base = report["results"][0]
    lines = [f"# Hugging Face LlamaForCausalLM training step: stock vs fusedloss.hf (N {s['n']}, D {s['d']}, "
             f"V {s['v']}, float32, cpu)", "",
             f"`python bench/hf_head.py {' '.join(argv)}` on {m['cpu']} ({m['torch_threads']} threads); torch "
             f"{m['torch']}, fusedloss backends {report['backend']}, commit {m['fusedloss_commit']}; load average "
             f"(1 min) {m['loadavg_1m']} at the start, {m['loadavg_1m_end']} at the end.", "",
             f"One training step of a {s['layers']}-layer LlamaForCausalLM (hidden {s['d']}, vocabulary {s['v']}, "
             f"batch {s['batch']} x {s['seq']} tokens): `model(input_ids, labels=labels)` and `loss.backward()`, "
             f"parameter gradients included. Times: median over the interleaved repeats. Peak extra memory: every "
             f"tensor the step allocates (fusedloss.memtrack), beside the (N, V) float32 logits' "
             f"{report['logits_bytes'] / MIB:.0f} MiB.", "",
             "| model | loss | loss value | median ms | x stock | peak extra MiB | x stock | saved MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['method']} | {r['loss']} | {r['value']:.5f} | {r['median_ms']:.0f} | "
                     f"{r['median_ms'] / base['median_ms']:.2f} | {r['peak_extra_bytes'] / MIB:.0f} | "
                     f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.2f} | "
                     f"{(base['peak_extra_bytes'] - r['peak_extra_bytes']) / MIB:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
