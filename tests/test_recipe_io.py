"""Recipe validation errors and crash-safe files."""

import json
import math

import pytest

from rmx_local.errors import RmxError
from rmx_local.io import Journal, atomic_write_json, read_json
from rmx_local.ranges import Range
from rmx_local.recipe import field_info, load_recipe, numeric_fields, recipe_to_toml


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


def test_every_numeric_field_has_a_range_its_default_is_in():
    """A new int/float field without `ranged(...)` fails here, so no number skips the range check."""
    fields = numeric_fields()
    assert len(fields) >= 39 and all(r is not None for _, _, r in fields), [k for k, _, r in fields if r is None]
    for key, typ, rng in fields:
        assert field_info(key)[1] in rng, key
        assert rng.beyond(typ), f"{key}: no value lies outside {rng.rule()}"


@pytest.mark.parametrize("key,typ,rng", numeric_fields(), ids=[k for k, _, _ in numeric_fields()])
def test_a_value_beyond_each_bound_is_refused_with_field_value_and_example(tmp_path, key, typ, rng):
    """In a recipe file and as an override: one line naming the field, the value and the default as an example;
    the closed bounds themselves are accepted."""
    default = field_info(key)[1]
    *section, name = key.split(".")
    for value in rng.beyond(typ):
        toml = (f"[{section[0]}]\n" if section else "") + f"{name} = {value!r}\n"  # repr: inf, -inf, nan, -5e-324
        for source in (lambda: load_recipe(write(tmp_path, toml)), lambda: load_recipe(None, [f"{key}={value!r}"])):
            with pytest.raises(RmxError) as e:
                source()
            line = e.value.line()
            assert f"{key} must be " in line and f"got {value!r}" in line and f"write e.g. {key} = {default!r}" in line, line
    closed = [b for b, is_open in ((rng.lo, rng.lo_open), (rng.hi, rng.hi_open)) if math.isfinite(b) and not is_open]
    for bound in closed:
        recipe = load_recipe(None, [f"{key}={typ(bound)!r}"])
        assert getattr(getattr(recipe, section[0]) if section else recipe, name) == bound


def test_range_rules_and_bounds():
    r = Range.parse("(0, 1]")
    assert (0.0 in r, 1e-9 in r, 1.0 in r, 1.0000001 in r, float("nan") in r) == (False, True, True, False, False)
    assert r.rule() == "in (0, 1]" and Range.parse("[2, inf)", "why").rule() == ">= 2 (why)"
    assert Range.parse("[0, 1)").beyond(float)[:2] == [-5e-324, 1.0] and Range.parse("[1, inf)").beyond(int) == [0]
