"""Selection, advantages, gating and the learning-rate schedule, on hand-made numbers."""

import numpy as np
import pytest

from rmx_local.recipe import TrainConfig
from rmx_local.stages.gate import compute_gate
from rmx_local.stages.select import advantages, pick_mixed
from rmx_local.stages.train import build_examples, lr_at, micro_batches, schedule


def test_advantage_population_std_and_clip():
    a = advantages([1, 0, 0, 0], clip=2.5)
    # mean 0.25, population std sqrt(0.1875) = 0.4330
    assert a == pytest.approx([1.7320508, -0.5773503, -0.5773503, -0.5773503], rel=1e-6)
    rare = advantages([1] + [0] * 19, clip=2.5)  # (1 - .05) / .2179 = 4.36 -> clipped
    assert rare[0] == 2.5 and rare[1] == pytest.approx(-0.2294157, rel=1e-6)
    assert advantages([1, 1, 1], clip=2.5) == [0.0, 0.0, 0.0]  # std 0 guarded by 1e-8


def test_pick_mixed_closest_to_half_first():
    rates = {"a": 0.0, "b": 0.9, "c": 0.5, "d": 1.0, "e": 0.25, "f": 0.75}
    assert pick_mixed(rates, 10) == ["c", "e", "f", "b"]
    assert pick_mixed(rates, 2) == ["c", "e"]
    assert pick_mixed({"a": 0.0, "b": 1.0}, 5) == []


def test_gate_by_fraction_reports_implied_tau():
    ents = [np.array([0.1, 2.0, 0.3, 5.0], np.float32), np.array([0.2, 0.4, 3.0, 0.05, 0.6, 0.7], np.float32)]
    gates, rep = compute_gate(ents, "fraction", 1.4, 0.2, seed=0)
    assert rep["tokens"] == 10 and rep["gated"] == 2  # the two largest: 5.0 and 3.0
    assert gates[0].tolist() == [False, False, False, True] and gates[1].tolist() == [False, False, True, False, False, False]
    assert 2.0 <= rep["tau"] < 3.0
    assert rep["paper_tau_fraction"] == pytest.approx(0.3)  # 2.0, 5.0, 3.0 exceed 1.4


def test_gate_by_tau_and_random_control_same_size():
    ents = [np.linspace(0, 3, 50, dtype=np.float32), np.linspace(0, 3, 30, dtype=np.float32)]
    gates, rep = compute_gate(ents, "tau", 1.4, 0.05)
    n = sum(int(g.sum()) for g in gates)
    assert n == rep["gated"] == int(sum((e > 1.4).sum() for e in ents))
    rgates, rrep = compute_gate(ents, "tau", 1.4, 0.05, random_gate=True, seed=1)
    assert sum(int(g.sum()) for g in rgates) == n and rrep["random_gate"]
    assert [g.shape for g in rgates] == [g.shape for g in gates]
    assert any((a != b).any() for a, b in zip(rgates, gates))


def test_lr_warmup_then_linear_decay():
    lrs = [lr_at(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[-1] == pytest.approx(0.125) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lr_at(0, 5, 0, 2.0) == pytest.approx(2.0)


def test_schedule_and_deterministic_order():
    t = TrainConfig(epochs=1.0, batch_size=1, grad_accum=8)
    assert schedule(100, t) == (100, 13)
    assert schedule(100, TrainConfig(epochs=2.0, batch_size=2, grad_accum=4)) == (100, 25)
    ex = list(range(10))
    a, b = micro_batches(ex, 15, 2, seed=3), micro_batches(ex, 15, 2, seed=3)
    assert a == b and sorted(x for mb in a[:5] for x in mb) == ex  # each epoch is a permutation


def test_group_size_keeps_rollouts_of_a_problem_together():
    from rmx_local.backends import TrainExample

    ex = [TrainExample([p, p, k], 2, np.array([False]), 0.0) for p in (5, 6, 7) for k in range(4)]
    whole = micro_batches(ex, 6, 4, seed=1, group_size=4)
    assert all(len({e.tokens[0] for e in mb}) == 1 for mb in whole)  # one problem per micro-batch
    assert sorted(mb[0].tokens[0] for mb in whole[:3]) == [5, 6, 7]  # an epoch visits every problem once
    halves = micro_batches(ex, 3, 4, seed=1, group_size=2)
    assert all(sum(e.tokens[0] == mb[0].tokens[0] for e in mb) % 2 == 0 for mb in halves)  # pairs stay together
    assert sorted(id(e) for mb in halves for e in mb) == sorted(id(e) for e in ex)  # an epoch is a permutation
    assert any(len({e.tokens[0] for e in mb}) == 2 for mb in halves)  # and groups of different problems mix


def test_positive_only_drops_negative_rollouts():
    seqs = [{"prompt_ids": [1, 2], "completion_ids": [3, 4], "advantage": a} for a in (1.0, -0.5, 0.3)]
    gates = [np.array([True, False])] * 3
    assert [e.advantage for e in build_examples(seqs, gates, positive_only=True)] == [1.0, 0.3]
    assert len(build_examples(seqs, gates, positive_only=False)) == 3
