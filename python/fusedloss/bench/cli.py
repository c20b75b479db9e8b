"""Entry point of ``fusedloss-bench`` / ``python -m fusedloss.bench``.

Exit status: 0 success; 1 when a measurement raised (the other cells are still
reported); 2 for a usage error (unknown loss/backend/dtype, a requested
backend that is unavailable here, a shape that would not fit in memory).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

try:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
except ImportError:  # a machine without rich (bench/gpu/check.sh on an offline GPU box): plain text
    from ._plain import BarColumn, Console, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # type: ignore[assignment]

from .._extras import MissingExtraError, require_extra
from . import backends as bk
from . import machine, memory, report, sweep
from .options import BenchConfig, UsageError, dtype_name, parse_args

GIB = 2**30


def _resolve_backends(cfg: BenchConfig) -> tuple[list[bk.Backend], dict[str, str]]:
    """Backends to run, and the skipped ones with the reason.

    An unavailable backend the user named is an error; one that is merely part
    of the default list (a peer library not installed, a GPU-only kernel on a
    CPU machine) is skipped and listed, so the default run works everywhere.
    """
    chosen: list[bk.Backend] = []
    skipped: dict[str, str] = {}
    for name in cfg.backends:
        reason = bk.unavailable_reason(name, cfg.device)
        if reason is not None:
            if cfg.backends_explicit and not cfg.skip_unavailable:
                raise UsageError(f"backend '{name}' is unavailable: {reason}")
            skipped[name] = reason
            continue
        backend = bk.get_backend(name)
        if cfg.backends_explicit and not any(backend.supports(loss) for loss in cfg.losses):
            raise UsageError(f"backend '{name}' implements ce only; add --loss ce")
        chosen.append(backend)
    return chosen, skipped


def _check_fits(cfg: BenchConfig) -> None:
    """Refuse, before allocating anything, a shape the device cannot hold."""
    available = memory.available_bytes(cfg.device)
    if available is None:
        return
    for dtype in cfg.dtypes:
        for n in cfg.ns:
            for c in cfg.cs:
                need = memory.bytes_needed(n, c, dtype, cfg.check_accuracy)
                if need > available:
                    logits = n * c * torch.empty((), dtype=dtype).element_size()
                    raise UsageError(
                        f"N={n} C={c} {dtype_name(dtype)} needs about {need / GIB:.1f} GiB "
                        f"(logits {logits / GIB:.1f} GiB) but only {available / GIB:.1f} GiB is free "
                        f"on {cfg.device}" + ("; --no-accuracy saves the float64 check" if cfg.check_accuracy else "")
                    )


def _config_dict(cfg: BenchConfig) -> dict[str, object]:
    out = asdict(cfg)
    out["device"] = str(cfg.device)
    out["dtypes"] = [dtype_name(d) for d in cfg.dtypes]
    for key, value in out.items():
        if isinstance(value, Path):
            out[key] = str(value)
    return out


def _title(info: dict[str, object], cfg_mode: str, logits: str) -> str:
    return f"fusedloss-bench {cfg_mode}, {logits} logits: {machine.one_line(info)}"


def _write_outputs(cfg: BenchConfig, doc: dict[str, object], console: Console) -> None:
    records: list[dict[str, object]] = doc["results"]  # type: ignore[assignment]
    info: dict[str, object] = doc["machine"]  # type: ignore[assignment]
    mode = str(records[0]["mode"]) if records else cfg.mode
    logits = str(records[0]["logits"]) if records else cfg.logits
    if cfg.json_path:
        report.write_json(cfg.json_path, doc)
        console.print(f"wrote {cfg.json_path}")
    if cfg.csv_path:
        report.write_csv(cfg.csv_path, records, info)
        console.print(f"wrote {cfg.csv_path}")
    if cfg.markdown_path:
        report.write_markdown(cfg.markdown_path, doc)
        console.print(f"wrote {cfg.markdown_path}")
    if cfg.plot_path:
        from .plot import write_plot  # matplotlib is slow to import: only when asked

        write_plot(cfg.plot_path, records, _title(info, mode, logits))
        console.print(f"wrote {cfg.plot_path}")


def _measure(cfg: BenchConfig, chosen: list[bk.Backend], err: Console) -> list[dict[str, object]]:
    records: list[dict[str, object]] = []
    total = sweep.cells(cfg, chosen)
    progress = Progress(TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, disable=cfg.quiet, transient=False)
    with progress:
        task = progress.add_task("starting", total=total)
        for rec in sweep.run(cfg, chosen, on_cell=lambda label: progress.update(task, description=label)):
            records.append(rec)
            progress.advance(task)
        progress.update(task, description="done")
    return records


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--head" in args:  # the LLM head benchmark has its own options (bench/head.py)
        from .head import main as head_main

        return head_main([a for a in args if a != "--head"])
    # The table fits the terminal (report.terminal_tables: one table per shape and fewer
    # columns when narrow). Not on a terminal (CI logs, pipes, files) and without COLUMNS,
    # rich would assume 80: 200 keeps every column there.
    out = Console() if Console().is_terminal or os.environ.get("COLUMNS") else Console(width=200)
    err = Console(stderr=True)
    try:
        cfg = parse_args(args, bk.known_backends())
        if cfg.plot_path:  # checked now, not after a sweep of minutes
            try:
                require_extra("bench", "--plot")
            except MissingExtraError as exc:
                raise UsageError(str(exc)) from None
        if cfg.from_json is not None:
            try:
                doc = report.read_json(cfg.from_json)
            except (OSError, ValueError) as exc:
                raise UsageError(f"--from-json: {exc}") from None
            report.print_table(out, doc["results"], _title(doc["machine"], cfg.mode, cfg.logits))  # type: ignore[arg-type]
            _write_outputs(cfg, doc, err)
            return 0
        chosen, skipped = _resolve_backends(cfg)
        if not chosen:
            raise UsageError("no backend to run")
        _check_fits(cfg)
    except UsageError as exc:
        # One line even when a reason quotes a multi-line exception message.
        one_line = " ".join(str(exc).split())
        err.print(f"fusedloss-bench: error: {one_line}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    allocator = "system"
    if cfg.device.type == "cpu" and cfg.cpu_allocator == "warm":
        from .allocator import keep_freed_memory

        allocator = keep_freed_memory()
    info = machine.describe(cfg.device)
    info["cpu_allocator"] = allocator
    err.print(f"machine: {machine.one_line(info)}", markup=False, highlight=False)
    for name, reason in skipped.items():
        err.print(f"skipped backend {name}: {reason}", markup=False, highlight=False)
    records = _measure(cfg, chosen, err)
    info["loadavg_1m_end"] = machine.loadavg()
    doc: dict[str, object] = {
        "schema": report.SCHEMA,
        "command": "fusedloss-bench" + (" " + shlex.join(args) if args else ""),
        "machine": info,
        "config": _config_dict(cfg),
        "unavailable": skipped,
        "results": records,
    }
    report.print_table(out, records, _title(info, cfg.mode, cfg.logits))
    _write_outputs(cfg, doc, err)
    return 1 if any(r.get("error") for r in records) else 0
