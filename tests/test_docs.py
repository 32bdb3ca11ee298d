"""The docs stay honest: the recipe reference matches recipe.py, and every command the docs show still parses.

- docs/recipes.md is exactly what scripts/gen_recipe_docs.py renders now (so a new recipe field fails here until
  the reference is regenerated), and its keys are exactly the recipe's.
- Every `section.key` written as inline code in README.md or docs/*.md is a recipe key.
- Every `rmx-local ...` line in a ```bash block: `rmx-local VERB --help` exits 0 for each verb it uses (sub-verbs
  such as `recipes list` included), and every `rmx-local run` line exits 0 with `--dry-run` and its run_dir in a
  tmp folder. A dry run only resolves the recipe, so lines aimed at a remote server (rollout.engine=openai
  rollout.base_url=...) are checked the same way and nothing is contacted; the other verbs are checked by
  `--help` only, because they need a finished run folder or a runtime.
- `make TARGET` lines name Makefile targets, and `python benchmarks/... | scripts/...` lines name existing files.
Verbs, pages and lines are discovered from the text, so pages and verbs added later are covered as they land.
Shortcut: commands are read from ```bash blocks only (not prose); `$VARS` are not expanded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from rmx_local.cli import main
from rmx_local.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FILE_SUFFIXES = {"jsonl", "json", "toml", "py", "md", "gguf", "txt", "safetensors", "html", "csv", "png", "svg", "log",
                 "yaml", "sh"}  # `train.jsonl` is a file name, not the recipe key train.jsonl


def _generator():
    spec = importlib.util.spec_from_file_location("gen_recipe_docs", ROOT / "scripts" / "gen_recipe_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_keys() -> set[str]:
    keys = set()
    for f in dataclasses.fields(Recipe):
        value = getattr(Recipe(), f.name)
        if dataclasses.is_dataclass(value):
            keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(value)}
        else:
            keys.add(f.name)
    return keys


SECTIONS = {k.split(".")[0] for k in recipe_keys() if "." in k}


def bash_lines(page: Path) -> list[tuple[str, int, str]]:
    """(page name, line number, command) for every command line of the page's ```bash blocks."""
    out, inside, pending, start = [], False, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            inside = not inside and line.strip() in ("```bash", "```sh")
            continue
        if not inside:
            continue
        if not pending:
            start = number
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            out.append((page.name, start, pending.strip()))
        pending = ""
    return out


def all_lines() -> list[tuple[str, int, str]]:
    return [entry for page in PAGES for entry in bash_lines(page)]


def prose(text: str) -> str:
    """The text without its fenced code blocks (fences at the start of a line)."""
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def rmx_lines() -> list[tuple[str, int, list[str]]]:
    return [(page, n, w) for page, n, c in all_lines() if (w := words(c)) and w[0] == "rmx-local"]


def verb_path(argv: list[str]) -> list[str]:
    """The (sub)command names at the start of argv: ["recipes", "list"] for `recipes list`."""
    command, path = main, []
    for word in argv:
        if not (isinstance(command, click.Group) and word in command.commands):
            break
        command = command.commands[word]
        path.append(word)
    return path


def test_docs_show_commands():
    assert any(w[1:2] == ["run"] for _, _, w in rmx_lines()), "README.md shows no `rmx-local run` line"


def test_recipe_reference_is_up_to_date():
    generator = _generator()
    assert generator.OUT.read_text() == generator.render(), (
        f"docs/recipes.md is stale: run `{generator.COMMAND}` and commit the result")


def test_recipe_reference_keys_are_the_recipe_keys():
    documented = set(re.findall(r"^\| `([\w.]+)` \|", (ROOT / "docs" / "recipes.md").read_text(), re.M))
    keys = recipe_keys() - SECTIONS
    assert documented - keys == set(), "documented but not in rmx_local/recipe.py"
    assert keys - documented == set(), "in rmx_local/recipe.py but not in docs/recipes.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_recipe_keys_named_in_docs_exist(page):
    spans = re.findall(r"`([^`\n]+)`", prose(page.read_text())) + [c for _, _, c in bash_lines(page)]
    named = {w.split("=")[0] for span in spans for w in span.split()}
    dotted = {k for k in named if re.fullmatch(r"[a-z]+\.[a-z_]+", k) and k.split(".")[0] in SECTIONS
              and k.split(".")[1] not in FILE_SUFFIXES}
    assert dotted - recipe_keys() == set(), f"{page.name} names recipe keys that rmx_local/recipe.py does not have"


VERBS = sorted({" ".join(verb_path(w[1:])) for _, _, w in rmx_lines()})


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_shown_has_help(verb):
    assert verb, "a `rmx-local` line in the docs does not start with a known verb (see `rmx-local --help`)"
    result = CliRunner().invoke(main, verb.split() + ["--help"])
    assert result.exit_code == 0, result.output


def test_every_shown_line_starts_with_a_verb():
    unknown = [f"{page}:{n}: {' '.join(w)}" for page, n, w in rmx_lines() if len(w) > 1 and not verb_path(w[1:])]
    assert unknown == [], "unknown rmx-local verbs in the docs"


def copied_recipes(page: str) -> dict[str, str]:
    """DEST -> NAME for `rmx-local recipes copy NAME DEST` lines, so a later `rmx-local run DEST` can be checked."""
    return {w[4]: w[3] for p, _, w in rmx_lines() if p == page and w[1:3] == ["recipes", "copy"] and len(w) >= 5}


RUN_LINES = [(page, n, w) for page, n, w in rmx_lines() if w[1:2] == ["run"]]


@pytest.mark.parametrize("page,number,argv", RUN_LINES, ids=[f"{p}:{n}" for p, n, _ in RUN_LINES])
def test_each_run_line_resolves_with_dry_run(page, number, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [a for a in argv[2:] if a != "--dry-run"]
    if args and not (ROOT / args[0]).exists():
        args[0] = copied_recipes(page).get(args[0], args[0])
    result = CliRunner().invoke(main, ["run", *args, f"run_dir={tmp_path / 'run'}", "--dry-run", "--plain"])
    assert result.exit_code == 0, f"{page}:{number}: {' '.join(argv)}\n{result.output}"
    assert not (tmp_path / "run").exists(), "a dry run wrote a run folder"


def test_make_targets_and_script_paths_exist():
    makefile = (ROOT / "Makefile").read_text()
    missing = []
    for page, n, command in all_lines():
        w = words(command)
        if w[:1] == ["make"]:
            missing += [f"{page}:{n}: make {t}" for t in w[1:] if not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
        missing += [f"{page}:{n}: {p}" for p in w if re.match(r"(benchmarks|scripts)/", p) and not (ROOT / p).exists()]
    assert missing == []


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_exist(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s) and mailto links are not checked (no network in tests)
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", prose(linked.read_text()), re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert broken == [], f"{page.name}: broken links"


def test_code_map_names_every_file():
    """The README's code map names every module, recipe, benchmark and test (by file stem), and no file that is gone."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Code map"):]
    files = [*ROOT.glob("rmx_local/**/*.py"), *ROOT.glob("benchmarks/*"), *ROOT.glob("tests/*.py"),
             *ROOT.glob("recipes/*.toml"), *ROOT.glob("scripts/*")]
    stems = {f.stem for f in files if f.is_file() and f.stem not in ("__init__", "__main__")}
    missing = sorted(s for s in stems if not re.search(rf"\b{re.escape(s)}\b", block))
    assert not missing, f"README code map lacks: {missing}"
    named = set(re.findall(r"\b(test_\w+|\w+_\w+)\.(?:py|sh)\b", block))
    gone = sorted(n for n in named if n not in stems)
    assert not gone, f"README code map names files that do not exist: {gone}"
