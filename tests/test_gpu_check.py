"""benchmarks/gpu_check.py: its comparisons on known inputs, and (slow) `DRY=1 benchmarks/gpu_check.sh` end to end
on the CPU: the CPU-vs-CPU row agrees exactly, bf16 differs by rounding, the kill -9 resume equals, the speed table
prints."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rmx_local.adapter import LoraAdapter, save_peft

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)


def test_greedy_agreement_counts_tokens_before_the_first_divergence():
    ref = [[3, 4, 5], [5, 5], [4], []]
    test = [[3, 4, 5], [5, 4], [4, 3], []]
    same, before = gc.greedy_agreement(test, ref)
    assert same == 0.5  # rows 0 and 3
    assert before == pytest.approx((3 + 1 + 1) / 6)


def test_adapter_relative_difference_is_over_the_deltas(tmp_path):
    a = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # rank 2 x in 2
    b = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=np.float32)  # out 2 x rank 2: delta = scale * b @ a
    ref = LoraAdapter(2, 4.0, ["q_proj"], "m", "llama", {}, {"q": (a, b)})
    test = LoraAdapter(2, 4.0, ["q_proj"], "m", "llama", {}, {"q": (a, b * 1.1)})
    save_peft(ref, tmp_path / "ref")
    save_peft(test, tmp_path / "test")
    assert gc.adapter_rel_diff(tmp_path / "test", tmp_path / "ref") == pytest.approx(0.1, rel=1e-6)
    assert gc.adapter_rel_diff(tmp_path / "ref", tmp_path / "ref") == 0.0
    assert gc.adapter_max_abs(tmp_path / "test", tmp_path / "ref") == pytest.approx(0.1, rel=1e-6)


def test_gate_agreement_counts_tokens_gated_alike():
    ref = {("a", 0): np.array([0.1, 0.9, 0.2, 0.3]), ("a", 1): np.array([0.4, 0.5, 0.6, 0.8])}
    test = {k: v.copy() for k, v in ref.items()}
    assert gc.gate_agreement(test, ref, 0.25) == 1.0  # the top 2 of 8: 0.9 and 0.8
    test[("a", 0)][2] = 0.95  # now 0.95 and 0.9 are the top 2: 0.8 leaves the gate, 0.95 joins it
    assert gc.gate_agreement(test, ref, 0.25) == 6 / 8


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    env = dict(os.environ, DRY="1", PY=sys.executable)
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "all checks passed" in out.stdout
    figures = json.loads((ROOT / "runs" / "gpu_check_dry.json").read_text())
    again, bf16 = figures["rows"][1], figures["rows"][2]
    assert again["entropy_max_abs"] == 0.0 and again["adapter_rel"] == 0.0 and again["greedy_same"] == 1.0
    assert 0 < bf16["entropy_max_abs"] < 0.05 and 0 < bf16["adapter_rel"] < 0.5 and bf16["lora"] == "float32"
    assert figures["resume"]["killed"] and figures["resume"]["adapter_max_abs"] == 0.0
    assert "qwen2.5-1.5b train bfloat16 8 512" in out.stdout  # gpu_scale.sh's plan
    assert "smollm2-135m      135M float32  train" in out.stdout and "of bound" in out.stdout
