"""Gate controls and variants (entropy-min, every token, shared-context exclusion), on hand-made numbers."""

import numpy as np
import pytest

from rmx_local.errors import RmxError
from rmx_local.recipe import load_recipe
from rmx_local.stages.gate import compute_gate, shared_context, widen_positives


def test_low_select_gates_the_same_number_of_lowest_entropy_tokens():
    ents = [np.array([0.1, 2.0, 0.3, 5.0], np.float32), np.array([0.2, 0.4, 3.0, 0.05, 0.6, 0.7], np.float32)]
    high, hrep = compute_gate(ents, "fraction", 1.4, 0.2, seed=0)
    low, lrep = compute_gate(ents, "fraction", 1.4, 0.2, seed=0, select="low")
    assert hrep["gated"] == lrep["gated"] == 2 and lrep["select"] == "low"
    assert low[0].tolist() == [True, False, False, False] and low[1].tolist() == [False, False, False, True, False, False]
    assert lrep["gated_entropy"] == pytest.approx(0.075) and hrep["gated_entropy"] == pytest.approx(4.0)


def test_low_select_breaks_ties_at_random_but_keeps_the_count():
    ents = [np.zeros(20, np.float32), np.array([1.0, 2.0, 3.0], np.float32)]
    a, rep = compute_gate(ents, "tau", 1.5, 0.05, seed=0, select="low")
    b, _ = compute_gate(ents, "tau", 1.5, 0.05, seed=1, select="low")
    assert rep["gated"] == 2 and int(a[0].sum()) == int(b[0].sum()) == 2 and not a[1].any()
    assert (a[0] != b[0]).any()  # which zero-entropy tokens is the seed's choice


def test_fraction_one_gates_every_token():
    ents = [np.array([0.0, 0.0, 1.0], np.float32), np.array([0.5, 0.0], np.float32)]
    gates, rep = compute_gate(ents, "fraction", 1.4, 1.0)
    assert all(g.all() for g in gates) and rep["gated"] == 5 and rep["gated_fraction"] == 1.0
    assert load_recipe(None, ["gate.fraction=1.0"]).gate.fraction == 1.0
    with pytest.raises(RmxError, match="gate.fraction must be in"):
        load_recipe(None, ["gate.fraction=1.5"])
    with pytest.raises(RmxError, match="gate.select"):
        load_recipe(None, ["gate.select=middle"])


def test_shared_context_marks_the_common_prefix_of_a_problems_rollouts():
    seqs = [{"id": "a", "completion_ids": [5, 6, 7, 8]}, {"id": "a", "completion_ids": [5, 6, 9]},
            {"id": "b", "completion_ids": [1, 2]}, {"id": "b", "completion_ids": [3, 2, 4]}]
    masks = shared_context(seqs)
    # problem a shares tokens 5, 6: positions 0-2 have the same context in both rollouts; b shares only the prompt
    assert [m.tolist() for m in masks] == [[True, True, True, False], [True, True, True],
                                           [True, False], [True, False, False]]


def test_exclude_shared_keeps_the_gate_size_and_skips_shared_positions():
    # position 0 of every rollout (shared context) has the highest entropy, as a problem's first token does
    ents = [np.array([4.0, 1.0, 0.1, 2.0, 0.2], np.float32) + 0.01 * k for k in range(4)]
    shared = [np.array([True, False, False, False, False])] * 4
    plain, prep = compute_gate(ents, "fraction", 1.4, 0.2, seed=0)
    excl, erep = compute_gate(ents, "fraction", 1.4, 0.2, seed=0, shared=shared)
    assert all(g.tolist() == [True, False, False, False, False] for g in plain)  # only first tokens
    assert prep["gated"] == erep["gated"] == 4 and erep["excluded_shared"] == 4
    assert all(g.tolist() == [False, False, False, True, False] for g in excl)  # the next most uncertain ones
    low, _ = compute_gate(ents, "fraction", 1.4, 0.2, seed=0, shared=shared, select="low")
    assert not any(g[0] for g in low) and sum(int(g.sum()) for g in low) == 4


def test_positives_all_trains_every_token_of_positive_rollouts_only():
    ents = [np.array([3.0, 0.1, 0.2], np.float32), np.array([0.3, 2.5, 0.1, 0.2], np.float32)]
    seqs = [{"advantage": 1.5}, {"advantage": -0.5}]
    gates, rep = compute_gate(ents, "fraction", 1.4, 2 / 7, seed=0)
    assert [g.tolist() for g in gates] == [[True, False, False], [False, True, False, False]]
    wide, wrep = widen_positives(seqs, gates, rep)
    assert [g.tolist() for g in wide] == [[True, True, True], [False, True, False, False]]
    assert wrep["gated"] == 2 and wrep["trained_fraction"] == pytest.approx(4 / 7) and wrep["positives"] == "all"
