"""`rmx-local run` end to end on the embedded SmolLM2-135M, through the real CLI (slow: run by .ci/run)."""

import json
import os
import subprocess
import sys

import pytest

from rmx_local.recipe import load_recipe

pytestmark = pytest.mark.slow

# rollouts through llama.cpp (engine auto, for the GGUF on a CPU): the quickstart itself samples with torch,
# which the evaluations exercise here
TINY = ["rollout.engine=auto", "task.train_size=12", "task.eval_size=8", "rollout.n=4", "rollout.max_tokens=48", "eval.max_tokens=48",
        "eval.n_samples=0", "train.grad_accum=4", "train.warmup_steps=1", "select.max_problems=4"]


def rmx(*args, check=True):
    return subprocess.run([sys.executable, "-m", "rmx_local", *args], capture_output=True, text=True, check=check)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_run_quickstart_tiny(tmp_path, backend):
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
        if not os.environ.get("RMX_TEST_MLX_E2E"):
            # mlx's Linux CPU build is ~6 GFLOP/s: rollouts come from llama.cpp and MLX does the entropies,
            # training and evaluation, still minutes on 2 cores. Opt in with RMX_TEST_MLX_E2E=1 (.ci/run does).
            pytest.skip("set RMX_TEST_MLX_E2E=1 to run the MLX end-to-end check (slow on Linux CPU)")
    run_dir = tmp_path / "run"
    # MLX: 2 problems x 4 rollouts of <= 16 tokens, so entropy + training + evaluation stay a few minutes on 2 cores
    extra = ["rollout.max_tokens=16", "eval.max_tokens=16", "task.eval_size=2", "select.max_problems=2"] if backend == "mlx" else []
    out = rmx("run", "recipes/quickstart.toml", f"run_dir={json.dumps(str(run_dir))}", f"backend={backend}", "--plain", *TINY, *extra)
    assert "base vs adapted" in out.stdout, out.stdout + out.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    # the recipe's gate fraction; with MLX's ~80 completion tokens, tied entropies of identical rollouts move it most
    frac = load_recipe("recipes/quickstart.toml").gate.fraction
    low = 0.6 if backend == "torch" else 0.4
    assert s["train_sequences"] > 0 and s["gate"]["gated"] >= 2 and low * frac <= s["gated_fraction"] <= 1.6 * frac
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    again = rmx("run", "recipes/quickstart.toml", f"run_dir={json.dumps(str(run_dir))}", f"backend={backend}", "--plain", *TINY, *extra)
    assert "rollouts: engine" not in again.stdout  # nothing left to sample on a rerun


def test_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text('model = "embedded:nope"\n')
    out = rmx("run", str(bad), f"run_dir={json.dumps(str(tmp_path / 'x'))}", "--plain", check=False)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: unknown embedded model 'nope'")
    assert len(out.stderr.strip().splitlines()) == 1
    out = rmx("run", "recipes/quickstart.toml", "model=/no/such/model.gguf", "--plain", check=False)
    assert out.returncode == 2 and "GGUF file not found: /no/such/model.gguf" in out.stderr
