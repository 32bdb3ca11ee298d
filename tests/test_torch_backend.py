"""TorchBackend on a tiny random llama: batching never changes results, the adapter switch works."""

import numpy as np
import torch

from rmx_local.backends import SampleParams, TrainExample


def make_examples(tok):
    a = tok.encode("What is 2+3?") + tok.encode("It is 5")
    b = tok.encode("Hi") + tok.encode("ok!")
    return [TrainExample(a, 12, np.array([False, True, False, False, False, False, True]), 1.3),
            TrainExample(b, 2, np.array([True, False, False]), -0.8)]


def grads(backend):
    return {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}


def test_batched_entropies_equal_one_by_one(torch_backend, tokenizer):
    seqs = [(e.tokens, e.prompt_len) for e in make_examples(tokenizer)]
    together = torch_backend.entropies(seqs)
    for (s, h) in zip(seqs, together):
        np.testing.assert_allclose(torch_backend.entropies([s])[0], h, rtol=1e-5, atol=1e-5)
    assert [h.shape[0] for h in together] == [7, 3]


def test_batched_loss_and_gradients_equal_accumulated_singles(torch_backend, tokenizer):
    torch_backend.init_lora(4, 8.0, 0.0, ["q_proj", "v_proj"], seed=0)
    for p in torch_backend.model.parameters():  # move B off zero so every LoRA tensor gets a gradient
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    ex = make_examples(tokenizer)
    m_batch = torch_backend.accumulate(ex, 0.2, 0.0, 1.0)
    g_batch = grads(torch_backend)
    torch_backend.optimizer.zero_grad(set_to_none=True)
    m1 = torch_backend.accumulate(ex[:1], 0.2, 0.0, 0.5)
    m2 = torch_backend.accumulate(ex[1:], 0.2, 0.0, 0.5)
    g_single = grads(torch_backend)
    assert m_batch["loss"] == __import__("pytest").approx((m1["loss"] + m2["loss"]) / 2, rel=1e-5)
    assert set(g_batch) == set(g_single) and len(g_batch) == 8
    for n in g_batch:
        torch.testing.assert_close(g_batch[n], g_single[n], rtol=1e-4, atol=1e-6)


def test_adapter_switch_and_greedy_generation(torch_backend, tokenizer):
    prompt = [tokenizer.encode("What is 1+1?")]
    greedy = SampleParams(3, 0.0, 1.0, 8, seed=0)
    base = torch_backend.generate(prompt, greedy)
    assert len(base[0]) == 3 and base[0][0] == base[0][1]  # greedy: one decode repeated n times
    torch_backend.init_lora(4, 8.0, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=0)
    adapter = torch_backend.get_adapter()
    for name, (a, b) in adapter.weights.items():
        adapter.weights[name] = (a, np.random.default_rng(0).normal(0, 0.5, b.shape).astype(np.float32))
    torch_backend.set_adapter(adapter)
    assert torch_backend.generate(prompt, greedy) != base  # a large adapter changes the answer
    torch_backend.set_adapter_enabled(False)
    assert torch_backend.generate(prompt, greedy) == base  # and switching it off restores the base exactly
    sampled = SampleParams(2, 0.8, 0.95, 8, seed=5)
    assert torch_backend.generate(prompt, sampled) == torch_backend.generate(prompt, sampled)


def optimizer_layout(backend):
    return {(i, k): (v.device.type, v.dtype) for i, s in backend.optimizer.state_dict()["state"].items() for k, v in s.items()}


def test_optimizer_state_resumes_where_the_parameters_are(torch_backend, tokenizer, tmp_path):
    """A saved optimizer state is read to the CPU and placed by `load_state_dict`: moments beside their parameters,
    `step` a CPU tensor as in a fresh AdamW (on CUDA, reading it to the device put `step` there: a GPU sync per
    parameter per step, and a state unlike the uninterrupted run's). The backend's device label is set to "meta"
    for the load: reading the file to that device cannot place anything, so the test fails if it is used."""
    torch_backend.init_lora(4, 8.0, 0.0, ["q_proj", "v_proj"], seed=0)
    torch_backend.accumulate(make_examples(tokenizer), 0.2, 0.0, 1.0)
    torch_backend.step(1e-3, 0.0, 1.0)
    before = optimizer_layout(torch_backend)
    torch_backend.save_optimizer(str(tmp_path / "optimizer.pt"))
    saved = {k: v.clone() for k, v in torch_backend.optimizer.state_dict()["state"][0].items()}
    torch_backend.device = "meta"
    torch_backend.load_optimizer(str(tmp_path / "optimizer.pt"))
    assert optimizer_layout(torch_backend) == before and len(before) == 3 * 8  # step, exp_avg, exp_avg_sq x 8 LoRA tensors
    for k, v in torch_backend.optimizer.state_dict()["state"][0].items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)


def test_bf16_base_trains_like_fp32(tokenizer):
    """The CUDA default (bf16 weights) on the CPU: the LoRA stays fp32 under the bf16 base, the chunked vocabulary
    path is kept, and entropies, loss and gradient norm stay within bf16 rounding of the fp32 backend's."""
    from conftest import tiny_llama

    from rmx_local.backends.torch_backend import TorchBackend

    ex = make_examples(tokenizer)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        backend = TorchBackend(tiny_llama(len(tokenizer)).to(dtype), tokenizer, "cpu", batch_size=8)
        h = backend.entropies([(e.tokens, e.prompt_len) for e in ex])
        backend.init_lora(4, 8.0, 0.0, ["q_proj", "v_proj"], seed=0)
        for n, p in backend.model.named_parameters():  # move B off zero, the same in both dtypes
            if "lora_B" in n:
                p.data.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))
        metrics = backend.accumulate(ex, 0.2, 0.0, 1.0)
        norm = backend.step(1e-3, 0.0, 1.0)
        lora = {p.dtype for n, p in backend.model.named_parameters() if "lora_" in n}
        out[dtype] = (np.concatenate(h), metrics, norm, lora, backend.split is not None)
    (h32, m32, n32, lora32, split32), (h16, m16, n16, lora16, split16) = out[torch.float32], out[torch.bfloat16]
    assert lora16 == lora32 == {torch.float32} and split16 and split32
    assert 0 < np.max(np.abs(h16 - h32)) < 0.02  # bf16 does differ, by rounding only (entropies ~4.6 nats here)
    assert m16["kl"] > 0 and abs(m16["loss"] - m32["loss"]) < 0.02 * abs(m32["loss"])
    assert abs(n16 - n32) < 0.05 * n32
