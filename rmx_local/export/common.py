"""Checks shared by every exporter: which architectures and modules a format can express, and shapes.

Shortcut: only decoder-only llama / qwen2 style models are supported (their seven linear projections per
block). Embeddings and lm_head are refused everywhere: a math-reasoning correction never needs them, and
llama.cpp ties them on small models, where an adapter on `output` would be silently ignored.
"""

from __future__ import annotations

import re

from rmx_local.adapter import LoraAdapter
from rmx_local.errors import RmxError

# HF model_type -> (GGUF architecture name, whether llama.cpp permutes q/k rows for its rope layout)
SUPPORTED_ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False)}

# the linear layers of one decoder block, relative to `model.layers.N.`
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_MODULE_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_NEVER = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


def check_arch(adapter: LoraAdapter, fmt: str) -> tuple[str, bool]:
    """Return (gguf architecture, permute q/k?) or refuse an architecture we cannot export."""
    arch = adapter.architecture
    if arch not in SUPPORTED_ARCHS:
        got = repr(arch) if arch else "no architecture recorded"
        raise RmxError(f"export {fmt}: unsupported model architecture {got}",
                       fix=f"rmx-local exports {', '.join(sorted(SUPPORTED_ARCHS))} models; use the PEFT export "
                           "(--format peft) for others")
    return SUPPORTED_ARCHS[arch]


def split_module(module: str, fmt: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'); refuse anything else."""
    if any(part in module for part in _NEVER):
        raise RmxError(f"export {fmt}: adapter targets {module!r} (embeddings / lm_head)",
                       fix="retrain without embed_tokens / lm_head in train.targets; they are never exported")
    m = _MODULE_RE.fullmatch(module)
    if not m or m.group(2) not in BLOCK_LINEARS:
        raise RmxError(f"export {fmt}: target module {module!r} cannot be expressed in this format",
                       fix=f"only the block projections ({', '.join(s.rsplit('.', 1)[1] for s in BLOCK_LINEARS)}) "
                           "can be exported; retrain with train.targets limited to them")
    return int(m.group(1)), m.group(2)


def expected_shape(module_key: str, cfg: dict) -> tuple[int | None, int | None]:
    """(out, in) of a block linear implied by the model config; None where the config does not say."""
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    inter = cfg.get("intermediate_size")
    q_out = heads * head_dim if heads and head_dim else None
    kv_out = kv * head_dim if kv and head_dim else None
    return {
        "self_attn.q_proj": (q_out, hidden), "self_attn.k_proj": (kv_out, hidden),
        "self_attn.v_proj": (kv_out, hidden), "self_attn.o_proj": (hidden, q_out),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }[module_key]


def check_adapter(adapter: LoraAdapter, fmt: str) -> dict[str, tuple[int, str]]:
    """Validate ranks, module names and shapes against the model config; return module -> (layer, key)."""
    adapter.validate()
    if not adapter.weights:
        raise RmxError(f"export {fmt}: the adapter has no weights", fix="retrain; the run saved an empty adapter")
    n_layers = adapter.model_config.get("num_hidden_layers")
    parsed = {}
    for module, (a, b) in adapter.weights.items():
        layer, key = split_module(module, fmt)
        if n_layers is not None and layer >= n_layers:
            raise RmxError(f"export {fmt}: {module} is beyond the model's {n_layers} layers",
                           fix="the adapter belongs to another base model; export it with that model's recipe")
        out_dim, in_dim = expected_shape(key, adapter.model_config)
        if (out_dim and b.shape[0] != out_dim) or (in_dim and a.shape[1] != in_dim):
            raise RmxError(f"export {fmt}: {module} has A{tuple(a.shape)} B{tuple(b.shape)}, but the base model "
                           f"needs a ({out_dim}, {in_dim}) delta",
                           fix="the adapter belongs to another base model; export it with that model's recipe")
        parsed[module] = (layer, key)
    return parsed


def rope_permute(b, n_head: int, inverse: bool = False):
    """Reorder the output rows of a q/k lora_B the way llama.cpp reorders q_proj/k_proj weights for rope.

    HF stores each head's rotary dims as [first half | second half]; GGUF llama interleaves them in pairs.
    lora_A (input side) is untouched. `inverse` undoes it (GGUF -> HF).
    """
    out, rank = b.shape
    half = out // n_head // 2
    if out % (n_head * 2):
        raise RmxError(f"export gguf: {out} rows do not split into {n_head} rotary heads",
                       fix="model_config head counts do not match the adapter; re-save the adapter from its run")
    shape = (n_head, half, 2, rank) if inverse else (n_head, 2, half, rank)
    return b.reshape(shape).swapaxes(1, 2).reshape(out, rank)
