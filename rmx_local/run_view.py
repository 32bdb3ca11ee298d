"""What `rmx-local run` shows a person: a compact header before the work, and where things are / what next after it.

The full resolved recipe is not printed on a run (it is in RUN/recipe.toml, and `--dry-run` prints it).
Shortcut: the device shown is the one the torch backend would pick (`auto` resolved); other backends show the
recipe's value as written.
"""

from __future__ import annotations

from pathlib import Path

from rmx_local.recipe import Recipe


def _device(recipe: Recipe) -> str:
    if recipe.backend != "torch" or recipe.device != "auto":
        return recipe.device
    try:
        from rmx_local.backends.torch_backend import pick_device

        return pick_device("auto")
    except ImportError:
        return "auto"


def _number(x: float) -> str:
    """1e-4 and 2.5e-4 rather than 0.0001 and 0.00025."""
    if x == 0 or abs(x) >= 1e-3:
        return f"{x:g}"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _short_targets(targets: list[str]) -> str:
    return ",".join(t.removesuffix("_proj") for t in targets)


def header_rows(recipe: Recipe) -> list[tuple[str, str]]:
    """(label, value) rows: model, backend and device, task and sizes, rollouts, gate, LoRA, run folder."""
    t, r, g, tr = recipe.task, recipe.rollout, recipe.gate, recipe.train
    task = f"arith:{t.difficulty}" if t.name == "arith" else t.path
    gate = (f"the {g.fraction:.0%} most uncertain completion tokens" if g.mode == "fraction"
            else f"base entropy > tau {g.tau}")
    if tr.random_gate:
        gate += " · control: random positions"
    epochs = f"{tr.epochs:g} epoch" + ("" if tr.epochs == 1 else "s")
    return [
        ("model", recipe.model),
        ("backend", f"{recipe.backend} on {_device(recipe)}" + (f" ({recipe.dtype})" if recipe.dtype != "auto" else "")),
        ("task", f"{task} · {t.train_size} train, {t.val_size} val, {t.eval_size} eval problems"),
        ("rollouts", f"K = {r.n} per problem · T {r.temperature} · top-p {r.top_p} · <= {r.max_tokens} tokens ({r.engine})"),
        ("gate", gate),
        ("LoRA", f"rank {tr.lora_rank}, alpha {tr.lora_alpha:g} on {_short_targets(tr.targets)} · lr {_number(tr.lr)} · {epochs}"),
        ("run folder", f"{recipe.run_dir}  (full recipe in recipe.toml there)"),
    ]


def next_steps(run_dir: str | Path, summary: dict, report: Path | None) -> list[tuple[str, str]]:
    """(label, path or command) rows printed at the end of a run."""
    run = str(run_dir)
    rows = [("adapter", str(Path(run) / "adapter"))]
    if report is not None:
        rows.append(("report", str(report)))
    for fmt, path in summary.get("exports", {}).items():
        rows.append((f"export {fmt}", path))
    rows += [("export", f"rmx-local export {run} --format gguf")]
    if "sweep" in summary:
        rows.append(("export a variant", f"rmx-local export {run} --variant NAME  (sweep.json names them)"))
    rows += [("compare", f"rmx-local chat {run} --compare"), ("inspect", f"rmx-local show {run}")]
    if report is None:
        rows.append(("report", f"rmx-local report {run}"))
    return rows


def print_rows(ui, title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column block: a Rich panel on a terminal, plain `label  value` lines elsewhere."""
    width = max(len(k) for k, _ in rows)
    body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    ui.panel(title, body)
