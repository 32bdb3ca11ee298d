"""`rmx-local show RUN [--example N]`: one training rollout in the terminal, coloured by base entropy, and a
histogram of all completion-token entropies with the run's tau (and the paper's) marked.

Reads the finished run folder only (selected.json, entropies.jsonl, summary.json) plus the run's tokenizer.
`--example N` is the N-th training rollout in selected.json order; without it, the report's first example (the
right rollout with the most decision points). Off a terminal the same content prints as plain text (decision
points in [brackets]). Shortcut: the histogram is Rich text bars (fixed 16 bins), not a plotting library.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.text import Text

from rmx_local.errors import RmxError
from rmx_local.io import read_json
from rmx_local.report import pick_examples, training_sequences
from rmx_local.runfolder import require_finished, run_tokenizer

BINS = 16
BAR = 40


def entropy_style(h: float, top: float) -> str:
    """Background from dim to hot as entropy grows: the five steps of a yellow-red ramp."""
    ramp = ("grey23", "dark_goldenrod", "orange3", "dark_orange", "red3")
    return f"on {ramp[min(int(h / max(top, 1e-6) * len(ramp)), len(ramp) - 1)]}"


def rollout_text(seq: dict, tau: float, tokenizer, top: float) -> Text:
    """The completion as Rich Text: every token on its entropy colour, decision points bold and underlined."""
    out = Text()
    for tok, h in zip(seq["completion_ids"], seq["H"]):
        piece = tokenizer.decode([tok]).replace("\n", "↵\n")
        style = entropy_style(float(h), top) + (" bold underline" if h > tau else "")
        out.append(piece, style=style)
    return out


def histogram_lines(entropies: np.ndarray, marks: dict[str, float]) -> list[str]:
    """Text bars of entropy counts; a line per mark ("tau 2.71 ─── ...") inserted where its value falls."""
    top = max(float(entropies.max()) if entropies.size else 1.0, *marks.values()) * 1.0001
    edges = np.linspace(0.0, top, BINS + 1)
    counts, _ = np.histogram(entropies, bins=edges)
    peak = max(int(counts.max()), 1)
    lines, pending = [], sorted(marks.items(), key=lambda kv: kv[1])
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        while pending and pending[0][1] < hi:
            name, value = pending.pop(0)
            above = float((entropies > value).mean()) if entropies.size else 0.0
            lines.append(f"{'':>11} ── {name} {value:.2f}: {above:.1%} of tokens above ──")
        lines.append(f"{lo:5.2f}-{hi:<5.2f}│{'█' * round(BAR * c / peak):<{BAR}} {c}")
    return lines


def show_run(run_dir: str | Path, example: int | None = None, console: Console | None = None) -> dict:
    """Print the rollout and the histogram; returns the shown sequence (tests)."""
    run_dir = Path(run_dir)
    console = console or Console()
    summary = require_finished(run_dir)
    tau, paper_tau = float(summary["tau"]), float(summary.get("gate", {}).get("paper_tau", 1.4))
    seqs = training_sequences(run_dir)
    if not seqs:
        raise RmxError(f"{run_dir}: no training rollouts with entropies", fix="finish the run with `rmx-local run`")
    if example is None:
        seq = pick_examples(seqs, tau, 1)[0]
    elif 0 <= example < len(seqs):
        seq = seqs[example]
    else:
        raise RmxError(f"--example {example}: the run has {len(seqs)} training rollouts", fix=f"pick 0..{len(seqs) - 1}")
    flat = np.concatenate([s["H"] for s in seqs])
    tokenizer = run_tokenizer(run_dir)
    problems = {p["id"]: p for p in read_json(run_dir / "problems.json").get("train", [])}
    problem = problems.get(seq["id"], {"question": "?", "answer": "?"})
    gated = int((seq["H"] > tau).sum())
    verdict = "right" if seq["reward"] > 0 else "wrong"
    console.print(f"problem {seq['id']}: {problem['question']}  (gold {problem['answer']})", markup=False, highlight=False)
    console.print(f"rollout {seq['k']}: {verdict}, advantage {seq['advantage']:+.2f}, {gated} of {len(seq['H'])} tokens "
                  f"are decision points (base entropy > tau {tau:.2f})", markup=False, highlight=False)
    if console.is_terminal:
        console.print(rollout_text(seq, tau, tokenizer, float(flat.max())))
        console.print(Text.assemble("colour: base entropy ", ("low", entropy_style(0, 1)), " ", ("mid", entropy_style(0.5, 1)),
                                    " ", ("high", entropy_style(1, 1)), "; ", ("decision point", "bold underline")))
    else:
        pieces = [(f"[{tokenizer.decode([t])}]" if h > tau else tokenizer.decode([t])) for t, h in zip(seq["completion_ids"], seq["H"])]
        console.print("".join(pieces), markup=False, highlight=False)
        console.print("decision points in [brackets]", markup=False, highlight=False)
    console.print(f"\nbase entropy of all {flat.size} completion tokens (nats):", markup=False, highlight=False)
    for line in histogram_lines(flat, {"tau": tau, "paper's tau": paper_tau}):
        style = "bold red" if "── tau" in line else "yellow" if "── paper's" in line else None
        console.print(line, style=style, markup=False, highlight=False)
    return seq
