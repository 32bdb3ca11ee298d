"""`train.objective = "rft"`: rejection-sampling fine-tuning as a trainer objective.

The objective reuses the paper's loss with every completion token gated, advantage 1 and no KL anchor, so it
must equal plain cross-entropy over the completion tokens of the correct rollouts (mean per sequence, then
mean over sequences), computed here independently with a bare forward pass.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rmx_local.stages.select as select_stage
from rmx_local.backends import TrainExample
from rmx_local.pipeline import run_pipeline
from rmx_local.recipe import load_recipe
from rmx_local.stages import RunContext
from rmx_local.stages.select import rft_sequences
from rmx_local.ui import UI
from rmx_local.verify import Verdict
from test_pipeline import model_dir  # noqa: F401 (a fixture)


def plain_ce(model, examples):
    losses = []
    for ex in examples:
        tokens = torch.tensor(ex.tokens)
        logits = model(tokens[None]).logits[0]
        losses.append(F.cross_entropy(logits[ex.prompt_len - 1 : -1], tokens[ex.prompt_len :]))
    return float(torch.stack(losses).mean())


def test_rft_loss_is_plain_ce_over_correct_completions(torch_backend, tokenizer):
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids
    prompts = [enc("What is 2+3?\n"), enc("What is 7-4?\n")]
    completions = [enc("5. The answer is 5."), enc("2+3 is 5"), enc("The answer is 3.")]
    examples = [TrainExample(p + c, len(p), np.ones(len(c), dtype=bool), 1.0)
                for p, c in zip([prompts[0], prompts[0], prompts[1]], completions)]
    torch_backend.init_lora(4, 8.0, 0.0, ["q_proj", "v_proj"], seed=0)
    torch_backend.accumulate(examples[:2], 0.0, 0.0, 1.0)  # one real step so the LoRA is no longer the identity
    torch_backend.step(1e-2, 0.0, 1.0)
    metrics = torch_backend.accumulate(examples, 0.0, 0.0, 1.0)
    torch_backend.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        expected = plain_ce(torch_backend.model, examples)
        with torch_backend.model.disable_adapter():
            base = plain_ce(torch_backend.model, examples)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - base) > 1e-4  # the comparison is with the adapted model, not the base
    assert metrics["policy"] == pytest.approx(metrics["loss"])  # the anchor, if computed at all, weighs 0
    # skipping the base forward when kl_coef = 0 (the full-logits path) changes nothing: an anchor at ~0 gives the same loss
    anchored = torch_backend.accumulate(examples, 1e-12, 0.0, 1.0)
    torch_backend.model.zero_grad(set_to_none=True)
    assert anchored["loss"] == pytest.approx(expected, rel=1e-5)


def test_rft_keeps_every_correct_rollout_of_every_problem(tmp_path, monkeypatch):
    rollouts = [{"id": "a", "prompt_ids": [1], "completions": [[5], [6], [7]], "texts": ["x", "y", "z"]},  # mixed
                {"id": "b", "prompt_ids": [2], "completions": [[8], [9], []], "texts": ["u", "v", ""]},  # all right
                {"id": "c", "prompt_ids": [3], "completions": [[4], [4], [4]], "texts": ["w", "w", "w"]}]  # all wrong
    right = {"x": True, "y": False, "z": True, "u": True, "v": True, "": True, "w": False}
    monkeypatch.setattr(select_stage, "verify_many", lambda t, g, timeout_s=5.0: [Verdict(right[x], "1") for x in t])
    ctx = RunContext(load_recipe(None), tmp_path, UI(rich=False))
    from rmx_local.tasks import Problem

    problems = [Problem(i, "q", "1") for i in "abc"]
    seqs = rft_sequences(ctx, problems, rollouts)
    assert [(s["id"], s["k"]) for s in seqs] == [("a", 0), ("a", 2), ("b", 0), ("b", 1)]  # the empty completion dropped
    assert all(s["advantage"] == 1.0 for s in seqs)


def test_rft_run_reuses_the_rollouts_and_trains_without_anchor(model_dir, tmp_path, monkeypatch):
    d = model_dir
    monkeypatch.setattr(select_stage, "verify_many", lambda t, g, timeout_s=5.0: [Verdict(i % 4 != 0, "1") for i in range(len(t))])
    base = [f"model={json.dumps(str(d))}", f"run_dir={json.dumps(str(tmp_path / 'run'))}", "task.train_size=4",
            "task.eval_size=2", "rollout.n=4", "rollout.max_tokens=5", "eval.max_tokens=3", "eval.n_samples=0",
            "train.grad_accum=2", "train.warmup_steps=1", "train.lr=1e-2"]
    rmx = run_pipeline(load_recipe(None, base), UI(rich=False))
    rollouts_before = (tmp_path / "run" / "rollouts.jsonl").read_text()
    rft = run_pipeline(load_recipe(None, base + ["train.objective=rft"]), UI(rich=False))
    assert (tmp_path / "run" / "rollouts.jsonl").read_text() == rollouts_before
    assert rft["train"]["key"] != rmx["train"]["key"]
    assert rft["train_sequences"] == 12 and rft["gated_fraction"] == 1.0  # 3 of each problem's 4 rollouts
    log = [json.loads(x) for x in (tmp_path / "run" / "train" / rft["train"]["key"] / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(h["policy"] == pytest.approx(h["loss"]) for h in log)  # no anchor term
    assert "rollouts" not in rft["timings_s"] and rft["cpu_timings_s"]["train"] > 0
