"""Chunked full-vocabulary passes (torch_vocab) equal the plain full-logits ones: entropies, losses, LoRA gradients."""

import numpy as np
import pytest
import torch

from rmx_local.backends import TrainExample
from rmx_local.backends.torch_backend import TorchBackend
from rmx_local.backends.torch_packing import split_passes
from rmx_local.backends.torch_vocab import FP32_COPIES, LOGITS_BUDGET_BYTES, chunk_rows, split_head
from tests.conftest import tiny_llama

VOCAB = 300  # larger than the char tokenizer so sampled targets cover ids it never emits


def batch(rng) -> list[TrainExample]:
    """Two problems with three and two rollouts each (shared prompts get packed), plus a lone sequence."""
    out = []
    for prompt_len, n, advantage in [(9, 3, 1.1), (5, 2, -0.7), (4, 1, 0.4)]:
        prompt = rng.integers(3, VOCAB, prompt_len).tolist()
        for k in range(n):
            completion = rng.integers(3, VOCAB, 4 + 3 * k).tolist()
            out.append(TrainExample(prompt + completion, prompt_len, rng.random(len(completion)) < 0.4, advantage))
    return out


def backend(tokenizer, chunked: bool) -> TorchBackend:
    b = TorchBackend(tiny_llama(VOCAB, seed=3, initializer_range=0.3), tokenizer, "cpu", batch_size=8, model_name="tiny")
    b.logits_budget = 3 * VOCAB * 4 * FP32_COPIES  # 3 positions per chunk: many chunks
    if not chunked:
        b.split = None
    return b


def with_lora(b: TorchBackend, targets=("q_proj", "v_proj", "o_proj")) -> TorchBackend:
    """`init_lora` probes the head again (`split_head`); a backend made full-logits stays so."""
    full = b.split is None
    b.init_lora(4, 8.0, 0.0, list(targets), seed=0)
    if full:
        b.split = None
    torch.manual_seed(1)
    for p in b.model.parameters():  # move B off zero so the adapted and base distributions differ
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return b


def lora_grads(b: TorchBackend) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}


def test_chunk_rows_follow_the_budget():
    assert chunk_rows(151_936) == LOGITS_BUDGET_BYTES // (151_936 * 4 * FP32_COPIES)  # Qwen2.5: 27 positions
    assert chunk_rows(49_152, 49_152 * 4 * FP32_COPIES * 10) == 10
    assert chunk_rows(10**9, 1) == 1  # never zero


def test_split_head_is_used_for_plain_heads(tokenizer):
    b = backend(tokenizer, chunked=True)
    assert b.split is not None and b.split[1] is b.model.lm_head
    assert split_head(tiny_llama(VOCAB, tie_word_embeddings=True)) is not None


def test_chunked_entropies_equal_full_logits(tokenizer):
    seqs = [(ex.tokens, ex.prompt_len) for ex in batch(np.random.default_rng(0))]
    chunked = with_lora(backend(tokenizer, True)).entropies(seqs)  # the adapter is off for scoring
    full = backend(tokenizer, False).entropies(seqs)
    assert [h.shape for h in chunked] == [h.shape for h in full] == [(len(t) - p,) for t, p in seqs]
    for a, b in zip(chunked, full):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert float(np.concatenate(full).std()) > 0.01  # not a degenerate constant


def test_chunked_kl_from_base_equals_full_logits(tokenizer, monkeypatch):
    """`eval --kl`: same per-token KL on both paths (1e-6), the chunked one never forms full logits and applies the
    head to at most 3 positions at a time; another adapter gives other values, so the comparison can fail."""
    seqs = [(ex.tokens, ex.prompt_len) for ex in batch(np.random.default_rng(5))]
    full = with_lora(backend(tokenizer, False)).kl_from_base(seqs)
    b = with_lora(backend(tokenizer, True))
    head_rows = []
    b.model.get_base_model().lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[0]))
    monkeypatch.setattr("rmx_local.backends.torch_backend.packed_logits", None)  # a full-logits call would raise
    chunked = b.kl_from_base(seqs)
    assert [k.shape for k in chunked] == [k.shape for k in full] == [(len(t) - p,) for t, p in seqs]
    shared = 2 + 1  # rollouts 2-3 of problem 1 and 2 of problem 2 share the first prediction position of their prompt
    assert max(head_rows) == 3 and sum(head_rows) == 2 * (sum(len(t) - p for t, p in seqs) - shared)  # base + adapted
    for a, f in zip(chunked, full):
        assert a.dtype == f.dtype == np.float32
        np.testing.assert_allclose(a, f, rtol=1e-6, atol=1e-6)
    assert float(np.concatenate(full).min()) >= -1e-6 and float(np.concatenate(full).mean()) > 1e-2  # KL, and live
    torch.manual_seed(2)
    for p in b.model.parameters():  # another adapter: the comparison above is not vacuous
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    other = np.concatenate(b.kl_from_base(seqs))
    assert np.abs(other - np.concatenate(full)).max() > 1e-2


@pytest.mark.parametrize("cap", [0.0, 5.0])
def test_chunked_loss_and_lora_gradients_equal_full_logits(tokenizer, cap):
    examples = batch(np.random.default_rng(1))
    results = []
    for chunked in (True, False):
        b = with_lora(backend(tokenizer, chunked))
        metrics = b.accumulate(examples, 0.2, cap, 1.0)
        results.append((metrics, lora_grads(b)))
    (m_c, g_c), (m_f, g_f) = results
    assert m_c["kl"] > 1e-3 and m_c["gated"] > 0  # both terms are live
    for k in m_f:
        assert m_c[k] == pytest.approx(m_f[k], rel=1e-6, abs=1e-6), k
    assert set(g_c) == set(g_f) and len(g_c) == 12  # A and B of q, v, o in 2 layers
    for n in g_f:
        assert float(g_f[n].abs().max()) > 1e-4
        torch.testing.assert_close(g_c[n], g_f[n], rtol=1e-6, atol=1e-6)


def test_without_the_anchor_chunked_equals_full_and_skips_the_base_forward(tokenizer, monkeypatch):
    """kl_coef 0 (train.objective = "rft"): same loss and gradients on both paths, KL 0, no adapter-off forward."""
    examples = batch(np.random.default_rng(4))
    results = []
    for chunked in (True, False):
        b = with_lora(backend(tokenizer, chunked))
        base_forwards = []
        off = b._adapter_off
        monkeypatch.setattr(b, "_adapter_off", lambda: base_forwards.append(1) or off())
        metrics = b.accumulate(examples, 0.0, 0.0, 1.0)
        assert base_forwards == [] and abs(metrics["kl"]) < 1e-6
        results.append((metrics, lora_grads(b)))
    (m_c, g_c), (m_f, g_f) = results
    assert m_c["loss"] == pytest.approx(m_f["loss"], rel=1e-6, abs=1e-6) and m_c["gated"] > 0
    assert set(g_c) == set(g_f) and len(g_c) == 12
    for n in g_f:
        assert float(g_f[n].abs().max()) > 1e-4
        torch.testing.assert_close(g_c[n], g_f[n], rtol=1e-6, atol=1e-6)


def test_split_passes_keep_prompts_together_within_the_budget():
    a, b = [1, 2, 3], [7, 8]
    seqs = [(a + [4, 5], 3), (a + [6], 3), (a + [9, 9, 9], 3), (b + [1], 2), ([5] * 40, 3)]
    assert split_passes(seqs, 9) == [[0, 1, 2], [3], [4]]  # 3 + 2 + 1 + 3 = 9 tokens; a new prompt starts a piece
    assert split_passes(seqs, 1) == [[0], [1], [2], [3], [4]]  # at least one sequence per pass
    assert split_passes(seqs, 10**6) == [[0, 1, 2, 3, 4]]


def test_training_in_several_passes_equals_one_pass(tokenizer):
    examples = batch(np.random.default_rng(3))
    results = []
    for budget in (1, 10**12):  # one sequence per pass, then the whole batch in one
        b = with_lora(backend(tokenizer, True))
        b.activation_budget = budget
        results.append((b.accumulate(examples, 0.2, 0.0, 1.0), lora_grads(b)))
    (m1, g1), (m2, g2) = results
    for k in m2:
        assert m1[k] == pytest.approx(m2[k], rel=1e-6, abs=1e-6), k
    for n in g2:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-6, atol=1e-6)


def test_lora_on_the_output_head_falls_back_to_full_logits(tokenizer):
    b = with_lora(backend(tokenizer, True), targets=("q_proj", "lm_head"))
    assert b.split is None
    metrics = b.accumulate(batch(np.random.default_rng(2)), 0.2, 0.0, 1.0)
    assert np.isfinite(metrics["loss"]) and any("lm_head" in n for n in lora_grads(b))


def test_scaled_head_is_not_split():
    """A model whose logits are not head(decoder(x)) (here: soft-capped) keeps the full-logits path."""
    model = tiny_llama(VOCAB)
    forward = model.forward

    def capped(*a, **k):
        out = forward(*a, **k)
        out.logits = 30 * torch.tanh(out.logits / 30) + 1.0
        return out

    model.forward = capped
    assert split_head(model) is None
