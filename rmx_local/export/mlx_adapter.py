"""MLX adapter folder (mlx-lm) <-> canonical adapter.

`mlx_lm.load(base, adapter_path=DIR)` reads DIR/adapter_config.json (fine_tune_type, num_layers = how many
of the *last* blocks get LoRA layers, lora_parameters {rank, scale, dropout, keys}) and DIR/adapters.safetensors
with `model.layers.N.<key>.lora_a` of shape (in, r) and `.lora_b` of shape (r, out): PEFT's A and B transposed.
mlx-lm computes y + scale * (x @ lora_a) @ lora_b, so `scale = alpha / r`.

Shortcut: mlx-lm applies one key set to every converted block; blocks or keys the adapter does not cover get
LoRA layers with lora_b = 0 (no effect), which is harmless. An `rmx_local` entry in the config keeps the exact
alpha, base name and model config for an exact read-back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rmx_local.adapter import LoraAdapter
from rmx_local.errors import RmxError
from rmx_local.export.common import check_fits
from rmx_local.io import atomic_dir

WEIGHTS, CONFIG = "adapters.safetensors", "adapter_config.json"


def write_mlx_adapter(adapter: LoraAdapter, out_dir: str | Path) -> Path:
    """Write an mlx-lm adapter folder (atomically); return it."""
    from safetensors.numpy import save_file

    parsed = check_fits(adapter, "export mlx")  # every architecture in rmx_local.archs has an mlx-lm module
    n_layers = adapter.model_config.get("num_hidden_layers") or 1 + max(layer for layer, _ in parsed.values())
    first = min(layer for layer, _ in parsed.values())
    tensors = {}
    for module, (a, b) in adapter.weights.items():
        tensors[f"{module}.lora_a"] = np.ascontiguousarray(a.T, dtype=np.float32)
        tensors[f"{module}.lora_b"] = np.ascontiguousarray(b.T, dtype=np.float32)
    config = {
        "fine_tune_type": "lora",
        "model": adapter.base_model,
        "num_layers": n_layers - first,
        "lora_parameters": {"rank": adapter.rank, "scale": adapter.scale, "dropout": 0.0,
                            "keys": sorted({key for _, key in parsed.values()})},
        "rmx_local": {"alpha": adapter.alpha, "targets": adapter.targets, "base_model": adapter.base_model,
                      "architecture": adapter.architecture, "model_config": adapter.model_config},
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "mlx"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return Path(out_dir)


def read_mlx_adapter(folder: str | Path) -> LoraAdapter:
    """Read an mlx-lm LoRA adapter folder back into the canonical form."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise RmxError(f"{folder}: no MLX adapter here (need {CONFIG} + {WEIGHTS})",
                       fix="export it first with `rmx-local export RUN_DIR --format mlx`")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("fine_tune_type", "lora") != "lora":
        raise RmxError(f"{folder / CONFIG}: fine_tune_type {config['fine_tune_type']!r} is not a LoRA",
                       fix="only LoRA adapters (not DoRA or full fine-tunes) can be read")
    params = config.get("lora_parameters") or {}
    if "rank" not in params or "scale" not in params:
        raise RmxError(f"{folder / CONFIG}: lora_parameters needs rank and scale", fix="re-export the adapter")
    extra = config.get("rmx_local", {})
    pairs: dict[str, list] = {}
    for key, value in load_file(str(folder / WEIGHTS)).items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise RmxError(f"{folder / WEIGHTS}: unexpected tensor {key!r}", fix="only LoRA tensors are supported")
        pairs.setdefault(module, [None, None])[leaf == "lora_b"] = np.ascontiguousarray(value.T, dtype=np.float32)
    for module, (a, b) in pairs.items():
        if a is None or b is None:
            raise RmxError(f"{folder / WEIGHTS}: {module} has only one of lora_a / lora_b", fix="re-export the adapter")
    rank = int(params["rank"])
    adapter = LoraAdapter(
        rank=rank, alpha=float(extra.get("alpha", params["scale"] * rank)),
        targets=extra.get("targets") or sorted({m.rsplit(".", 1)[1] for m in pairs}),
        base_model=extra.get("base_model", config.get("model", "")),
        architecture=extra.get("architecture", ""), model_config=extra.get("model_config", {}),
        weights={m: (p[0], p[1]) for m, p in sorted(pairs.items())})
    adapter.validate()
    return adapter
