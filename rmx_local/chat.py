"""Local inference with the trained correction: one-shot `generate` and the `chat_loop` REPL.

The base model plus the exported adapter run in llama-cpp-python (GGUF) or mlx-lm (MLX), a `Streamer` each (not a
rollout engine); `load_streamers(target, runtime, compare)` accepts a run folder (exporting the needed format on
first use), a GGUF adapter file, or an MLX adapter folder. Tokens stream into a Rich panel, and `compare=True`
streams base and adapted answers side by side (both advance token by token). When stdout is not a terminal the
output is plain text: the answer as it streams, or with compare two `### base` / `### adapted` sections one after
the other. Shortcuts: greedy (temperature 0) by default; the REPL keeps one history per streamer (each sees its own
earlier answers); with `compare` the base is loaded a second time (no runtime adapter switching); a streamer keeps
no state between calls (the caller passes the history).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rmx_local.errors import RmxError
from rmx_local.export import exported_adapter, gguf_adapter_base
from rmx_local.export.check import llama_cpp_model
from rmx_local.model_check import check_model_source
from rmx_local.models import resolve_model
from rmx_local.runfolder import is_run, load_run_adapter, run_base_spec

EXIT_WORDS = {"/exit", "/quit", "/q", ":q", "exit", "quit"}

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
    if importlib.util.find_spec(module) is None:
        raise RmxError(f"runtime needs the `{module}` package, which is not installed", fix=f"pip install 'rmx-local[{extra}]'")


def resolve_chat_target(target: str | Path, runtime: str, base: str | None = None) -> ChatTarget:
    """Find the base model spec and the adapter file/folder for `runtime`."""
    if runtime not in CHAT_RUNTIMES:
        raise RmxError(f"unknown runtime {runtime!r}", fix=f"use one of {', '.join(CHAT_RUNTIMES)}")
    path = Path(target)
    if path.is_file() and path.suffix == ".gguf":
        if runtime != "llama_cpp":
            raise RmxError(f"{path}: a GGUF adapter runs on llama_cpp", fix="use --runtime llama_cpp or pass an MLX adapter folder")
        spec = base or gguf_adapter_base(path)
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
    if is_run(path):
        spec = base or run_base_spec(path, load_run_adapter(path))
        return ChatTarget(spec, exported_adapter(path, "gguf" if runtime == "llama_cpp" else "mlx"))
    raise RmxError(f"{target}: not a run folder, a GGUF adapter file or an MLX adapter folder",
                   fix="pass the folder `rmx-local run` created")


def _llama_cpp_streamer(name: str, base_gguf: str, adapter: Path | None, n_ctx: int) -> Streamer:
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


def _messages(history: list[dict], system: str | None, prompt: str) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + history + [{"role": "user", "content": prompt}]


def _view(streamers: list[Streamer], texts: dict[str, str], done: set[str]):
    panels = [Panel(Text(texts[e.name] or "…"), title=f"[bold]{e.name}[/]" + ("" if e.name in done else " [dim]…[/]"),
                    subtitle=f"[dim]{e.info}[/]", border_style="green" if e.name == "adapted" else "blue")
              for e in streamers]
    if len(panels) == 1:
        return panels[0]
    grid = Table.grid(expand=True, padding=(0, 1))
    for _ in panels:
        grid.add_column(ratio=1)
    grid.add_row(*panels)
    return Group(grid)


def stream_answers(streamers: list[Streamer], messages: dict[str, list[dict]], max_tokens: int, temperature: float,
                   console: Console) -> dict[str, str]:
    """Run every engine on its messages, streaming to `console`; return {engine name: full answer}."""
    texts = {e.name: "" for e in streamers}
    if not console.is_terminal:
        for e in streamers:
            if len(streamers) > 1:
                console.file.write(f"### {e.name}\n")
            for piece in e.stream(messages[e.name], max_tokens, temperature):
                texts[e.name] += piece
                console.file.write(piece)
                console.file.flush()
            console.file.write("\n\n" if len(streamers) > 1 else "\n")
        console.file.flush()
        return texts
    streams: dict[str, Iterator[str]] = {e.name: iter(e.stream(messages[e.name], max_tokens, temperature)) for e in streamers}
    done: set[str] = set()
    with Live(_view(streamers, texts, done), console=console, refresh_per_second=12, vertical_overflow="visible") as live:
        while len(done) < len(streamers):
            for name, it in streams.items():  # round robin: both columns advance together
                if name in done:
                    continue
                piece = next(it, None)
                if piece is None:
                    done.add(name)
                else:
                    texts[name] += piece
            live.update(_view(streamers, texts, done))
    return texts


def generate(target: str, prompt: str, runtime: str = "llama_cpp", compare: bool = False, max_tokens: int = 256,
             temperature: float = 0.0, base: str | None = None, system: str | None = None,
             console: Console | None = None, streamers: list[Streamer] | None = None) -> dict[str, str]:
    """One-shot answer(s) for `prompt`: {"adapted": ...} or, with compare, {"base": ..., "adapted": ...}.

    `target` is a run folder, a GGUF adapter file or an MLX adapter folder; `base` overrides the base model.
    `streamers` (tests) bypasses model loading.
    """
    console = console or Console()
    streamers = streamers or _load(target, runtime, compare, base, console)
    messages = {e.name: _messages([], system, prompt) for e in streamers}
    return stream_answers(streamers, messages, max_tokens, temperature, console)


def chat_loop(target: str, runtime: str = "llama_cpp", compare: bool = False, max_tokens: int = 512,
              temperature: float = 0.0, base: str | None = None, system: str | None = None,
              console: Console | None = None, streamers: list[Streamer] | None = None,
              read_line: Callable[[str], str] | None = None) -> int:
    """A REPL: each line is a user turn; /reset clears the history, /exit (or EOF, Ctrl-C) leaves. Returns turns."""
    console = console or Console()
    streamers = streamers or _load(target, runtime, compare, base, console)
    read_line = read_line or (lambda p: console.input(p) if console.is_terminal else input())
    histories: dict[str, list[dict]] = {e.name: [] for e in streamers}
    if console.is_terminal:
        console.print(Panel(Text.from_markup(
            f"[bold]rmx-local chat[/] · {' vs '.join(e.name for e in streamers)} · {streamers[-1].info}\n"
            "[dim]/reset clears the conversation, /exit leaves[/]"), border_style="magenta"))
    turns = 0
    while True:
        try:
            line = read_line("[bold magenta]you ›[/] " if console.is_terminal else "").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line.lower() in EXIT_WORDS:
            break
        if line.lower() == "/reset":
            histories = {name: [] for name in histories}
            console.print("[dim](history cleared)[/]" if console.is_terminal else "(history cleared)")
            continue
        messages = {name: _messages(h, system, line) for name, h in histories.items()}
        try:
            answers = stream_answers(streamers, messages, max_tokens, temperature, console)
        except KeyboardInterrupt:
            console.print("[dim](interrupted)[/]")
            continue
        for name, answer in answers.items():
            histories[name] += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
        turns += 1
    return turns


def _load(target: str, runtime: str, compare: bool, base: str | None, console: Console) -> list[Streamer]:
    if not console.is_terminal:
        return load_streamers(target, runtime, compare, base)
    with console.status(f"loading {'base + adapted' if compare else 'adapted'} model ({runtime})…"):
        return load_streamers(target, runtime, compare, base)
