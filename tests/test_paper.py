"""`python -m sim paper`: every arm, its lower bound and its gap to the best offline schedule."""

from __future__ import annotations

import numpy as np

from sim.paper import OFFLINE, PaperArgs, gaps, markdown, run_paper
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace


def test_paper_rows_sit_between_their_bounds(tmp_path):
    tr = random_trace(np.random.default_rng(0), tokens=12, prefill=4, layers=32, experts=8, top_k=2, locality=0.4)
    write_trace(tr, tmp_path / "tr")
    rows = run_paper(PaperArgs(trace=str(tmp_path / "tr"), hw="rtx4090.yaml", T=0.2, sensitivity="trace"),
                     progress=False)
    by = {r["arm"]: r for r in rows}
    assert len(rows) == 12 and not any("error" in r for r in rows)
    for ref, label in OFFLINE.items():
        assert by[label]["x_offline"] == 1.0
        belady = by[f"belady, no prefetch ({'top-k' if ref == 'topk' else 'adapmoe'} gating)"]
        assert by[label]["tpot_ms"] <= belady["tpot_ms"]
    assert all(r["x_bound"] >= 1.0 for r in rows)
    table = markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "x best offline" in table
    assert gaps(rows).count("lower bound") == 2
