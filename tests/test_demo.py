"""``make demo``: the product's first screen, run as a newcomer runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_shows_both_stages_with_metrics_and_no_library_noise():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "rerank.demo"], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "first stage top 3" in out and "reranked top 3" in out
    # One row per labelled question, each with three ids per stage.
    rows = [line for line in out.splitlines() if len(re.findall(r"\b[a-z]+-\d+\*?", line)) == 6]
    assert len(rows) == 8
    first = float(re.search(r"first stage \(\w+\) ([01]\.\d{3})", out).group(1))
    reranked = float(re.search(r"reranked\s+([01]\.\d{3})", out).group(1))
    assert "fused signals and the weights fitted for this model: " in out
    assert 0.0 <= first <= 1.0 and 0.0 <= reranked <= 1.0
    assert ("below this first stage" in out) == (reranked < first)
    assert "answer: " in out
    # Library progress bars and warnings stay out of a newcomer's terminal unless -v.
    for noise in ("Loading weights", "it/s]", "Warning", "WARNING"):
        assert noise not in out + res.stderr, noise
