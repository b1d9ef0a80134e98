"""benchmarks/bench_gpu.py must not rot: its CPU smoke mode prints every row of its table."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _rows() -> list[str]:
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module.ROWS


def test_bench_gpu_quick_on_cpu_prints_every_row():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    cells = {line.split(" | ")[0][2:]: [c.strip() for c in line.strip("|").split("|")] for line in lines}
    rows = _rows()
    assert len(rows) == 15
    for row in rows:
        assert row in cells, f"missing row: {row}"
        name, value, unit, peak, detail = cells[row]
        assert value and unit, row
    compiled = cells[rows[1]][1]
    if hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported():
        assert compiled != "n/a", cells[rows[1]]
    assert "done in" in proc.stdout
