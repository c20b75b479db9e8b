"""Render results: the rich terminal table, JSON, CSV and markdown.

All four read the same list of result records (dicts made by
:mod:`fusedloss.bench.sweep`), and the cell formatting lives in one place so
the terminal and the committed markdown never disagree.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

try:
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table
except ImportError:  # no rich: print_table writes the markdown table (see bench/_plain.py)
    Console = Table = box = Measurement = None  # type: ignore[assignment,misc]

Record = dict[str, object]
SCHEMA = 1

# (key in the record, header) in display order.
COLUMNS: list[tuple[str, str]] = [
    ("loss", "loss"),
    ("label", "backend"),
    ("n", "N"),
    ("c", "C"),
    ("dtype", "dtype"),
    ("median_ms", "median ms"),
    ("spread", "±"),
    ("x_copy", "× copy"),
    ("copy_bw_pct", "% copy BW"),
    ("gbps", "GB/s"),
    ("peak_extra_mib", "peak MiB"),
    ("x_logits", "× logits"),
    ("loss_err", "loss err"),
    ("grad_err", "grad err"),
    ("nonfinite", "nan/inf"),
]

#: What the columns mean: (keys, meaning). The terminal table is followed by the entries of the
#: columns it shows (their headers, then the meaning); the markdown page ends with all of them.
LEGEND: list[tuple[tuple[str, ...], str]] = [
    (("median_ms",), "median of the repeats"),
    (("spread",), "half the inter-quartile range, as a % of the median"),
    (("x_copy",), "the row's median / the median of logits.clone() timed alternately with the row's own repeats "
                  "(not the copy row's median: that row is the clone timed on its own)"),
    (("copy_bw_pct",), "100 / × copy"),
    (("gbps",), "the mode's least traffic (fwd 1x, bwd 2x, fwd+bwd 3x the logits' bytes) / median"),
    (("peak_extra_mib", "x_logits"), "peak bytes allocated during the run beyond the inputs (the gradient "
                                     "included), in MiB / as a multiple of the logits' bytes (1.00: the gradient alone)"),
    (("loss_err", "grad_err"), "max abs error of the per-row losses / of the gradient vs float64"),
    (("nonfinite",), "entries the backend made nan / inf where float64 is finite"),
]

#: Columns left out, in this order, of a terminal table wider than the terminal (after N, C and
#: dtype move into one table per shape); --json, --csv and --markdown keep every column.
DROP_ORDER = ("gbps", "copy_bw_pct", "peak_extra_mib", "spread", "grad_err")

CSV_FIELDS = [
    "loss", "backend", "kind", "n", "c", "dtype", "mode", "logits", "median_ms", "p25_ms", "p75_ms",
    "min_ms", "repeats", "copy_ms", "x_copy", "copy_bw_pct", "bytes_moved", "gbps", "logits_bytes", "peak_extra_bytes",
    "peak_extra_mib", "x_logits", "loss_err", "grad_err", "nan", "inf", "error", "memory_error",
]
CSV_MACHINE_FIELDS = ["device", "cpu", "torch_threads", "torch", "triton", "gpu"]


def _num(value: object) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out


def _sig(value: float, digits: int = 3) -> str:
    """Three significant digits without scientific notation for ordinary sizes."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    if abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"


def cell(rec: Record, key: str) -> str:
    """The text of one table cell."""
    if rec.get("error") and key not in {"loss", "label", "n", "c", "dtype"}:
        return "error" if key == "median_ms" else ""
    if key == "spread":
        med, p25, p75 = (_num(rec.get(k)) for k in ("median_ms", "p25_ms", "p75_ms"))
        if med and p25 is not None and p75 is not None:
            return f"{100 * (p75 - p25) / (2 * med):.0f}%"
        return ""
    if key == "nonfinite":
        if "nan" not in rec:
            return ""
        return f"{rec['nan']}/{rec['inf']}"
    value = rec.get(key)
    if value is None:
        if key in {"peak_extra_mib", "x_logits"} and rec.get("memory_error"):
            return "n/a"
        return ""
    if key in {"loss_err", "grad_err"}:
        return f"{float(value):.1e}"  # type: ignore[arg-type]
    if key in {"x_copy", "x_logits"}:
        return f"{float(value):.2f}"  # type: ignore[arg-type]
    if key == "copy_bw_pct":
        return f"{float(value):.0f}%"  # type: ignore[arg-type]
    if key in {"median_ms", "gbps", "peak_extra_mib"}:
        return _sig(float(value))  # type: ignore[arg-type]
    return str(value)


def _groups(records: list[Record]) -> Iterable[list[Record]]:
    """Consecutive records sharing (dtype, N, C): one table section each."""
    group: list[Record] = []
    for rec in records:
        key = (rec["dtype"], rec["n"], rec["c"])
        if group and (group[0]["dtype"], group[0]["n"], group[0]["c"]) != key:
            yield group
            group = []
        group.append(rec)
    if group:
        yield group


def rich_table(records: list[Record], title: str, keys: list[str] | None = None, compact: bool = False) -> Table:
    """The terminal table of ``records`` with the columns ``keys`` (default: all); ``compact``:
    no outer border and one space between columns."""
    keys = [k for k, _ in COLUMNS] if keys is None else keys
    headers = dict(COLUMNS)
    table = Table(title=title, show_lines=False, header_style="bold", title_justify="left" if compact else "center",
                  **({"box": box.SIMPLE_HEAD, "pad_edge": False, "padding": (0, 1), "collapse_padding": True}
                     if compact else {}))
    for key in keys:
        table.add_column(headers[key], justify="left" if key in {"loss", "label", "dtype"} else "right",
                         no_wrap=True)
    for i, group in enumerate(_groups(records)):
        if i:
            table.add_section()
        for rec in group:
            style = "bold" if rec["backend"] == "copy" else ("red" if rec.get("error") else None)
            table.add_row(*(cell(rec, k) for k in keys), style=style)
    return table


def _width(console: Console, table: Table) -> int:
    """The natural width of ``table`` (measured unconstrained: rich caps a measure at the console width)."""
    return Measurement.get(console, console.options.update_width(10_000), table).maximum


def terminal_tables(console: Console, records: list[Record], title: str) -> tuple[list[Table], list[str]]:
    """The tables to print within ``console.width``, and the keys of the columns left out.

    One table with every column when it fits; else one table per shape (N, C and dtype in its
    title), compact, leaving out columns in DROP_ORDER until the widest fits."""
    tables = [rich_table(records, title)]
    if _width(console, tables[0]) <= console.width:
        return tables, []
    keys = [k for k, _ in COLUMNS if k not in {"n", "c", "dtype"}]
    dropped: list[str] = []
    groups = list(_groups(records))

    def build() -> list[Table]:
        out = [rich_table(g, f"N={g[0]['n']} C={g[0]['c']} {g[0]['dtype']}", keys, compact=True) for g in groups]
        if out:
            out[0].title = f"{title}\n{out[0].title}"
        return out

    tables = build()
    for key in DROP_ORDER:
        if max(_width(console, t) for t in tables) <= console.width:
            break
        keys.remove(key)
        dropped.append(key)
        tables = build()
    return tables, dropped


def legend(keys: Iterable[str]) -> str:
    """What the columns ``keys`` mean (those that need saying), in one paragraph."""
    keys = set(keys)
    headers = dict(COLUMNS)
    parts = []
    for group, meaning in LEGEND:
        shown = [k for k in group if k in keys]
        if shown:
            parts.append(f"{', '.join(headers[k] for k in shown)}: {meaning}")
    return "; ".join(parts) + "."


def print_table(console: Console, records: list[Record], title: str) -> None:
    if Table is None:
        console.print("\n".join([title, "", *_md_table([h for _, h in COLUMNS],
                                                       [[cell(r, k) for k, _ in COLUMNS] for r in records])]),
                      markup=False)
        console.print(legend(k for k, _ in COLUMNS), markup=False)
    else:
        tables, dropped = terminal_tables(console, records, title)
        for table in tables:
            console.print(table)
        shown = [k for k, _ in COLUMNS if k not in dropped]
        note = ""
        if dropped:
            headers = dict(COLUMNS)
            note = (f" Left out to fit {console.width} columns: {', '.join(headers[k] for k in dropped)} "
                    "(--json, --csv, --markdown have every column).")
        console.print(legend(shown) + note, markup=False, highlight=False)
    for rec in records:
        if rec.get("error"):
            console.print(f"[red]error[/red] {rec['loss']} {rec['backend']} N={rec['n']} C={rec['c']}: {rec['error']}")
        elif rec.get("memory_error"):
            console.print(f"memory n/a for {rec['loss']} {rec['backend']}: {rec['memory_error']}")


def write_json(path: Path, document: dict[str, object]) -> None:
    """``document`` = {schema, command, machine, config, unavailable, results}."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(obj: object) -> object:
        return str(obj)

    # allow_nan=False would reject a nan error value; map non-finite floats to
    # strings instead so the file stays strict JSON.
    path.write_text(json.dumps(_finite(document), indent=1, default=default) + "\n")


def _finite(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def read_json(path: Path) -> dict[str, object]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or "results" not in doc:
        raise ValueError(f"{path} is not a fusedloss-bench result file (schema {SCHEMA})")
    return doc


def write_csv(path: Path, records: list[Record], machine: dict[str, object]) -> None:
    """One row per record; the machine description is repeated on every row so
    that rows from several files can be concatenated and still be told apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + CSV_MACHINE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            writer.writerow({**{k: machine.get(k) for k in CSV_MACHINE_FIELDS}, **rec})


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _pivot(records: list[Record], key: str) -> list[str]:
    """Rows (loss, backend), columns C: one number per cell (e.g. × copy)."""
    lines: list[str] = []
    for dtype, n in dict.fromkeys((r["dtype"], r["n"]) for r in records):
        subset = [r for r in records if r["dtype"] == dtype and r["n"] == n]
        cs = list(dict.fromkeys(r["c"] for r in subset))
        rows: dict[tuple[object, object], dict[object, str]] = {}
        for r in subset:
            rows.setdefault((r["loss"], r["label"]), {})[r["c"]] = cell(r, key) or "–"
        lines.append(f"N = {n}, {dtype}:")
        lines.append("")
        lines += _md_table(["loss", "backend", *(f"C={c}" for c in cs)],
                           [[str(loss), str(lab), *(v.get(c, "") for c in cs)] for (loss, lab), v in rows.items()])
        lines.append("")
    return lines


def markdown(doc: dict[str, object]) -> str:
    """The committed results page: provenance, two pivots (time and memory), full table."""
    records: list[Record] = doc["results"]  # type: ignore[assignment]
    machine: dict[str, object] = doc["machine"]  # type: ignore[assignment]
    threads = machine.get("torch_threads")
    where = machine.get("gpu") or f"{machine.get('cpu')}, {threads} torch thread{'' if threads == 1 else 's'}"
    mode = records[0]["mode"] if records else ""
    out = [
        f"# fusedloss-bench results: {machine.get('device')} ({where})",
        "",
        f"Command: `{doc.get('command')}`  ",
        f"Date: {machine.get('date')}; torch {machine.get('torch')}, triton {machine.get('triton')}, "
        f"fusedloss {machine.get('fusedloss')} ({machine.get('fusedloss_commit')}); mode {mode}, "
        f"logits {records[0]['logits'] if records else ''}; load average (1 min) {machine.get('loadavg_1m')} "
        f"at the start, {machine.get('loadavg_1m_end')} at the end, on {machine.get('cpu_count')} logical CPUs; CPU allocator {machine.get('cpu_allocator')}.",
        "",
    ]
    unavailable = doc.get("unavailable") or {}
    if unavailable:
        out.append("Not measured: " + "; ".join(f"`{k}` ({v})" for k, v in unavailable.items()) + ".")  # type: ignore[union-attr]
        out.append("")
    out += ["## Time as a multiple of the copy row (`logits.clone()`, same run)", ""]
    out += _pivot(records, "x_copy")
    out += ["## Peak extra memory during fwd+bwd, as a multiple of the logits' size", ""]
    out += _pivot([r for r in records if r["backend"] != "copy"], "x_logits")
    out += ["## All columns", ""]
    out += _md_table([h for _, h in COLUMNS], [[cell(r, k) for k, _ in COLUMNS] for r in records])
    out.append("")
    out.append(legend(k for k, _ in COLUMNS))
    return "\n".join(out) + "\n"


def write_markdown(path: Path, doc: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(doc))
