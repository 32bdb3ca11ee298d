"""The Section-3 analysis on a constructed pair whose answers are worked out by hand.

The "models" are a table: the next token depends only on the last token x. The base ranks the candidates x+1,
x+2, ..., x+20 in that order (logit gap 2: low entropy; gap 0.1 at the uncertain states 3, 6, 10: high
entropy); from x >= 12 it ends (EOS = 0). The teacher equals the base except at x = 3 (picks the base's rank-2
token 5: reranked), x = 6 (rank 4, token 10: reranked), x = 9 and x = 11 (rank 8: shifted).
"""

import math

import numpy as np
import pytest

from rmx_local.analyze import (CONTROL_TOP, RERANKED, Policy, classification, guided_decode, policy_rows,
                               position_facts)

V, END, EOS = 40, 12, 0
HIGH = {3, 6, 10}
CHANGED = {3: 2, 6: 4, 9: 8, 11: 8}  # state -> base rank of the teacher's token


def base_logits(x: int) -> np.ndarray:
    row = np.full(V, -1000.0)
    if x >= END:
        row[EOS] = 0.0
        return row
    gap = 0.1 if x in HIGH else 2.0
    for r in range(1, 21):
        row[x + r] = -(r - 1) * gap
    return row


def teacher_logits(x: int) -> np.ndarray:
    row = base_logits(x)
    if x in CHANGED:
        row[x + CHANGED[x]] = 10.0
    return row


class TableStepper:
    def __init__(self):
        self.calls = []

    def _logits(self):
        return np.stack([base_logits(x) for x in self.last]), np.stack([teacher_logits(x) for x in self.last])

    def start(self, prompts):
        self.last = [p[-1] for p in prompts]
        self.calls.append(len(prompts))
        return self._logits()

    def advance(self, keep, tokens):
        assert len(keep) == len(tokens)
        self.last = [int(t) for t in tokens]
        return self._logits()


def entropy(gap: float) -> float:
    w = [math.exp(-(r - 1) * gap) for r in range(1, 21)]
    z = sum(w)
    return -sum(x / z * math.log(x / z) for x in w)


POLICIES = [Policy("base", "base"), Policy("teacher", "teacher"), Policy("oracle", "oracle"),
            Policy("random", "random"), Policy("gate 1.0", "entropy", 1.0), Policy("gate 9", "entropy", 9.0)]


@pytest.fixture(scope="module")
def traces():
    return guided_decode(TableStepper(), [[1], [7]], POLICIES, max_tokens=30, eos_ids=[EOS], seed=3)


def tokens(traces, p, name):
    return traces[p][[x.name for x in POLICIES].index(name)].tokens


def test_position_facts_ranks_and_kinds():
    states = [1, 3, 6, 9, 12]
    f = position_facts(np.stack([base_logits(x) for x in states]), np.stack([teacher_logits(x) for x in states]))
    assert f["rank"].tolist() == [1, 2, 4, 8, 1]
    assert f["kind"].tolist() == [0, 1, 1, 2, 0]
    np.testing.assert_allclose(f["entropy"], [entropy(2.0), entropy(0.1), entropy(0.1), entropy(2.0), 0.0], atol=1e-9)


def test_each_policy_decodes_its_hand_worked_sequence(traces):
    assert tokens(traces, 0, "base") == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert tokens(traces, 0, "teacher") == [2, 3, 5, 6, 10, 11, 19]  # shifted at 11: 11 + 8
    # the oracle continues from its corrected prefix (state 5, then 10: state 9 is never reached), keeps the base at 11
    assert tokens(traces, 0, "oracle") == [2, 3, 5, 6, 10, 11, 12]
    assert tokens(traces, 0, "gate 1.0") == [2, 3, 5, 6, 10, 11, 12]
    assert tokens(traces, 0, "gate 9") == tokens(traces, 0, "base")
    assert tokens(traces, 1, "base") == [8, 9, 10, 11, 12]
    assert tokens(traces, 1, "teacher") == [8, 9, 17]
    assert tokens(traces, 1, "oracle") == [8, 9, 10, 11, 12]  # only shifted positions on this path: nothing substituted


def test_tokens_touched(traces):
    touched = {pol.name: [sum(traces[p][j].touched) for p in range(2)] for j, pol in enumerate(POLICIES)}
    assert touched["base"] == [0, 0]
    assert touched["oracle"] == [2, 0]
    assert touched["gate 1.0"] == [3, 1]  # states 3, 6, 10 / state 10 (its substitution equals the base's token)
    assert touched["teacher"] == [3, 1]  # reranked 3, 6 and shifted 11 / shifted 9
    right = [[(t.tokens[2] == 5) if p == 0 else (17 in t.tokens) for t in traces[p]] for p in range(2)]
    rows = policy_rows(traces, POLICIES, np.array(right))
    by = {r["policy"]: r for r in rows}
    assert by["oracle"]["touched"] == pytest.approx(2 / (8 + 6))  # 8 positions (7 tokens + EOS), 6 on prompt 2
    assert by["base"]["accuracy"] == (0.0, 0.0) and by["teacher"]["accuracy"][0] == 1.0
    assert by["oracle"]["accuracy"][0] == 0.5 and by["oracle"]["vs_base"][0] == 0.5
    assert by["gate 1.0"]["accuracy"][0] == 0.5 and by["gate 9"]["accuracy"][0] == 0.0


def test_random_control_touches_the_reranked_positions_with_base_top20_tokens(traces):
    j = [p.name for p in POLICIES].index("random")
    tr = traces[0][j]
    assert tr.tokens[:2] == [2, 3] and sum(tr.touched) >= 1
    first = tr.touched.index(True)
    assert first == 2 and tr.kinds[first] == RERANKED  # state 3, the first reranked position
    assert 5 <= tr.tokens[first] <= 3 + CONTROL_TOP  # base top 20 of state 3 is 4..23, minus its argmax 4
    for i, hit in enumerate(tr.touched):
        assert hit == (tr.kinds[i] == RERANKED)
    # seeded per problem: the same draws whatever the batching
    again = guided_decode(TableStepper(), [[1], [7]], POLICIES, 30, [EOS], seed=3, batch_size=1)
    assert [t.tokens for t in again[0]] == [t.tokens for t in traces[0]]
    other = [guided_decode(TableStepper(), [[1]], POLICIES[3:4], 30, [EOS], seed=s)[0][0].tokens[2] for s in range(12)]
    assert len(set(other)) > 3 and all(5 <= t <= 23 for t in other)


def test_classification_on_the_base_completions(traces):
    c = classification([traces[0][0], traces[1][0]])
    # positions: 11 tokens + EOS for prompt 1 (states 1..12), 5 + EOS for prompt 2 (states 7..12)
    assert c["positions"] == 18
    assert c["reranked"] == pytest.approx(2 / 18) and c["shifted"] == pytest.approx(4 / 18)
    assert c["mean_base_rank"] == pytest.approx((2 + 4 + 8 * 4) / 6)
    assert c["rank_histogram"] == {"2": 1, "3": 0, "4": 1, "5": 0, "6-10": 4, "11-20": 0, ">20": 0}
    hi, lo = entropy(0.1), entropy(2.0)
    changed = (2 * hi + 4 * lo) / 6  # states 3, 6 (uncertain); 9, 11 twice (certain)
    unchanged = (2 * hi + 8 * lo + 2 * 0.0) / 12  # state 10 twice, 8 certain states, the end state twice
    assert c["entropy_changed"] == pytest.approx(changed) and c["entropy_unchanged"] == pytest.approx(unchanged)
    assert c["entropy_ratio"] == pytest.approx(changed / unchanged)


def test_max_tokens_bounds_every_row():
    out = guided_decode(TableStepper(), [[1]], POLICIES[:1], max_tokens=4, eos_ids=[EOS])
    assert out[0][0].tokens == [2, 3, 4, 5]


def test_torch_stepper_matches_full_forwards_with_the_adapter_off_and_on(torch_backend):
    """Cached, batched, row-retiring logits equal a plain forward of each whole prefix, adapter off (base) / on."""
    import contextlib

    import torch

    from rmx_local.analyze_torch import TorchPairStepper

    b = torch_backend
    b.init_lora(4, 8, 0.0, ["q_proj", "v_proj"], seed=0)
    with torch.no_grad():
        for name, p in b.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero correction, so off and on differ
    m = b.model
    stepper = TorchPairStepper([(m, m.disable_adapter), (m, contextlib.nullcontext)], b.pad_id, "cpu")
    prompts = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8]]

    def full(seq, adapter_on):
        with torch.inference_mode(), (contextlib.nullcontext() if adapter_on else m.disable_adapter()):
            return m(input_ids=torch.tensor([seq])).logits[0, -1].float().numpy()

    base, teacher = stepper.start(prompts)
    seqs = [list(p) for p in prompts]
    assert not np.allclose(base[0], teacher[0], atol=1e-3)
    for step, keep in enumerate([[0, 1, 2], [0, 2], [1]]):  # retire row 1, then the first live row
        for i, s in enumerate(seqs):
            np.testing.assert_allclose(base[i], full(s, False), atol=1e-4)
            np.testing.assert_allclose(teacher[i], full(s, True), atol=1e-4)
        seqs = [seqs[i] for i in keep]
        new = [20 + step + i for i in range(len(keep))]
        seqs = [s + [t] for s, t in zip(seqs, new)]
        base, teacher = stepper.advance(np.array(keep), np.array(new))


def test_analyze_command_on_a_tiny_run_prints_json(finished_run):
    """End to end: BASE `base` (the run's own model), TEACHER a run folder (its adapter, its prompt, its gate's tau)."""
    import json

    from click.testing import CliRunner

    from rmx_local.cli import main
    from rmx_local.recipe import load_recipe

    base = load_recipe(finished_run / "recipe.toml").model
    tau = json.loads((finished_run / "gate.json").read_text())["tau"]
    result = CliRunner().invoke(main, ["analyze", "base", str(finished_run), "--data", "arith:single", "--limit", "3",
                                       "--tau", "1.2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert out["problems"] == 3 and out["max_tokens"] == 4 and out["run_tau"] == pytest.approx(tau) and out["base"] == base
    kinds = [p["kind"] for p in out["policies"]]
    assert kinds == ["base", "teacher", "oracle", "random", "entropy", "entropy"]
    assert [p["tau"] for p in out["policies"][4:]] == [1.2, round(tau, 3)]
    c = out["classification"]
    assert 3 <= c["positions"] <= 3 * 5 and c["reranked"] + c["shifted"] <= 1
    gate_all = out["policies"][4]  # tau 1.2 is below every entropy of a random model: substitutes everywhere
    assert gate_all["touched"] == 1.0


def test_a_model_teacher_identical_to_the_base_changes_nothing(finished_run):
    """A full-model TEACHER is loaded beside the base; the same weights on both sides: no position differs."""
    import json

    from click.testing import CliRunner

    from rmx_local.cli import main
    from rmx_local.recipe import load_recipe

    model = load_recipe(finished_run / "recipe.toml").model
    result = CliRunner().invoke(main, ["analyze", model, model, "--data", "arith:single", "--limit", "2",
                                       "--max-tokens", "3", "--tau", "9", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert "two models" in out["pair"] and out["classification"]["changed"] == 0
    assert all(p["touched"] == 0 and p["vs_base"][0] == 0 for p in out["policies"])
