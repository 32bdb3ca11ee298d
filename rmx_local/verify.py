"""Rule-based answer verifier: reward 1 if a completion's final answer matches the gold answer, else 0.

Pipeline: `extract_answer` pulls one final-answer string out of the completion, `_clean` normalises it (and the
gold), then a numeric fast path compares plain numbers exactly in-process; anything else goes to math-verify
(`parse` + `verify`, gold first) in a worker process with a hard timeout.

Shortcuts taken (deliberately simple, documented so nobody is surprised):
- Extraction priority: the last `\\boxed{...}`/`\\fbox{...}` (balanced braces; an unclosed one is skipped), else
  the last "answer is X" / "Answer: X" / "#### X" phrase (rest of that line, cut at the first sentence end), else
  the last number in the text. Nothing found -> `parsed=None` (unparseable, counted apart from wrong answers).
- Cleaning strips markdown bold, `$`/`\\(`/`\\[` delimiters, a trailing period, thousands commas, `\\text{}`
  wrappers, and units/words after a leading number (`12 apples`, `$5.00` -> `5`). An equation keeps only the
  text after its last `=` (`x = 5` -> `5`), so "x = 5" and "5" match, and so do "x = 5" and "y = 5".
- Numeric fast path: ints, decimals, `a/b`, `\\frac{a}{b}` and negatives are compared exactly as fractions with
  relative tolerance 1e-6. A percent is lenient, as in math-verify: `50%` matches both `50` and `0.5`.
- An unevaluated expression is not an answer to a number: when the gold is a plain number, a final answer that
  still holds an arithmetic operator between operands (`3 × 9`, `24 + 18`, `2^3`, `6 \\cdot 7`) is wrong even
  where math-verify would evaluate it to the gold. Such an answer restates the question: Gemma 3 270M's base
  writes "The answer is 3 × 9.", and TRL GRPO learned to, scoring 1.000 with nothing computed (docs/gemma.md).
  A fraction `a/b` or `\\frac{a}{b}` is a number, not an expression.
- Text answers (no number) match when equal after case-folding and removing spaces; otherwise math-verify
  sees pure words as `\\text{...}` (else "$Paris$" would be the product P*a*r*i*s and equal "$Sirap$").
- math-verify's own signal-based timeouts are off (`parsing_timeout=None`, `timeout_seconds=None`): signals only
  work in the main thread. Instead one reusable worker process (a fresh interpreter, safe next to CUDA and
  unguarded scripts) runs each call; a call that exceeds `timeout_s` kills the worker (restarted on next use)
  and the verdict is incorrect-but-parsed. Worker start-up (importing sympy, ~1 s) is not counted in `timeout_s`.
  Calls are serialised through that one worker (verify_many goes one pair at a time, fast path in-process).
- Bounded work on pathological text: only the last MAX_COMPLETION_CHARS of a completion are searched, a final
  answer longer than MAX_ANSWER_CHARS is wrong, `\\boxed{}` matching is linear, numbers past Python's
  4300-digit limit leave the fast path, and whatever reaches math-verify (`10^10^10^10`, LaTeX nested
  thousands deep) is cut off by the worker's timeout. Model text is parsed, never evaluated as code.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any, Callable

from rmx_local.errors import RmxError

log = logging.getLogger(__name__)

REL_TOL = Fraction(1, 10**6)
MAX_COMPLETION_CHARS = 20_000  # only a completion's last 20k characters are searched for its final answer
MAX_ANSWER_CHARS = 1_000  # a longer final answer is graded wrong without math-verify
_STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Verdict:
    """`correct`: the reward (True = 1). `parsed`: the extracted final answer, None when unparseable."""

    correct: bool
    parsed: str | None


# ---------------------------------------------------------------- extraction

_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+(?![\d.]))?")
_PHRASE_RE = re.compile(r"(?:answer\s*(?:is\b|:)\s*:?|####)[ \t]*([^\n]*)", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|;|,\s|\s(?:because|since|which|so|as)\b", re.IGNORECASE)
_EXPRESSION_RE = re.compile(r"[\d)}]\s*(?:[-+*×·÷−^]|\\times|\\cdot|\\div)\s*[({\\]?\s*-?\d")  # `3 × 9`, `(2+1)*4`
_LEADING_NUM_RE = re.compile(r"^([+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?)(\s*\\?%)?(?=\s|\\|$|[A-Za-z])(.*)$")


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` whose braces balance (nested braces allowed).

    One pass over the braces (a stack of open ones), so 1 MB of unclosed `\\boxed{` costs linear time."""
    boxes = {m.end() - 1 for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)}  # positions of their "{"
    if not boxes:
        return None
    stack: list[int] = []
    best: tuple[int, int] | None = None
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            start = stack.pop()
            if start in boxes and (best is None or start > best[0]):
                best = (start, m.start())
    return text[best[0] + 1 : best[1]] if best else None


def _phrase_answer(text: str) -> str | None:
    """The X of the last "answer is X" / "Answer: X" / "#### X" phrase, cut at the end of its sentence."""
    for m in reversed(list(_PHRASE_RE.finditer(text))):
        rest = m.group(1).strip().replace("**", "").strip()
        if rest.startswith("$") and rest.count("$") >= 2:  # an inline-math answer: keep it whole
            rest = rest[: rest.index("$", rest.index("$") + 1) + 1]
        else:
            rest = _SENTENCE_END_RE.split(rest, maxsplit=1)[0]
        cleaned = _clean(rest)
        # A long phrase without a digit is prose ("Answer: Let's think step by step"), not an answer.
        if cleaned and (re.search(r"[\d\\]", cleaned) or len(cleaned.split()) <= 4):
            return cleaned
    return None


def _clean(s: str) -> str:
    """Normalise an answer string: delimiters, bold, commas, units, `x = ` prefixes, trailing zeros."""
    s = s.strip().replace("**", "").replace("__", "")
    s = re.sub(r"\\[\(\)\[\]]|\\\$|\$", " ", s)  # \( \) \[ \] \$ $
    s = re.sub(r"\\(?:left|right|displaystyle)\b|\\[,;:! ]", " ", s)
    s = re.sub(r"\^\{?\\circ\}?", "", s)  # degrees
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = s.strip().rstrip(".").strip()
    if re.search(r"(?<![<>!\\])=(?!=)", s):  # an equation: keep the right-hand side
        s = re.split(r"(?<![<>!\\])=(?!=)", s)[-1].strip()
    text = re.fullmatch(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", s)
    if text:
        s = text.group(1).strip()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    m = _LEADING_NUM_RE.match(s)
    if m and (not m.group(3).strip() or re.match(r"\s*\\(?:text|mathrm|mbox)\b|\s+[A-Za-z]", m.group(3))):
        s = m.group(1).replace(" ", "") + ("%" if m.group(2) else "")
    num = re.fullmatch(r"([+-]?)(\d*)\.(\d+)(%?)", s)  # 5.00 -> 5, 2.50 -> 2.5, .5 -> 0.5
    if num:
        frac = num.group(3).rstrip("0")
        s = f"{num.group(1).lstrip('+')}{num.group(2) or '0'}{'.' + frac if frac else ''}{num.group(4)}"
    return s.lstrip("+") if re.fullmatch(r"\+\d.*", s) else s


def extract_answer(completion: str) -> str | None:
    """The completion's final answer as a cleaned string, or None when there is no answer at all."""
    completion = completion[-MAX_COMPLETION_CHARS:]
    boxed = _clean(_last_boxed(completion) or "")
    if boxed:
        return boxed
    phrase = _phrase_answer(completion)
    if phrase:
        return phrase
    numbers = _NUMBER_RE.findall(completion)
    return _clean(numbers[-1]) if numbers else None


# ---------------------------------------------------------------- comparison

def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, is_percent) for plain numbers: ints, decimals, a/b, \\frac{a}{b}, negatives; else None."""
    pct = s.endswith("%")
    body = s[:-1].rstrip().removesuffix("\\") if pct else s
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", body)
    if m:
        body = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if not re.fullmatch(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*-?\d+)?", body):
        return None
    try:
        return Fraction(body.replace(" ", "")), pct
    except (ValueError, ZeroDivisionError):
        return None


def _close(a: Fraction, b: Fraction) -> bool:
    """Relative tolerance REL_TOL, computed exactly (no float overflow on huge numbers)."""
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def _numeric_equal(gold: tuple[Fraction, bool], pred: tuple[Fraction, bool]) -> bool:
    (g, g_pct), (p, p_pct) = gold, pred
    if g_pct == p_pct:
        return _close(g, p)
    return _close(g, p) or _close(g / 100 if g_pct else g, p / 100 if p_pct else p)


def _text_key(s: str) -> str:
    return re.sub(r"\s+", "", s).casefold()


_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z '\-]+")  # a text answer ("twelve", "Paris"), graded word for word only


def gold_parses(gold: str) -> bool:
    """Whether the verifier reads a math value from this gold (a number, a fraction, LaTeX, a letter); False for
    words ("twelve"), which only a completion saying the same words matches, and for an empty gold.
    Shortcut: a syntactic test (no math-verify call), so a gold math-verify fails on later still counts here."""
    g = _clean(_last_boxed(gold) or gold)
    return bool(g) and not (_WORDS_RE.fullmatch(g) and len(g) > 1)


def _as_latex(s: str) -> str:
    """Wrap a cleaned answer for math-verify's LaTeX extractor; pure words become `\\text{...}`."""
    if _WORDS_RE.fullmatch(s) and len(s) > 1:
        return f"$\\text{{{s}}}$"
    return "$" + re.sub(r"(?<!\\)%", r"\\%", s) + "$"  # a bare % would start a LaTeX comment


def _math_verify_equal(gold: str, pred: str) -> bool:
    """Runs in the worker: math-verify parse + verify (gold first) with its signal timeouts disabled."""
    from math_verify import parse, verify as mv_verify

    g = parse(_as_latex(gold), parsing_timeout=None)  # type: ignore[arg-type]
    p = parse(_as_latex(pred), parsing_timeout=None)  # type: ignore[arg-type]
    if not g or not p:
        return False
    return bool(mv_verify(g, p, timeout_seconds=None))


# ---------------------------------------------------------------- worker process with a hard timeout

def _worker_main(fd: int) -> None:
    """Worker loop (run as `python -c ...`): import math-verify, then answer (fn, args) requests until None."""
    conn = Connection(fd)
    os.dup2(2, 1)  # stray prints from sympy & co. go to stderr, never into the parent's stdout
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own timeouts are off
    import math_verify  # noqa: F401  (pay the sympy import before reporting ready)

    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        fn, args = request
        try:
            conn.send(("ok", fn(*args)))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which scores it as incorrect
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    """One lazily started, reused worker process; a call past its timeout kills it (restarted next time).

    A fresh interpreter (subprocess + socketpair) rather than multiprocessing: `fork` is unsafe next to
    CUDA/threads, and `spawn` re-imports the caller's `__main__`, which breaks unguarded scripts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._pid = os.getpid()

    def _start(self) -> None:
        parent, child = mp.Pipe(duplex=True)
        paths = [os.path.abspath(p or os.curdir) for p in sys.path if isinstance(p, str)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        code = "import sys; from rmx_local.verify import _worker_main; _worker_main(int(sys.argv[1]))"
        proc = subprocess.Popen([sys.executable, "-c", code, str(child.fileno())], pass_fds=(child.fileno(),),
                                env=env, stdin=subprocess.DEVNULL)
        child.close()
        try:
            ready = parent.poll(_STARTUP_TIMEOUT_S) and parent.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            proc.kill()
            proc.wait()
            raise RmxError("verifier worker process did not start (math-verify import failed or hung)",
                           fix="check that `python -c 'import math_verify'` works in this environment")
        self._proc, self._conn = proc, parent

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> tuple[str, Any]:
        """("ok", result), ("error", message) or ("timeout", None)."""
        with self._lock:
            if self._pid != os.getpid():  # we were forked: the worker and pipe belong to the parent
                self._proc = self._conn = None
                self._pid = os.getpid()
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            assert self._conn is not None
            try:
                self._conn.send((fn, args))
                if self._conn.poll(max(timeout_s, 0.0)):
                    return self._conn.recv()
            except (EOFError, OSError) as e:
                self._kill()
                return "error", f"worker died: {e}"
            self._kill()
            return "timeout", None

    def close(self) -> None:
        """Stop the worker (registered with atexit)."""
        with self._lock:
            if self._proc is None or self._pid != os.getpid():
                return
            try:
                assert self._conn is not None
                self._conn.send(None)
                self._proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._kill()


_WORKER = _Worker()
atexit.register(_WORKER.close)


def _slow_check(gold: str, pred: str, timeout_s: float) -> bool:
    status, result = _WORKER.call(_math_verify_equal, (gold, pred), timeout_s)
    if status == "timeout":
        log.warning("math-verify timed out after %.1fs on %r vs gold %r; scored incorrect", timeout_s, pred[:80], gold[:80])
    elif status == "error":
        log.warning("math-verify failed on %r vs gold %r (%s); scored incorrect", pred[:80], gold[:80], str(result)[:200])
    return status == "ok" and bool(result)


def _fast_verdict(completion: str, gold: str) -> tuple[Verdict | None, str | None, str]:
    """(verdict if decided without math-verify, parsed answer, cleaned gold)."""
    gold_clean = _clean(_last_boxed(gold) or gold)
    parsed = extract_answer(completion)
    if parsed is None:
        return Verdict(False, None), None, gold_clean
    if len(parsed) > MAX_ANSWER_CHARS:
        return Verdict(False, parsed), parsed, gold_clean
    g_num, p_num = _as_number(gold_clean), _as_number(parsed)
    if g_num is not None and p_num is not None:
        return Verdict(_numeric_equal(g_num, p_num), parsed), parsed, gold_clean
    if g_num is not None and _EXPRESSION_RE.search(parsed):  # the question restated, not answered
        return Verdict(False, parsed), parsed, gold_clean
    if _text_key(parsed) == _text_key(gold_clean):
        return Verdict(True, parsed), parsed, gold_clean
    return None, parsed, gold_clean


def verify(completion: str, gold: str, timeout_s: float = 5.0) -> Verdict:
    """Score one completion against its gold answer (see the module docstring for the rules)."""
    verdict, parsed, gold_clean = _fast_verdict(completion, gold)
    if verdict is not None:
        return verdict
    assert parsed is not None
    return Verdict(_slow_check(gold_clean, parsed, timeout_s), parsed)


def verify_many(completions: list[str], golds: list[str], timeout_s: float = 5.0) -> list[Verdict]:
    """`verify` over pairs; only the answers the fast path cannot decide make the trip to the worker."""
    if len(completions) != len(golds):
        raise ValueError(f"verify_many: {len(completions)} completions but {len(golds)} golds")
    return [verify(c, g, timeout_s) for c, g in zip(completions, golds)]
