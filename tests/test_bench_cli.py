"""fusedloss-bench: options, output files, unavailable backends, exit codes.

Tiny shapes only (N <= 14, C <= 17) and few repeats: the numbers are not the
point, the plumbing is. Runs ``main(argv)`` in-process, plus one subprocess for
the ``python -m`` entry point. Nothing here touches CUDA unless it is present.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedloss.bench import backends as bk
from fusedloss.bench.cli import main
from fusedloss.bench.options import UsageError, parse_args

# "system": the in-process runs must not retune malloc for the rest of the
# pytest process; the default ("warm") is exercised in a subprocess below.
TINY = ["--n", "8", "--c", "5", "17", "--repeat", "3", "--warmup", "1", "--quiet", "--cpu-allocator", "system"]
MACHINE_KEYS = {"cpu", "cpu_count", "torch_threads", "torch", "triton", "gpu", "device", "date"}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    for option in ("--loss", "--backend", "--n", "--c", "--dtype", "--mode", "--device", "--repeat", "--threads",
                   "--cpu-allocator",
                   "--logits", "--json", "--csv", "--plot", "--markdown", "--from-json"):
        assert option in out


def test_every_option_parses(tmp_path: Path) -> None:
    cfg = parse_args(
        ["--loss", "ce,bce", "focal", "--backend", "reference", "naive", "torch", "--n", "3", "1_024",
         "--c", "imagenet", "llm", "77", "1000", "--dtype", "fp32", "bf16", "float16", "--mode", "fwd",
         "--device", "cpu", "--repeat", "4", "--warmup", "0", "--logits", "extreme", "--seed", "3", "--threads", "1", "--cpu-allocator", "system",
         "--json", str(tmp_path / "a.json"), "--csv", str(tmp_path / "a.csv"), "--plot", str(tmp_path / "a.png"),
         "--markdown", str(tmp_path / "a.md"), "--no-accuracy", "--no-memory", "--quiet"],
        bk.known_backends(),
    )
    assert cfg.losses == ("ce", "bce", "focal")
    assert cfg.backends == ("reference", "naive", "torch") and cfg.backends_explicit
    assert cfg.ns == (3, 1024)
    assert cfg.cs == (1000, 32000, 128256, 262144, 77)  # presets expanded, duplicate dropped
    assert cfg.dtypes == (torch.float32, torch.bfloat16, torch.float16)
    assert (cfg.mode, cfg.device.type, cfg.repeat, cfg.warmup, cfg.logits, cfg.seed) == ("fwd", "cpu", 4, 0, "extreme", 3)
    assert cfg.threads == 1 and cfg.cpu_allocator == "system" and not cfg.check_accuracy and not cfg.check_memory and cfg.quiet
    assert cfg.json_path == tmp_path / "a.json" and cfg.plot_path == tmp_path / "a.png"
    assert parse_args(["--c", "imagenet21k"], bk.known_backends()).cs == (21841,)
    assert parse_args(["--loss", "all"], bk.known_backends()).losses == ("ce", "bce", "nllr", "crl", "lace", "focal")
    with pytest.raises(UsageError):
        parse_args(["--n", "0"], bk.known_backends())


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--loss", "hinge"], "unknown loss 'hinge'"),
        (["--backend", "tensorflow"], "unknown backend 'tensorflow'"),
        (["--dtype", "float8"], "unknown dtype 'float8'"),
        (["--mode", "sideways"], "unknown mode 'sideways'"),
        (["--logits", "weird"], "unknown kind 'weird'"),
        (["--cpu-allocator", "jemalloc"], "unknown choice 'jemalloc'"),
        (["--c", "lots"], "not a positive integer"),
        (["--repeat", "0"], "at least 1"),
        (["--bogus-flag"], "unrecognized arguments"),
        (["--backend", "torch", "--loss", "bce"], "ce only"),
        (["--n", "1000000", "--c", "1000000"], "needs about"),
        (["--from-json", "/nonexistent/x.json"], "--from-json"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(argv + ["--quiet"], capsys)
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("fusedloss-bench: error: ")
    assert needle in err


@pytest.mark.parametrize("name", ["liger", "quack", "triton", "cuda"])
def test_requested_unavailable_backend_exits_2(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    if bk.unavailable_reason(name, torch.device("cpu")) is None:
        pytest.skip(f"{name} runs on this machine's CPU")
    rc, _, err = run(["--backend", name, "--loss", "ce", "--device", "cpu", *TINY], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert f"backend '{name}' is unavailable" in err


def test_cuda_device_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    rc, _, err = run(["--device", "cuda", *TINY], capsys)
    assert rc == 2 and "CUDA is not available" in err


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small sweep writing every output format, shared by the checks below."""
    d = tmp_path_factory.mktemp("bench")
    files = {k: d / f"r.{k}" for k in ("json", "csv", "png", "md")}
    rc = main(["--loss", "ce", "bce", "focal", "--backend", "torch", "reference", "naive", "--device", "cpu",
               "--json", str(files["json"]), "--csv", str(files["csv"]), "--plot", str(files["png"]),
               "--markdown", str(files["md"]), *TINY])
    assert rc == 0
    return files


def test_json_is_well_formed(sweep_files: dict[str, Path]) -> None:
    doc = json.loads(sweep_files["json"].read_text())
    assert doc["schema"] == 1 and doc["command"].startswith("fusedloss-bench --loss ce bce focal")
    assert MACHINE_KEYS <= doc["machine"].keys()
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["torch_threads"] >= 1
    rows = doc["results"]
    # Per shape: one copy row, torch for ce only, reference and naive for all three losses.
    assert len(rows) == 2 * (1 + 1 + 3 * 2)
    assert [r["c"] for r in rows if r["backend"] == "copy"] == [5, 17]
    assert {r["loss"] for r in rows if r["backend"] == "torch"} == {"ce"}
    assert all(r["label"] == "torch (ce only)" for r in rows if r["backend"] == "torch")
    for r in rows:
        assert "error" not in r, r
        assert r["repeats"] == 3 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert r["copy_ms"] > 0 and math.isclose(r["x_copy"], r["median_ms"] / r["copy_ms"])
        assert math.isclose(r["copy_bw_pct"], 100 / r["x_copy"])
        assert r["peak_extra_bytes"] > 0 and r["x_logits"] > 0
        if r["backend"] == "copy":
            # One logits-sized output: the tracker must see exactly that much.
            assert r["peak_extra_bytes"] == r["logits_bytes"]
        else:
            # The gradient alone is one logits-sized tensor.
            assert r["x_logits"] >= 1.0
            assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5 and r["nan"] == 0 and r["inf"] == 0


def test_csv_is_well_formed(sweep_files: dict[str, Path]) -> None:
    doc = json.loads(sweep_files["json"].read_text())
    with sweep_files["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["results"])
    assert {"loss", "backend", "median_ms", "x_copy", "copy_bw_pct", "peak_extra_bytes", "loss_err", "cpu", "torch", "triton"} <= rows[0].keys()
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert {r["torch"] for r in rows} == {torch.__version__}


def test_png_and_markdown_are_written(sweep_files: dict[str, Path]) -> None:
    data = sweep_files["png"].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(sweep_files["png"]).shape
    assert height > 300 and width > 300
    md = sweep_files["md"].read_text()
    assert "fusedloss-bench --loss ce bce focal" in md and "| ce | torch (ce only) |" in md


def test_from_json_rerenders_without_measuring(sweep_files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--from-json", str(sweep_files["json"]), "--markdown", str(tmp_path / "again.md")], capsys)
    assert rc == 0 and "copy" in out
    assert (tmp_path / "again.md").read_text() == sweep_files["md"].read_text()


def test_table_shows_copy_row_and_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--loss", "nllr", "--backend", "reference", "--mode", "fwd", "--dtype", "bf16", "fp16",
                      "--no-memory", *TINY], capsys)
    assert rc == 0
    assert "× copy" in out and "copy" in out and "bfloat16" in out and "float16" in out
    assert "% copy BW" in out


@pytest.mark.parametrize("columns", [80, 120])
def test_table_fits_the_terminal_with_a_legend(columns: int, sweep_files: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """COLUMNS=80/120: every line within the width, no cell cut to an ellipsis, the columns left out
    named, and the legend saying what × copy divides by (not the copy row's median)."""
    monkeypatch.setenv("COLUMNS", str(columns))
    rc, out, _ = run(["--from-json", str(sweep_files["json"])], capsys)
    assert rc == 0
    assert max(len(line) for line in out.splitlines()) <= columns
    assert "…" not in out
    assert "N=8 C=5 float32" in out and "N=8 C=17 float32" in out  # one table per shape
    legend = " ".join(out.split())
    assert "× copy: the row's median / the median of logits.clone() timed alternately" in legend
    assert "not the copy row's median" in legend and "nan/inf: entries the backend made nan / inf" in legend
    if columns == 80:
        assert "Left out to fit 80 columns: GB/s" in legend and "--json, --csv, --markdown have every column" in legend


def test_table_keeps_every_column_without_a_terminal(sweep_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # a pipe or a CI log: 200 columns, one table
    rc, out, _ = run(["--from-json", str(sweep_files["json"])], capsys)
    assert rc == 0 and "Left out" not in out and "…" not in out
    for header in ("GB/s", "% copy BW", "peak MiB", "grad err", "dtype"):
        assert header in out
    assert "GB/s: the mode's least traffic" in " ".join(out.split())


def test_bwd_mode_and_default_backends_report_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    rc, _, err = run(["--loss", "ce", "--mode", "bwd", "--json", str(path), "--device", "cpu", *TINY], capsys)
    assert rc == 0
    doc = json.loads(path.read_text())
    # Peers cannot run on CPU: listed with a reason, not an error.
    assert {"liger", "quack"} <= doc["unavailable"].keys()
    assert "skipped backend liger" in err
    # No install hint for a peer that could not run here anyway.
    assert "pip install" not in doc["unavailable"]["liger"] and "CUDA" in doc["unavailable"]["liger"]
    ran = {r["backend"] for r in doc["results"]}
    assert {"copy", "torch", "reference", "naive"} <= ran
    assert set(bk.known_backends()) >= ran - {"copy"}


def test_extreme_logits_show_naive_nonfinite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    rc, _, _ = run(["--logits", "extreme", "--loss", "nllr", "--backend", "reference", "naive", "--n", "14",
                    "--c", "9", "--repeat", "2", "--warmup", "0", "--no-memory", "--quiet", "--json", str(path),
                    "--cpu-allocator", "system"],
                   capsys)
    assert rc == 0
    rows = {r["backend"]: r for r in json.loads(path.read_text())["results"]}
    assert rows["naive"]["nan"] + rows["naive"]["inf"] > 0
    assert rows["reference"]["nan"] == rows["reference"]["inf"] == 0


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "fusedloss.bench", "--dtype", "int3"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fusedloss-bench: error: --dtype: unknown dtype 'int3' (choose from float32, float16, bfloat16)"


def test_python_dash_m_default_allocator_run(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "fusedloss.bench", "--device", "cpu", "--loss", "ce", "--backend",
                           "reference", "--n", "4", "--c", "3", "--repeat", "2", "--json", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "× copy" in proc.stdout
    doc = json.loads(path.read_text())
    if sys.platform == "linux":
        assert doc["machine"]["cpu_allocator"].startswith(("warm", "system (mallopt"))


@pytest.mark.slow
def test_compile_baseline_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    rc, out, _ = run(["--loss", "ce", "--backend", "compile", "--n", "8", "--c", "5", "--repeat", "2",
                      "--warmup", "1", "--quiet", "--no-memory", "--json", str(path), "--cpu-allocator", "system"],
                     capsys)
    assert rc == 0 and "compile" in out
    (row,) = [r for r in json.loads(path.read_text())["results"] if r["backend"] == "compile"]
    assert row["loss_err"] < 1e-5 and row["grad_err"] < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    rc, _, _ = run(["--device", "cuda", "--loss", "ce", "--backend", "torch", "reference", "--json", str(path), *TINY],
                   capsys)
    assert rc == 0
    doc = json.loads(path.read_text())
    assert doc["machine"]["gpu"] and all(r["peak_extra_bytes"] > 0 for r in doc["results"])


def test_peer_import_is_lazy() -> None:
    # Importing the bench must not import the peers (or fail without them).
    for mod in ("liger_kernel", "quack"):
        if importlib.util.find_spec(mod) is None:
            assert mod not in sys.modules
