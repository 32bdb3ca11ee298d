"""The ReasonMaxxer loss (paper Eq. 5-7), in PyTorch, for one sequence.

    L = mean_{t in D} A * CE_t  +  kl_coef * mean_{t not in D} KL(p_base(.|<t) || p_theta(.|<t))

Positions are next-token prediction positions of the whole sequence: row j of the logits predicts token j+1.
D (the decision points) is given per completion token; every other position, prompt included, is anchored
to the base model by the KL term. A batch's loss is the mean of its sequences' losses.

Shortcut (a recipe knob, off by default as in the paper): with `negative_ce_cap > 0`, a negative-advantage
token's CE is clamped at that value, so its gradient stops once log p_theta(token) < -cap. The plain negative
term is unbounded and, measured on SmolLM2-135M at lr 1e-3, collapses the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_gate(gate: torch.Tensor, prompt_len: int, seq_len: int) -> torch.Tensor:
    """Map a per-completion-token gate (C,) to a per-prediction-position gate (seq_len - 1,)."""
    g = torch.zeros(seq_len - 1, dtype=torch.bool, device=gate.device)
    g[prompt_len - 1 : prompt_len - 1 + gate.numel()] = gate
    return g


def position_terms(logits: torch.Tensor, base_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_theta, KL(p_base || p_theta)) at every position of (..., V) logits, in fp32; base has no grad."""
    logp = F.log_softmax(logits.float(), dim=-1)
    base_logp = F.log_softmax(base_logits.detach().float(), dim=-1)
    return logp, (base_logp.exp() * (base_logp - logp)).sum(-1)


def combine_terms(
    ce: torch.Tensor,  # (T-1,) CE of each prediction position's target
    kl: torch.Tensor,  # (T-1,) KL(p_base || p_theta) at each prediction position
    g: torch.Tensor,  # (T-1,) bool prediction gate (see `prediction_gate`)
    advantage: float,
    kl_coef: float,
    negative_ce_cap: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One sequence's loss from its per-position terms: A * mean CE over D + kl_coef * mean KL elsewhere."""
    n_gated = int(g.sum())
    if n_gated:
        ce_d = ce[g]
        if advantage < 0 and negative_ce_cap > 0:
            ce_d = ce_d.clamp(max=negative_ce_cap)
        policy = advantage * ce_d.mean()
    else:
        policy = ce.new_zeros(())
    kl_kept = kl[~g]
    kl_mean = kl_kept.mean() if kl_kept.numel() else ce.new_zeros(())
    loss = policy + kl_coef * kl_mean
    metrics = {"loss": float(loss.detach()), "policy": float(policy.detach()), "kl": float(kl_mean.detach()), "gated": n_gated,
               "ce_gated": float(ce[g].detach().mean()) if n_gated else 0.0}
    return loss, metrics


def sequence_loss(
    logits: torch.Tensor,  # (T-1, V) adapted model, rows predict tokens[1:]
    base_logits: torch.Tensor,  # (T-1, V) base model (adapter disabled), no grad
    tokens: torch.Tensor,  # (T,)
    prompt_len: int,
    gate: torch.Tensor,  # (C,) bool, C = T - prompt_len
    advantage: float,
    kl_coef: float,
    negative_ce_cap: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    logp, kl = position_terms(logits, base_logits)
    ce = -logp.gather(-1, tokens[1:, None]).squeeze(-1)  # (T-1,)
    return combine_terms(ce, kl, prediction_gate(gate, prompt_len, tokens.numel()), advantage, kl_coef, negative_ce_cap)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary entropy in nats, fp32, safe for -inf logits (0 * log 0 := 0)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
