"""The one place that loads problems: `load_problems(spec, ...) -> list[Problem]`, for recipes and `rmx-local eval`.

    load_problems(spec, *, limit=None, seed=0, question_field=None, answer_field=None, warn=None) -> list[Problem]

SPEC is one of
  arith:single | arith:word | arith:two_step   the built-in seeded generator (`rmx_local.tasks`): the LAST n
        problems of the seed's sequence (n = `limit`, default 200), which are exactly the problems a run with the
        same seed holds out for its final table whenever n <= its task.eval_size (200 in the quickstart).
  a local .jsonl / .json / .csv / .parquet file, optionally `FILE:NAME` (for .json: the top-level key NAME
        holding the list of rows, e.g. a run's `problems.json:eval`)
  a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, optionally `FOLDER:SPLIT`
  a datasets hub id `org/name[:config[:split]]` (e.g. `openai/gsm8k:main:test`), resolved from the local
        datasets cache when offline; with neither cache nor network, one error naming both.
Files and folders are read by the `datasets` library (no hand-written readers). A split is needed when a
folder or hub id has several: `test` is taken when present, else the only one, else an error listing them.

Layouts, detected from the column names (first match wins; names also match case-insensitively):
  Body + Question + Answer          SVAMP / ASDiv: question "{Body} {Question}", answers like 9.0 or "9 (apples)"
  problem + solution [+ answer]     MATH: gold = `answer` when present, else the last \\boxed{} of `solution`
  question + answer                 GSM8K ("... #### 1,234" -> "1234") or plain answers
  problem + answer                  generic
  input + target                    generic (BIG-bench style)
`question_field` / `answer_field` override detection: a column name, or a template of columns such as
"{Body} {Question}" (joined fields). Gold normalisation: the text after "####" (commas dropped), a
number followed by a parenthesised unit ("9 (apples)" -> "9"), integral floats ("8.0" -> "8"), a \\boxed{}
when the answer column holds a full solution; anything else is kept as text (the verifier compares it).

`limit` keeps a seeded random subset (`random.Random(seed).sample`, in file order), so `--limit 100 --seed 0`
is the same 100 problems on every machine. Ids: the source's own `id` column when its values are unique (a
run's problems.json keeps its ids), else "{source}-{row}" with the 0-based row in the source (file stem,
`name[-config][-split]` for hub ids), stable while the source is. Bad input (missing file, unknown
field, empty data, a row without question or gold, a gold that is a list / object or a multi-line or
>200-character text, a question over 1 MB) raises one `RmxError` naming the source, the row and the fix.
Golds the verifier cannot grade (`verify.gold_parses`: words such as "twelve" where a number is expected) are
counted on read: none gradeable is an error, some is one warning line through `warn` (default: the logging
warning), each naming the first few ids and golds.
Shortcut: only the chosen rows' golds are checked, so a bad row outside a `limit` subset goes unnoticed.
"""

from __future__ import annotations

import logging
import random
import re
import string
from pathlib import Path
from typing import Any, Callable

from rmx_local.errors import RmxError
from rmx_local.tasks import DIFFICULTIES, Problem, arith_problems, arith_space_size
from rmx_local.verify import _last_boxed, gold_parses

log = logging.getLogger(__name__)

ARITH_DEFAULT_N = 200  # the quickstart's held-out size
MAX_QUESTION_CHARS = 1_000_000  # no model's context holds a longer problem: the file is broken
MAX_GOLD_CHARS = 200  # a longer (or multi-line) "gold" is a solution without its final answer
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
FIELDS_FIX = "pass --question-field COLUMN (or a template like '{Body} {Question}') and --answer-field COLUMN"


def load_problems(spec: str, *, limit: int | None = None, seed: int = 0, question_field: str | None = None,
                  answer_field: str | None = None, warn: Callable[[str], None] | None = None) -> list[Problem]:
    """Problems from SPEC (see the module docstring); `limit` picks a seeded subset."""
    if limit is not None and limit <= 0:
        raise RmxError(f"--limit {limit}: must be a positive number of problems", fix="use e.g. --limit 100")
    if spec.startswith("arith:"):
        return _arith(spec, limit, seed)
    table, name = _load_table(spec)
    columns = list(table.column_names)
    question_of, answer_col, from_solution = _layout(spec, columns, question_field, answer_field)
    rows = list(range(len(table)))
    if not rows:
        raise RmxError(f"{spec}: no rows (the data is empty)", fix="point at a file or split that holds problems")
    if limit is not None and limit < len(rows):
        rows = sorted(random.Random(seed).sample(rows, limit))
    own_ids = table["id"] if "id" in columns else None
    if own_ids is not None and len(set(map(str, own_ids))) != len(own_ids):
        own_ids = None
    problems, bad = [], []
    for i in rows:
        row = table[i]
        question = question_of(row).strip()
        gold = gold_answer(row[answer_col], from_solution)
        if len(question) > MAX_QUESTION_CHARS:
            raise RmxError(f"{spec}: row {i}: the question is {len(question) / 1e6:.1f} MB long (limit 1 MB)",
                           fix="one problem per row; drop or split that row")
        if "\n" in gold or len(gold) > MAX_GOLD_CHARS:  # a worked solution without its final answer, not a gold
            gold = ""
        if not question or not gold:
            bad.append((i, "question" if not question else "gold answer", row[answer_col]))
            continue
        problems.append(Problem(id=str(own_ids[i]) if own_ids is not None else f"{name}-{i}", question=question, answer=gold))
    if bad:
        i, what, raw = bad[0]
        raise RmxError(f"{spec}: {len(bad)} of {len(rows)} rows have no usable {what} (first: row {i}, "
                       f"{answer_col}={str(raw)[:60]!r})", fix=f"clean those rows, or {FIELDS_FIX}")
    check_golds(spec, problems, warn or log.warning)
    return problems


def check_golds(spec: str, problems: list[Problem], warn: Callable[[str], None], show: int = 3) -> None:
    """Refuse data whose golds the verifier cannot grade at all; warn (one line) when some of them are such."""
    words = [p for p in problems if not gold_parses(p.answer)]
    if not words:
        return
    first = ", ".join(f"{p.id}={p.answer[:40]!r}" for p in words[:show])
    share = f"{len(words)} of {len(problems)} gold answers are words the verifier cannot grade as a number or math"
    if len(words) == len(problems):
        raise RmxError(f"{spec}: {share} (first: {first}); every rollout would be graded wrong",
                       fix=f"golds must be final answers such as 12, 3/4 or \\frac{{1}}{{2}}: {FIELDS_FIX}")
    warn(f"warning: {spec}: {share} (first: {first}); they count as right only when a completion says the same words")


def _arith(spec: str, limit: int | None, seed: int) -> list[Problem]:
    difficulty = spec.split(":", 1)[1]
    if difficulty not in DIFFICULTIES:
        raise RmxError(f"data {spec!r}: unknown generator difficulty", fix=f"use arith:{' or arith:'.join(DIFFICULTIES)}")
    space = arith_space_size(difficulty)
    n = min(limit or ARITH_DEFAULT_N, space)
    return arith_problems(difficulty, n, seed, offset=space - n)


# ---------------------------------------------------------------- reading tables through `datasets`

def _datasets():
    try:
        import datasets
    except ImportError:
        raise RmxError("loading data files needs the `datasets` package", fix="pip install datasets") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _split_local(spec: str) -> tuple[Path, str | None] | None:
    """(path, NAME) when SPEC is an existing path or `PATH:NAME`; None otherwise."""
    if Path(spec).expanduser().exists():
        return Path(spec).expanduser(), None
    head, _, tail = spec.rpartition(":")
    if head and Path(head).expanduser().exists():
        return Path(head).expanduser(), tail
    return None


def _load_table(spec: str):
    """(a `datasets.Dataset`, the id prefix) for a local file, a save_to_disk folder or a hub id."""
    local = _split_local(spec)
    if local is not None:
        path, name = local
        return (_load_folder(spec, path, name) if path.is_dir() else _load_file(spec, path, name)), \
            path.stem + (f"-{name}" if name else "")
    if HUB_ID.fullmatch(spec.split(":", 1)[0]) and spec.count(":") <= 2:
        return _load_hub(spec)
    looks_like_file = Path(spec.split(":", 1)[0]).suffix in FILE_BUILDERS
    raise RmxError(f"data {spec!r}: {'file not found' if looks_like_file else 'not a file, a folder, arith:... or a hub id'}",
                   fix="check the path (relative to the current folder), or use e.g. arith:single or openai/gsm8k:main:test")


def _load_file(spec: str, path: Path, name: str | None):
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise RmxError(f"{path}: unknown data format {path.suffix!r}", fix=f"use one of {', '.join(FILE_BUILDERS)}")
    if name and path.suffix.lower() != ".json":
        raise RmxError(f"data {spec!r}: only a .json file takes a :NAME suffix (its top-level key)", fix=f"pass {path}")
    if path.stat().st_size == 0:
        raise RmxError(f"{path}: no rows (the file is empty)", fix="point at a file that holds problems")
    datasets = _datasets()
    kwargs = {"field": name} if name else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a malformed file; all mean "cannot read it"
        cause = str(e.__cause__ or e).strip().splitlines()
        raise RmxError(f"{path}: cannot read it as {path.suffix} ({type(e).__name__}: {cause[0] if cause else ''})"[:300],
                       fix="check the file: JSONL = one JSON object per line; .json = a list of objects (or "
                           "FILE.json:KEY for a key holding one)") from None


def _pick_split(spec: str, splits: dict, split: str | None):
    if split:
        if split not in splits:
            raise RmxError(f"data {spec!r}: no split {split!r} (has {', '.join(splits)})", fix="pick one of those")
        return splits[split]
    if "test" in splits:
        return splits["test"]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise RmxError(f"data {spec!r} has several splits ({', '.join(splits)})", fix=f"append one, e.g. {spec}:{next(iter(splits))}")


def _load_folder(spec: str, path: Path, split: str | None):
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise RmxError(f"{path}: not a folder written by save_to_disk (no dataset_info.json / dataset_dict.json)",
                       fix="save it with Dataset.save_to_disk, or pass one of its data files") from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(spec, dict(loaded), split)
    if split:
        raise RmxError(f"data {spec!r}: {path} holds one dataset, not splits", fix=f"pass {path}")
    return loaded


def _load_hub(spec: str):
    datasets = _datasets()
    name, config, split = (spec.split(":") + [None, None])[:3]
    config, split = config or None, split or None
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline + not cached surfaces as several exception types
        cache = datasets.config.HF_DATASETS_CACHE
        cause = str(e).strip().splitlines()
        raise RmxError(f"data {spec!r}: cannot load it from the hub or the local datasets cache ({cache}): "
                       f"{type(e).__name__}: {cause[0][:160] if cause else ''}",
                       fix="load it once with network (it is then cached), or export it to a local "
                           ".jsonl/.parquet file and pass that") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(spec, dict(loaded), None)
    return loaded, "-".join(x for x in (name.split("/")[1], config, split) if x)


# ---------------------------------------------------------------- layouts and gold answers

def _field(spec: str, columns: list[str], name: str, what: str) -> str:
    if name in columns:
        return name
    raise RmxError(f"data {spec!r}: no field {name!r} for the {what} (fields: {', '.join(columns)})", fix=FIELDS_FIX)


def _template_reader(spec: str, columns: list[str], template: str):
    """A row -> text function for a column name or a '{col} {col}' template; unknown columns refused."""
    if "{" not in template:
        col = _field(spec, columns, template, "question")
        return lambda row: str(row[col] if row[col] is not None else "")
    used = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    for f in used:
        _field(spec, columns, f, "question template")
    return lambda row: template.format_map({f: "" if row[f] is None else str(row[f]).strip() for f in used})


def _layout(spec: str, columns: list[str], question_field: str | None, answer_field: str | None):
    """(row -> question text, answer column, answer holds a full solution?) for the table's columns."""
    lower = {c.lower(): c for c in columns}
    has = lambda *names: all(n.lower() in lower for n in names)  # noqa: E731
    col = lambda n: lower[n.lower()]  # noqa: E731
    question, answer, from_solution = None, None, False
    if has("body", "question", "answer"):
        question, answer = f"{{{col('body')}}} {{{col('question')}}}", col("answer")
    elif has("problem", "solution"):
        question = col("problem")
        answer, from_solution = (col("answer"), False) if has("answer") else (col("solution"), True)
    elif has("question", "answer"):
        question, answer = col("question"), col("answer")
    elif has("problem", "answer"):
        question, answer = col("problem"), col("answer")
    elif has("input", "target"):
        question, answer = col("input"), col("target")
    if question is None or answer is None:  # partial layouts, completed by an override below
        question = next((col(n) for n in ("question", "problem", "input") if has(n)), None)
        answer, from_solution = next(((col(n), n == "solution") for n in ("answer", "target", "solution") if has(n)), (None, False))
    if question_field:
        question = question_field
    if answer_field:
        answer, from_solution = _field(spec, columns, answer_field, "answer"), False
    if question is None or answer is None:
        missing = "question" if question is None else "answer"
        raise RmxError(f"data {spec!r}: cannot tell which field is the {missing} (fields: {', '.join(columns)})",
                       fix=FIELDS_FIX)
    return _template_reader(spec, columns, question), answer, from_solution


_UNIT_RE = re.compile(r"(-?[\d,]*\.?\d+)\s*\(.*\)")  # ASDiv: "9 (apples)", "1,234 (ml)"
_INTEGRAL_RE = re.compile(r"(-?\d+)\.0+")


def gold_answer(value: Any, from_solution: bool = False) -> str:
    """The gold final answer of one row's answer field, normalised (see the module docstring); "" if none."""
    if value is None or isinstance(value, (bool, list, dict)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = _last_boxed(text)
    if from_solution or (boxed is not None and len(text) > len(boxed) + 8):  # a worked solution ending in \boxed{}
        return (boxed or "").strip()
    unit = _UNIT_RE.fullmatch(text)
    if unit:
        text = unit.group(1).replace(",", "")
    integral = _INTEGRAL_RE.fullmatch(text)
    return integral.group(1) if integral else text
