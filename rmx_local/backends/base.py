"""The types every backend shares (see the package docstring): the Backend protocol, sampling parameters, training
examples, and small token helpers; light (numpy only), so engines and stages import it without loading a framework.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from rmx_local.adapter import LoraAdapter


@dataclass
class TrainExample:
    tokens: list[int]  # prompt + completion
    prompt_len: int
    gate: np.ndarray  # (len(tokens) - prompt_len,) bool: decision points among completion tokens
    advantage: float


@dataclass
class SampleParams:
    n: int
    temperature: float  # 0 = greedy
    top_p: float
    max_tokens: int
    seed: int


Progress = Callable[[int], None]  # called with the number of new tokens produced


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all prompts, leaving at least one token of each after it."""
    shortest = min(map(len, prompts))
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def strip_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    """Cut a completion at its first end-of-sequence token (the token itself dropped)."""
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[:i]
    return row


def group_completions(flat: list[list[int]], n_prompts: int, params: "SampleParams") -> list[list[list[int]]]:
    """Flat completions (prompt-major) -> per prompt; a greedy decode (one per prompt) is repeated n times."""
    per = len(flat) // max(n_prompts, 1)
    grouped = [flat[i * per : (i + 1) * per] for i in range(n_prompts)]
    return [g * params.n for g in grouped] if params.temperature == 0 and params.n > 1 else grouped


class Backend(Protocol):
    name: str
    tokenizer: Any  # a transformers tokenizer (encode/decode/chat template)

    def generate(self, prompts: list[list[int]], params: SampleParams, progress: Progress | None = None) -> list[list[list[int]]]:
        """For each prompt, `params.n` completions (token ids, EOS stripped), using the current adapter state."""

    def entropies(self, sequences: list[tuple[list[int], int]]) -> list[np.ndarray]:
        """Base-model entropy (nats) of the distribution predicting each completion token of (tokens, prompt_len)."""

    def init_lora(self, rank: int, alpha: float, dropout: float, targets: list[str], seed: int) -> None: ...

    def set_adapter_enabled(self, enabled: bool) -> None: ...

    def accumulate(self, batch: list[TrainExample], kl_coef: float, negative_ce_cap: float, scale: float) -> dict[str, float]:
        """Forward + backward of the loss on `batch`; gradients (times `scale`) add up until `step`."""

    def step(self, lr: float, weight_decay: float, grad_clip: float) -> float:
        """AdamW step on the accumulated gradients, then zero them; returns the pre-clip gradient norm."""

    def get_adapter(self) -> LoraAdapter: ...

    def set_adapter(self, adapter: LoraAdapter) -> None: ...

    def save_optimizer(self, path: str) -> None: ...

    def load_optimizer(self, path: str) -> None: ...


def pick_backend_name(name: str) -> str:
    if name == "auto":
        return "mlx" if platform.system() == "Darwin" and platform.machine() == "arm64" else "torch"
    return name
