"""`bench/bench.py --quick` (what `make bench` runs, on a tiny model) runs its cases and writes its results. The
suite runs the SFT pair alone (alignkit and raw TRL: ~1 minute on 2 cores); every case is `make bench`'s to run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_bench_writes_its_cases_and_ratios(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--cpus", "", "--methods", "sft",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench-quick.json").read_text())
    assert set(result["runs"]) == {"sft/trl", "sft/alignkit"}
    for runs in result["runs"].values():
        assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_gb"] > 0.1 for r in runs)
    whats = [line["what"] for line in result["ratios"]]
    assert whats == ["sft cpu_s: alignkit / raw TRL", "sft peak_gb: alignkit / raw TRL", "sft wall_s: alignkit / raw TRL"]
    assert all(line["ratio"] > 0 for line in result["ratios"])
    assert "| sft/alignkit |" in (tmp_path / "bench-quick.md").read_text()
