"""Reading a run folder that `rmx-local run` wrote: every verb that takes RUN_DIR (export, eval, analyze, report,
show, chat) reads it through here, so the folder's layout is known in one place besides the writers (round.py,
rounds.py, sweep.py, stages/).

  RUN_DIR/adapter/         the chosen LoRA (PEFT)              load_run_adapter
  RUN_DIR/recipe.toml      the resolved recipe: base, prompt   run_base_spec, run_prompt, run_recipe
  RUN_DIR/summary.json     written last: the run is finished   require_finished
  RUN_DIR/sweep.json       a sweep's variants and their folders variant_adapter
A PEFT folder or an exported file inside a run (run/adapter, run/export/<fmt>/...) belongs to it: owning_run.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from rmx_local.adapter import LoraAdapter, load_peft
from rmx_local.errors import RmxError
from rmx_local.io import read_json
from rmx_local.models import resolve_model
from rmx_local.recipe import Recipe, load_recipe


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / "adapter").is_dir()


def load_run_adapter(run_dir: str | Path) -> LoraAdapter:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RmxError(f"{run_dir}: run folder not found", fix="pass the folder `rmx-local run` created")
    if not (run_dir / "adapter").is_dir():
        raise RmxError(f"{run_dir}: no adapter/ folder in this run", fix="finish training with `rmx-local run` first")
    return load_peft(run_dir / "adapter")


def run_base_spec(run_dir: Path, adapter: LoraAdapter | None = None) -> str:
    """The base model spec of a run: recipe.toml's `model`, else the adapter's base_model."""
    recipe = run_dir / "recipe.toml"
    if recipe.is_file():
        try:
            model = tomllib.loads(recipe.read_text()).get("model")
        except tomllib.TOMLDecodeError as e:
            raise RmxError(f"{recipe}: not valid TOML ({e})", fix="repair or delete the file") from None
        if model:
            return str(model)
    if adapter is not None and adapter.base_model:
        return adapter.base_model
    raise RmxError(f"{run_dir}: cannot tell the base model (no recipe.toml `model`, none in the adapter)",
                   fix="restore RUN_DIR/recipe.toml")


def variant_adapter(run_dir: str | Path, name: str) -> LoraAdapter:
    """A sweep variant's adapter, by name (RUN_DIR/sweep.json names each variant's folder)."""
    path = Path(run_dir) / "sweep.json"
    if not path.is_file():
        raise RmxError(f"{run_dir}: no sweep.json, so no variants to export",
                       fix="export without --variant, or run a recipe with sweep.enabled = true")
    rows = {r["name"]: r for r in read_json(path)["variants"]}
    if name not in rows:
        raise RmxError(f"{path}: no variant {name!r}", fix=f"choose one of {', '.join(rows)}")
    return load_peft(Path(run_dir) / rows[name]["folder"] / "adapter")


def require_finished(run_dir: Path) -> dict:
    """The run's summary.json (written last, so its presence means the run finished)."""
    if not (run_dir / "summary.json").is_file():
        raise RmxError(f"{run_dir}: no summary.json (not a finished run folder)",
                       fix="point at a folder written by `rmx-local run`, or finish the run first")
    return read_json(run_dir / "summary.json")


def run_recipe(run_dir: Path) -> Recipe:
    return load_recipe(run_dir / "recipe.toml")


def owning_run(path: Path) -> Path | None:
    """The run folder a PEFT folder or exported file sits in (run/adapter, run/export/<fmt>/...), if any."""
    for parent in list(path.resolve().parents)[:3]:
        if (parent / "recipe.toml").is_file() and is_run(parent):
            return parent
    return None


@dataclass(frozen=True)
class RunPrompt:
    template: str
    instruction: str
    max_tokens: int  # the run's eval.max_tokens


def run_prompt(run_dir: Path) -> RunPrompt:
    """The prompt the run trained with, and its evaluation budget."""
    recipe = run_recipe(run_dir)
    return RunPrompt(recipe.task.template, recipe.task.instruction, recipe.eval.max_tokens)


def run_tokenizer(run_dir: Path):
    """The run's tokenizer (transformers), from the model its summary names, so a folder written by another version
    of rmx-local still renders (its recipe then only matters for trust_remote_code, which falls back to off)."""
    from transformers import AutoTokenizer

    model = require_finished(run_dir)["model"]
    try:
        recipe = run_recipe(run_dir)
    except RmxError:  # missing, or written by another version: its remote-code setting is not trusted
        recipe = Recipe()
    return AutoTokenizer.from_pretrained(resolve_model(model).hf_path, trust_remote_code=recipe.trust_remote_code)
