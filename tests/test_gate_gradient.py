"""benchmarks/gate_gradient.py: the per-token logit-gradient norms match an unpacked forward, and the gate shares
are the fractions of that mass each gate holds."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

spec = importlib.util.spec_from_file_location("gate_gradient", Path(__file__).resolve().parents[1] / "benchmarks" / "gate_gradient.py")
gg = importlib.util.module_from_spec(spec)
sys.modules["gate_gradient"] = gg
spec.loader.exec_module(gg)


def test_norms_match_an_unpacked_forward(torch_backend):
    prompt = [3, 4, 5, 6]
    seqs = [{"prompt_ids": prompt, "completion_ids": c} for c in ([7, 8, 9], [7, 10], [11, 12, 13, 14])]
    norms = gg.logit_gradient_norms(torch_backend, seqs, batch=2)  # a batch boundary inside the problem
    for s, n in zip(seqs, norms):
        ids = torch.tensor([s["prompt_ids"] + s["completion_ids"]])
        with torch.inference_mode():
            prob = torch.softmax(torch_backend.model(input_ids=ids).logits[0].float(), -1)
        p = len(s["prompt_ids"])
        want = [torch.linalg.vector_norm(prob[t - 1] - torch.nn.functional.one_hot(ids[0, t], prob.shape[-1])).item()
                for t in range(p, ids.shape[1])]
        assert n.shape == (len(s["completion_ids"]),)
        np.testing.assert_allclose(n, want, rtol=1e-4, atol=1e-5)


def test_shares_of_each_gate():
    entropies = [np.array([3.0, 0.1, 2.0, 0.2, 0.3]), np.array([0.4, 4.0, 0.5, 0.6, 0.7])]
    norms = [h / 10 for h in entropies]  # g proportional to H: the two top tokens hold (3 + 4) / total
    cfg = SimpleNamespace(mode="fraction", tau=1.4, fraction=0.2, select="high")
    r = gg.gate_shares(entropies, norms, cfg, seed=0)
    total = sum(h.sum() for h in entropies)
    assert r["tokens"] == 10
    assert r["gates"]["entropy"]["tokens"] == 2
    assert r["gates"]["entropy"]["g_share"] == pytest.approx(7.0 / total)
    assert r["gates"]["low"]["g_share"] == pytest.approx(0.3 / total)
    assert r["corr_H_g"] == pytest.approx(1.0)
    rand = r["gates"]["random"]
    assert rand["tokens"] == 2 and 0.0 <= rand["overlap"] <= 1.0
    assert rand["g_share"] == pytest.approx(rand["mean_g"] * 2 / (total / 10))
