"""`rmx-local show` and what `rmx-local run` prints around the work."""

import io
import json
import re

import numpy as np
from click.testing import CliRunner
from rich.console import Console

from rmx_local.cli import main
from rmx_local.recipe import load_recipe
from rmx_local.run_view import header_rows, next_steps
from rmx_local.show import histogram_lines, show_run


def test_show_prints_the_rollout_with_decision_points_and_the_histogram(finished_run):
    buf = io.StringIO()
    seq = show_run(finished_run, example=2, console=Console(file=buf, width=120))
    out = buf.getvalue()
    summary = json.loads((finished_run / "summary.json").read_text())
    gated = int((seq["H"] > summary["tau"]).sum())
    assert f"{gated} of {len(seq['H'])} tokens are decision points" in out
    assert out.count("[") >= gated and "decision points in [brackets]" in out  # plain text off a terminal
    assert f"tau {summary['tau']:.2f}" in out and "paper's tau 1.40" in out
    coloured = io.StringIO()
    show_run(finished_run, console=Console(file=coloured, width=120, force_terminal=True, color_system="truecolor"))
    assert "\x1b[" in coloured.getvalue() and "\x1b[1;4" in coloured.getvalue()  # bold underline on decision points


def test_histogram_marks_tau_where_it_falls():
    lines = histogram_lines(np.array([0.05, 0.06, 0.07, 3.0]), {"tau": 1.0})
    mark = next(i for i, ln in enumerate(lines) if "tau 1.00" in ln)
    assert "25.0% of tokens above" in lines[mark]
    assert lines[0].startswith(" 0.00") and lines[0].rstrip().endswith(" 3")  # three tokens in the first bin
    assert float(lines[mark - 1].split("-")[1].split("│")[0]) <= 1.0 + 1e-9 < float(lines[mark + 1].split("-")[1].split("│")[0])


def test_run_header_is_compact_and_dry_run_keeps_the_full_recipe():
    rows = dict(header_rows(load_recipe("recipes/quickstart.toml")))
    assert rows["task"] == "arith:single · 55 train, 0 val, 200 eval problems"
    assert rows["LoRA"] == "rank 32, alpha 64 on q,k,v,o · lr 1e-4 · 1 epoch"
    assert rows["gate"] == "the 20% most uncertain completion tokens"
    assert rows["rollouts"].startswith("K = 8 per problem")
    assert max(len(v) for v in rows.values()) < 66  # fits an 80-column terminal beside its labels
    out = CliRunner().invoke(main, ["run", "recipes/quickstart.toml", "--dry-run"]).output
    assert "[train]" in out and "kl_coef = 0.2" in out  # --dry-run still prints the whole resolved recipe


def test_next_steps_name_the_adapter_report_and_commands(tmp_path):
    rows = dict(next_steps(tmp_path / "run", {}, tmp_path / "run" / "report" / "index.html"))
    assert rows["adapter"] == str(tmp_path / "run" / "adapter")
    assert rows["report"].endswith("report/index.html")
    assert rows["compare"] == f"rmx-local chat {tmp_path / 'run'} --compare"
    assert rows["export"].startswith("rmx-local export")


def test_run_prints_a_header_then_the_report_path_and_next_commands(finished_run):
    """Rerunning a finished run (every stage cached, no model loaded) shows what a person sees at both ends."""
    result = CliRunner().invoke(main, ["run", str(finished_run / "recipe.toml"), "--plain"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "kl_coef" not in out and "[train]" not in out  # no 90-line recipe dump
    assert "task        arith:single · 3 train, 0 val, 3 eval problems" in out
    assert re.search(rf"^report +{re.escape(str(finished_run / 'report' / 'index.html'))}$", out, re.M)
    assert f"rmx-local chat {finished_run} --compare" in out and f"rmx-local export {finished_run}" in out
    assert (finished_run / "report" / "index.html").is_file()
