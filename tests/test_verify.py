"""Golden table for the rule-based verifier, plus the worker's hard timeout and verify_many == verify."""

from __future__ import annotations

import time

import pytest

from rmx_local import verify as V
from rmx_local.verify import Verdict, extract_answer, verify, verify_many

# (completion, gold, expected_correct, expected_parsed or None when unparseable)
GOLDEN = [
    # \boxed{} extraction, nested braces, last box wins, unclosed box skipped
    ("so the total is \\boxed{42}.", "42", True, "42"),
    ("First \\boxed{3}, no wait: \\boxed{5}", "5", True, "5"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True, "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}", True, "\\frac{a}{b^{2}}"),
    ("\\boxed{3} then \\boxed{5", "3", True, "3"),
    ("\\boxed{}  The answer is 9", "9", True, "9"),
    # markdown bold
    ("The answer is **73**.", "73", True, "73"),
    ("**Answer:** 42", "42", True, "42"),
    ("\\boxed{**73**}", "73", True, "73"),
    # \pm answers
    ("\\boxed{\\pm 3}", "\\pm 3", True, "\\pm 3"),
    ("\\boxed{3, -3}", "\\pm 3", True, "3, -3"),
    ("\\boxed{3}", "\\pm 3", False, "3"),
    # equations: compare the right-hand side
    ("\\boxed{x = 5}", "5", True, "5"),
    ("The answer is $x = 5$.", "x = 5", True, "5"),
    ("\\boxed{y = 2x + 1}", "2x+1", True, "2x + 1"),
    # an expression restating the question is no answer to a number, even where it evaluates to the gold
    ("What is 3 × 9? The answer is 3 × 9.", "27", False, "3 × 9"),
    ("The answer is 24 + 18", "42", False, "24 + 18"),
    ("\\boxed{6 \\cdot 7}", "42", False, "6 \\cdot 7"),
    ("\\boxed{2^3}", "8", False, "2^3"),
    ("\\boxed{3 - 5}", "-2", False, "3 - 5"),
    ("3 × 9 = 27", "27", True, "27"),  # the calculation with its result is an answer
    ("\\boxed{\\frac{54}{2}}", "27", True, "\\frac{54}{2}"),  # a fraction is a number
    ("\\boxed{x+1}", "x+1", True, "x+1"),  # a symbolic gold keeps math-verify's equivalence
    # fractions, decimals
    ("\\boxed{\\frac{1}{2}}", "0.5", True, "\\frac{1}{2}"),
    ("The answer is 1/2", "\\frac{1}{2}", True, "1/2"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True, "\\frac{3}{4}"),
    ("The answer is 0.3333333", "1/3", True, "0.3333333"),
    ("The answer is 0.33", "1/3", False, "0.33"),
    ("\\boxed{3.0}", "3", True, "3"),
    # commas in numbers
    ("#### 1,234", "1234", True, "1234"),
    ("\\boxed{1{,}234}", "1,234", True, "1234"),
    ("It costs $1,234.50 in total", "1234.5", True, "1234.5"),
    # units and currency
    ("She has 12 apples.", "12", True, "12"),
    ("The answer is 12 apples because 5 + 7 = 12.", "12", True, "12"),
    ("\\boxed{12 \\text{ apples}}", "12", True, "12"),
    ("Answer: $5.00", "5", True, "5"),
    ("\\boxed{\\$18}", "18", True, "18"),
    ("\\boxed{90^\\circ}", "90", True, "90"),
    # percent (lenient both ways, like math-verify)
    ("\\boxed{50\\%}", "50", True, "50%"),
    ("\\boxed{50\\%}", "0.5", True, "50%"),
    ("The answer is 40%", "50", False, "40%"),
    # negative numbers
    ("The answer is -7.", "-7", True, "-7"),
    ("So 3 - 10 = -7", "-7", True, "-7"),
    ("So 10-3 = 7", "-7", False, "7"),
    # symbolic answers go to math-verify
    ("\\boxed{2x + 1}", "1+2x", True, "2x + 1"),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", True, "\\{1, 2\\}"),
    ("\\boxed{\\frac{2}{\\sqrt{2}}}", "\\sqrt{2}", True, "\\frac{2}{\\sqrt{2}}"),
    # text answers
    ("\\boxed{\\text{Paris}}", "Paris", True, "Paris"),
    ("The answer is paris.", "Paris", True, "paris"),
    ("The answer is Sirap.", "Paris", False, "Sirap"),
    ("The answer isn't obvious, but 6 works", "6", True, "6"),
    ("\\boxed{" + "9" * 400 + "}", "9" * 400, True, "9" * 400),  # exact, no float overflow
    # wrong numbers
    ("\\boxed{41}", "42", False, "41"),
    ("#### 8", "9", False, "8"),
    # the raw template's own "Answer: Let's think step by step" is not an answer
    ("Answer: Let's think step by step. 7 + 5 = 12 in total", "12", True, "12"),
    # unparseable
    ("I don't know", "5", False, None),
    ("", "5", False, None),
    ("   \n  ", "0", False, None),
    ("Let me think about this problem carefully.", "3", False, None),
]


@pytest.mark.parametrize("completion,gold,correct,parsed", GOLDEN)
def test_golden(completion: str, gold: str, correct: bool, parsed: str | None) -> None:
    assert verify(completion, gold) == Verdict(correct, parsed)
    assert extract_answer(completion) == parsed


def test_golden_table_is_big_enough() -> None:
    assert len(GOLDEN) >= 35
    assert sum(p is None for *_, p in GOLDEN) >= 3


def test_verify_many_matches_verify() -> None:
    completions = [c for c, *_ in GOLDEN]
    golds = [g for _, g, *_ in GOLDEN]
    assert verify_many(completions, golds) == [verify(c, g) for c, g in zip(completions, golds)]
    assert verify_many([], []) == []
    with pytest.raises(ValueError):
        verify_many(["1"], [])


def test_numeric_fast_path_never_uses_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise AssertionError("numeric answers must not go to math-verify")

    monkeypatch.setattr(V, "_slow_check", boom)
    assert verify_many(["\\boxed{1,234}", "The answer is -3/4", "#### 5 apples"], ["1234", "-0.75", "6"]) == [
        Verdict(True, "1234"), Verdict(True, "-3/4"), Verdict(False, "5")]


def test_hard_timeout_kills_a_slow_call_and_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inject a slow function into the worker path: every math-verify call becomes a 30 s sleep in the worker.
    real_call = V._WORKER.call
    monkeypatch.setattr(V._WORKER, "call", lambda fn, args, timeout_s: real_call(time.sleep, (30,), timeout_s))
    start = time.monotonic()
    assert verify("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", timeout_s=0.3) == Verdict(False, "\\sqrt{8}")
    assert time.monotonic() - start < 10  # returned at the deadline (plus a worker start at most)
    assert V._WORKER._proc is None  # the stuck worker was killed
    monkeypatch.undo()
    # The next call starts a fresh worker and works normally.
    assert verify("\\boxed{\\sqrt{8}}", "2\\sqrt{2}") == Verdict(True, "\\sqrt{8}")


def test_worker_errors_score_incorrect() -> None:
    assert V._WORKER.call(int, ("not a number",), timeout_s=30)[0] == "error"
    assert V._WORKER.call(max, (2, 7), timeout_s=30) == ("ok", 7)


def test_gold_parses_tells_math_from_words():
    from rmx_local.verify import gold_parses

    table = {"12": True, "-4": True, "3.5": True, "\\frac{1}{2}": True, "x": True, "(C)": True, "\\boxed{7}": True,
             "12 apples": True, "twelve": False, "Paris": False, "\\text{odd}": False, "": False}
    assert {g: gold_parses(g) for g in table} == table
