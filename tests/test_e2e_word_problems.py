"""The word-problem recipe end to end on the embedded SmolLM2-135M, small, through the real CLI (slow)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TINY = ["task.train_size=12", "task.eval_size=8", "rollout.n=4", "rollout.max_tokens=32", "eval.max_tokens=32",
        "select.max_problems=4", "train.warmup_steps=1"]


def rmx(*args):
    return subprocess.run([sys.executable, "-m", "rmx_local", *args], capture_output=True, text=True, check=True)


def test_word_problem_recipe_tiny_and_a_gate_control_on_the_same_rollouts(tmp_path):
    run_dir = f"run_dir={json.dumps(str(tmp_path / 'run'))}"
    out = rmx("run", "recipes/word-problems.toml", run_dir, "--plain", *TINY)
    assert "base vs adapted" in out.stdout, out.stdout + out.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["eval_problems"] == 8 and s["train_sequences"] > 0 and s["gate"]["select"] == "high"
    # the entropy-min control reuses the rollouts and entropies: only training and the adapted eval are redone
    low = rmx("run", "recipes/word-problems.toml", run_dir, "--plain", *TINY, "gate.select=low")
    assert "rollouts: engine" not in low.stdout and "entropy: start" not in low.stdout and "eval base" not in low.stdout
    s_low = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s_low["gate"]["gated"] == s["gate"]["gated"] and s_low["gate"]["gated_entropy"] < s["gate"]["gated_entropy"]
    assert s_low["train"]["key"] != s["train"]["key"]
