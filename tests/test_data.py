"""rmx_local.data: every source kind and layout, built locally in the test (no network, no ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rmx_local.data import gold_answer, load_problems
from rmx_local.errors import RmxError
from rmx_local.tasks import Problem, arith_problems

datasets = pytest.importorskip("datasets")


def _jsonl(tmp_path: Path, name: str, rows: list) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


GSM8K = [{"question": "Sam has 1,000 coins and gets 234 more. How many?",
          "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"},
         {"question": " What is 2 + 3? ", "answer": "2 + 3 = 5\n#### 5"}]


def test_gsm8k_jsonl(tmp_path: Path) -> None:
    assert load_problems(_jsonl(tmp_path, "gsm8k-train.jsonl", GSM8K)) == [
        Problem("gsm8k-train-0", "Sam has 1,000 coins and gets 234 more. How many?", "1234"),
        Problem("gsm8k-train-1", "What is 2 + 3?", "5")]


@pytest.mark.parametrize("rows,expected", [
    ([{"problem": "Compute 1/2 + 1/4.", "solution": "We add: $\\frac12+\\frac14=\\boxed{\\frac{3}{4}}$."}], "\\frac{3}{4}"),
    ([{"problem": "Compute 1/2 + 1/4.", "solution": "... \\boxed{0.75}", "answer": "\\frac{3}{4}"}], "\\frac{3}{4}"),
    ([{"question": "What is 6 x 7?", "answer": 42}], "42"),
    ([{"problem": "What is 6 x 7?", "answer": "42"}], "42"),
    ([{"input": "What is 6 x 7?", "target": "42"}], "42"),
    ([{"Body": "Tom has 3 apples.", "Question": "He eats one. How many are left?", "Answer": 2.0}], "2"),
    ([{"Body": "Tom has 3 apples.", "Question": "He eats one. How many are left?", "Answer": "2 (apples)"}], "2"),
    ([{"body": "Tom has 3 apples.", "question": "He eats one. How many are left?", "answer": "1,002 (ml)"}], "1002"),
])
def test_layouts(tmp_path: Path, rows: list, expected: str) -> None:
    [p] = load_problems(_jsonl(tmp_path, "d.jsonl", rows))
    assert p.answer == expected
    if "Body" in rows[0] or "body" in rows[0]:
        assert p.question == "Tom has 3 apples. He eats one. How many are left?"


def test_gold_answer_normalisation() -> None:
    assert gold_answer("#### -3") == "-3"
    assert gold_answer(7.5) == "7.5" and gold_answer(12) == "12" and gold_answer("8.00") == "8"
    assert gold_answer("The area is \\boxed{12\\pi} square units.") == "12\\pi"
    assert gold_answer("\\boxed{5}") == "\\boxed{5}"  # a bare boxed answer is left to the verifier (it unboxes golds)
    assert gold_answer("(3, 4)") == "(3, 4)" and gold_answer(None) == "" and gold_answer("  ") == ""


def test_field_overrides_and_templates(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, "custom.jsonl", [{"ctx": "A box holds 4 pens.", "ask": "How many in 2 boxes?", "sol": "8",
                                              "answer": "7"}])
    [p] = load_problems(path, question_field="{ctx} {ask}", answer_field="sol")
    assert (p.question, p.answer) == ("A box holds 4 pens. How many in 2 boxes?", "8")
    [p] = load_problems(path, question_field="ask")
    assert (p.question, p.answer) == ("How many in 2 boxes?", "7")


def test_csv_parquet_json_and_save_to_disk(tmp_path: Path) -> None:
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    table = datasets.Dataset.from_list(rows)
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "problems.json").write_text(json.dumps({"train": rows[:2], "eval": rows[2:]}))
    table.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": table.select(range(2)), "test": table.select(range(2, 5))}).save_to_disk(str(tmp_path / "two"))
    expected = [(r["question"], r["answer"]) for r in rows]
    for spec in ("d.csv", "d.parquet", "d.json", "one"):
        assert [(p.question, p.answer) for p in load_problems(str(tmp_path / spec))] == expected, spec
    assert [p.answer for p in load_problems(str(tmp_path / "problems.json") + ":eval")] == ["3", "4", "5"]
    assert [p.answer for p in load_problems(str(tmp_path / "two"))] == ["3", "4", "5"]  # `test` by default
    assert [p.id for p in load_problems(str(tmp_path / "two") + ":train")] == ["two-train-0", "two-train-1"]


def test_id_column_is_kept(tmp_path: Path) -> None:
    rows = [{"id": "arith-single-0-55", "question": "What is 1 + 1?", "answer": "2"}]
    assert load_problems(_jsonl(tmp_path, "p.jsonl", rows))[0].id == "arith-single-0-55"


def test_limit_is_a_seeded_subset_in_file_order(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, "d.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(50)])
    a = load_problems(path, limit=10, seed=0)
    assert a == load_problems(path, limit=10, seed=0) and len(a) == 10
    assert [int(p.answer) for p in a] == sorted(int(p.answer) for p in a)
    assert a != load_problems(path, limit=10, seed=1)
    assert len(load_problems(path, limit=500)) == 50


def test_arith_generator_is_the_runs_held_out_tail() -> None:
    held = load_problems("arith:single", limit=200, seed=0)
    assert held == arith_problems("single", 200, 0, offset=55)  # the quickstart's eval split (55 train + 200)
    assert held[0].id == "arith-single-0-55"
    assert len(load_problems("arith:word")) == 200 and len(load_problems("arith:single", limit=10_000)) == 255
    assert load_problems("arith:two_step", limit=5, seed=3) == arith_problems("two_step", 5, 3, offset=9254 - 5)


@pytest.mark.parametrize("rows,kwargs,match", [
    ([{"question": "q", "answer": "1"}], {"answer_field": "gold"}, "no field 'gold'"),
    ([{"question": "q", "answer": "1"}], {"question_field": "{body} {question}"}, "no field 'body'"),
    ([{"text": "q", "label": "1"}], {}, "cannot tell which field is the question"),
    ([{"question": "q", "answer": "1"}, {"question": "r", "answer": "steps\n#### "}], {}, r"1 of 2 rows have no usable gold.*row 1"),
    ([{"problem": "p", "solution": "no box here"}], {}, "no usable gold"),
    ([{"question": "  ", "answer": "1"}], {}, "no usable question"),
])
def test_bad_rows_are_one_error(tmp_path: Path, rows: list, kwargs: dict, match: str) -> None:
    path = _jsonl(tmp_path, "bad.jsonl", rows)
    with pytest.raises(RmxError, match=match) as e:
        load_problems(path, **kwargs)
    assert e.value.fix and "\n" not in e.value.line()


def test_bad_sources(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "1"}\n{not json\n')
    (tmp_path / "d.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    cases = [(str(tmp_path / "nope.jsonl"), "file not found"), (str(tmp_path / "empty.jsonl"), "empty|cannot read"),
             (str(tmp_path / "broken.jsonl"), "cannot read"), (str(tmp_path / "d.txt"), "unknown data format"),
             (str(tmp_path / "plain"), "save_to_disk"), ("arith:hard", "unknown generator"),
             ("not a spec", "not a file")]
    for spec, match in cases:
        with pytest.raises(RmxError, match=match) as e:
            load_problems(spec)
        assert e.value.fix, spec
    with pytest.raises(RmxError, match="positive"):
        load_problems("arith:single", limit=0)


def test_hub_id_without_cache_or_network_is_one_error(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(RmxError, match="cannot load it from the hub or the local datasets cache") as e:
        load_problems("nobody/no-such-set:main:test")
    assert "network" in e.value.fix


def test_hub_id_resolves_from_the_local_cache_when_offline(tmp_path: Path, monkeypatch) -> None:
    """A hub dataset cached as `load_dataset` leaves it ({org}___{name}/{config}/{version}/{commit}/), read offline."""
    import shutil

    import huggingface_hub.constants
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": "4"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    cache = tmp_path / "cache"
    Parquet(cache_dir=str(cache), dataset_name="cached-set", config_name="main",
            data_files=DataFilesDict.from_patterns({"test": [str(tmp_path / "t.parquet")]})).download_and_prepare()
    (cache / "nobody___cached-set" / "main" / "0.0.0").mkdir(parents=True)
    shutil.move(str(next((cache / "cached-set").glob("main-*/0.0.0"))), str(cache / "nobody___cached-set" / "main" / "0.0.0" / "abc123"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    problems = load_problems("nobody/cached-set:main:test")
    assert [(p.id, p.answer) for p in problems] == [("cached-set-main-test-0", "2"), ("cached-set-main-test-1", "4")]
