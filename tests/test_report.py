"""`rmx-local report` on a finished tiny run (`finished_run` in conftest: the pipeline on a random model)."""

import base64
import io
import json
import re

from rmx_local.report import external_evals, token_kind, write_report


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


def test_external_eval_summaries_are_read_generically(tmp_path):
    (tmp_path / "eval-gsm8k").mkdir()
    (tmp_path / "eval-gsm8k" / "summary.json").write_text(json.dumps(
        {"targets": {"base": {"greedy": [0.25, 0.05], "pass@1": {"mean": 0.2, "se": 0.04}},
                     "runs/x": {"greedy": {"mean": 0.5, "se": 0.06}, "pass@1": [0.3, 0.05]}},
         "delta": {"greedy": [0.25, 0.07]}, "problems": [3, 4]}))
    assert external_evals(tmp_path) == [
        {"label": "eval-gsm8k\ngreedy", "base": (0.25, 0.05), "adapted": (0.5, 0.06)},
        {"label": "eval-gsm8k\npass@1", "base": (0.2, 0.04), "adapted": (0.3, 0.05)}]


def test_token_kinds():
    assert [token_kind(t, i) for i, t in enumerate(["The", " 7", " +", "=", " answer", "."])] == \
        ["first token", "digit", "operator", "operator", "word", "other"]


def test_eval_out_summaries_give_one_pair_per_data_set_runtime_and_target(tmp_path):
    """The layout `rmx-local eval --out` writes: data[].results[runtime][target] = {accuracy, se, ...}."""
    (tmp_path / "eval-words").mkdir()
    result = lambda acc, se: {"accuracy": acc, "se": se, "problems": 40, "unparseable": 0.0}  # noqa: E731
    (tmp_path / "eval-words" / "summary.json").write_text(json.dumps({"data": [
        {"spec": "words.jsonl", "results": {"torch": {"base": result(0.1, 0.04), "runs/q": result(0.2, 0.05)},
                                            "llama_cpp": {"base": result(0.1, 0.04), "runs/q": result(0.15, 0.05)}}}]}))
    rows = external_evals(tmp_path)
    assert [r["label"] for r in rows] == ["eval-words: words.jsonl\nq [torch]", "eval-words: words.jsonl\nq [llama_cpp]"]
    assert rows[0]["base"] == (0.1, 0.04) and rows[0]["adapted"] == (0.2, 0.05) and rows[1]["adapted"] == (0.15, 0.05)
