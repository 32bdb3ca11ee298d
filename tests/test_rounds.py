"""`rounds = R` on a tiny random model: round r samples from round r-1's adapted model, and a run killed between
rounds resumes without redoing the finished round and ends with the same adapter as an uninterrupted run."""

import json

import numpy as np
import pytest

import rmx_local.rounds as rounds
import rmx_local.stages.select as select_stage
from rmx_local.adapter import load_peft
from rmx_local.backends.torch_backend import TorchBackend
from rmx_local.errors import RmxError
from rmx_local.pipeline import run_pipeline
from rmx_local.recipe import load_recipe
from rmx_local.ui import UI
from test_pipeline import alternate, model_dir  # noqa: F401 (a fixture): the same tiny model and fake verifier


def recipe(model_dir, run_dir, *extra):
    return load_recipe(None, [f"model={json.dumps(str(model_dir))}", f"run_dir={json.dumps(str(run_dir))}", "rounds=2",
                              "task.train_size=4", "task.eval_size=2", "rollout.n=4", "rollout.max_tokens=4",
                              "eval.max_tokens=2", "eval.n_samples=0", "train.grad_accum=4", "train.warmup_steps=1",
                              "train.lr=5e-2", "gate.fraction=0.25", *extra])


def lora_state(backend: TorchBackend):
    layers = [m for m in backend.model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
    return backend.get_adapter(), bool(layers) and not any(m.disable_adapters for m in layers)


@pytest.fixture(scope="module")
def clean(model_dir, tmp_path_factory):
    """An uninterrupted 2-round run, with the LoRA state recorded at every sampling call."""
    run, seen = tmp_path_factory.mktemp("clean") / "run", []
    real = TorchBackend.generate

    def spy(self, prompts, params, progress=None):
        if params.temperature > 0:  # rollouts (evaluation is greedy here)
            seen.append(lora_state(self) if self.lora is not None else (None, False))
        return real(self, prompts, params, progress)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select_stage, "verify_many", alternate)
        mp.setattr(TorchBackend, "generate", spy)
        return run_pipeline(recipe(model_dir, run), UI(rich=False)), seen, run


def test_a_round_samples_from_the_previous_rounds_adapted_model(clean):
    s, seen, run = clean
    assert len(seen) == 2 and seen[0] == (None, False)  # round 1: the plain base
    adapter, enabled = seen[1]
    first = json.loads((run / "rounds.json").read_text())[0]
    # round 1 kept its last checkpoint (no validation split); every round trains under the same settings key
    chosen = load_peft(run / "train" / s["train"]["key"] / f"step-{first['steps']}" / "adapter")
    assert enabled
    for name, (a, b) in chosen.weights.items():
        np.testing.assert_array_equal(adapter.weights[name][1], b)
        assert np.abs(b).max() > 0  # a trained correction, not the zero-initialised LoRA
    final, r2 = load_peft(run / "adapter"), load_peft(run / "round-2" / "adapter")
    assert all(np.array_equal(final.weights[n][1], r2.weights[n][1]) for n in final.weights)
    assert not all(np.allclose(final.weights[n][1], chosen.weights[n][1]) for n in final.weights)  # round 2 trained on
    assert [r["round"] for r in s["rounds"]] == [1, 2] and s["rounds"][1]["base"] == s["rounds"][0]["base"]


def test_kill_between_rounds_resumes_with_the_same_result(model_dir, clean, tmp_path, monkeypatch):
    monkeypatch.setattr(select_stage, "verify_many", alternate)
    real = rounds.run_round

    def killed_before_round_2(rec, ui=None, start_adapter=None, round_no=1):
        if round_no == 2:
            raise KeyboardInterrupt
        return real(rec, ui, start_adapter, round_no)

    monkeypatch.setattr(rounds, "run_round", killed_before_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(recipe(model_dir, tmp_path / "run"), UI(rich=False))
    monkeypatch.setattr(rounds, "run_round", real)
    round1_rollouts = (tmp_path / "run" / "rollouts.jsonl").read_text()
    steps = []
    real_acc = TorchBackend.accumulate
    monkeypatch.setattr(TorchBackend, "accumulate", lambda self, *a: steps.append(1) or real_acc(self, *a))
    resumed = run_pipeline(recipe(model_dir, tmp_path / "run"), UI(rich=False))
    assert (tmp_path / "run" / "rollouts.jsonl").read_text() == round1_rollouts
    assert len(steps) == resumed["rounds"][1]["steps"] * 4  # round 2's micro-batches only; round 1 was not retrained
    a, b = load_peft(clean[2] / "adapter"), load_peft(tmp_path / "run" / "adapter")
    for name in a.weights:
        np.testing.assert_allclose(a.weights[name][1], b.weights[name][1], atol=1e-6)
    assert resumed["eval"] == clean[0]["eval"]


def test_rounds_need_the_backend_sampler(model_dir, tmp_path):
    with pytest.raises(RmxError, match="rounds > 1 needs rollout.engine"):
        recipe(model_dir, tmp_path / "run", "rollout.engine=llama_cpp")


def test_validation_keeps_the_best_round(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(select_stage, "verify_many", alternate)
    # the random model answers no training problem right: every round ties at 0, so the earlier round 1 is kept
    s = run_pipeline(recipe(model_dir, tmp_path / "run", "train.select_on_train=true"), UI(rich=False))
    assert s["chosen_round"] == 1 and [r["val"] for r in s["rounds"]] == [0.0, 0.0]
    kept, round1 = load_peft(tmp_path / "run" / "adapter"), load_peft(tmp_path / "run" / "train" / s["train"]["key"]
                                                                      / f"step-{s['train']['best_step']}" / "adapter")
    for name in kept.weights:
        np.testing.assert_array_equal(kept.weights[name][1], round1.weights[name][1])
    assert s["rounds"][1]["held_out"] is not None
