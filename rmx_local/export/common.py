"""The one check that an adapter fits a base model, shared by every exporter and by `eval` / `chat` targets.

Architecture facts (GGUF names, q/k permutation, fused projections) come from `rmx_local.archs`. Embeddings and
lm_head are refused everywhere: a math-reasoning correction never needs them, and llama.cpp ties them on small
models, where an adapter on `output` would be silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

from rmx_local.adapter import LoraAdapter
from rmx_local.archs import NEVER, Arch, Shape, lookup
from rmx_local.errors import RmxError
from rmx_local.io import read_json
from rmx_local.models import model_summary

_MODULE_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def split_module(module: str, arch: Arch, where: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'); refuse anything else."""
    if any(part in module for part in NEVER):
        raise RmxError(f"{where}: adapter targets {module!r} (embeddings / lm_head)",
                       fix="retrain without embed_tokens / lm_head in train.targets; they are never exported")
    m = _MODULE_RE.fullmatch(module)
    if not m or m.group(2) not in arch.linears:
        raise RmxError(f"{where}: target module {module!r} is not a block projection of a {arch.model_type} model",
                       fix=f"retrain with train.targets among {', '.join(k.rsplit('.', 1)[1] for k in arch.linears)}")
    return int(m.group(1)), m.group(2)


def check_fits(adapter: LoraAdapter, where: str, base_config: dict | None = None,
               base_name: str = "the base model") -> dict[str, tuple[int, str]]:
    """Validate an adapter against a base (its config.json), or against its own stored shape when none is given.

    Checks: weights present, ranks consistent, architecture in the table (and equal to the base's), every module a
    block projection within the layer count, every A/B shape the one the base implies. Returns module -> (layer, key).
    """
    adapter.validate()
    if not adapter.weights:
        raise RmxError(f"{where}: the adapter has no weights", fix="retrain; the run saved an empty adapter")
    fix = "use the base it was trained on (the run's recipe.toml `model`, or --base MODEL)"
    if base_config is not None:
        base_type = (base_config.get("text_config") or base_config).get("model_type", base_config.get("model_type"))
        if adapter.architecture and base_type and adapter.architecture != base_type:
            raise RmxError(f"{where}: adapter made for a {adapter.architecture} model, but {base_name} is "
                           f"{base_type!r}", fix=fix)
        arch = lookup(adapter.architecture or base_type or "", where)
        shape = Shape.from_config(base_config)
    else:
        arch = lookup(adapter.architecture, where)
        shape = Shape.from_config(adapter.model_config)
    parsed = {}
    for module, (a, b) in adapter.weights.items():
        layer, key = split_module(module, arch, where)
        out_dim, in_dim = shape.linear(key)
        if layer >= shape.layers or (out_dim and b.shape[0] != out_dim) or (in_dim and a.shape[1] != in_dim):
            raise RmxError(f"{where}: adapter made for another base: {module} is A{tuple(a.shape)} B{tuple(b.shape)}, "
                           f"{base_name} has {shape.layers} layers and a ({out_dim}, {in_dim}) {key}", fix=fix)
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


def permuted_heads(arch: Arch, key: str, shape: Shape) -> int | None:
    """How many rotary heads the rows of this key's lora_B are permuted over in GGUF (None: not permuted)."""
    if not arch.permute_qk:
        return None
    return {"self_attn.q_proj": shape.heads, "self_attn.k_proj": shape.kv_heads}.get(key)


def check_same_base(adapter: LoraAdapter, hf_path: str, label: str) -> None:
    """Refuse an adapter whose shape differs from the base model (folder `hf_path`) it is exported for."""
    config = Path(hf_path) / "config.json"
    if config.is_file() and adapter.model_config:
        check_fits(adapter, "export", read_json(config), label)


def complete_from_base(adapter: LoraAdapter, hf_path: str) -> LoraAdapter:
    """Fill in architecture / model_config from the base's config.json when the adapter lacks them."""
    needed = ("num_attention_heads", "hidden_size", "num_hidden_layers")
    if adapter.architecture and all(k in adapter.model_config for k in needed):
        return adapter
    info = model_summary(hf_path)
    adapter.architecture = adapter.architecture or info.pop("model_type")
    info.pop("model_type", None)
    adapter.model_config = {**info, **adapter.model_config}
    return adapter
