"""Command line: `rmx-local run recipes/quickstart.toml train.lr=3e-4`, `rmx-local recipes list`, ..."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import click

from rmx_local import distributed as dist
from rmx_local.analyze import analyze as run_analysis, print_analysis
from rmx_local.chat import chat_loop, generate as run_generate
from rmx_local.doctor import doctor as run_doctor, healthy, print_doctor
from rmx_local.errors import RmxError
from rmx_local.eval import EvalOptions, print_report, run_eval
from rmx_local.export import export_run
from rmx_local.model_check import check_model_source
from rmx_local.pipeline import run_pipeline
from rmx_local.recipe import CHOICES, flag_check as field, load_recipe, recipe_to_toml
from rmx_local.report import report_after_run, write_report
from rmx_local.run_view import header_rows, next_steps, print_rows
from rmx_local.show import show_run
from rmx_local.sweep import print_sweep_plan
from rmx_local.ui import UI, SilentUI

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _fail(e: RmxError) -> None:
    click.echo(f"error: {e.line()}", err=True)
    sys.exit(2)


class Group(click.Group):
    """Turns RmxError into one line on stderr and Ctrl-C into a resume hint, for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RmxError as e:
            _fail(e)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is saved; rerun the same command to resume", err=True)
            sys.exit(130)


@click.group(cls=Group)
@click.version_option(package_name="rmx-local")
def main() -> None:
    """rmx-local: make a small LM better at math by re-ranking its own decision points (ReasonMaxxer)."""


def _recipe_path(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    bundled = RECIPES / (name if name.endswith(".toml") else f"{name}.toml")
    if bundled.is_file():
        return bundled
    raise RmxError(f"recipe not found: {name}", fix="`rmx-local recipes list` shows the bundled recipes")


@main.command()
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe, estimate memory and time, and exit.")
@click.option("--plain", is_flag=True, help="Plain line logs even on a terminal.")
def run(recipe: str, overrides: tuple[str, ...], dry_run: bool, plain: bool) -> None:
    """Run the whole pipeline for RECIPE (a path or a bundled name), with key=value OVERRIDES."""
    r = load_recipe(_recipe_path(recipe), list(overrides))
    ui = UI(rich=False if plain else None) if dist.is_main() else SilentUI()
    if dry_run:
        check_model_source(r.model)  # a plan for a model that cannot load is no plan (run checks it under its lock)
        ui.panel(f"rmx-local run {recipe} (recipe {r.hash()})", recipe_to_toml(r).strip())
        from rmx_local.plan import print_plan

        print_plan(r, ui)
        if r.sweep.enabled:
            print_sweep_plan(r, ui)
        return
    print_rows(ui, f"rmx-local run {recipe} (recipe {r.hash()})", header_rows(r))

    summary = run_pipeline(r, ui)
    if not dist.is_main():  # torchrun: rank 0 reports and writes the report
        return
    print_summary(ui, summary)
    report = None
    if r.report:
        report = report_after_run(r.run_dir, ui.line)
    print_rows(ui, f"done in {summary['total_s']:.0f} s: where things are, what next", next_steps(r.run_dir, summary, report))


def print_summary(ui, summary: dict) -> None:
    def pct(ms) -> str:
        return f"{ms[0]:.3f} ± {ms[1]:.3f}"

    rows = []
    for metric, row in summary["eval"].items():
        name = "greedy accuracy" if metric == "greedy" else "pass@1 (sampled)"
        adapted = row.get("adapted")
        delta = row.get("delta")
        rows.append([name, pct(row["base"]), pct(adapted) if adapted else "-",
                     f"{delta[0]:+.3f} ± {delta[1]:.3f} ({delta[0] / delta[1]:+.1f} SE)" if delta and delta[1] > 0 else "-"])
        rows.append([f"  unparseable ({name.split()[0]})", f"{row['base_unparseable']:.3f}",
                     f"{row.get('adapted_unparseable', 0):.3f}", ""])
    if rows:
        ui.table(f"base vs adapted on {summary['eval_problems']} held-out problems", ["metric", "base", "adapted", "adapted - base"], rows)
    t = [[k, f"{v:.1f}"] for k, v in summary["timings_s"].items()]
    t += [[k, f"{v:,.0f}"] for k, v in summary["rates"].items()]
    t += [["total (s)", f"{summary['total_s']:.1f}"], ["peak RSS (MB)", f"{summary['peak_rss_mb']:,.0f}"],
          ["gated fraction / tau", f"{summary['gated_fraction']:.3f} / {summary['tau']:.3f}"],
          ["training problems / sequences", f"{summary['train_problems']} / {summary['train_sequences']}"],
          ["chosen step (of)", f"{summary['train']['best_step']} ({summary['train']['steps']})"]]
    ui.table("run", ["stage / figure", "value"], t)


@main.group()
def recipes() -> None:
    """List, show or copy the bundled recipes."""


@recipes.command("list")
def recipes_list() -> None:
    for p in sorted(RECIPES.glob("*.toml")):
        first = next((ln.lstrip("# ").strip() for ln in p.read_text().splitlines() if ln.startswith("# ") and "rmx-local run" not in ln), "")
        click.echo(f"{p.stem:<20} {first}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name: str) -> None:
    click.echo(_recipe_path(name).read_text())


@recipes.command("copy")
@click.argument("name")
@click.argument("dest", type=click.Path())
def recipes_copy(name: str, dest: str) -> None:
    src, out = _recipe_path(name), Path(dest)
    if out.is_dir():
        out = out / src.name
    if out.exists():
        raise RmxError(f"{out} already exists", fix="choose another destination or delete it first")
    shutil.copyfile(src, out)
    click.echo(f"copied {src.name} -> {out}")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--format", "formats", default="all", show_default=True, help="gguf, mlx, peft, ollama or all (comma-separated).")
@click.option("--outtype", default="f16", show_default=True, callback=field("export.outtype"),
              help=f"GGUF tensor type: {', '.join(sorted(CHOICES['export.outtype']))}.")
@click.option("--out", "out_dir", default=None, type=click.Path(), help="Destination folder (default RUN_DIR/export).")
@click.option("--variant", default=None, help="A sweep variant's adapter, by name (default: the run's chosen adapter).")
def export(run_dir: str, formats: str, outtype: str, out_dir: str | None, variant: str | None) -> None:
    """Export RUN_DIR's adapter as GGUF (llama.cpp, Ollama), MLX (mlx-lm) and/or PEFT; `all` writes every format
    this base allows and names each one it skips."""
    skipped: dict = {}
    for fmt, path in export_run(run_dir, formats, outtype, out_dir, skipped=skipped, variant=variant).items():
        click.echo(f"{fmt:<7} {path}")
    for fmt, (why, fix) in skipped.items():
        click.echo(f"skipped {fmt}: {why} (fix: {fix})")


def _inference_options(f):
    f = click.option("--runtime", type=click.Choice(["llama_cpp", "mlx"]), default="llama_cpp", show_default=True)(f)
    f = click.option("--compare", is_flag=True, help="Show base and adapted answers side by side.")(f)
    f = click.option("--max-tokens", default=256, show_default=True, callback=field("eval.max_tokens"))(f)
    f = click.option("--temperature", default=0.0, show_default=True, callback=field("eval.temperature"))(f)
    f = click.option("--base", default=None, help="Base model GGUF/folder (default: the run's model).")(f)
    return f


@main.command()
@click.argument("target", type=click.Path())
@click.argument("prompt")
@_inference_options
def generate(target: str, prompt: str, runtime: str, compare: bool, max_tokens: int, temperature: float, base: str | None) -> None:
    """One answer to PROMPT from TARGET (a run folder or an exported adapter), streamed."""
    run_generate(target, prompt, runtime=runtime, compare=compare, max_tokens=max_tokens, temperature=temperature, base=base)


@main.command()
@click.argument("target", type=click.Path())
@_inference_options
def chat(target: str, runtime: str, compare: bool, max_tokens: int, temperature: float, base: str | None) -> None:
    """Chat with the base model plus TARGET's adapter (a run folder or an exported adapter)."""
    chat_loop(target, runtime=runtime, compare=compare, max_tokens=max_tokens, temperature=temperature, base=base)


@main.command("eval")
@click.argument("targets", nargs=-1, required=True)
@click.option("--data", "data", multiple=True, required=True, help="arith:single|word|two_step, a .jsonl/.json/.csv/.parquet "
              "file, a save_to_disk folder, or a hub id org/name[:config[:split]]. Repeatable.")
@click.option("--limit", type=int, default=None, callback=field("task.eval_size"),
              help="Score a seeded random subset of this many problems per data set.")
@click.option("--seed", default=0, show_default=True, callback=field("seed"), help="Seed of the subset and of sampling.")
@click.option("--n-samples", default=1, show_default=True, callback=field("eval.n_samples"),
              help="Samples per problem (>1: pass@1, pass@k, maj@k).")
@click.option("--temperature", default=0.6, show_default=True, callback=field("eval.temperature"),
              help="Sampling temperature (with --n-samples > 1).")
@click.option("--top-p", default=0.95, show_default=True, callback=field("eval.top_p"))
@click.option("--max-tokens", type=int, default=None, callback=field("eval.max_tokens"),
              help="Default: the run target's eval.max_tokens, else 512.")
@click.option("--runtime", "runtimes", multiple=True, default=("torch",), show_default=True,
              help="torch and/or llama_cpp (GGUF base + GGUF adapter); repeat or comma-separate.")
@click.option("--kl", is_flag=True, help="Mean per-token KL(base || adapted) on the base's greedy completions (torch).")
@click.option("--template", default=None, callback=field("task.template"), help="auto, chat or raw. Default: the run's.")
@click.option("--instruction", default=None, help="Text after the question. Default: the run's.")
@click.option("--shots", default=0, show_default=True, help="Worked examples before each question (arith data: the "
              "first N of the generator's sequence, the end runs train on; graded up to the next 'Question:').")
@click.option("--question-field", default=None, help="Column, or a template like '{Body} {Question}'.")
@click.option("--answer-field", default=None, help="Column holding the gold answer.")
@click.option("--base", default=None, help="Base model spec for the adapters (default: the one they name).")
@click.option("--threads", default=0, show_default=True, callback=field("threads"), help="CPU threads (0 = all).")
@click.option("--batch-size", default=64, show_default=True, callback=field("rollout.batch_size"),
              help="Sequences decoded together.")
@click.option("--out", default=None, type=click.Path(), help="Write problems.jsonl and summary.json here.")
@click.option("--plain", is_flag=True, help="Plain line logs even on a terminal.")
def eval_command(targets: tuple[str, ...], plain: bool, **options) -> None:
    """Score TARGETS (run folders, PEFT folders, GGUF adapters, model specs, `base`) on --data, paired with the first."""
    ui = UI(rich=False if plain else None)
    options["data"], options["runtimes"] = list(options["data"]), list(options["runtimes"])
    print_report(ui, run_eval(list(targets), EvalOptions(**options), ui))


@main.command()
@click.argument("run_dir", type=click.Path())
def report(run_dir: str) -> None:
    """Write RUN_DIR/report/index.html (one self-contained page) and its PNGs, from a finished run."""
    click.echo(str(write_report(run_dir)))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--example", type=int, default=None, help="The N-th training rollout (default: the report's first example).")
def show(run_dir: str, example: int | None) -> None:
    """Print a rollout of RUN_DIR with its decision points coloured by base entropy, and an entropy histogram."""
    show_run(run_dir, example)


@main.command()
@click.argument("base")
@click.argument("teacher")
@click.option("--data", required=True, help="A data spec as `rmx-local eval` takes it (arith:single, a file, a hub id).")
@click.option("--limit", type=int, default=None, callback=field("task.eval_size"), help="A seeded subset of N problems.")
@click.option("--tau", "taus", type=float, multiple=True, callback=field("gate.tau"),
              help="Entropy-gate thresholds to sweep (default 0.8 1.2 2 3, plus the run's).")
@click.option("--max-tokens", type=int, default=None, callback=field("eval.max_tokens"),
              help="Completion budget (default: the teacher run's eval.max_tokens, else 512).")
@click.option("--device", default="auto", show_default=True, callback=field("device"))
@click.option("--batch-size", default=64, show_default=True, callback=field("rollout.batch_size"),
              help="Decoded rows (problem x policy) per batch.")
@click.option("--seed", default=0, show_default=True, callback=field("seed"), help="Problem subset and the random control's draws.")
@click.option("--template", default=None, callback=field("task.template"), help="auto, chat or raw. Default: the teacher run's.")
@click.option("--instruction", default=None, help="Text after the question. Default: the teacher run's.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of the table.")
def analyze(base, teacher, data, limit, taus, max_tokens, device, batch_size, seed, template, instruction, as_json) -> None:
    """The paper's Section-3 analysis of TEACHER against BASE, greedy, on the base's own completions.

    TEACHER: anything `rmx-local eval` scores (a run folder, a PEFT folder, a GGUF adapter, a model). BASE: a model
    spec, or `base` for the teacher's own base model."""
    ui = UI(rich=False if as_json else None)
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():  # progress off the JSON
        result = run_analysis(base, teacher, data, limit, list(taus) or None, max_tokens, device, batch_size, seed, ui,
                              template, instruction)
    if as_json:
        for r in result["policies"]:
            r.pop("per_problem")
        click.echo(json.dumps(result, indent=2))
    else:
        print_analysis(result, ui)


@main.command()
def doctor() -> None:
    """Report backends, devices, versions, llama.cpp and Ollama availability."""
    rows = run_doctor()
    print_doctor(rows)
    sys.exit(0 if healthy(rows) else 1)
