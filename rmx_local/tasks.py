"""Problems and prompts: a seeded arithmetic generator and prompt building (files and hub data: `rmx_local.data`).

Arithmetic problems (`arith_problems`). Every difficulty has a finite space of S distinct questions
(`arith_space_size`: single 255, word 84,816, two_step 9,254). Problem index i is element (i mod S) of a
permutation of that space drawn with `random.Random(seed)`, so (difficulty, seed, i) fully determines the
problem and its id (`arith-{difficulty}-{seed}-{i}`). Within any S consecutive indices no question repeats, so
index ranges that are disjoint modulo S give disjoint question sets; e.g. train = [0, n_train) and
eval = [S - n_eval, S) never share a question while n_train + n_eval <= S. Indices past S wrap around
(ids stay distinct, question texts repeat): offsets like 1_000_000 are accepted but are NOT disjoint from
train for small spaces, so either pick offsets with `arith_space_size` or dedupe by question text.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Callable

from rmx_local.errors import RmxError

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# No system prompt override: chat prompts keep the tokenizer's own default system prompt.
SYSTEM_PROMPT: str | None = None
RAW_TEMPLATE = "Question: {question}\n" + INSTRUCTION + "\nAnswer: Let's think step by step."
TEMPLATES = ("chat", "raw", "auto")
SHOT_SEPARATOR = "\n\n"  # between a few-shot example's answer and the next "Question:" (raw template)
DIFFICULTIES = ("single", "word", "two_step")


@dataclass(frozen=True)
class Problem:
    """One question with its gold final answer; `id` is stable across runs (e.g. "arith-single-0-17")."""

    id: str
    question: str
    answer: str
    solution: str = ""  # a worked calculation ending at the answer (the arith generator writes one); few-shot examples show it


# ---------------------------------------------------------------- the arithmetic question spaces

NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lily", "Omar", "Zoe")
ITEMS = ("apples", "coins", "books", "marbles", "stickers", "pencils")

# One-step word templates: (text, op); a >= 2 keeps plurals right, and b <= a keeps differences >= 0.
WORD_TEMPLATES = (
    ("{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", "+"),
    ("There are {a} {item} in a box. {name} puts in {b} more. How many {item} are in the box now?", "+"),
    ("{name} bought {a} {item} on Monday and {b} more on Tuesday. How many {item} did {name} buy in total?", "+"),
    ("{name} has {a} {item} and gives {b} of them away. How many {item} does {name} have left?", "-"),
    ("There are {a} {item} on a table. {name} takes {b} of them. How many {item} are left on the table?", "-"),
    ("{name} had {a} {item} and lost {b} of them. How many {item} does {name} have now?", "-"),
)

# Two-step word templates: (text, answer as a function of a, b, c).
TWO_STEP_TEMPLATES: tuple[tuple[str, Callable[[int, int, int], int]], ...] = (
    ("{name} has {a} marbles, gets {b} more, and then gives {c} away. How many marbles does {name} have now?",
     lambda a, b, c: a + b - c),
    ("{name} has {a} bags with {b} cookies in each bag and {c} more cookies on a plate. "
     "How many cookies does {name} have in total?", lambda a, b, c: a * b + c),
    ("{name} has {a} stickers and gives {b} to each of {c} friends. How many stickers does {name} have left?",
     lambda a, b, c: a - b * c),
)
TWO_STEP_RANGES = ((range(5, 16), range(1, 7), range(1, 7)),
                   (range(2, 5), range(2, 7), range(1, 7)),
                   (range(10, 21), range(1, 4), range(2, 4)))


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _two_ops(a: int, op1: str, b: int, op2: str, c: int) -> int | None:
    """Value of `a op1 b op2 c` with × before +/-, or None if it or a partial result is negative."""
    if op2 == "×" and op1 != "×":
        partial = b * c
        value = _apply(a, op1, partial)
    else:
        partial = _apply(a, op1, b)
        value = _apply(partial, op2, c)
    return value if partial >= 0 and value >= 0 else None


@functools.lru_cache(maxsize=None)
def _space(difficulty: str) -> tuple[tuple[Any, ...], ...]:
    """All distinct (question, answer) recipes of a difficulty, in a fixed canonical order."""
    ops = ("+", "-", "×")
    if difficulty == "single":
        return tuple(("expr", f"{a} {op} {b}", _apply(a, op, b))
                     for op in ops for a in range(10) for b in range(10) if _apply(a, op, b) >= 0)
    if difficulty == "word":
        return tuple(("word", t, a, b, name, item)
                     for t, (_, op) in enumerate(WORD_TEMPLATES)
                     for a in range(2, 21) for b in range(1, 21) if op == "+" or b <= a
                     for name in range(len(NAMES)) for item in range(len(ITEMS)))
    if difficulty == "two_step":
        exprs = [("expr", f"{a} {o1} {b} {o2} {c}", v)
                 for o1 in ops for o2 in ops for a in range(1, 10) for b in range(1, 10) for c in range(1, 10)
                 if (v := _two_ops(a, o1, b, o2, c)) is not None]
        words = [("word2", t, a, b, c, name)
                 for t, (ra, rb, rc) in enumerate(TWO_STEP_RANGES)
                 for a in ra for b in rb for c in rc if TWO_STEP_TEMPLATES[t][1](a, b, c) >= 0
                 for name in range(len(NAMES))]
        return tuple(exprs + words)
    raise RmxError(f"unknown arithmetic difficulty {difficulty!r}", fix=f"use one of {', '.join(DIFFICULTIES)}")


def _steps(a: int, op1: str, b: int, op2: str, c: int) -> str:
    """The worked calculation of `a op1 b op2 c` (× first), e.g. "3 × 4 = 12, and 2 + 12 = 14."."""
    if op2 == "×" and op1 != "×":
        partial = b * c
        return f"{b} × {c} = {partial}, and {a} {op1} {partial} = {_apply(a, op1, partial)}."
    partial = _apply(a, op1, b)
    return f"{a} {op1} {b} = {partial}, and {partial} {op2} {c} = {_apply(partial, op2, c)}."


# The two-step word templates' calculations, in the order of TWO_STEP_TEMPLATES: (a, b, c) -> `_steps` arguments.
TWO_STEP_STEPS = (lambda a, b, c: (a, "+", b, "-", c), lambda a, b, c: (a, "×", b, "+", c),
                  lambda a, b, c: (a, "-", b, "×", c))


def _render(recipe: tuple[Any, ...]) -> tuple[str, int, str]:
    """(question text, integer answer, worked calculation) for one recipe of `_space`."""
    kind = recipe[0]
    if kind == "expr":
        expr, value = recipe[1], recipe[2]
        parts = expr.split()
        solution = f"{expr} = {value}." if len(parts) == 3 else _steps(int(parts[0]), parts[1], int(parts[2]), parts[3], int(parts[4]))
        return f"What is {expr}?", value, solution
    if kind == "word":
        _, t, a, b, name, item = recipe
        text, op = WORD_TEMPLATES[t]
        value = _apply(a, op, b)
        return text.format(name=NAMES[name], item=ITEMS[item], a=a, b=b), value, f"{a} {op} {b} = {value}."
    _, t, a, b, c, name = recipe
    text, answer = TWO_STEP_TEMPLATES[t]
    return text.format(name=NAMES[name], a=a, b=b, c=c), answer(a, b, c), _steps(*TWO_STEP_STEPS[t](a, b, c))


@functools.lru_cache(maxsize=16)
def _order(difficulty: str, seed: int) -> tuple[int, ...]:
    """The seeded permutation of the difficulty's space: index i -> position in `_space`."""
    order = list(range(len(_space(difficulty))))
    random.Random(seed).shuffle(order)
    return tuple(order)


def arith_space_size(difficulty: str) -> int:
    """How many distinct questions `difficulty` has (the exclusive upper bound for indices)."""
    return len(_space(difficulty))


def arith_problems(difficulty: str, n: int, seed: int, offset: int = 0) -> list[Problem]:
    """Problems with indices offset .. offset+n-1 of the seeded sequence (see the module docstring)."""
    size = arith_space_size(difficulty)
    if n < 0 or offset < 0:
        raise RmxError(f"arith problems: n={n} and offset={offset} must be >= 0", fix="use non-negative values")
    order = _order(difficulty, seed)
    problems = []
    for i in range(offset, offset + n):
        question, answer, solution = _render(_space(difficulty)[order[i % size]])
        problems.append(Problem(id=f"arith-{difficulty}-{seed}-{i}", question=question, answer=str(answer), solution=solution))
    return problems


# ---------------------------------------------------------------- prompts

def worked_answer(problem: Problem, instruction: str) -> str:
    """A few-shot example's answer in the graded format: its worked calculation, then "The answer is N." (N inside
    \\boxed{} when the instruction asks for it). Shortcut: any other format the instruction names is not followed."""
    final = f"\\boxed{{{problem.answer}}}" if "\\boxed" in instruction else problem.answer
    return " ".join(x for x in (problem.solution, f"The answer is {final}.") if x)


def cut_at_next_question(completion: str) -> str:
    """A few-shot prompt teaches a base model to write the next "Question:" after its answer; the completion is
    graded up to there (lm-eval's `until` convention)."""
    return completion.split(SHOT_SEPARATOR + "Question:", 1)[0]


def build_prompt(tokenizer: Any, question: str, template: str, instruction: str = INSTRUCTION,
                 shots: tuple[Problem, ...] = ()) -> str:
    """The text fed to the model: "chat" (the tokenizer's chat template), "raw" (base models) or "auto".

    `instruction` follows the question (default: the paper's \\boxed{} instruction). `shots`: worked examples put
    before the question, each a full question and `worked_answer` (raw: one after another, SHOT_SEPARATOR between;
    chat: earlier user and assistant turns). The caller draws them from training problems, never held-out ones."""
    if template not in TEMPLATES:
        raise RmxError(f"prompt template {template!r} is unknown", fix=f"use one of {', '.join(TEMPLATES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        template = "chat" if has_chat else "raw"
    if template == "raw":
        raw = lambda q: RAW_TEMPLATE.replace(INSTRUCTION, instruction).replace("{question}", q)  # noqa: E731
        return "".join(raw(s.question) + " " + worked_answer(s, instruction) + SHOT_SEPARATOR for s in shots) + raw(question)
    if not has_chat:
        raise RmxError('task.template = "chat": this tokenizer has no chat template',
                       fix='use task.template = "raw" (or "auto") for base models')
    messages = [m for s in shots for m in ({"role": "user", "content": s.question + "\n" + instruction},
                                           {"role": "assistant", "content": worked_answer(s, instruction)})]
    messages.append({"role": "user", "content": question + "\n" + instruction})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def resolve_template(tokenizer: Any, template: str) -> str:
    """"auto" -> "chat" when the tokenizer has a chat template, else "raw"; others unchanged."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    return template


def encode_prompts(tokenizer: Any, questions: list[str], template: str, instruction: str,
                   shots: tuple[Problem, ...] = ()) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, prompt token ids) for the questions, as every stage and `rmx-local eval` feed them."""
    template = resolve_template(tokenizer, template)
    texts = [build_prompt(tokenizer, q, template, instruction, shots) for q in questions]
    # chat templates already spell out their special tokens; the raw template relies on the tokenizer's BOS
    ids = [tokenizer(s, add_special_tokens=(template == "raw")).input_ids for s in texts]
    return texts, ids
