"""The word-problem recipe end to end on the embedded SmolLM2-135M, small, through the real CLI (slow)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TINY = ["task.train_size=12", "task.eval_size=8", "rollout.n=4", "rollout.max_tokens=32", "eval.max_tokens=32",
        "select.max_problems=4", "train.warmup_steps=1"]
PAPER_GATE = ["gate.fraction=0.2", "train.positive_only=false", "train.epochs=1"]


def rmx(*args):
    return subprocess.run([sys.executable, "-m", "rmx_local", *args], capture_output=True, text=True, check=True)


def test_word_problem_recipe_tiny_then_the_paper_gate_and_its_control_on_the_same_rollouts(tmp_path):
    run_dir = f"run_dir={json.dumps(str(tmp_path / 'run'))}"
    out = rmx("run", "recipes/word-problems.toml", run_dir, "--plain", *TINY)
    assert "base vs adapted" in out.stdout, out.stdout + out.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    selected = json.loads((tmp_path / "run" / "selected.json").read_text())["sequences"]
    positives = sum(x["advantage"] > 0 for x in selected)
    # the recipe: every completion token of the positive-advantage rollouts, two epochs
    assert s["eval_problems"] == 8 and s["gated_fraction"] == 1.0 and 0 < positives == s["train_sequences"] < len(selected)
    # the paper's gate and the entropy-min control reuse the rollouts and entropies: only training and the adapted
    # eval are redone
    paper = rmx("run", "recipes/word-problems.toml", run_dir, "--plain", *TINY, *PAPER_GATE)
    assert "rollouts: engine" not in paper.stdout and "eval base" not in paper.stdout
    s_paper = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.15 < s_paper["gated_fraction"] < 0.25 and s_paper["train_sequences"] == len(selected)
    low = rmx("run", "recipes/word-problems.toml", run_dir, "--plain", *TINY, *PAPER_GATE, "gate.select=low")
    assert "rollouts: engine" not in low.stdout and "entropy: start" not in low.stdout and "eval base" not in low.stdout
    s_low = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s_low["gate"]["gated"] == s_paper["gate"]["gated"] and s_low["gate"]["gated_entropy"] < s_paper["gate"]["gated_entropy"]
    assert len({s["train"]["key"], s_paper["train"]["key"], s_low["train"]["key"]}) == 3
