"""`sweep.enabled` on a tiny random model: variants on one set of rollouts, chosen on validation; the held-out set
is scored only after the choice; a tie goes to the earlier variant; a sweep killed mid-variant resumes to the same
result; variants are exported by name; bad variant lines are one error each."""

import json

import numpy as np
import pytest

import rmx_local.stages.evaluate as evaluate
import rmx_local.stages.select as select_stage
from rmx_local.adapter import load_peft
from rmx_local.backends.torch_backend import TorchBackend
from rmx_local.errors import RmxError
from rmx_local.pipeline import run_pipeline
from rmx_local.recipe import DEFAULT_VARIANTS, load_recipe
from rmx_local.sweep import choose, fit, variants
from rmx_local.ui import UI
from test_pipeline import alternate, model_dir  # noqa: F401 (a fixture): the same tiny model and fake verifier

VARIANTS = json.dumps(["gate20: gate.fraction=0.2", "rft: train.objective=rft",
                       "positive: gate.fraction=1.0 train.positive_only=true train.epochs=2"])


def recipe(model_dir, run_dir, *extra):
    return load_recipe(None, [f"model={json.dumps(str(model_dir))}", f"run_dir={json.dumps(str(run_dir))}",
                              "sweep.enabled=true", f"sweep.variants={VARIANTS}", "task.train_size=4",
                              "task.val_size=3", "task.eval_size=2", "rollout.n=4", "rollout.max_tokens=4",
                              "eval.max_tokens=2", "eval.n_samples=0", "train.grad_accum=2", "train.warmup_steps=1",
                              "train.lr=5e-2", "train.checkpoint_every=2", *extra])


@pytest.fixture(scope="module")
def clean(model_dir, tmp_path_factory):
    """An uninterrupted sweep; every scored problem set recorded with whether sweep.json existed then."""
    run, scored = tmp_path_factory.mktemp("clean") / "run", []
    real = evaluate.score_problems

    def spy(backend, problems, *a, **k):
        scored.append(({p.id for p in problems}, (run / "sweep.json").exists()))
        return real(backend, problems, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select_stage, "verify_many", alternate)
        mp.setattr(evaluate, "score_problems", spy)
        return run_pipeline(recipe(model_dir, run), UI(rich=False)), scored, run


def test_held_out_is_scored_only_after_the_choice(clean):
    s, scored, run = clean
    problems = json.loads((run / "problems.json").read_text())
    held_out, val = {p["id"] for p in problems["eval"]}, {p["id"] for p in problems["val"]}
    assert held_out and not held_out & val
    held = [after for ids, after in scored if ids & held_out]
    assert held == [True, True]  # the base and the chosen adapter, once each, after sweep.json holds the choice
    assert any(ids == val and not after for ids, after in scored)  # validation drove the choice
    # every variant's base and checkpoints (every 2 steps of 8, 4, 8) on validation, before the choice
    assert sum(1 for ids, after in scored if ids == val and not after) == (1 + 4) + (1 + 2) + (1 + 4)


def test_the_run_adapter_is_the_chosen_variant_and_every_row_is_there(clean):
    s, _, run = clean
    sweep = json.loads((run / "sweep.json").read_text())
    assert [r["name"] for r in sweep["variants"]] == ["gate20", "rft", "positive"]
    chosen = next(r for r in sweep["variants"] if r["name"] == sweep["chosen"])
    kept, chosen_adapter = load_peft(run / "adapter"), load_peft(run / chosen["folder"] / "adapter")
    for name in kept.weights:
        np.testing.assert_array_equal(kept.weights[name][1], chosen_adapter.weights[name][1])
    keys = {r["key"] for r in sweep["variants"]}
    assert len(keys) == 3 and all((run / r["folder"] / "adapter").is_dir() for r in sweep["variants"])
    rft = sweep["variants"][1]
    assert rft["gated_fraction"] == 1.0 and rft["sequences"] == 8  # the 8 correct rollouts of 4 problems (alternate)
    assert sweep["variants"][2]["steps"] == 8  # 8 positive rollouts, 2 epochs, 2 per step
    assert all(r["kl"] > 0 for r in sweep["variants"])  # trained corrections move off the base
    assert s["sweep"]["chosen"] == sweep["chosen"] and s["eval"]["greedy"]["adapted"] is not None
    assert "sweep" in (run / "recipe.toml").read_text() and "enabled = false" in (run / "sweep" / "chosen.toml").read_text()


def test_a_tie_within_one_se_goes_to_the_earlier_variant():
    a = {"name": "a", "val": (0.5, 0.1), "val_scores": [1, 0] * 10}
    # better on 2 problems of 20, worse on 1: +0.05 against a paired SE of 0.088
    b = {"name": "b", "val": (0.55, 0.1), "val_scores": [0, 1, 1, 1] + [1, 0] * 8}
    assert choose([a, b])[0] == 0 and "within 1 SE" in choose([a, b])[1]
    c = {"name": "c", "val": (1.0, 0.0), "val_scores": [1] * 20}  # better on 10 of 20: 0.5 > SE 0.11
    assert choose([a, c]) == (1, "the best validation accuracy (ties go to the earlier variant)")
    assert choose([a, dict(a, name="a2")])[0] == 0  # an exact tie
    # one problem of 50 apart: gap 0.02 == the paired SE 0.02 (in floats 0.84 - 0.82 > 0.02): still a tie
    d = {"name": "d", "val": (0.82, 0.05), "val_scores": [1] * 41 + [0] * 9}
    e = {"name": "e", "val": (0.84, 0.05), "val_scores": [1] * 42 + [0] * 8}
    assert choose([d, e])[0] == 0


def test_resume_mid_sweep_equals_an_uninterrupted_sweep(model_dir, clean, tmp_path, monkeypatch):
    monkeypatch.setattr(select_stage, "verify_many", alternate)
    real, calls = TorchBackend.step, []
    variant_starts = []

    def killed(self, *a):  # dies in the second variant (rft), after its first checkpoint
        calls.append(1)
        if len(calls) == 8 + 3:  # gate20: 8 steps (16 sequences, 2 per step), then rft's third of 4
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(TorchBackend, "step", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(recipe(model_dir, tmp_path / "run"), UI(rich=False))
    assert (tmp_path / "run" / "sweep" / "gate20.json").is_file() and not (tmp_path / "run" / "sweep" / "rft.json").exists()
    monkeypatch.setattr(TorchBackend, "step", lambda self, *a: variant_starts.append(1) or real(self, *a))
    resumed = run_pipeline(recipe(model_dir, tmp_path / "run"), UI(rich=False))
    clean_rows = json.loads((clean[2] / "sweep.json").read_text())
    rows = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert len(variant_starts) == (4 - 2) + 8  # rft from its checkpoint at step 2 of 4, then positive's 8; gate20 not redone
    for a, b in zip(clean_rows["variants"], rows["variants"]):
        assert (a["name"], a["key"], a["best_step"], a["val"], a["val_scores"]) == (b["name"], b["key"], b["best_step"], b["val"], b["val_scores"])
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4)
    assert rows["chosen"] == clean_rows["chosen"] and resumed["eval"] == clean[0]["eval"]
    x, y = load_peft(clean[2] / "adapter"), load_peft(tmp_path / "run" / "adapter")
    for name in x.weights:
        np.testing.assert_allclose(x.weights[name][1], y.weights[name][1], atol=1e-6)


def test_export_a_variant_by_name(clean, tmp_path):
    from rmx_local.export import export_run

    _, _, run = clean
    out = export_run(run, "peft", variant="rft", out_dir=tmp_path / "rft")
    rft = json.loads((run / "sweep.json").read_text())["variants"][1]
    a, b = load_peft(out["peft"]), load_peft(run / rft["folder"] / "adapter")
    assert all(np.array_equal(a.weights[n][1], b.weights[n][1]) for n in a.weights)
    with pytest.raises(RmxError, match="no variant 'nope'.*choose one of gate20, rft, positive"):
        export_run(run, "peft", variant="nope")


def test_budget_keeps_what_fits_in_list_order():
    assert fit(100, 20, [30, 60, 40, 10]) == [0, 2, 3]
    assert fit(10, 20, [1, 2]) == []


@pytest.mark.parametrize("entry, message", [
    ("no colon here", "not `NAME: key=value"),
    ("a: rollout.n=4", "`rollout.n=4` is not a gate.\\* or train.\\* field"),
    ("a: gate.fraction=2.0", "gate.fraction must be in"),
    ("a: train.lrr=1e-3", "unknown key `train.lrr`"),
])
def test_bad_variant_lines_are_one_error(model_dir, tmp_path, entry, message):
    r = recipe(model_dir, tmp_path / "run", f"sweep.variants={json.dumps([entry])}")
    with pytest.raises(RmxError, match=message):
        variants(r)


def test_the_defaults_parse_and_a_sweep_needs_validation(model_dir, tmp_path):
    r = recipe(model_dir, tmp_path / "run", f"sweep.variants={json.dumps(DEFAULT_VARIANTS)}")
    vs = variants(r)
    assert [v.name for v in vs][:4] == ["paper-tau1.2", "paper-tau1.4", "paper-tau1.6", "paper-tau1.8"]
    assert vs[1].recipe.gate.mode == "tau" and vs[1].recipe.gate.tau == 1.4 and vs[6].recipe.train.epochs == 2.0
    assert vs[7].recipe.train.objective == "rft" and r.train.objective == "reasonmaxxer"  # the recipe itself untouched
    with pytest.raises(RmxError, match="task.val_size = 0"):
        variants(recipe(model_dir, tmp_path / "run", "task.val_size=0"))
    with pytest.raises(RmxError, match="name 'a' is used twice"):
        variants(recipe(model_dir, tmp_path / "run", 'sweep.variants=["a: gate.fraction=0.2", "a: gate.fraction=0.3"]'))
