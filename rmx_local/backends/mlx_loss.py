"""The ReasonMaxxer loss in MLX: a line-for-line mirror of `rmx_local.loss` (same definitions, same metrics).

    L = mean_{t in D} A * CE_t  +  kl_coef * mean_{t not in D} KL(p_base(.|<t) || p_theta(.|<t))

MLX has no boolean-mask indexing, so the gate (known on the host as a numpy array) becomes integer index
arrays before the graph is built; everything else is the same arithmetic in fp32. `negative_ce_cap` clamps a
negative-advantage token's CE at the cap exactly like `torch.clamp(max=cap)` (no gradient above it).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def prediction_gate(gate: np.ndarray, prompt_len: int, seq_len: int) -> np.ndarray:
    """Map a per-completion-token gate (C,) to a per-prediction-position gate (seq_len - 1,)."""
    g = np.zeros(seq_len - 1, dtype=bool)
    gate = np.asarray(gate, dtype=bool)
    g[prompt_len - 1 : prompt_len - 1 + gate.size] = gate
    return g


def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def sequence_loss(
    logits: mx.array,  # (T-1, V) adapted model, rows predict tokens[1:]
    base_logits: mx.array,  # (T-1, V) base model (adapter disabled), treated as a constant
    tokens: list[int],  # (T,)
    prompt_len: int,
    gate: np.ndarray,  # (C,) bool, C = T - prompt_len
    advantage: float,
    kl_coef: float,
    negative_ce_cap: float = 0.0,
) -> tuple[mx.array, dict[str, mx.array | int]]:
    """Loss of one sequence and its metrics (as lazy mx scalars; the caller evaluates them)."""
    logp = log_softmax(logits)
    targets = mx.array(tokens[1:], dtype=mx.int32)
    ce = -mx.take_along_axis(logp, targets[:, None], axis=-1).squeeze(-1)  # (T-1,)
    g = prediction_gate(gate, prompt_len, len(tokens))
    gated, kept = np.flatnonzero(g), np.flatnonzero(~g)

    n_gated = int(gated.size)
    zero = mx.array(0.0, dtype=mx.float32)
    if n_gated:
        ce_all = ce[mx.array(gated)]
        ce_d = mx.minimum(ce_all, negative_ce_cap) if advantage < 0 and negative_ce_cap > 0 else ce_all
        policy = advantage * ce_d.mean()
    else:
        ce_all, policy = None, zero

    if kept.size:
        idx = mx.array(kept)
        base_logp = mx.stop_gradient(log_softmax(base_logits))[idx]
        kl_t = (mx.exp(base_logp) * (base_logp - logp[idx])).sum(-1)  # KL(p_base || p_theta) per position
        kl = kl_t.mean()
    else:
        kl = zero
    loss = policy + kl_coef * kl
    metrics = {"loss": loss, "policy": policy, "kl": kl, "gated": n_gated,
               "ce_gated": mx.stop_gradient(ce_all.mean()) if n_gated else zero}
    return loss, metrics


def token_entropy(logits: mx.array) -> mx.array:
    """Full-vocabulary entropy in nats, fp32, safe for -inf logits (0 * log 0 := 0)."""
    logp = log_softmax(logits)
    p = mx.exp(logp)
    return -mx.where(p > 0, p * logp, 0.0).sum(-1)
