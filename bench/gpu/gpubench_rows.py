"""What the GPU benchmark scripts (distill_bench.py, targets_bench.py) share: one measured row
(a step against the copy it is divided by, timed interleaved, its peak extra memory), and the
atomic rewrite of their JSON and markdown after every row (a run cut by the budget keeps what it
measured)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def measure_row(row: dict, step: Callable[[], torch.Tensor], copy: Callable[[], object], device: torch.device,
                warmup: int, repeat: int, logits_bytes: int | None, value_key: str) -> bool:
    """Fill ``row`` with the step's median time, the copy's, their ratio (``x_copy``), the step's
    first value under ``value_key`` (a sanity check of what it computes), the peak extra memory
    over ``logits_bytes`` (None: not measured) and the seconds it all took; or with ``error``.
    The first call is untimed (Triton's JIT, Inductor's compile); then ``warmup`` more. Returns
    whether the row was measured: one method failing must not hide the others."""
    from fusedloss.bench.memory import peak_extra_bytes
    from fusedloss.bench.timing import measure_interleaved

    t0 = time.time()
    try:
        value = float(step())
        tc, tm = measure_interleaved([copy, step], device, warmup, repeat)
        row.update(ms=tm.median_ms, copy_ms=tc.median_ms, x_copy=tm.median_ms / tc.median_ms)
        row[value_key] = value if math.isfinite(value) else str(value)
        if logits_bytes:
            row["peak_x_logits"] = peak_extra_bytes(step, device) / logits_bytes
        ok = True
    except Exception as exc:  # noqa: BLE001 - reported in the row
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        ok = False
    row["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(row), flush=True)
    return ok


def saver(doc: dict, json_path: Path, md_path: Path | None, markdown: Callable[[dict], str]) -> Callable[[], None]:
    """The script's ``save()``: ``doc`` as JSON (and its markdown), rewritten atomically."""
    def save() -> None:
        write_atomic(json_path, json.dumps(doc, indent=1) + "\n")
        if md_path:
            write_atomic(md_path, markdown(doc))
    return save


def finish(doc: dict, save: Callable[[], None], md_path: Path | None, failed: int) -> int:
    """Mark the run complete, save it, print the markdown; the exit status (1: a row failed)."""
    doc["complete"] = True
    save()
    if md_path:
        print(md_path.read_text())
    return 1 if failed else 0
