"""Smoke test of bench/serve.py: its --quick mode runs end to end (a fresh `forgeline serve`
process per part, real HTTP) and reports sane numbers. The numbers themselves live in
BENCHMARKS.md, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--only", "cold,swap,many",
                           "--json", str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    cold = r["cold"]["rows"]
    assert cold["forgeline serve"]["seconds"] > 0 and cold["plain script (torch.load, build, call)"]["seconds"] > 0
    assert r["swap"]["failed"] == 0
    assert r["swap"]["promotion_to_new_version_s"] is not None  # the promoted version answered
    assert r["swap"]["v1_answers_after_swap"] == 0
    many = r["many"]
    assert many["failed"] == 0 and many["requests"] == r["many_setup"]["requests"]
    assert 0 < many["hit_rate"] < 1 and many["load_sources"] == ["shm"]
