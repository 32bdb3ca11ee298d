"""GGUF LoRA adapter (llama.cpp / Ollama) <-> canonical adapter, written with the `gguf` package.

Layout llama.cpp's adapter loader expects: general.type=adapter, adapter.type=lora, adapter.lora.alpha
(float32), general.architecture equal to the base's, and for each base tensor `blk.N.<name>.weight` two
tensors `.lora_a` (PEFT's A, numpy (r, in), ggml ne [in, r]) and `.lora_b` (PEFT's B, (out, r)), untransposed.
Where llama.cpp's converter rope-permutes the base's q/k rows (`rmx_local.archs`: llama, mistral, granite,
smollm3) the rows of the q/k lora_b are permuted the same way (k with the KV head count). Tensor names come from
gguf-py's own per-architecture tensor map (phi3's fused qkv_proj -> attn_qkv, gate_up_proj -> ffn_up).

Output types: f32, f16, bf16, q8_0. Shortcut (as llama.cpp's converter does): a q8_0 tensor whose rows
are not a multiple of 32 values (lora_b rows are `rank` long) is written as f16 instead.
An `rmx_local.adapter` JSON key carries what llama.cpp does not need (exact alpha, base name, model config)
so that reading the file back gives the very same canonical adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rmx_local.adapter import LoraAdapter
from rmx_local.archs import Arch, Shape, by_gguf, lookup
from rmx_local.errors import RmxError
from rmx_local.export.common import check_fits, permuted_heads, rope_permute
from rmx_local.io import temp_path
from rmx_local.recipe import GGUF_OUTTYPES

OUTTYPES = GGUF_OUTTYPES
EXTRA_KEY = "rmx_local.adapter"


def _qtypes():
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


def _encode(array: np.ndarray, outtype: str):
    """Return (data, raw_dtype or None) for GGUFWriter.add_tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    array = np.ascontiguousarray(array, dtype=np.float32)
    if outtype == "q8_0" and array.shape[-1] % 32:
        outtype = "f16"
    if outtype == "f32":
        return array, None
    if outtype == "f16":
        return array.astype(np.float16), None
    qtype = Q.BF16 if outtype == "bf16" else Q.Q8_0
    return quantize(array, qtype), qtype


def _tensor_map(arch: Arch, n_blocks: int):
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch.gguf not in by_name:
        raise RmxError(f"export gguf: the installed gguf package does not know architecture {arch.gguf!r}",
                       fix="pip install -U gguf llama-cpp-python")
    return gguf.get_tensor_name_map(by_name[arch.gguf], n_blocks)


def tensor_names(arch: Arch, n_blocks: int) -> dict[str, str]:
    """HF module ('model.layers.N.self_attn.q_proj') -> GGUF base tensor ('blk.N.attn_q.weight'), every block linear."""
    tmap = _tensor_map(arch, n_blocks)
    names = {}
    for layer in range(n_blocks):
        for key in arch.linears:
            module = f"model.layers.{layer}.{key}"
            name = tmap.get_name(module)
            if name is None:
                raise RmxError(f"export gguf: gguf-py has no {arch.gguf} tensor for {module!r}",
                               fix="retrain with train.targets limited to the attention projections")
            names[module] = name + ".weight"
    return names


def write_gguf_adapter(adapter: LoraAdapter, path: str | Path, outtype: str = "f16") -> Path:
    """Write `adapter` as a llama.cpp LoRA GGUF at `path` (atomically); return the path."""
    import gguf

    if outtype not in OUTTYPES:
        raise RmxError(f"export gguf: unknown outtype {outtype!r}", fix=f"use one of {', '.join(OUTTYPES)}")
    parsed = check_fits(adapter, "export gguf")
    arch, shape = lookup(adapter.architecture), Shape.from_config(adapter.model_config)
    names = tensor_names(arch, shape.layers)
    path = Path(path)
    tmp = temp_path(path)  # umask permissions: llama.cpp / Ollama servers may run as another user
    try:
        writer = gguf.GGUFWriter(str(tmp), arch.gguf)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
        writer.add_name(f"{adapter.base_model or 'base'} rmx-local LoRA")
        if adapter.base_model:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, adapter.base_model)
        writer.add_string(EXTRA_KEY, json.dumps({
            "alpha": adapter.alpha, "rank": adapter.rank, "targets": adapter.targets, "base_model": adapter.base_model,
            "architecture": adapter.architecture, "model_config": adapter.model_config}, sort_keys=True))
        for module in sorted(adapter.weights, key=lambda m: (parsed[m][0], arch.linears.index(parsed[m][1]))):
            a, b = adapter.weights[module]
            heads = permuted_heads(arch, parsed[module][1], shape)
            if heads:
                b = rope_permute(b, heads)
            for suffix, tensor in (("lora_a", a), ("lora_b", b)):
                data, raw = _encode(tensor, outtype)
                writer.add_tensor(f"{names[module]}.{suffix}", data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_gguf_adapter(path: str | Path, model_config: dict | None = None) -> LoraAdapter:
    """Read a GGUF LoRA adapter back into the canonical form (dequantizing f16/bf16/q8_0 to float32).

    Files written elsewhere lack the `rmx_local.adapter` key: then pass the base's config.json as `model_config`
    (permuted architectures need its head counts to undo the rope permutation); targets and rank are read from the
    tensors.
    """
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise RmxError(f"{path}: GGUF adapter not found", fix="export it first with `rmx-local export RUN_DIR --format gguf`")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise RmxError(f"{path}: not a readable GGUF file ({e})", fix="re-export the adapter") from None
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise RmxError(f"{path}: not a LoRA adapter GGUF (general.type={fields.get('general.type')!r})",
                       fix="point at the adapter file, not the base model")
    gguf_arch = fields.get("general.architecture")
    extra = json.loads(fields[EXTRA_KEY]) if EXTRA_KEY in fields else {}
    cfg = extra.get("model_config") or model_config or {}
    known = by_gguf(gguf_arch)
    arch = lookup(extra.get("architecture") or cfg.get("model_type") or (known.model_type if known else gguf_arch),
                  str(path))
    tensors = {t.name: dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
               for t in reader.tensors}
    n_blocks = cfg.get("num_hidden_layers") or 1 + max(int(n.split(".")[1]) for n in tensors)
    reverse = {v: k for k, v in tensor_names(arch, n_blocks).items()}
    shape = Shape.from_config(cfg) if cfg.get("num_attention_heads") else None
    weights = {}
    for name in sorted(tensors):
        if not name.endswith(".lora_a"):
            continue
        base = name.removesuffix(".lora_a")
        if base not in reverse or base + ".lora_b" not in tensors:
            raise RmxError(f"{path}: unexpected tensor {name!r}", fix="only block projection LoRA tensors are supported")
        module = reverse[base]
        a, b = tensors[name].astype(np.float32), tensors[base + ".lora_b"].astype(np.float32)
        key = module.split(".", 3)[3]
        if arch.permute_qk and key in ("self_attn.q_proj", "self_attn.k_proj"):
            if shape is None:
                raise RmxError(f"{path}: a {arch.model_type} adapter without head counts",
                               fix="pass the base model's config.json as model_config")
            b = rope_permute(b, permuted_heads(arch, key, shape), inverse=True)
        weights[module] = (a, np.ascontiguousarray(b))
    if not weights:
        raise RmxError(f"{path}: the adapter holds no LoRA tensors", fix="re-export the adapter")
    rank = int(next(iter(weights.values()))[0].shape[0])
    adapter = LoraAdapter(
        rank=int(extra.get("rank", rank)), alpha=float(extra.get("alpha", fields.get("adapter.lora.alpha", rank))),
        targets=extra.get("targets") or sorted({m.rsplit(".", 1)[1] for m in weights}),
        base_model=extra.get("base_model", fields.get("general.base_model.0.name", "")),
        architecture=arch.model_type, model_config=shape.as_config() if shape and "model_type" in cfg else cfg, weights=weights)
    adapter.validate()
    return adapter


def gguf_adapter_base(path: str | Path) -> str:
    """The base model name a GGUF adapter records (general.base_model.0.name, written by `write_gguf_adapter`), or ""."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    return fields["general.base_model.0.name"].contents() if "general.base_model.0.name" in fields else ""
