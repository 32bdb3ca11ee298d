"""`rmx-local report` and `rmx-local show` on a finished tiny run (the pipeline of test_pipeline on a random model)."""

import base64
import io
import json
import re

import numpy as np
import pytest
from rich.console import Console

import rmx_local.stages.select as select_stage
from rmx_local.pipeline import run_pipeline
from rmx_local.report import external_evals, token_kind, write_report
from rmx_local.show import histogram_lines, show_run
from rmx_local.ui import UI
from conftest import char_tokenizer, tiny_llama
from test_pipeline import alternate, recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-model")
    tok = char_tokenizer()
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    run = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select_stage, "verify_many", alternate)
        run_pipeline(recipe(model_dir, run, "task.train_size=3", "rollout.n=2"), UI(rich=False))
    return run


def test_report_writes_a_self_contained_page_and_decodable_pngs(finished_run):
    from PIL import Image

    (finished_run / "eval-extra").mkdir()
    (finished_run / "eval-extra" / "summary.json").write_text(json.dumps(
        {"targets": {"base": {"greedy": [0.25, 0.05]}, "runs/x": {"greedy": {"mean": 0.5, "se": 0.06}}},
         "delta": {"greedy": [0.25, 0.07]}}))
    page = write_report(finished_run)
    assert page == finished_run / "report" / "index.html"
    text = page.read_text()
    embedded = dict((name, data) for data, name in re.findall(r'src="data:image/png;base64,([^"]+)".*?\(([\w-]+\.png)\)', text))
    assert sorted(embedded) == ["accuracy.png", "decision-points.png", "entropy.png", "training.png"]
    assert "src=\"http" not in text  # self-contained: nothing fetched
    for name, data in embedded.items():
        png = (finished_run / "report" / name).read_bytes()
        assert base64.b64decode(data) == png
        w, h = Image.open(io.BytesIO(png)).size
        assert w > 300 and h > 150
    assert text.count('class="rollout"') == 3  # three example rollouts, decision points outlined
    assert 'class="tok gate"' in text
    assert "Which held-out problems flipped" in text and "wrong → right" in text


def test_external_eval_summaries_are_read_generically(finished_run):
    rows = external_evals(finished_run)
    assert rows == [{"label": "eval-extra\ngreedy", "base": (0.25, 0.05), "adapted": (0.5, 0.06)}]


def test_token_kinds():
    assert [token_kind(t, i) for i, t in enumerate(["The", " 7", " +", "=", " answer", "."])] == \
        ["first token", "digit", "operator", "operator", "word", "other"]


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
