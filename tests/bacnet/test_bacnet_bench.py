"""The BACnet bench experiment still runs at a tiny size and reports finite figures for both
readers (its full run is a benchmark, not a test)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bacnet_poll_experiment_runs(tmp_path: Path) -> None:
    output = tmp_path / "results.md"
    finished = subprocess.run(
        [sys.executable, "-m", "bench.experiments.bacnet_poll.run", "--objects", "10",
         "--cycles", "1", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    rows = re.findall(r"^\| (Fieldbridge BACnet connector|bacpypes3 alone[^|]*) \| ([\d,.]+) "
                      r"\| ([\d.]+) \|$", output.read_text(), flags=re.MULTILINE)
    assert len(rows) == 2, output.read_text()
    for _, points_per_second, requests in rows:
        assert math.isfinite(float(points_per_second.replace(",", "")))
        assert float(requests) == 2  # one batch per device, two devices
