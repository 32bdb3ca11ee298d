"""The implemented loss equals the paper's Eq. 5-7 computed independently (numpy, by hand)."""

import numpy as np
import pytest
import torch

from rmx_local.loss import sequence_loss, token_entropy


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def paper_loss(logits, base, tokens, prompt_len, gate, adv, beta, cap=0.0):
    """Eq. 5-7 written out position by position: mean A*CE over D + beta * mean KL(base||theta) elsewhere."""
    lp, lb = log_softmax(logits), log_softmax(base)
    in_d, kls = [], []
    for j in range(len(tokens) - 1):  # row j predicts token j+1
        c = j + 1 - prompt_len  # completion index of the predicted token
        gated = 0 <= c < len(gate) and gate[c]
        if gated:
            ce = -lp[j, tokens[j + 1]]
            in_d.append(min(ce, cap) if (adv < 0 and cap > 0) else ce)
        else:
            kls.append(sum(np.exp(lb[j, v]) * (lb[j, v] - lp[j, v]) for v in range(lp.shape[1])))
    policy = adv * np.mean(in_d) if in_d else 0.0
    return policy + beta * np.mean(kls)


@pytest.mark.parametrize("adv,cap", [(1.5, 0.0), (-0.7, 0.0), (-2.5, 1.0)])
def test_loss_matches_independent_formula(adv, cap):
    rng = np.random.default_rng(3)
    T, V, P = 9, 7, 4
    tokens = rng.integers(0, V, T)
    logits = rng.normal(size=(T - 1, V)) * 2
    base = logits + rng.normal(size=(T - 1, V)) * 0.5
    gate = np.array([True, False, True, False, True])
    loss, m = sequence_loss(torch.tensor(logits), torch.tensor(base), torch.tensor(tokens), P,
                            torch.tensor(gate), adv, 0.2, cap)
    expected = paper_loss(logits, base, tokens, P, gate, adv, 0.2, cap)
    assert float(loss) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert m["gated"] == 3


def test_golden_value_on_hand_built_case():
    # 2-token vocabulary, hand-checkable: uniform base, theta favours token 0 with logit gap ln 3 (p = 3/4, 1/4).
    logits = torch.tensor([[np.log(3.0), 0.0]] * 3, dtype=torch.float64)
    base = torch.zeros(3, 2, dtype=torch.float64)
    tokens = torch.tensor([0, 0, 1, 0])
    gate = torch.tensor([False, True, False])  # prompt_len 1: completion tokens at 1,2,3; gate token at 2 (=1)
    loss, _ = sequence_loss(logits, base, tokens, 1, gate, advantage=2.0, kl_coef=0.2)
    ce = -np.log(0.25)  # token 1 has p = 1/4
    kl = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)  # KL(uniform || (3/4, 1/4))
    assert float(loss) == pytest.approx(2.0 * ce + 0.2 * kl, rel=1e-6)  # the loss is computed in fp32
    assert float(loss) == pytest.approx(2.8014, abs=1e-4)  # 2 ln 4 + 0.2 * 0.14384


def test_no_gated_tokens_is_pure_kl_and_zero_at_base():
    logits = torch.randn(5, 6)
    loss, m = sequence_loss(logits, logits.clone(), torch.randint(0, 6, (6,)), 3, torch.zeros(3, dtype=torch.bool), 1.0, 0.2)
    assert m["gated"] == 0 and float(loss) == pytest.approx(0.0, abs=1e-6)


def test_negative_cap_stops_gradient_past_cap():
    logits = torch.tensor([[0.0, 5.0], [0.0, 5.0]], requires_grad=True)  # token 0 has CE ~5.007 > cap
    loss, _ = sequence_loss(logits, logits.detach(), torch.tensor([1, 0, 0]), 1, torch.tensor([True, True]), -1.0, 0.0, 2.0)
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_entropy_handles_minus_inf_and_matches_formula():
    logits = torch.tensor([[0.0, 0.0, float("-inf")], [1.0, 2.0, 3.0]])
    h = token_entropy(logits)
    assert torch.isfinite(h).all()
    assert float(h[0]) == pytest.approx(np.log(2), rel=1e-6)
    p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    assert float(h[1]) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
