"""The kill loop's short version (slow): kill -9 a tiny run 5 times across its stages, rerun to the end, and the
run folder equals an uninterrupted run's (adapter tensors, summary metrics, journals). See benchmarks/faults.py."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_five_kills_leave_the_same_results_as_no_kill(tmp_path):
    spec = importlib.util.spec_from_file_location("faults", ROOT / "benchmarks" / "faults.py")
    faults = sys.modules["faults"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    rows = faults.run_trials(trials=1, kills=5, seed=1, work=tmp_path, log=lambda s: None)
    assert len(rows) >= 3  # a drawn kill can come after the run already finished
    assert [k.verdict for k in rows] == ["equal"] * len(rows)
