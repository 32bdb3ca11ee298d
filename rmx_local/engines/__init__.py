"""Rollout engines: who samples the K completions per problem from the frozen base model.

Rollout generation is the dominant cost of a run, and it only needs the *frozen* base, so it need not run in
the training framework:

  backend    the training backend's own `generate` (torch / mlx); the only engine that sees a LoRA correction
  llama_cpp  llama.cpp in-process on the model's GGUF (`llama-cpp-python`); fastest on a CPU at small batches
  openai     any OpenAI-compatible `/v1/completions` server (vLLM, llama.cpp server, ...), possibly remote
  auto       llama_cpp when the model has a GGUF, no CUDA/MPS device is present and llama_cpp imports;
             otherwise backend

Every engine returns, for each prompt, `params.n` completions as ids of the *training* tokenizer with EOS
stripped, so the rest of the pipeline never knows which engine ran. Text engines (llama_cpp, openai)
re-tokenize the completion text with `tokenizer.encode(text, add_special_tokens=False)`; the prompt ids are
always the caller's `prompt_ids`, unchanged.

Sampling semantics shared by the text engines: temperature 0 is greedy (one completion, repeated n times);
otherwise plain temperature + top-p sampling (no top-k, min-p or repetition penalty). Completion j of prompt i
uses the seed `derive_seed(params.seed, i, j)`, so results do not depend on how an engine batches sequences
(they do depend on the prompt's index within the call: pass a per-group `params.seed` for group-independent
results).
"""

from __future__ import annotations

from typing import Any, Callable

from rmx_local.backends import Backend, Progress, SampleParams
from rmx_local.engines.base import RolloutEngine, derive_seed, eos_texts, retokenize
from rmx_local.engines.llama_cpp_engine import LlamaCppEngine
from rmx_local.engines.openai_engine import OpenAIEngine
from rmx_local.errors import RmxError

__all__ = ["ENGINES", "LLAMA_CPP_MAX_PARALLEL", "BackendEngine", "LlamaCppEngine", "OpenAIEngine", "RolloutEngine",
           "derive_seed", "eos_texts", "has_accelerator", "llama_cpp_importable", "make_engine", "pick_engine_name",
           "retokenize"]

ENGINES = ("backend", "llama_cpp", "openai", "auto")
LLAMA_CPP_MAX_PARALLEL = 32  # measured on 2 cores, 55 brief prompts x 8 x 64 tokens: 88 tok/s at 16, 84 at 32


class BackendEngine:
    """The training backend's own sampler; the backend is created on first use only."""

    name = "backend"

    def __init__(self, backend_factory: Callable[[], Backend]):
        self._factory = backend_factory
        self._backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._factory()
        return self._backend

    def sample(self, prompts: list[str], prompt_ids: list[list[int]], params: SampleParams,
               progress: Progress | None = None) -> list[list[list[int]]]:
        return self.backend.generate(prompt_ids, params, progress)


def has_accelerator() -> bool:
    """CUDA or MPS visible to torch (imported only here, and only for engine = "auto")."""
    try:
        import torch
    except ImportError:
        return False
    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available() or (mps is not None and mps.is_available()))


def llama_cpp_importable() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # ImportError, or OSError from a broken shared library
        return False
    return True


def pick_engine_name(name: str, source: Any) -> str:
    if name != "auto":
        return name
    if source.gguf_path and not has_accelerator() and llama_cpp_importable():
        return "llama_cpp"
    return "backend"


def make_engine(recipe: Any, source: Any, tokenizer: Any, backend_factory: Callable[[], Backend]) -> RolloutEngine:
    """The rollout engine the recipe asks for (`[rollout] engine`); nothing heavy is loaded until `sample`."""
    name = pick_engine_name(recipe.rollout.engine, source)
    if name == "backend":
        return BackendEngine(backend_factory)
    if name == "llama_cpp":
        if not source.gguf_path:
            raise RmxError(f'rollout.engine = "llama_cpp" needs a GGUF model, and {source.spec!r} has none',
                           fix='point `model` at a .gguf file (or a folder holding one), or set rollout.engine = "backend"')
        if not llama_cpp_importable():
            raise RmxError('rollout.engine = "llama_cpp" needs llama-cpp-python',
                           fix='pip install llama-cpp-python  (or set rollout.engine = "backend")')
        # batching gains on a CPU are modest while KV memory grows with every slot
        parallel = min(recipe.rollout.batch_size, LLAMA_CPP_MAX_PARALLEL)
        return LlamaCppEngine(source.gguf_path, tokenizer, threads=recipe.threads, parallel=parallel)
    if name == "openai":
        return OpenAIEngine.from_recipe(recipe, tokenizer)
    raise RmxError(f"unknown rollout.engine {name!r}", fix=f"use one of: {', '.join(ENGINES)}")
