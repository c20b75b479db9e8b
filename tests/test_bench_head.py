"""fusedloss-bench --head on a tiny shape: every row measured or explained, JSON and Markdown written."""
from __future__ import annotations

import json

from fusedloss.bench.cli import main


def test_head_bench_tiny(tmp_path):
    js, md = tmp_path / "h.json", tmp_path / "h.md"
    rc = main(["--head", "--n", "64", "--d", "16", "--v", "100", "--repeat", "1", "--warmup", "0",
               "--loss", "ce,focal", "--no-compile", "--threads", "1", "--json", str(js), "--markdown", str(md)])
    assert rc == 0
    doc = json.loads(js.read_text())
    rows = {(r["method"], r["loss"]): r for r in doc["results"]}
    assert rows[("floor (3 matmuls)", "-")]["x_floor"] == 1.0
    fused = rows[("fused linear_softmax_loss", "focal")]
    assert fused["median_ms"] > 0 and fused["x_logits"] > 0
    assert rows[("eager F.cross_entropy(h @ W.T)", "ce")]["x_logits"] >= 1.0  # the logits and more
    assert all("median_ms" in r or r["note"] for r in doc["results"])
    assert "| fused linear_softmax_loss | ce |" in md.read_text()
