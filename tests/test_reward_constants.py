"""Reward false positives (issue 9 item 2): constants are not units, prose is not an answer.

Two rules of the reward contract (recipe/iib_lpo/reward/score.py module docstring):

* The trailing-unit rule drops units after a bare number (``5 cm`` = 5) but never a
  mathematical constant or function, written as a word (``2 pi``, ``2 infinity``, ``2 sqrt 3``)
  or in LaTeX (``3\\pi``, ``2\\mathrm{e}``, ``2\\text{ pi}``), in or out of ``\\boxed{}``: such an
  answer is an expression (``2 pi`` = ``2\\pi``) and never equals the bare number.
* The ``####`` / ``Answer:`` / ``The answer is`` fallbacks accept only a mathematical answer;
  prose after them is no answer (reason ``unparseable_answer``, the style's wrong score).
"""

from __future__ import annotations

import time

import pytest

from recipe.iib_lpo.reward import answer_checking as ac
from recipe.iib_lpo.reward import extraction as ex
from recipe.iib_lpo.reward import normalization as norm
from recipe.iib_lpo.reward import verifier_pool as vp
from recipe.iib_lpo.reward.score import compute_score, extract_answer


@pytest.fixture(scope="module")
def verifier():
    vp.warm_up_verifier()
    yield
    vp.shutdown_verifier()


# --------------------------------------------------------------------------------------------
# Constants are not units: (prediction, gold, expected)
# --------------------------------------------------------------------------------------------
CONSTANT_CASES = [
    # pi as a word, in LaTeX, in a text wrapper
    ("2 pi", "2\\pi", True),
    ("2pi", "2\\pi", True),
    ("2 PI", "2\\pi", True),
    ("2\\text{ pi}", "2\\pi", True),
    ("\\text{pi}", "\\pi", True),
    ("pi/2", "\\frac{\\pi}{2}", True),
    ("2\\pi", "2 pi", True),  # the gold is normalised the same way
    ("2", "2\\pi", False),
    ("2 pi", "2", False),
    ("2 PI", "2", False),
    ("2\\text{ pi}", "2", False),
    ("2 pi", "3\\pi", False),
    ("3\\pi", "3", False),
    ("3 \\pi", "2", False),
    # e
    ("e^2", "e^2", True),
    ("\\mathrm{e}^2", "e^2", True),
    ("\\e^{2}", "e^2", True),
    ("e^3", "e^2", False),
    ("3 e", "3", False),
    ("3e", "3", False),
    ("3\\,\\mathrm{e}", "3", False),
    ("3\\mathrm{e}", "3e", True),
    ("3 \\e", "3", False),
    # i
    ("2 i", "2i", True),
    ("2\\mathrm{i}", "2i", True),
    ("2 i", "2", False),
    ("2\\text{ i}", "2", False),
    # infinity
    ("infinity", "\\infty", True),
    ("inf", "\\infty", True),
    ("(-inf, 3)", "(-\\infty, 3)", True),
    ("[1, infinity)", "[1,\\infty)", True),
    ("2 infinity", "2", False),
    ("2 inf", "2", False),
    ("2\\text{ infinity}", "2", False),
    # square roots and functions
    ("2 sqrt 3", "2\\sqrt{3}", True),
    ("sqrt(2)/2", "\\frac{\\sqrt{2}}{2}", True),
    ("2sqrt{3}", "2\\sqrt3", True),
    ("2 sqrt 3", "2", False),
    ("2\\sqrt{3}", "2", False),
    ("2 sin pi", "2", False),
    # postfix operations and hedges are not units either
    ("4 squared", "4", False),
    ("2 cubed", "2", False),
    ("3 or more", "3", False),
    # units are still dropped after a number
    ("2 cm", "2", True),
    ("5 cm", "5", True),
    ("12 dollars", "12", True),
    ("30^\\circ", "30", True),
    ("10\\text{ cm}^2", "10", True),
    ("5 square feet", "5", True),
    ("3 times", "3", True),
    ("2 sec", "2", True),
    ("2 cm", "3", False),
    ("12 dollars", "13", False),
]


@pytest.mark.parametrize("pred,gold,expected", CONSTANT_CASES)
def test_constants_are_not_units(verifier, pred, gold, expected):
    assert ac.answers_equivalent(pred, gold) is expected


@pytest.mark.parametrize(
    "answer,latex",
    [
        ("2 pi", "2 \\pi"),
        ("2\\text{ pi}", "2\\pi"),
        ("2 \\mathrm{e}", "2 e"),
        ("(-inf, 3)", "(-\\infty , 3)"),
        ("sqrt(x+1)", "\\sqrt{x+1}"),
        ("2 sqrt 3", "2 \\sqrt{3}"),
        ("\\e^x", "e^x"),
        # whole words only: other words and real LaTeX commands are left alone
        ("\\text{pie}", "pie"),
        ("\\inf S", "\\inf S"),
        ("1\\\\e", "1\\\\e"),  # a LaTeX line break before e is not \e
        ("\\text{E}", "e"),  # a choice letter, not Euler's number
        # units after a number are dropped
        ("5 cm", "5"),
        ("12 dollars", "12"),
        ("30^\\circ", "30"),
    ],
)
def test_normalised_form(answer, latex):
    assert norm.normalize_answer(answer).latex == latex


@pytest.mark.parametrize(
    "solution,gold,score",
    [
        ("so \\boxed{2 pi}", "2\\pi", 1.0),
        ("so \\boxed{2 pi}", "2", 0.0),
        ("so \\boxed{2\\pi}", "2 pi", 1.0),
        ("\\boxed{pi}", "\\pi", 1.0),
        ("\\boxed{3\\pi}", "3", 0.0),
        ("\\boxed{2\\mathrm{e}}", "2", 0.0),
        ("\\boxed{3 e}", "3", 0.0),
        ("$\\boxed{e^2}$", "e^2", 1.0),
        ("\\boxed{2 infinity}", "2", 0.0),
        ("\\boxed{2 cm}", "2", 1.0),
        ("\\boxed{2 cm}", "2\\pi", 0.0),
        ("The answer is 2 pi.", "2", 0.0),
        ("The answer is 2 pi.", "2\\pi", 1.0),
        ("#### 2 pi", "2", 0.0),
        ("Answer: 5 cm", "5", 1.0),
    ],
)
def test_compute_score_with_constants(verifier, solution, gold, score):
    out = compute_score("math", solution, gold)
    assert out["score"] == score, out
    assert out["reason"] == ("correct" if score else "wrong")


# --------------------------------------------------------------------------------------------
# The line fallbacks accept only mathematics
# --------------------------------------------------------------------------------------------
NON_ANSWERS = [
    "The answer is not obvious, let me think",
    "Hmm. The answer is not obvious. Let me think again about the triangle.",
    "So the answer is correct!",
    "The answer is yes",
    "The answer is a bit tricky",
    "The answer is two-fold: first, ...",
    "I think the answer is ...",
    "The answer is 5. Wait, the answer is not 5",  # the last statement counts
    "The answer is 3 or 4",
    "The answer is 4 squared",
    "Answer: see above",
    "Answer: \u4e0d\u786e\u5b9a",
    "#### not sure",
    "#### ",
]


@pytest.mark.parametrize("text", NON_ANSWERS)
def test_fallback_rejects_prose(text):
    found = ex.extract_answer_detailed(text)
    assert found.answer is None
    assert found.reason in ("unparseable_answer", "empty_answer")
    if text.strip() != "####":
        assert found.reason == "unparseable_answer"
        assert found.source in ("answer_line", "gsm8k_hashes")


@pytest.mark.parametrize("text", NON_ANSWERS)
@pytest.mark.parametrize("style,wrong", [("binary", 0.0), ("signed", -1.0)])
def test_prose_after_the_answer_phrase_scores_as_no_answer(text, style, wrong):
    # golds chosen to be what a prose parse could wrongly match ("not ...", "yes", 5, 3, 4)
    for gold in ("5", "3", "4", "\\text{yes}", "\\text{not obvious, let me think}"):
        out = compute_score("math", text, gold, reward_style=style)
        assert out["score"] == wrong and out["acc"] is False and out["pred"] is None, (text, gold, out)
        assert out["reason"] in ("unparseable_answer", "empty_answer")


@pytest.mark.parametrize(
    "text,answer",
    [
        ("the answer is 42.", "42"),
        ("the answer is $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("The answer is $\\frac{1}{2}$, since the two halves match.", "\\frac{1}{2}"),
        ("Therefore the answer is -3.5.", "-3.5"),
        ("The answer is 12 dollars.", "12 dollars"),
        ("The answer is five.", "five"),
        ("The answer is 2xy", "2xy"),
        ("The answer is x-y", "x-y"),
        ("Answer: x = 3", "x = 3"),
        ("Answer: f(x) = x^2 + 1", "f(x) = x^2 + 1"),
        ("Answer: (1, 2]", "(1, 2]"),
        ("Answer: \\{1, 2\\}", "\\{1, 2\\}"),
        ("The answer is (C).", "(C)"),
        ("Answer: \\text{Monday}", "\\text{Monday}"),  # explicit LaTeX text is an answer
        ("The answer is pi/2", "pi/2"),
        ("The answer is sqrt(2)/2", "sqrt(2)/2"),
        ("The answer is infinity", "infinity"),
        ("The answer is \u221e", "\u221e"),
        ("The answer is a", "a"),
        ("I checked it twice; the answer is not 5. The answer is 6", "6"),
        ("#### 1,234", "1,234"),
    ],
)
def test_fallback_accepts_math(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "text,gold",
    [
        ("the answer is 42.", "42"),
        ("the answer is $\\frac{1}{2}$", "1/2"),
        ("the answer is $\\frac{1}{2}$", "0.5"),
        ("The answer is sqrt(2)/2", "\\frac{\\sqrt{2}}{2}"),
        ("The answer is infinity", "\\infty"),
        ("Answer: x = 3", "3"),
    ],
)
def test_fallback_answers_score(verifier, text, gold):
    out = compute_score("math", text, gold)
    assert (out["score"], out["reason"]) == (1.0, "correct"), out


@pytest.mark.parametrize(
    "text",
    ["pi " * 333, "sqrt(" * 200, "sqrt" * 250, "2 " + "\\text{pi}" * 100, "inf" * 333, "\\e" * 500, "a b " * 250],
)
def test_new_rules_are_fast_on_worst_case_strings(text):
    """The constant rewrites and the prose check stay linear-ish at the answer cap."""
    start = time.perf_counter()
    for _ in range(10):
        norm.normalize_answer(text)
        ex._is_math_line_answer(text)
        ex.extract_answer_detailed("The answer is " + text)
    assert time.perf_counter() - start < 0.5


def test_last_answer_statement_counts_even_on_one_line(verifier):
    """A line with several statements is read at its last one, in linear time (1 MB here)."""
    start = time.perf_counter()
    out = compute_score("math", "Answer: 1 " * 100_000, "1")
    assert time.perf_counter() - start < 1.0
    assert (out["score"], out["pred"]) == (1.0, "1")
    assert compute_score("math", "The answer is 1. No, the answer is 2", "1")["score"] == 0.0
