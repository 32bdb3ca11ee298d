"""Local inference with the trained correction: one-shot `generate` and the `chat_loop` REPL.

The base model plus the exported adapter run in llama-cpp-python (GGUF) or mlx-lm (MLX); tokens stream into
a Rich panel, and `compare=True` streams base and adapted answers side by side (both advance token by token).
When stdout is not a terminal the output is plain text: the answer as it streams, or with compare two
`### base` / `### adapted` sections one after the other. Shortcut: greedy (temperature 0) by default; the
REPL keeps one history per engine (each sees its own earlier answers).
"""

from __future__ import annotations

from typing import Callable, Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rmx_local.export.runtimes import Streamer, load_streamers

EXIT_WORDS = {"/exit", "/quit", "/q", ":q", "exit", "quit"}


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
