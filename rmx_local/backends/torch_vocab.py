"""Full-vocabulary terms a chunk of positions at a time: entropy for scoring, KL for `eval --kl`, log-sum-exp and
KL for the loss.

A causal LM's forward projects every position onto the vocabulary at once: (rows, length, vocab) logits, and
as many fp32 copies again for log-softmax, probabilities and their gradients. At 151k vocabulary (Qwen2.5) one
1,000-token sequence is 600 MB per copy. Here the decoder's hidden states (rows x length x hidden, ~100x
smaller) are computed once, the positions a pass needs are gathered from them (padding never reaches the
vocabulary; scoring skips the prompt), and the output head is applied to `chunk_rows` positions at a time,
so the full-vocabulary tensors of one pass stay within `LOGITS_BUDGET_BYTES` whatever the batch and length.

Training: the loss needs, per position, log p_theta(target) = z_target - lse and KL(p_base || p_theta), with
gradients w.r.t. the hidden state. d lse/dz = p_theta and d KL/dz = p_theta - p_base, so `_LseKl` forms
(p_theta @ W) and ((p_theta - p_base) @ W) while each chunk is live and keeps only those (positions x hidden)
tensors for the backward pass; z_target is one row of W per token, left to autograd. Exact, with one more
head-sized matmul than autograd through full logits, and no recomputation.

Shortcut: this path is taken only when the model splits into a decoder and a frozen `nn.Linear` head whose
product reproduces the model's own logits (probed once, `split_head`); a head with soft-capping or scaling
(Gemma, Cohere) or a LoRA on the head gets the plain full-logits path (`packed_logits` + `loss.position_terms`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rmx_local.backends.torch_packing import Packed
from rmx_local.loss import position_terms, token_entropy

LOGITS_BUDGET_BYTES = 128 * 2**20  # full-vocabulary fp32 tensors of one chunk, all copies together
FP32_COPIES = 8  # vocabulary-sized fp32 tensors alive at once per position inside `_LseKl.forward`


def chunk_rows(vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """Positions per chunk so that one chunk's full-vocabulary tensors fit in `budget_bytes`."""
    return max(1, budget_bytes // (vocab_size * 4 * FP32_COPIES))


def split_head(model) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, head) when head(decoder(x)) is the model's logits and the head is a plain linear layer, else None.

    Works through a PEFT wrapper (its LoRA layers live inside the decoder, so `disable_adapter` still applies)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    if not isinstance(head, torch.nn.Linear) or decoder is None:
        return None
    ids = torch.tensor([[0, 1, 2, 3]], device=head.weight.device) % head.out_features
    with torch.inference_mode():
        full = causal(input_ids=ids).logits
        split = head(decoder(input_ids=ids).last_hidden_state)
    return (decoder, head) if torch.allclose(full.float(), split.float(), rtol=1e-4, atol=1e-4) else None


def packed_hidden(decoder, packed: Packed) -> torch.Tensor:
    """(R * L, H) final hidden states of a packed batch, flattened over rows."""
    out = decoder(input_ids=packed.ids, position_ids=packed.positions, attention_mask=packed.mask).last_hidden_state
    return out.flatten(0, 1)


def flat_positions(packed: Packed, first: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Unique flattened packed positions that sequence i needs from its `first[i]`-th prediction on, and, per
    sequence, where its positions sit in that unique list."""
    L = packed.ids.shape[1]
    wanted = [packed.row[i] * L + idx[f:] for i, (idx, f) in enumerate(zip(packed.index, first))]
    unique, inverse = torch.unique(torch.cat(wanted), return_inverse=True)
    return unique, list(torch.split(inverse, [w.numel() for w in wanted]))


@torch.inference_mode()
def chunked_entropy(hidden: torch.Tensor, head: torch.nn.Linear, rows: int) -> torch.Tensor:
    """(N,) full-vocabulary entropy (nats, fp32) of the head's distribution at each of N hidden states."""
    return torch.cat([token_entropy(head(hidden[s : s + rows])) for s in range(0, hidden.shape[0], rows)])


@torch.inference_mode()
def chunked_kl(hidden: torch.Tensor, base_hidden: torch.Tensor, head: torch.nn.Linear, rows: int) -> torch.Tensor:
    """(N,) KL(p_base || p_theta) (nats, fp32) between the head's distributions at base_hidden[j] and hidden[j];
    no gradient (for that, `lse_and_kl`)."""
    return torch.cat([position_terms(head(hidden[s : s + rows]), head(base_hidden[s : s + rows]))[1]
                      for s in range(0, hidden.shape[0], rows)])


class _LseKl(torch.autograd.Function):
    """(lse, KL(p_base || p_theta)) per position; the gradient w.r.t. the hidden states is formed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, base_hidden, weight, bias, rows):
        n = hidden.shape[0]
        lse = hidden.new_empty(n, dtype=torch.float32)
        kl = hidden.new_empty(n, dtype=torch.float32)
        d_lse = torch.empty_like(hidden, dtype=torch.float32)  # d lse / d hidden = p_theta @ W
        d_kl = torch.empty_like(hidden, dtype=torch.float32)  # d KL / d hidden = (p_theta - p_base) @ W
        for s in range(0, n, rows):
            z = F.linear(hidden[s : s + rows], weight, bias).float()
            base_logp = F.log_softmax(F.linear(base_hidden[s : s + rows], weight, bias).float(), dim=-1)
            chunk_lse = torch.logsumexp(z, dim=-1)
            logp = z - chunk_lse[:, None]
            base_p = base_logp.exp()
            lse[s : s + rows] = chunk_lse
            kl[s : s + rows] = (base_p * (base_logp - logp)).sum(-1)
            p_w = logp.exp_().to(weight.dtype) @ weight
            d_lse[s : s + rows] = p_w
            d_kl[s : s + rows] = p_w - base_p.to(weight.dtype) @ weight
        ctx.save_for_backward(d_lse, d_kl)
        ctx.hidden_dtype = hidden.dtype
        return lse, kl

    @staticmethod
    def backward(ctx, g_lse, g_kl):
        d_lse, d_kl = ctx.saved_tensors
        grad = g_lse[:, None] * d_lse + g_kl[:, None] * d_kl
        return grad.to(ctx.hidden_dtype), None, None, None, None


def lse_and_kl(hidden: torch.Tensor, base_hidden: torch.Tensor, head: torch.nn.Linear, rows: int):
    """(N,) log-sum-exp of the adapted logits and (N,) KL(p_base || p_theta), differentiable w.r.t. `hidden`."""
    return _LseKl.apply(hidden, base_hidden.detach(), head.weight.detach(), None if head.bias is None else head.bias.detach(), rows)


def target_logits(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """(M,) logit of targets[j] at hidden[j]: one row of the head each, not the vocabulary."""
    z = (hidden * head.weight[targets]).sum(-1)
    return (z if head.bias is None else z + head.bias[targets]).float()
