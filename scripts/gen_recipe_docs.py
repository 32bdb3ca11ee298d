"""Render docs/recipes.md, the recipe reference, from rmx_local/recipe.py so the two cannot drift apart.

    python scripts/gen_recipe_docs.py           # rewrite docs/recipes.md
    python scripts/gen_recipe_docs.py --check   # exit 1 (and say so) when docs/recipes.md is stale

Names, types and sections come from the live `Recipe` dataclasses, defaults from `recipe_to_toml(Recipe())` (the
TOML a run writes), a section's intro from its class docstring, a field's description from the comment written
beside it in recipe.py (or the comment lines right above it), the allowed values from `recipe.CHOICES` where
that comment does not already list them, and a numeric field's range from its `ranged(...)` declaration.
Shortcut: comments are matched to fields by line number with `tokenize`; a field without one gets an empty
description, and a comment is shown as written (no markup is added beyond escaping `|` for the table).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import get_type_hints

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rmx_local import recipe as recipe_module  # noqa: E402  (needs the repository on sys.path first)
from rmx_local.recipe import CHOICES, Recipe, recipe_to_toml  # noqa: E402

OUT = ROOT / "docs" / "recipes.md"
COMMAND = "python scripts/gen_recipe_docs.py"

INTRO = f"""# Recipe reference

<!-- Generated from rmx_local/recipe.py by `{COMMAND}`; do not edit by hand (tests/test_docs.py checks it). -->

A recipe is one TOML file: top-level keys, then one `[section]` table per stage. Every key has a default (the
paper's value where the paper sets one), so a recipe only names what it changes; `rmx-local run RECIPE key=value`
overrides any key for one run (values are TOML; bare words are strings). Unknown keys and wrong types are refused
with the closest valid key named, and a number outside its field's range (the `range` column; floats must also be
finite) with the field, the value and a valid example; the CLI options that set a field (`rmx-local eval
--top-p`, ...) take the same range. `rmx-local run RECIPE --dry-run` prints the resolved recipe.
The bundled recipes are in `recipes/` (`rmx-local recipes list`).
"""


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment beside the field, or the comment lines right above it."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            beside = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
            above, n = [], stmt.lineno - 1
            while n in comments and n not in code_lines:
                above.insert(0, comments[n])
                n -= 1
            found[(node.name, stmt.target.id)] = " ".join(beside or above)
    return found


def default_values() -> dict[str, str]:
    """Dotted key -> its default as TOML, read back from the resolved TOML of a default recipe."""
    values, section = {}, ""
    for line in recipe_to_toml(Recipe()).splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif " = " in line:
            key, value = line.split(" = ", 1)
            values[section + key] = value
    return values


def sections() -> list[tuple[str, type]]:
    """("", Recipe) for the top level, then (name, dataclass) for every [section], in the recipe's order."""
    hints = get_type_hints(Recipe)
    tables = [(f.name, hints[f.name]) for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(hints[f.name])]
    return [("", Recipe), *tables]


def type_name(typ) -> str:
    """`int`, `str`, ... and `list[str]` as written in recipe.py."""
    return str(typ) if getattr(typ, "__args__", None) else typ.__name__


def describe(key: str, comment: str) -> str:
    """The table cell: the field's comment, led by its allowed values when the comment does not name them all."""
    if key in CHOICES and not all(re.search(rf"\b{c}\b", comment) for c in CHOICES[key]):
        comment = f"one of {' | '.join(sorted(CHOICES[key]))}" + (f"; {comment}" if comment else "")
    return comment.replace("|", "\\|")


def render() -> str:
    comments = field_comments(Path(inspect.getsourcefile(recipe_module)).read_text())
    defaults = default_values()
    parts = [INTRO]
    for name, cls in sections():
        parts.append(f"\n## {f'[{name}]' if name else 'Top level'}\n")
        doc = inspect.getdoc(cls) if name else ""
        if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses invent a signature docstring
            parts.append(doc + "\n")
        parts.append("| key | type | default | range | description |\n|---|---|---|---|---|")
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            key = f"{name}.{f.name}" if name else f.name
            text = describe(key, comments.get((cls.__name__, f.name), ""))
            rng = f.metadata.get("range")
            span = rng.rule().split(" (")[0] if rng else ""
            parts.append(f"| `{key}` | {type_name(hints[f.name])} | `{defaults[key]}` | {span} | {text} |")
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run `{COMMAND}` and commit the result", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
