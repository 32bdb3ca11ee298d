"""Recipe validation errors and crash-safe files."""

import json

import pytest

from rmx_local.errors import RmxError
from rmx_local.io import Journal, atomic_write_json, read_json
from rmx_local.recipe import load_recipe, recipe_to_toml


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ("[train]\nlrr = 1e-4\n", "unknown key `train.lrr` (fix: did you mean `train.lr`?)"),
    ("[train]\nlr = \"fast\"\n", "`train.lr` must be float"),
    ("[gate]\nmode = \"top\"\n", "`gate.mode` = 'top' is not one of"),
    ("[train\n", "malformed TOML"),
    ("train = 3\n", "`train` must be a [train] table"),
    ("[rollout]\nn = 1\n", "rollout.n must be >= 2"),
    ("[task]\nname = \"jsonl\"\n", "task.path is required"),
])
def test_bad_recipes_fail_with_one_clear_line(tmp_path, text, needle):
    with pytest.raises(RmxError) as e:
        load_recipe(write(tmp_path, text))
    assert needle in e.value.line() and "\n" not in e.value.line()
    assert "r.toml" in e.value.line()


def test_overrides_and_roundtrip(tmp_path):
    r = load_recipe(write(tmp_path, "seed = 3\n[train]\nlr = 2e-4\n"), ["train.lr=1e-3", "gate.mode=tau", "train.targets=[\"q_proj\"]"])
    assert (r.seed, r.train.lr, r.gate.mode, r.train.targets) == (3, 1e-3, "tau", ["q_proj"])
    again = load_recipe(write(tmp_path, recipe_to_toml(r)))
    assert again == r and again.hash() == r.hash()
    with pytest.raises(RmxError, match="not key=value"):
        load_recipe(None, ["train.lr"])


def test_journal_drops_torn_tail_and_keeps_records(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.append({"a": 1})
    j.append({"a": 2})
    with open(j.path, "a") as f:
        f.write('{"a": 3, "b": [1, 2')  # killed mid-write
    assert j.read() == [{"a": 1}, {"a": 2}]
    j.append({"a": 4})
    assert j.read() == [{"a": 1}, {"a": 2}, {"a": 4}]


def test_corrupt_json_names_the_file(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"k": 1})
    assert read_json(p) == {"k": 1}
    p.write_text("{oops")
    with pytest.raises(RmxError, match="x.json: corrupt JSON"):
        read_json(p)
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(RmxError, match="bad.jsonl:2"):
        Journal(tmp_path / "bad.jsonl").read()
    assert json.loads((tmp_path / "bad.jsonl").read_text().splitlines()[0]) == {"a": 1}
