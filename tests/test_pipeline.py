"""The pipeline end to end on a tiny random model: outputs, resume after interruption, bad input.

A random model never answers correctly, so the training-side verifier is replaced by a deterministic fake
that marks alternate rollouts correct (the evaluation keeps the real verifier).
"""

import json

import numpy as np
import pytest

import rmx_local.stages.select as select_stage
from rmx_local.adapter import load_peft
from rmx_local.errors import RmxError
from rmx_local.pipeline import run_pipeline
from rmx_local.recipe import load_recipe
from rmx_local.ui import UI
from rmx_local.verify import Verdict
from conftest import char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    tok = char_tokenizer()
    tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def alternate(texts, golds, timeout_s=5.0):
    return [Verdict(correct=i % 2 == 0, parsed="1") for i in range(len(texts))]


def recipe(model_dir, run_dir, *extra):
    return load_recipe(None, [f"model={json.dumps(str(model_dir))}", f"run_dir={json.dumps(str(run_dir))}",
                              "rollout.engine=backend", "task.train_size=6", "task.eval_size=3", "rollout.n=4",
                              "rollout.max_tokens=6", "eval.max_tokens=4", "train.grad_accum=4", "train.warmup_steps=1",
                              "train.lr=1e-2", "gate.fraction=0.25", "eval.n_samples=0", *extra])


def test_end_to_end_outputs(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(select_stage, "verify_many", alternate)
    s = run_pipeline(recipe(model_dir, tmp_path / "run"), UI(rich=False))
    assert s["selection"]["selected_problems"] == 6 and s["train_sequences"] == 24
    assert s["train"]["steps"] == 6 and s["gated_fraction"] == pytest.approx(0.25, abs=0.05)
    adapter = load_peft(tmp_path / "run" / "adapter")
    assert adapter.rank == 32 and len(adapter.weights) == 2 * 4  # 2 layers x q,k,v,o
    assert any(np.abs(b).max() > 0 for _, b in adapter.weights.values())  # training moved B off zero
    for f in ("recipe.toml", "manifest.json", "summary.json", "gate.json", "problems.json"):
        assert (tmp_path / "run" / f).is_file()
    assert set(s["eval"]) == {"greedy"} and s["eval"]["greedy"]["base"][0] == 0.0
    history = [json.loads(x) for x in (tmp_path / "run" / "train" / s["train"]["key"] / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(h["loss"]) for h in history)


def test_rerun_loads_nothing_and_resumes_torn_rollouts(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(select_stage, "verify_many", alternate)
    r = recipe(model_dir, tmp_path / "run")
    first = run_pipeline(r, UI(rich=False))
    # a second run finds every stage finished: it must not even load the model
    import rmx_local.backends as backends

    def no_model(*a, **k):
        raise AssertionError("model loaded on a finished run")

    monkeypatch.setattr(backends, "load_backend", no_model)
    assert run_pipeline(r, UI(rich=False))["eval"] == first["eval"]
    monkeypatch.undo()
    monkeypatch.setattr(select_stage, "verify_many", alternate)

    # simulate kill -9 during rollouts: two problems missing, a torn last line, later stages never written
    run = tmp_path / "run"
    finished = (run / "rollouts.jsonl").read_text()
    lines = finished.splitlines()
    (run / "rollouts.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])
    for f in ("selected.json", "entropies.jsonl"):
        (run / f).unlink()
    import shutil

    shutil.rmtree(run / "train")
    from rmx_local.backends.torch_backend import TorchBackend

    calls = []
    real = TorchBackend.generate
    monkeypatch.setattr(TorchBackend, "generate", lambda self, p, params, progress=None: calls.append(len(p)) or real(self, p, params, progress))
    again = run_pipeline(r, UI(rich=False))
    # the cut-short group of 6 problems is sampled whole again with its own seed (eval results were cached),
    # and only its two missing problems are journaled: the journal equals the uninterrupted one
    assert calls == [6]
    assert (run / "rollouts.jsonl").read_text() == finished
    assert again["train_sequences"] == first["train_sequences"]


def test_training_resumes_from_checkpoint_identically(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(select_stage, "verify_many", alternate)
    full = run_pipeline(recipe(model_dir, tmp_path / "a", "train.checkpoint_every=2"), UI(rich=False))
    from rmx_local.backends.torch_backend import TorchBackend

    real, count = TorchBackend.accumulate, {"n": 0}

    def crash_at_step_5(self, *a, **k):
        count["n"] += 1
        if count["n"] == 4 * 4 + 1:  # first micro-batch of step 5
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(TorchBackend, "accumulate", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(recipe(model_dir, tmp_path / "b", "train.checkpoint_every=2"), UI(rich=False))
    monkeypatch.setattr(TorchBackend, "accumulate", real)
    resumed = run_pipeline(recipe(model_dir, tmp_path / "b", "train.checkpoint_every=2"), UI(rich=False))
    a, b = load_peft(tmp_path / "a" / "adapter"), load_peft(tmp_path / "b" / "adapter")
    for name in a.weights:
        np.testing.assert_allclose(a.weights[name][1], b.weights[name][1], atol=1e-6)
    def losses(run, key):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "train" / key / "log.jsonl").read_text().splitlines()]

    assert full["train"]["key"] == resumed["train"]["key"]
    np.testing.assert_allclose(losses("a", full["train"]["key"]), losses("b", resumed["train"]["key"]), rtol=1e-5)


def test_select_on_train_scores_checkpoints_on_the_training_problems(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(select_stage, "verify_many", alternate)
    s = run_pipeline(recipe(model_dir, tmp_path / "run", "train.checkpoint_every=2", "train.select_on_train=true"), UI(rich=False))
    assert sorted(int(k) for k in s["train"]["val"]) == [0, 2, 4, 6]  # the base, then every checkpoint
    assert s["train"]["best_step"] == 2  # the random model answers nothing right: ties go to the earliest step
    assert [p.name for p in (tmp_path / "run" / "train" / s["train"]["key"]).glob("step-*")] == ["step-2"]


def test_no_mixed_problems_is_one_clear_error(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(select_stage, "verify_many", lambda t, g, timeout_s=5.0: [Verdict(False, None)] * len(t))
    with pytest.raises(RmxError, match="no mixed problems") as e:
        run_pipeline(recipe(model_dir, tmp_path / "run"), UI(rich=False))
    assert "raise rollout.n" in e.value.line()
    assert (tmp_path / "run" / "rollouts.jsonl").is_file()  # finished rollouts are kept


def test_changed_rollout_settings_refuse_to_mix(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(select_stage, "verify_many", alternate)
    run_pipeline(recipe(model_dir, tmp_path / "run"), UI(rich=False))
    with pytest.raises(RmxError, match="different recipe settings"):
        run_pipeline(recipe(model_dir, tmp_path / "run", "rollout.temperature=0.9"), UI(rich=False))
    # a different lr only retrains: rollouts are reused
    s = run_pipeline(recipe(model_dir, tmp_path / "run", "train.lr=1e-3"), UI(rich=False))
    assert len(list((tmp_path / "run" / "train").iterdir())) == 2 and s["train"]["steps"] == 6
