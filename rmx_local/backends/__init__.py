"""The backend seam: everything the pipeline needs from a deep-learning framework, and nothing more.

A backend owns one model (the frozen base plus an optional LoRA correction) and its tokenizer. It can
  - sample K completions per prompt                          (rollouts, evaluation)
  - score teacher-forced full-vocabulary entropies            (decision points), always on the base model
  - run the ReasonMaxxer loss forward/backward and step AdamW (training), base logits from the same
    model with the adapter switched off (no second copy of the weights)
  - hand its LoRA weights to / take them from the canonical `LoraAdapter`.

Token ids are plain Python lists; entropies are float32 numpy arrays. Implementations: `torch_backend`
(CPU, CUDA, MPS) and `mlx_backend` (Apple Silicon; Linux CPU for tests).
"""

from __future__ import annotations

from typing import Callable

from rmx_local.backends.base import (Backend, Progress, SampleParams, TrainExample, common_prefix, group_completions,
                                     pick_backend_name, strip_eos)
from rmx_local.errors import RmxError

__all__ = ["Backend", "Progress", "SampleParams", "TrainExample", "common_prefix", "group_completions", "load_backend",
           "pick_backend_name", "strip_eos"]


def load_backend(recipe, source, progress_note: Callable[[str], None] = lambda s: None) -> Backend:
    name = pick_backend_name(recipe.backend)
    if name == "torch":
        try:
            from rmx_local.backends.torch_backend import TorchBackend
        except ModuleNotFoundError as e:
            if e.name not in {"torch", "transformers", "peft"}:
                raise
            raise RmxError(f"backend torch needs PyTorch ({e})", fix="pip install torch transformers peft") from None
        return TorchBackend.load(source, recipe, progress_note)
    if name == "mlx":
        try:
            from rmx_local.backends.mlx_backend import MlxBackend
        except ImportError as e:
            raise RmxError(f"backend mlx needs mlx and mlx-lm ({e})", fix='pip install "mlx[cpu]" mlx-lm  (on a Mac: pip install mlx mlx-lm)') from None
        return MlxBackend.load(source, recipe, progress_note)
    raise RmxError(f"unknown backend {name!r}", fix='use backend = "torch", "mlx" or "auto"')
