"""What gpucheck reads and writes besides its steps: the parsers of ``nvidia-smi -q``, the
compute-sanitizer log and pytest's JUnit XML; the sweep's child process (imports torch) and the
sweep's markdown. Standard library only at import (see gpucheck.py)."""
from __future__ import annotations

import json
import os
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from gpucheck_plan import LOSSES


def parse_nvidia_smi(text: str) -> dict[str, str]:
    """A few fields of ``nvidia-smi -q``, keyed ``Section/Field`` (first GPU only)."""
    wanted = {
        "Driver Version", "CUDA Version", "Product Name", "Product Architecture", "Persistence Mode",
        "MIG Mode/Current", "Performance State", "FB Memory Usage/Total", "FB Memory Usage/Used",
        "Temperature/GPU Current Temp", "GPU Power Readings/Power Draw", "GPU Power Readings/Average Power Draw",
        "GPU Power Readings/Current Power Limit", "Clocks/Graphics", "Clocks/SM", "Clocks/Memory",
        "Max Clocks/SM", "Max Clocks/Memory", "ECC Mode/Current", "Clocks Event Reasons/HW Slowdown",
        "Clocks Event Reasons/SW Thermal Slowdown", "Clocks Event Reasons/SW Power Cap",
        "Clocks Throttle Reasons/HW Slowdown", "Clocks Throttle Reasons/SW Power Cap",
    }
    out: dict[str, str] = {}
    section = ""
    gpus = 0
    for line in text.splitlines():
        if line.startswith("GPU "):
            gpus += 1
            if gpus > 1:
                break
            continue
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if ":" not in line:
            if indent <= 4:
                section = line.strip()
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if indent <= 4:
            section = "" if value else key
        for name in (key, f"{section}/{key}"):
            if name in wanted and name not in out and value:
                out[name] = value
    return out


def parse_sanitizer_log(text: str) -> dict[str, object]:
    """Error count and the first reports of a ``compute-sanitizer`` log."""
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    reports = [ln.strip("= ").strip() for ln in text.splitlines()
               if re.match(r"=+\s+(Invalid|Out of range|Misaligned|Address|Program hit|Malloc|Cuda API|Race)", ln)]
    return {"errors": int(m[-1]) if m else None, "first_reports": reports[:20]}


def parse_junit(path: Path) -> dict[str, object]:
    """Totals and failing test ids of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            bad.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    tot["failed_ids"] = bad[:30]
    tot["time_s"] = round(sum(float(s.get("time", 0) or 0) for s in suites), 1)
    return tot


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def merge_sweeps(docs: list[dict], chunks: list[dict]) -> dict:
    """One ``fusedloss-bench`` result document (schema 1) from several."""
    machine = dict(docs[0]["machine"])
    machine["loadavg_1m_end"] = docs[-1]["machine"].get("loadavg_1m_end")
    unavailable: dict[str, str] = {}
    for d in docs:
        unavailable.update(d.get("unavailable") or {})
    return {"schema": docs[0]["schema"], "command": "gpucheck sweep: " + " ; ".join(d["command"] for d in docs),
            "machine": machine, "config": {"chunks": chunks}, "unavailable": unavailable,
            "results": [r for d in docs for r in d["results"]]}


def sweep_child(plan_path: Path) -> int:
    """Run the plan's chunks in this one process (torch, Triton and Inductor caches stay
    warm across chunks), rewriting the merged JSON and markdown, and the chunks' status
    (``plan["status"]``: what the parent reads), after each."""
    plan = json.loads(plan_path.read_text())
    from fusedloss.bench import report
    from fusedloss.bench.cli import main as bench_main

    status: list[dict[str, object]] = []
    worst = 0
    for i, chunk in enumerate(plan["chunks"]):
        t0 = time.time()
        print(f"[sweep {i + 1}/{len(plan['chunks'])}] fusedloss-bench {' '.join(chunk['argv'])}", flush=True)
        out = Path(chunk["json"])
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            rc = bench_main([*chunk["argv"], "--json", str(out)])
        except Exception as exc:  # noqa: BLE001 - the next chunk still runs
            print(f"[sweep] chunk {chunk['name']} raised {type(exc).__name__}: {exc}", flush=True)
            rc = 1
        worst = max(worst, rc)
        status.append({"name": chunk["name"], "rc": rc, "seconds": round(time.time() - t0, 1),
                       "argv": chunk["argv"], "json": out.name if out.exists() else None})
        print(f"[sweep {i + 1}/{len(plan['chunks'])}] rc={rc} in {time.time() - t0:.1f} s", flush=True)
        docs = [json.loads((out.parent / s["json"]).read_text()) for s in status if s["json"]]
        if docs:
            merged = merge_sweeps(docs, status)
            _write_atomic(Path(plan["merged"]), json.dumps(merged, indent=1) + "\n")
            _write_atomic(Path(plan["markdown"]), report.markdown(merged))
        if plan.get("status"):
            _write_atomic(Path(plan["status"]), json.dumps(status, indent=1) + "\n")
    return worst


def _num(rec: dict, key: str, fmt: str) -> str | None:
    v = rec.get(key)
    try:
        return fmt.format(float(v)) if v is not None else None
    except (TypeError, ValueError):
        return str(v)


_BACKEND_ORDER = ("copy", "triton", "cuda", "cpu", "torch", "liger", "quack", "compile", "reference", "naive")


def _pivot(records: list[dict], fmt) -> list[str]:
    """Markdown tables per dtype: rows (loss, backend), columns (C, N), cells ``fmt(record)``."""
    lines: list[str] = []
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        sub = [r for r in records if r["dtype"] == dtype]
        cols = sorted({(int(r["c"]), int(r["n"])) for r in sub})
        rows: dict[tuple[str, str], dict[tuple[int, int], str]] = {}
        for r in sub:
            cellv = "error" if r.get("error") else (fmt(r) or "–")
            rows.setdefault((r["loss"], r["label"]), {}).setdefault((int(r["c"]), int(r["n"])), cellv)

        def order(k: tuple[str, str]) -> tuple[int, int]:
            loss, label = k
            b = label.split(" ")[0]
            return ((LOSSES.index(loss) + 1) if loss in LOSSES else 0,
                    _BACKEND_ORDER.index(b) if b in _BACKEND_ORDER else len(_BACKEND_ORDER))

        lines += [f"**{dtype}**", "", "| loss | backend | " + " | ".join(f"C={c} (N={n})" for c, n in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for k in sorted(rows, key=order):
            lines.append(f"| {k[0]} | {k[1]} | " + " | ".join(rows[k].get(col, "") for col in cols) + " |")
        lines.append("")
    return lines


def render_sweep(results: Path) -> list[str]:
    """sweep.md (headline pivots of sweep.json) and, with matplotlib, sweep.png."""
    doc = json.loads((results / "sweep.json").read_text())
    recs = doc["results"]
    m = doc["machine"]
    head = [f"# Sweep: {m.get('gpu') or m.get('cpu')} ({m.get('device')})", "",
            f"torch {m.get('torch')}, triton {m.get('triton')}, cuda {m.get('cuda')}, fusedloss "
            f"{m.get('fusedloss_commit')}, {m.get('date')}. Forward+backward, reduction mean, N(0, 1) logits; "
            "every shape has about the same number of logits (N = elements // C). Full table, per-row "
            "spreads and GB/s: sweep_full.md; raw data: sweep.json.", ""]
    if doc.get("unavailable"):
        head += ["Not measured: " + "; ".join(f"`{k}` ({v})" for k, v in doc["unavailable"].items()), ""]
    time_tab = ["## Time as a multiple of a copy of the logits (same run, interleaved)", "",
                *_pivot(recs, lambda r: _num(r, "x_copy", "{:.2f}"))]
    mem = ["## Peak memory of fwd+bwd as a multiple of the logits (the gradient alone is 1.00)", "",
           *_pivot([r for r in recs if r["backend"] != "copy"], lambda r: _num(r, "x_logits", "{:.2f}"))]
    acc = ["## Largest error against float64 (loss / gradient) and nan+inf entries", "",
           *_pivot([r for r in recs if r["backend"] != "copy"],
                   lambda r: (f"{_num(r, 'loss_err', '{:.1e}')} / {_num(r, 'grad_err', '{:.1e}')} / "
                              f"{int(r.get('nan') or 0) + int(r.get('inf') or 0)}") if "loss_err" in r else None)]
    errs = [f"- {r['loss']} {r['backend']} {r['dtype']} C={r['c']}: {r['error']}" for r in recs if r.get("error")]
    if errs:
        acc += ["Errors:", "", *errs, ""]
    _write_atomic(results / "sweep.md", "\n".join(head + time_tab + mem + acc) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001 - the PNG is optional
        return time_tab + [f"(no sweep.png: matplotlib unavailable: {type(exc).__name__})"]
    losses = [x for x in LOSSES if any(r["loss"] == x for r in recs)]
    fig, axes = plt.subplots(len(losses), 2, figsize=(12, 3.2 * len(losses)), squeeze=False)
    for row, loss in enumerate(losses):
        for col, (key, ylabel) in enumerate((("x_copy", "time / copy"), ("x_logits", "peak mem / logits"))):
            ax = axes[row][col]
            series: dict[str, list[tuple[int, float]]] = {}
            for r in recs:
                if r["loss"] == loss and r.get(key) is not None and not r.get("error"):
                    series.setdefault(f"{r['label']} {r['dtype']}", []).append((int(r["c"]), float(r[key])))
            for name, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="--" if "float32" in name else "-", label=name)
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{loss}: {ylabel}")
            ax.set_xlabel("C")
            if series:
                ax.legend(fontsize=6)
    fig.suptitle(head[0][2:])
    fig.tight_layout()
    fig.savefig(results / "sweep.png", dpi=90)
    return time_tab
