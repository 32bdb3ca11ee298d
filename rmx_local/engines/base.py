"""What every rollout engine shares (see the package docstring): the RolloutEngine protocol, the per-completion seed,
and turning a server's completion text back into training-tokenizer ids."""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from rmx_local.backends import Progress, SampleParams


class RolloutEngine(Protocol):
    name: str

    def sample(self, prompts: list[str], prompt_ids: list[list[int]], params: SampleParams,
               progress: Progress | None = None) -> list[list[list[int]]]:
        """For each prompt, params.n completions as TRAINING-tokenizer ids (EOS stripped)."""


def derive_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 31-bit seed for one completion (31 bits: llama.cpp treats 0xFFFFFFFF as 'random')."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def eos_texts(tokenizer: Any) -> list[str]:
    """The text of the tokenizer's EOS token, sent as a stop string and stripped from completions."""
    eos = getattr(tokenizer, "eos_token", None)
    return [eos] if eos else []


def retokenize(tokenizer: Any, text: str, stops: list[str] = ()) -> list[int]:
    """Completion text -> training-tokenizer ids, with a trailing stop/EOS text removed if a server left it in."""
    for stop in stops:
        if stop and text.endswith(stop):
            text = text[: -len(stop)]
            break
    return tokenizer.encode(text, add_special_tokens=False) if text else []
