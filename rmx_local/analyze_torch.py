"""`rmx-local analyze` on PyTorch: the base / teacher pair as a `PairStepper`, and loading it for a resolved target.

When the teacher is a LoRA adapter of the base (a run folder, a PEFT folder), one model serves both sides: the
base logits come from a forward with the adapter switched off, the teacher's with it on, each side with its own
KV cache (the two caches differ: the adapter changes keys and values). A full-model teacher is a second model.
Each distinct prompt of a batch is prefilled once and its cache copied to the rows (one per policy) that share it.
Shortcut: prompts are left-padded with explicit position ids; no shared-preamble trick as in the sampler.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from rmx_local.backends import load_backend
from rmx_local.backends.torch_sampling import _cache_io
from rmx_local.errors import RmxError
from rmx_local.models import resolve_model
from rmx_local.recipe import Recipe


class TorchPairStepper:
    """`sides`: two (model, context factory) pairs, base first; the context switches an adapter off or on."""

    def __init__(self, sides, pad_id: int, device: str):
        self.sides, self.pad_id, self.device = sides, pad_id, device
        self.io = [_cache_io(model) for model, _ in sides]

    def _forward(self, k: int, **inputs):
        model, ctx = self.sides[k]
        kw, cache_of = self.io[k]
        with torch.inference_mode(), ctx():
            out = model(use_cache=True, logits_to_keep=1, **{kw: self.caches[k]}, **inputs)
        self.caches[k] = cache_of(out)
        return out.logits[:, -1].float().cpu().numpy()

    def start(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        unique = list(dict.fromkeys(map(tuple, prompts)))
        expand = torch.tensor([unique.index(tuple(p)) for p in prompts], device=self.device)
        width = max(map(len, unique))
        ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((len(unique), width), dtype=torch.long)
        mask = torch.zeros((len(unique), width), dtype=torch.long)
        for i, p in enumerate(unique):
            ids[i, width - len(p) :] = torch.tensor(p)
            pos[i, width - len(p) :] = torch.arange(len(p))
            mask[i, width - len(p) :] = 1
        self.caches = [None, None]
        inputs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos.to(self.device))
        logits = [self._forward(k, **inputs)[expand.cpu().numpy()] for k in range(2)]
        for cache in self.caches:
            cache.batch_select_indices(expand)
        self.mask = mask.to(self.device)[expand]
        self.next_pos = torch.tensor([len(p) for p in prompts], device=self.device)
        return logits[0], logits[1]

    def advance(self, keep: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(keep) < len(self.mask):
            idx = torch.as_tensor(keep, device=self.device)
            for cache in self.caches:
                cache.batch_select_indices(idx)
            self.mask, self.next_pos = self.mask[idx], self.next_pos[idx]
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.mask), 1))], dim=1)
        inputs = dict(input_ids=torch.as_tensor(tokens, device=self.device)[:, None], attention_mask=self.mask,
                      position_ids=self.next_pos[:, None])
        logits = [self._forward(k, **inputs) for k in range(2)]
        self.next_pos = self.next_pos + 1
        return logits[0], logits[1]


def load_pair(base_spec: str, target, device: str = "auto", note=lambda s: None):
    """(stepper, tokenizer, eos ids, description) for BASE and a resolved TEACHER (`rmx_local.targets.Target`).

    An adapter teacher (run, PEFT folder, GGUF adapter read back) shares the base's weights; a model teacher is
    loaded beside it and must share its vocabulary."""
    from transformers import AutoModelForCausalLM

    recipe = Recipe(model=base_spec, backend="torch", device=device, dtype="float32")
    backend = load_backend(recipe, resolve_model(base_spec), note)
    if target.adapter is not None:
        backend.set_adapter(target.adapter)
        backend.set_adapter_enabled(True)
        m = backend.model
        sides = [(m, m.disable_adapter), (m, contextlib.nullcontext)]
        what = f"{target.spec} ({target.kind} adapter on {base_spec}, one model, adapter off / on)"
    else:
        source = resolve_model(target.base_spec)
        note(f"loading teacher {source.hf_path}")
        teacher = AutoModelForCausalLM.from_pretrained(source.hf_path, dtype=torch.float32).to(backend.device).eval()
        if teacher.config.vocab_size != backend.model.config.vocab_size:
            raise RmxError(f"analyze: teacher {target.spec!r} has a {teacher.config.vocab_size}-token vocabulary, the base "
                           f"{backend.model.config.vocab_size}", fix="compare two models that share a tokenizer")
        sides = [(backend.model, contextlib.nullcontext), (teacher, contextlib.nullcontext)]
        what = f"{target.spec} vs {base_spec} (two models)"
    return TorchPairStepper(sides, backend.pad_id, backend.device), backend.tokenizer, backend.eos_ids, what
