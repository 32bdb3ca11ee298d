"""Prove an exported adapter in its runtime: logits(adapted) - logits(base) there vs. the same in PyTorch+PEFT.

Each `*_logits` function returns float32 arrays (positions, vocab) for the base and the adapted model on the
same token ids; `logit_agreement` compares two such deltas. Shortcut: one prompt, one forward pass per model
(no sampling); llama.cpp and mlx each load the base twice (with and without the adapter).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from rmx_local.adapter import LoraAdapter, save_peft
from rmx_local.archs import Shape, lookup
from rmx_local.models import resolve_model


def logit_agreement(delta: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Pearson correlation, max and RMS |difference| between two logits deltas, plus the reference's scale."""
    a, b = delta.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
    return {"corr": float(np.corrcoef(a, b)[0, 1]), "max_abs_diff": float(np.abs(a - b).max()),
            "rms_diff": float(np.sqrt(np.mean((a - b) ** 2))), "ref_max_abs": float(np.abs(b).max()),
            "ref_rms": float(np.sqrt(np.mean(b ** 2)))}


def peft_logits(hf_path: str, adapter: LoraAdapter, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(base, adapted) logits from transformers (fp32) with the adapter loaded by peft from a PEFT folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    x = torch.tensor([tokens])
    with torch.inference_mode():
        base = model(input_ids=x).logits[0].float().numpy()
        with tempfile.TemporaryDirectory() as tmp:
            peft_model = PeftModel.from_pretrained(model, save_peft(adapter, Path(tmp) / "peft"))
            adapted = peft_model(input_ids=x).logits[0].float().numpy()
    return base, adapted


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs to fd 2 from C; silence it for the load."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llama_cpp_model(base_gguf: str | Path, adapter_gguf: str | Path | None = None, n_ctx: int = 512,
                    logits_all: bool = False):
    from llama_cpp import Llama

    kwargs = {"lora_path": str(adapter_gguf)} if adapter_gguf else {}
    with _quiet_stderr():
        return Llama(model_path=str(base_gguf), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                     n_threads=max(1, min(4, os.cpu_count() or 1)), seed=0, **kwargs)


def llama_cpp_logits(base_gguf: str | Path, adapter_gguf: str | Path | None, tokens: list[int]) -> tuple[np.ndarray, float]:
    """(logits for every position, load seconds) from llama-cpp-python, with or without the LoRA GGUF."""
    start = time.perf_counter()
    llm = llama_cpp_model(base_gguf, adapter_gguf, n_ctx=max(64, len(tokens) + 8), logits_all=True)
    load_s = time.perf_counter() - start
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32), load_s
    finally:
        llm.close()


def mlx_logits(hf_path: str, mlx_dir: str | Path | None, tokens: list[int]) -> tuple[np.ndarray, float]:
    """(logits for every position, load seconds) from mlx-lm, the adapter (if any) loaded via adapter_path."""
    import mlx.core as mx
    from mlx_lm import load

    start = time.perf_counter()
    model, _ = load(hf_path, adapter_path=str(mlx_dir) if mlx_dir else None)
    load_s = time.perf_counter() - start
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32)), load_s


def random_adapter(model_config: dict, architecture: str, base_model: str = "", rank: int = 8, alpha: float = 16.0,
                   targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                   b_std: float = 0.02, seed: int = 0, layers: list[int] | None = None) -> LoraAdapter:
    """A LoRA with a visible effect (B ~ N(0, b_std), A ~ U(+-1/sqrt(in))), for runtime checks; `targets` are mapped
    to the architecture's own linears (phi3: q/k/v -> qkv_proj)."""
    arch, shape = lookup(architecture), Shape.from_config(model_config)
    wanted = arch.lora_targets(list(targets))
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in layers if layers is not None else range(shape.layers):
        for key in arch.linears:
            if key.rsplit(".", 1)[1] not in wanted:
                continue
            out_dim, in_dim = shape.linear(key)
            a = rng.uniform(-1, 1, size=(rank, in_dim)) / np.sqrt(in_dim)
            b = rng.normal(0.0, b_std, size=(out_dim, rank))
            weights[f"model.layers.{layer}.{key}"] = (a.astype(np.float32), b.astype(np.float32))
    return LoraAdapter(rank, alpha, sorted(wanted), base_model, architecture, shape.as_config(), weights)


PROBE = "Question: Tom has 17 apples and buys 23 more. How many apples does he have? Answer: Let's think step by step."


def base_setup(spec: str = "embedded:smollm2-135m-instruct", prompt: str = PROBE) -> dict:
    """Everything a runtime check needs about a base model: paths, architecture, model_config, probe tokens."""
    import json

    from transformers import AutoTokenizer

    source = resolve_model(spec)
    config = json.loads((Path(source.hf_path) / "config.json").read_text())
    tokens = AutoTokenizer.from_pretrained(source.hf_path)(prompt)["input_ids"]
    return {"spec": spec, "hf_path": source.hf_path, "gguf_path": source.gguf_path, "architecture": config["model_type"],
            "model_config": Shape.from_config(config).as_config(), "tokens": tokens}
