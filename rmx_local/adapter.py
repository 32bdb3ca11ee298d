"""The one canonical in-memory LoRA adapter. Every exporter is a pure function of it; every importer returns one.

Orientation is PEFT's: for a target linear layer W (out, in), `A` is (r, in) and `B` is (out, r), and the
weight delta is  dW = (alpha / r) * B @ A.  Module names are the transformers module paths of the base
model, e.g. "model.layers.3.self_attn.q_proj". Tensors are float32 numpy arrays.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rmx_local.archs import Shape
from rmx_local.errors import RmxError
from rmx_local.io import atomic_dir

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraAdapter:
    rank: int
    alpha: float
    targets: list[str]  # short names: q_proj, k_proj, ...
    base_model: str  # what the user named (recipe `model`)
    architecture: str  # HF model_type: llama, qwen2, ...
    model_config: dict  # the base's Shape as config keys (archs.Shape.as_config): layers, heads, kv heads, head_dim, ...
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # module -> (A, B)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, module: str) -> np.ndarray:
        a, b = self.weights[module]
        return self.scale * (b.astype(np.float64) @ a.astype(np.float64))

    def validate(self) -> None:
        for name, (a, b) in self.weights.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != self.rank or b.shape[1] != self.rank:
                raise RmxError(
                    f"adapter: {name} has A{tuple(a.shape)} B{tuple(b.shape)}, inconsistent with rank {self.rank}",
                    fix="the adapter file is damaged or from another model; retrain or re-export it",
                )


def model_facts(cfg) -> dict:
    """The model's whole shape (`rmx_local.archs.Shape`: layers, heads, kv heads, head_dim, intermediate size) as
    config keys, from a transformers config or mlx-lm model args; stored with every adapter."""
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size")
    return Shape.from_config({k: getattr(cfg, k, None) for k in keys}).as_config()


# ---- PEFT format (adapter_model.safetensors + adapter_config.json) ----

def save_peft(adapter: LoraAdapter, out_dir: str | Path) -> Path:
    """Write a PEFT LoRA folder that `peft.PeftModel.from_pretrained(base, out_dir)` loads."""
    from safetensors.numpy import save_file

    adapter.validate()
    tensors = {}
    for name, (a, b) in adapter.weights.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(adapter.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": adapter.base_model,
        "inference_mode": True,
    }
    extra = {"architecture": adapter.architecture, "model_config": adapter.model_config}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / "rmx_local.json").write_text(json.dumps(extra, indent=2))  # beside, not inside: PEFT warns on unknown keys
    return Path(out_dir)


def load_peft(folder: str | Path) -> LoraAdapter:
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg_path, st_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not st_path.is_file():
        raise RmxError(f"{folder}: no PEFT adapter here (need adapter_config.json + adapter_model.safetensors)",
                       fix="point at a run's adapter/ folder, or finish the run with `rmx-local run`")
    config = json.loads(cfg_path.read_text())
    extra = json.loads((folder / "rmx_local.json").read_text()) if (folder / "rmx_local.json").is_file() else {}
    raw = load_file(str(st_path))
    weights: dict[str, list] = {}
    for key, value in raw.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if not m:
            raise RmxError(f"{st_path}: unexpected tensor {key!r}", fix="only LoRA A/B tensors are supported")
        slot = weights.setdefault(m.group(1), [None, None])
        slot[0 if m.group(2) == "A" else 1] = value.astype(np.float32)
    targets = config["target_modules"]
    adapter = LoraAdapter(
        rank=int(config["r"]), alpha=float(config["lora_alpha"]),
        targets=sorted(targets) if isinstance(targets, list) else [targets],
        base_model=config.get("base_model_name_or_path") or "",
        architecture=extra.get("architecture", ""), model_config=extra.get("model_config", {}),
        weights={k: (v[0], v[1]) for k, v in sorted(weights.items())},
    )
    adapter.validate()
    return adapter
