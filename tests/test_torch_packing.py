"""Packed forwards (one row per prompt, rollouts as branches) equal plain per-sequence forwards."""

import numpy as np
import pytest
import torch

from rmx_local.backends import TrainExample
from rmx_local.backends.torch_packing import pack
from rmx_local.loss import sequence_loss, token_entropy


def group(tok):
    """Three rollouts of one prompt (one of them empty, one a single token) and one of another prompt."""
    prompt, other = tok.encode("What is 2+3?"), tok.encode("Hi")
    rng = np.random.default_rng(0)
    seqs = [(prompt + tok.encode("It is 5"), len(prompt)), (prompt, len(prompt)),
            (prompt + tok.encode("6"), len(prompt)), (other + tok.encode("ok!"), len(other)),
            (prompt + tok.encode("5, surely"), len(prompt))]
    return [TrainExample(t, p, rng.random(len(t) - p) < 0.4, a) for (t, p), a in zip(seqs, [1.2, -0.5, -0.9, 0.7, 0.3])]


def plain_logits(model, tokens):
    return model(input_ids=torch.tensor([tokens])).logits[0, :-1]


def test_layout_shares_the_prompt(tokenizer):
    ex = group(tokenizer)
    packed = pack([(e.tokens, e.prompt_len) for e in ex], pad_id=0, dtype=torch.float32)
    P = ex[0].prompt_len
    assert packed.ids.shape == (2, P + 7 + 0 + 1 + 9)  # the prompt once, then every completion of it
    assert packed.row == [0, 0, 0, 1, 0]
    assert packed.positions[0, P : P + 7].tolist() == list(range(P, P + 7))  # each completion restarts at P
    assert packed.positions[0, P + 7] == P
    assert packed.index[1].tolist() == list(range(P - 1))  # an empty completion predicts prompt tokens only
    assert packed.index[2].tolist() == list(range(P))  # "6" is predicted at the prompt's last position
    m = packed.mask[0, 0]
    first, second = P, P + 7  # first tokens of completions 1 and 3
    assert m[second, first] < 0 and m[second, P - 1] == 0 and m[first, second] < 0


def test_packed_entropies_equal_plain_forwards(torch_backend, tokenizer):
    ex = group(tokenizer)
    got = torch_backend.entropies([(e.tokens, e.prompt_len) for e in ex])
    with torch.no_grad():
        for e, h in zip(ex, got):
            want = token_entropy(plain_logits(torch_backend.model, e.tokens))[e.prompt_len - 1 :]
            assert h.shape == (len(e.tokens) - e.prompt_len,)
            np.testing.assert_allclose(h, want.numpy(), rtol=1e-5, atol=1e-5)


def test_packed_loss_and_gradients_equal_plain_sequence_losses(torch_backend, tokenizer):
    torch_backend.init_lora(4, 8.0, 0.0, ["q_proj", "v_proj"], seed=0)
    params = [p for p in torch_backend.model.parameters() if p.requires_grad]
    for p in params:  # move B off zero so every LoRA tensor gets a gradient and the KL is not zero
        p.data.normal_(0, 0.05)
    ex = group(tokenizer)
    metrics = torch_backend.accumulate(ex, 0.2, 0.0, 1.0)
    packed_grads = [p.grad.clone() for p in params]
    torch_backend.optimizer.zero_grad(set_to_none=True)

    model, total = torch_backend.model, 0.0
    for e in ex:  # the reference: each sequence alone, through the loss the golden tests pin down
        with torch.no_grad(), model.disable_adapter():
            base = plain_logits(model, e.tokens)
        loss, _ = sequence_loss(plain_logits(model, e.tokens), base, torch.tensor(e.tokens), e.prompt_len,
                                torch.tensor(e.gate), e.advantage, 0.2)
        total = total + loss / len(ex)
    total.backward()
    assert metrics["loss"] == pytest.approx(float(total.detach()), rel=1e-5)
    assert metrics["kl"] > 1e-4
    for got, p in zip(packed_grads, params):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
