"""The C_T benchmark runs end to end (tiny sizes) and its two paths agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ct.py"


def test_bench_ct_prints_speedup_last_and_paths_agree():
    args = ["--n-train", "400", "--n-held", "150", "--n-gen", "400", "--dim", "24",
            "--layers", "2", "--repeats", "1"]
    out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup: \d+\.\dx", lines[-1]), lines[-1]
    assert "max |C_T(a) - C_T(b)| over layers: 0" in out.stdout
    assert "peak RSS" in out.stdout
