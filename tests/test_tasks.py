"""Arithmetic generator and prompt building (no network, no real tokenizer); data files: test_data.py."""

from __future__ import annotations

import re

import pytest

from rmx_local.errors import RmxError
from rmx_local.tasks import (
    DIFFICULTIES,
    INSTRUCTION,
    arith_problems,
    arith_space_size,
    build_prompt,
    cut_at_next_question,
    worked_answer,
)
from rmx_local.verify import verify_many


# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_arith_is_deterministic_and_seeded(difficulty: str) -> None:
    a = arith_problems(difficulty, 50, seed=0)
    assert a == arith_problems(difficulty, 50, seed=0)
    assert [p.question for p in a] != [p.question for p in arith_problems(difficulty, 50, seed=1)]
    assert a[0].id == f"arith-{difficulty}-0-0" and a[17].id == f"arith-{difficulty}-0-17"


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_arith_offset_is_a_window_of_one_sequence(difficulty: str) -> None:
    full = arith_problems(difficulty, 60, seed=3)
    assert arith_problems(difficulty, 20, seed=3, offset=40) == full[40:]


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_arith_splits_are_disjoint(difficulty: str) -> None:
    size = arith_space_size(difficulty)
    n_train, n_eval = min(150, size // 2), min(100, size // 2)
    train = arith_problems(difficulty, n_train, seed=0)
    evals = arith_problems(difficulty, n_eval, seed=0, offset=size - n_eval)
    assert not {p.id for p in train} & {p.id for p in evals}
    assert not {p.question for p in train} & {p.question for p in evals}
    assert len({p.question for p in train}) == n_train  # no repeats inside a split either


def test_single_space_is_exhausted_without_repeats_then_wraps() -> None:
    size = arith_space_size("single")
    problems = arith_problems("single", size, seed=7)
    assert len({p.question for p in problems}) == len(problems) == size == 255
    # Past the end the sequence wraps: same questions, new ids (callers dedupe or pick offsets below S).
    far = arith_problems("single", 3, seed=7, offset=4 * size + 10)
    assert [p.question for p in far] == [p.question for p in problems[10:13]]
    assert far[0].id == f"arith-single-7-{4 * size + 10}"
    assert arith_problems("word", 5, seed=2, offset=1_000_000)[0].id == "arith-word-2-1000000"


def _expr_value(question: str) -> int:
    expr = re.fullmatch(r"What is ([\d +\-×]+)\?", question)
    assert expr, question
    return eval(expr.group(1).replace("×", "*"))  # noqa: S307 - digits and operators only


def _word_value(question: str) -> int:
    a, b, *rest = (int(x) for x in re.findall(r"\d+", question))
    if "each of" in question:
        return a - b * rest[0]
    if "in each bag" in question:
        return a * b + rest[0]
    if "then gives" in question:
        return a + b - rest[0]
    subtract = any(w in question for w in ("gives", "takes", "lost"))
    return a - b if subtract else a + b


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_arith_answers_are_correct(difficulty: str) -> None:
    for p in arith_problems(difficulty, min(300, arith_space_size(difficulty) - 5), seed=11, offset=5):
        value = _expr_value(p.question) if p.question.startswith("What is") else _word_value(p.question)
        assert p.answer == str(value) and value >= 0, p


def test_arith_difficulty_shapes() -> None:
    single = arith_problems("single", 200, seed=0)
    assert all(re.fullmatch(r"What is \d [+\-×] \d\?", p.question) for p in single)
    assert {p.question.split()[3] for p in single} == {"+", "-", "×"}
    word = arith_problems("word", 100, seed=0)
    assert all(len(re.findall(r"\d+", p.question)) == 2 and max(map(int, re.findall(r"\d+", p.question))) <= 20
               for p in word)
    two = arith_problems("two_step", 200, seed=0)
    assert any(p.question.startswith("What is") for p in two) and any("How many" in p.question for p in two)


def test_arith_errors() -> None:
    with pytest.raises(RmxError, match="difficulty 'hard'"):
        arith_problems("hard", 1, seed=0)
    with pytest.raises(RmxError):
        arith_problems("single", -1, seed=0)


# ---------------------------------------------------------------- prompts


class FakeTokenizer:
    """Just enough of a Hugging Face tokenizer: a chat_template attribute and apply_chat_template."""

    def __init__(self, chat_template: str | None) -> None:
        self.chat_template = chat_template
        self.calls: list[dict] = []

    def apply_chat_template(self, messages: list[dict], tokenize: bool, add_generation_prompt: bool) -> str:
        self.calls.append({"messages": messages, "tokenize": tokenize, "add_generation_prompt": add_generation_prompt})
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"


def test_chat_prompt() -> None:
    tok = FakeTokenizer("{{ messages }}")
    prompt = build_prompt(tok, "What is 2 + 3?", "chat")
    assert prompt == f"<|user|>What is 2 + 3?\n{INSTRUCTION}<|end|><|assistant|>"
    assert tok.calls == [{"messages": [{"role": "user", "content": f"What is 2 + 3?\n{INSTRUCTION}"}],
                          "tokenize": False, "add_generation_prompt": True}]
    assert build_prompt(tok, "What is 2 + 3?", "auto") == prompt


def test_raw_prompt() -> None:
    expected = ("Question: What is {x}?\nPlease reason step by step, and put your final answer within \\boxed{}.\n"
                "Answer: Let's think step by step.")
    assert build_prompt(FakeTokenizer(None), "What is {x}?", "raw") == expected
    assert build_prompt(FakeTokenizer(None), "What is {x}?", "auto") == expected
    assert build_prompt(FakeTokenizer("tmpl"), "What is {x}?", "raw") == expected


def test_prompt_errors() -> None:
    with pytest.raises(RmxError, match="no chat template"):
        build_prompt(FakeTokenizer(None), "q", "chat")
    with pytest.raises(RmxError, match="'fancy'"):
        build_prompt(FakeTokenizer("t"), "q", "fancy")


# ---------------------------------------------------------------- few-shot examples


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_worked_solutions_end_at_the_answer(difficulty: str) -> None:
    problems = arith_problems(difficulty, 300, seed=2)
    assert all(p.solution.endswith(f"= {p.answer}.") for p in problems)
    # the verifier grades every worked answer right in either format the examples are shown in
    for instruction in (INSTRUCTION, "Write the calculation, then end with: The answer is N."):
        answers = [worked_answer(p, instruction) for p in problems]
        assert all(v.correct for v in verify_many(answers, [p.answer for p in problems]))


def test_two_step_solutions_follow_precedence() -> None:
    by_question = {p.question: p.solution for p in arith_problems("two_step", arith_space_size("two_step"), seed=0)}
    assert by_question["What is 2 + 3 × 4?"] == "3 × 4 = 12, and 2 + 12 = 14."
    assert by_question["What is 2 × 3 + 4?"] == "2 × 3 = 6, and 6 + 4 = 10."
    assert by_question["Ana has 16 stickers and gives 3 to each of 2 friends. How many stickers does Ana have left?"] \
        == "3 × 2 = 6, and 16 - 6 = 10."


def test_raw_few_shot_prompt_puts_worked_examples_first() -> None:
    class NoChat:
        chat_template = None

    shots = tuple(arith_problems("single", 3, seed=0))
    prompt = build_prompt(NoChat(), "What is 1 + 1?", "raw", INSTRUCTION, shots)
    blocks = prompt.split("\n\n")
    assert len(blocks) == 4 and blocks[3] == build_prompt(NoChat(), "What is 1 + 1?", "raw", INSTRUCTION)
    for block, shot in zip(blocks, shots):
        assert block.startswith(f"Question: {shot.question}\n")
        assert block.endswith(f"step by step. {shot.solution} The answer is \\boxed{{{shot.answer}}}.")
    assert cut_at_next_question(" 1 + 1 = 2. The answer is 2.\n\nQuestion: What is 5 + 5?\nAnswer: 10") \
        == " 1 + 1 = 2. The answer is 2."


def test_chat_few_shot_prompt_has_earlier_turns() -> None:
    from conftest import char_tokenizer

    shots = tuple(arith_problems("word", 2, seed=0))
    prompt = build_prompt(char_tokenizer(), "What is 1 + 1?", "chat", "End with: The answer is N.", shots)
    assert prompt.count("<|im_start|>user") == 3 and prompt.count("<|im_start|>assistant") == 3
    assert f"{shots[1].solution} The answer is {shots[1].answer}.<|im_end|>" in prompt
    assert prompt.index(shots[1].question) < prompt.index("What is 1 + 1?")
