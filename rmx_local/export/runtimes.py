"""Streaming text for `rmx-local chat` / `generate` (a `Streamer` each; not a rollout engine): the base model plus
the exported adapter, run by llama-cpp-python (GGUF) or mlx-lm (MLX adapter on the HF-format base).

`load_streamers(target, runtime, compare)` accepts a run folder (exporting the needed format on first use),
a GGUF adapter file, or an MLX adapter folder. Shortcut: with `compare` the base is loaded a second time
(no runtime adapter switching); each engine keeps no state between calls (the caller passes the history).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from rmx_local.errors import RmxError

CHAT_RUNTIMES = ("llama_cpp", "mlx")
Messages = list[dict]


@dataclass
class Streamer:
    name: str  # "base" or "adapted"
    stream: Callable[[Messages, int, float], Iterator[str]]  # (messages, max_tokens, temperature) -> text pieces
    info: str = ""


@dataclass
class ChatTarget:
    base_spec: str
    adapter_path: Path  # GGUF file (llama_cpp) or MLX folder (mlx)


def _need(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RmxError(f"runtime needs the `{module}` package, which is not installed", fix=f"pip install 'rmx-local[{extra}]'")


def resolve_chat_target(target: str | Path, runtime: str, base: str | None = None) -> ChatTarget:
    """Find the base model spec and the adapter file/folder for `runtime`."""
    from rmx_local.export.run import GGUF_NAME, export_run, load_run_adapter, run_base_spec

    if runtime not in CHAT_RUNTIMES:
        raise RmxError(f"unknown runtime {runtime!r}", fix=f"use one of {', '.join(CHAT_RUNTIMES)}")
    path = Path(target)
    if path.is_file() and path.suffix == ".gguf":
        if runtime != "llama_cpp":
            raise RmxError(f"{path}: a GGUF adapter runs on llama_cpp", fix="use --runtime llama_cpp or pass an MLX adapter folder")
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
        spec = base or (fields["general.base_model.0.name"].contents() if "general.base_model.0.name" in fields else "")
        if not spec:
            raise RmxError(f"{path}: the adapter does not name its base model", fix="pass base=... (--base)")
        return ChatTarget(spec, path)
    if path.is_dir() and (path / "adapters.safetensors").is_file():
        if runtime != "mlx":
            raise RmxError(f"{path}: an MLX adapter runs on mlx", fix="use --runtime mlx or pass a GGUF adapter")
        spec = base or json.loads((path / "adapter_config.json").read_text()).get("model", "")
        if not spec:
            raise RmxError(f"{path}: the adapter does not name its base model", fix="pass base=... (--base)")
        return ChatTarget(spec, path)
    if path.is_dir() and (path / "adapter").is_dir():
        spec = base or run_base_spec(path, load_run_adapter(path))
        fmt = "gguf" if runtime == "llama_cpp" else "mlx"
        artifact = path / "export" / "gguf" / GGUF_NAME if fmt == "gguf" else path / "export" / "mlx"
        adapter_mtime = max(f.stat().st_mtime for f in (path / "adapter").iterdir())
        if not artifact.exists() or artifact.stat().st_mtime < adapter_mtime:
            export_run(path, [fmt])
        return ChatTarget(spec, artifact)
    raise RmxError(f"{target}: not a run folder, a GGUF adapter file or an MLX adapter folder",
                   fix="pass the folder `rmx-local run` created")


def _llama_cpp_streamer(name: str, base_gguf: str, adapter: Path | None, n_ctx: int) -> Streamer:
    from rmx_local.export.check import llama_cpp_model

    llm = llama_cpp_model(base_gguf, adapter, n_ctx=n_ctx)

    def stream(messages: Messages, max_tokens: int, temperature: float) -> Iterator[str]:
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature,
                                                stream=True, seed=0):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    return Streamer(name, stream, f"llama.cpp · {Path(base_gguf).name}" + (" + LoRA" if adapter else ""))


def _mlx_streamer(name: str, hf_path: str, adapter: Path | None) -> Streamer:
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(hf_path, adapter_path=str(adapter) if adapter else None)

    def stream(messages: Messages, max_tokens: int, temperature: float) -> Iterator[str]:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                        sampler=make_sampler(temp=temperature)):
            if response.text:
                yield response.text

    return Streamer(name, stream, f"mlx-lm · {Path(hf_path).name}" + (" + LoRA" if adapter else ""))


def load_streamers(target: str | Path, runtime: str = "llama_cpp", compare: bool = False, base: str | None = None,
                 n_ctx: int = 4096) -> list[Streamer]:
    """[adapted] or, with compare, [base, adapted]."""
    from rmx_local.model_check import check_model_source
    from rmx_local.models import resolve_model

    if runtime in CHAT_RUNTIMES:
        _need(*{"llama_cpp": ("llama_cpp", "llama"), "mlx": ("mlx_lm", "mlx")}[runtime])
    found = resolve_chat_target(target, runtime, base)
    check_model_source(found.base_spec, weights=runtime != "llama_cpp")  # llama.cpp reads only the GGUF
    source = resolve_model(found.base_spec)
    if runtime == "llama_cpp":
        if not source.gguf_path:
            raise RmxError(f"base model {found.base_spec!r} has no GGUF file for llama.cpp",
                           fix="use --runtime mlx, or a recipe model that is a .gguf / embedded model")
        make = lambda name, adapter: _llama_cpp_streamer(name, source.gguf_path, adapter, n_ctx)  # noqa: E731
    else:
        make = lambda name, adapter: _mlx_streamer(name, source.hf_path, adapter)  # noqa: E731
    streamers = [make("base", None)] if compare else []
    return streamers + [make("adapted", found.adapter_path)]
