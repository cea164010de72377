"""Whether two answers are the same (the verifiable math reward, METHOD.md step 5): the public
check, :func:`check_equivalence` / :func:`answers_equivalent`, and its path counters.

Model output is untrusted: nothing here evaluates text (no ``eval``/``exec``/``sympify``/
``parse_expr`` of raw text on any path). The reward is split by concern:

* extraction.py: the final answer of a response (box, ``####`` line, answer line, prose check);
* normalization.py: pure-string normalisation and the exact rational value of an answer;
* verifier_pool.py: math-verify in persistent child processes (deadline, eval guard);
* this module: size caps, prose check, the exact fast path, then math-verify.

The symbolic comparison is math-verify's own (``parse`` with ``LatexExtractionConfig`` only, then
``verify``). What this code does that math-verify does not, and why (measured on the tables of
tests/test_reward_checker.py, tests/test_reward_constants.py, tests/test_reward_runtime.py):

1. A hard time limit in any thread (verifier_pool.py): math-verify's timeout is
   ``signal.alarm``, which ``parse`` refuses off the main thread (verl calls the reward from
   executor threads), and ``9^{9^{9}}`` ignores signals anyway.
2. An eval guard in the verifier (verifier_pool.py): ``parse_expr`` (``eval``) is reachable
   through ``sympify`` of a string; ``ExprExtractionConfig``, which calls it, is never used.
3. Size and nesting caps (``answer_too_long``/``answer_too_deep``/``answer_unbalanced``):
   math-verify has none, and its LaTeX grammar is exponential in nesting (16 nested ``\\frac``
   take 7 s).
4. Answer extraction (extraction.py): math-verify's box extraction differs on 5 of the 13 box
   rows of the extraction table (it joins an earlier box to the last, reads past ``\\boxed 5``,
   accepts an empty or unterminated box), and without ``ExprExtractionConfig`` it finds no
   answer in 19 of 21 plain answer lines (``Answer: x = 3``, ``#### 1,234``).
5. Prose detection: a line answer must be mathematics ("The answer is not obvious" is no
   answer), and a prose prediction is compared as text only (``text_mismatch``): sympy would
   read ``touch`` as t*o*u*c*h. math-verify has no notion of either.
6. Normalisation (normalization.py): math-verify's own normaliser gives another form for 11 of
   the 14 pinned forms; it drops a trailing ``\\text{..}`` even when it is a constant
   (``2\\text{ pi}`` -> ``2``) and knows no number words, ``pi`` as a word, degree marks or
   ``10\\,000``. math-verify on the raw strings gets 29 of the 131 rows of the two equivalence
   tables wrong (4 of them false positives); it still normalises what we send, after ours.
7. An exact fast path with no IPC: plain rationals (``Fraction``) and identical normalised text
   decide most GSM8K/MATH answers in this process; math-verify needs sympy, which only the
   verifier process loads.
8. Percents: ``50\\%`` equals both 50 and 0.5 (and ``x\\%`` is also tried as ``x/100``);
   math-verify alone says False to ``50\\%`` = 0.5, ``50\\%`` = 50, ``75%`` = ``\\frac{3}{4}`` and to
   ``\\frac{\\sqrt2}{2}\\%`` = ``\\frac{\\sqrt2}{200}``.

Every outcome carries a ``reason`` and is counted (:func:`equivalence_path_counts`); failures are
logged.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter

from recipe.iib_lpo.reward.normalization import (
    MAX_ANSWER_CHARS,
    MAX_BRACE_DEPTH,
    MAX_PAREN_DEPTH,
    NON_MATH_MARKERS,
    TEXT_GROUP_RE,
    normalize_answer,
    unescaped_chars,
)
from recipe.iib_lpo.reward.verifier_pool import CheckResult, math_verify_check

logger = logging.getLogger(__name__)

#: Free-standing letter runs at least this long that are not known math words mark an answer as
#: text (prose, code, shell), which is then compared as a normalised string only: sympy would
#: read ``touch`` as the product t*o*u*c*h, which can be slow and is never the intended meaning.
MIN_TEXT_WORD_LETTERS = 5
_MATH_WORDS = frozenset(
    "arcsin arccos arctan arcsec arccsc arccot sinh cosh tanh infty infinity sqrt frac dfrac"
    " undefined".split()
)
#: Default hard time limit (seconds) of one equivalence check, measured from the request to
#: the verifier process (start-up of a fresh process is not counted). math-verify's own default
#: is 5 s per operation.
DEFAULT_TIMEOUT_S = 5.0

_STATS_LOCK = threading.Lock()
_PATH_COUNTS: Counter = Counter()


def _count(reason: str) -> None:
    with _STATS_LOCK:
        _PATH_COUNTS[reason] += 1


def equivalence_path_counts() -> dict[str, int]:
    """How many equivalence checks ended by which path/reason in this process (a snapshot)."""
    with _STATS_LOCK:
        return dict(_PATH_COUNTS)


def reset_equivalence_path_counts() -> None:
    with _STATS_LOCK:
        _PATH_COUNTS.clear()


# ---------------------------------------------------------------------------------------------
# Guards: what is not worth parsing, and prose
# ---------------------------------------------------------------------------------------------
def _input_problem(answer: str) -> str | None:
    """Why ``answer`` is not worth parsing (too long, too deeply nested, unbalanced), or None."""
    if len(answer) > MAX_ANSWER_CHARS:
        return "answer_too_long"
    braces = parens = 0
    for _, ch in unescaped_chars(answer):
        if ch == "{":
            braces += 1
            if braces > MAX_BRACE_DEPTH:
                return "answer_too_deep"
        elif ch == "}":
            braces -= 1
            if braces < 0:
                return "answer_unbalanced"
        elif ch in "([":
            parens += 1
            if parens > MAX_PAREN_DEPTH:
                return "answer_too_deep"
        elif ch in ")]":
            parens -= 1
    return "answer_unbalanced" if braces else None


def _looks_like_text(latex: str) -> bool:
    """Prose/code rather than a math expression (see MIN_TEXT_WORD_LETTERS)."""
    if any(marker in latex for marker in NON_MATH_MARKERS):
        return True
    # Drop \text{...} groups and \commands, then look for long free-standing words.
    stripped = re.sub(r"\\[A-Za-z]+", " ", TEXT_GROUP_RE.sub(" ", latex))
    words = re.findall(r"[A-Za-z]{%d,}" % MIN_TEXT_WORD_LETTERS, stripped)
    return any(w.lower() not in _MATH_WORDS for w in words)


def _replace_surrogates(s: str) -> str:
    """Lone surrogates cannot be encoded; replace them so every later step sees valid text."""
    return s.encode("utf-8", "replace").decode("utf-8") if _has_surrogates(s) else s


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------
def check_equivalence(pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> CheckResult:
    """Whether ``pred`` and ``gold`` are the same answer, with the path that decided it."""
    result = _check_equivalence(pred, gold, timeout_s)
    _count(result.reason)
    if result.failed and result.reason not in ("empty_answer",):
        logger.warning("answer check failed (%s); pred=%.80r gold=%.80r", result.reason, pred, gold)
    return result


def answers_equivalent(pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True when ``pred`` is mathematically the same answer as ``gold``.

    Safe for untrusted ``pred`` (never evaluated) and bounded by ``timeout_s`` seconds of
    verifier time in any thread; a check that fails or times out returns False (logged and
    counted, see :func:`check_equivalence`).
    """
    return check_equivalence(pred, gold, timeout_s).equal


def _check_equivalence(pred: str, gold: str, timeout_s: float) -> CheckResult:
    if not isinstance(pred, str) or not isinstance(gold, str):
        return CheckResult(False, "bad_input_type")
    pred, gold = _replace_surrogates(pred), _replace_surrogates(gold)
    problem = _input_problem(pred)
    if problem:
        return CheckResult(False, problem)
    problem = _input_problem(gold)
    if problem:
        return CheckResult(False, problem.replace("answer", "gold"))
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p.key or not g.key:
        return CheckResult(False, "empty_answer")
    if p.key == g.key:
        return CheckResult(True, "exact_string")
    if p.number is not None and g.number is not None:
        equal = p.number == g.number
        if p.percent != g.percent:
            pct, other = (p, g) if p.percent else (g, p)
            equal = equal or pct.number / 100 == other.number
        return CheckResult(equal, "exact_number")
    if _looks_like_text(p.latex):
        return CheckResult(False, "text_mismatch")
    pairs = [(p.latex, g.latex)]
    if p.percent != g.percent:
        pct, other = (p, g) if p.percent else (g, p)
        scaled = "\\frac{" + pct.latex + "}{100}"
        pairs.append((scaled, other.latex) if pct is p else (other.latex, scaled))
    deadline = time.monotonic() + timeout_s
    last = CheckResult(False, "math_verify")
    for pred_latex, gold_latex in pairs:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return CheckResult(False, "timeout")
        last = math_verify_check(pred_latex, gold_latex, remaining)
        if last.equal or last.failed:
            return last
    return last

