"""The word-problem recipe's transfer set: well formed, and none of its questions is one the generator makes."""

import json
import re
from pathlib import Path

from rmx_local.data import load_problems
from rmx_local.tasks import TWO_STEP_TEMPLATES, WORD_TEMPLATES

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data" / "one-step-word-problems.jsonl"


def template_pattern(text: str) -> re.Pattern:
    """A generator template as a regex: any name, item or number where it has a placeholder."""
    return re.compile(re.sub(r"\\\{\w+\\\}", ".+?", re.escape(text)) + "$", re.IGNORECASE)


def test_transfer_set_is_well_formed_and_not_generated():
    problems = load_problems(str(DATA))
    assert len(problems) >= 120
    assert all(p.answer.isdigit() and 0 <= int(p.answer) <= 100 for p in problems)
    questions = [p.question for p in problems]
    assert len({q.lower() for q in questions}) == len(questions)
    patterns = [template_pattern(t) for t, _ in WORD_TEMPLATES + TWO_STEP_TEMPLATES]
    assert patterns[0].match("Zed has 3 pears and gets 4 more. How many pears does Zed have now?")  # the check works
    assert not [q for q in questions if any(p.match(q) for p in patterns)]
    assert all(set(json.loads(line)) == {"question", "answer"} for line in DATA.read_text().splitlines())
