"""Answer extraction, equivalence table, reward styles and adversarial inputs of the reward.

The verifier process is started once per module (``verifier`` fixture) so that per-call timings
measure the check itself, not the ~1-4 s start-up of a fresh process.
"""

from __future__ import annotations

import time

import pytest

from recipe.iib_lpo.reward import answer_checking as ac
from recipe.iib_lpo.reward import extraction as ex
from recipe.iib_lpo.reward import normalization as norm
from recipe.iib_lpo.reward import verifier_pool as vp
from recipe.iib_lpo.reward.score import (
    answers_equivalent,
    compute_score,
    extract_answer,
    reset_reward_reason_counts,
    reward_reason_counts,
)


@pytest.fixture(scope="module")
def verifier():
    vp.warm_up_verifier()
    yield
    vp.shutdown_verifier()


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------
EXTRACTION_CASES = [
    ("So the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} first try, then \\boxed{2}", "2"),  # the last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("$\\boxed{\\frac{\\sqrt{3}}{2}}$ and some text after", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the box
    ("The result is $\\boxed 5$.", "5"),  # \boxed x form
    ("\\fbox{7}", "7"),
    ("\\boxed { 12 }", "12"),  # space before the brace, stripped content
    ("Final: \\boxed{x=3}\nWait, let me double check... yes.", "x=3"),  # text after ignored
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),  # GSM8K
    ("#### 1,000\nExtra lines", "1,000"),
    ("Reasoning...\nAnswer: 17", "17"),
    ("Final Answer: $\\frac{3}{4}$ because ...", "\\frac{3}{4}"),
    ("The answer is 3.5. This follows from the ratio.", "3.5"),
    ("answer: 1\nanswer: 2", "2"),  # the last answer line
    ("Answer: 12\n\\boxed{13}", "13"),  # a box beats an answer line
    ("no final answer here", None),
    ("", None),
    ("\\boxed{}", None),  # empty box
    ("\\boxed{3", None),  # unterminated box (truncated response)
    ("\\boxedfoo{3}", None),  # not a box command
    ("The answer is not obvious, let me think", None),  # prose after the phrase is no answer
    ("The answer is 42. I hope the answer is right.", None),  # the last statement counts
    ("the answer is $\\frac{1}{2}$", "\\frac{1}{2}"),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extraction_reasons():
    assert ex.extract_answer_detailed("\\boxed{" + "1" * (norm.MAX_ANSWER_CHARS + 5) + "}").reason == "answer_too_long"
    assert ex.extract_answer_detailed("\\boxed{" + "{" * 100 + "}" * 100 + "}").reason == "answer_too_deep"
    assert ex.extract_answer_detailed("\\boxed{3").reason == "unterminated_box"
    assert ex.extract_answer_detailed("nothing").reason == "no_answer"
    assert ex.extract_answer_detailed(None).reason == "bad_input_type"
    assert ex.extract_answer_detailed("#### 5").source == "gsm8k_hashes"
    prose = ex.extract_answer_detailed("Answer: see above")
    assert (prose.answer, prose.reason, prose.source) == (None, "unparseable_answer", "answer_line")


# --------------------------------------------------------------------------------------------
# Equivalence table: (prediction, gold, expected). Each row is a known answer.
# --------------------------------------------------------------------------------------------
EQUIVALENCE_CASES = [
    # fractions / decimals
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("1/2", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-\\frac{1}{2}", True),
    ("3.0", "3", True),
    ("0.50", ".5", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("\\frac{1}{3}", "0.333", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("-3", "3", False),
    ("2.5", "25", False),
    # percents
    ("50\\%", "50", True),
    ("50\\%", "0.5", True),
    ("75%", "\\frac{3}{4}", True),
    ("12.5 percent", "12.5", True),
    ("50\\%", "5", False),
    # LaTeX wrappers and spacing
    ("\\left(1, 2\\right)", "(1,2)", True),
    ("\\left[ 0, 1 \\right)", "[0,1)", True),
    ("$7$", "7", True),
    ("\\displaystyle\\frac{1}{2}", "0.5", True),
    # degrees
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("45°", "45", True),
    ("90 degrees", "90", True),
    ("30^\\circ", "60", False),
    # intervals
    ("(1,2]", "\\left(1, 2\\right]", True),
    ("[1,\\infty)", "[1, \\infty)", True),
    ("(-\\infty, 3)", "(-\\infty,3]", False),
    ("[1,\\infty)", "(1,\\infty)", False),
    # sets and tuples
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    ("(1,2)", "(2,1)", False),
    ("(\\frac{1}{2}, 3)", "(0.5,3)", True),
    ("1,2", "2,1", True),
    # equations vs values
    ("x=3", "3", True),
    ("3", "x=3", True),
    ("y = 2x+1", "2x+1", True),
    ("x=3", "4", False),
    ("a=1,b=2", "1,2", True),
    # units and currency
    ("10 \\text{ cm}", "10", True),
    ("10\\text{ cm}^2", "10", True),
    ("10 cm", "10", True),
    ("\\$5", "5", True),
    ("5 dollars", "5", True),
    ("\\mbox{10 cm}", "10", True),
    ("10 cm", "100", False),
    # constants are not units (more in test_reward_constants.py)
    ("2 pi", "2\\pi", True),
    ("2 pi", "2", False),
    ("3 e", "3", False),
    # thousands separators
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("10\\,000", "10000", True),
    ("1,000,000", "10^6", True),
    ("1,000", "1", False),
    # plain-text numbers and text answers
    ("five", "5", True),
    ("twenty-one", "21", True),
    ("three", "4", False),
    ("\\text{(C)}", "C", True),
    ("\\text{Yes}", "yes", True),
    ("\\text{odd}", "\\text{even}", False),
    # symbolic (math-verify path)
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("2\\pi", "\\pi \\cdot 2", True),
    ("\\frac{\\pi}{2}", "\\frac{\\pi}{3}", False),
    ("\\sqrt{2}", "2", False),
    ("5x", "5", False),
    ("2^{10}", "1024", True),
    ("\\binom{5}{2}", "10", True),
    ("1+1", "2", True),
    # hedging is not rewarded
    ("1, 2, 3", "2", False),
    ("2 \\text{ or } 3", "2", False),
    ("\\pm 2", "2", False),
    ("\\{2,3\\}", "2", False),
    # text answers compare as normalised text
    ("\\text{Monday}", "\\text{monday}", True),
    ("\\text{Tuesday}", "\\text{monday}", False),
]


def test_case_table_is_large():
    assert len(EQUIVALENCE_CASES) >= 60
    assert sum(1 for *_, eq in EQUIVALENCE_CASES if not eq) >= 15


@pytest.mark.parametrize("pred,gold,expected", EQUIVALENCE_CASES)
def test_answers_equivalent_table(verifier, pred, gold, expected):
    assert answers_equivalent(pred, gold) is expected


def test_fast_paths_decide_without_verifier(monkeypatch):
    """Plain numbers are decided by the exact path: the verifier pool is never touched."""

    def no_pool():
        raise AssertionError("verifier used for a plain-number comparison")

    monkeypatch.setattr(vp, "_pool", no_pool)
    assert ac.check_equivalence("\\frac{3}{6}", "0.5") == vp.CheckResult(True, "exact_number")
    assert ac.check_equivalence("1,000", "1000") == vp.CheckResult(True, "exact_string")
    assert ac.check_equivalence("0.333", "\\frac13") == vp.CheckResult(False, "exact_number")


def test_normalize_answer_details():
    n = norm.normalize_answer("$\\left( 1,\\! 2 \\right)$")
    assert n.key == "(1,2)" and n.number is None and not n.percent
    n = norm.normalize_answer("12.5\\%")
    assert n.percent and n.number == norm.Fraction(25, 2)
    # units are only dropped after a number: a text answer keeps its words
    assert norm.normalize_answer("\\text{no solution}").key == "nosolution"


# --------------------------------------------------------------------------------------------
# compute_score
# --------------------------------------------------------------------------------------------
def test_compute_score_binary_default(verifier):
    good = compute_score("gsm8k", "... so \\boxed{72}", "72")
    assert good == {"score": 1.0, "acc": True, "pred": "72", "reason": "correct"}
    bad = compute_score("gsm8k", "... so \\boxed{71}", "72")
    assert bad == {"score": 0.0, "acc": False, "pred": "71", "reason": "wrong"}
    none = compute_score("gsm8k", "I don't know", "72")
    assert none == {"score": 0.0, "acc": False, "pred": None, "reason": "no_answer"}


def test_compute_score_signed(verifier):
    assert compute_score("math", "\\boxed{\\frac{1}{2}}", "0.5", reward_style="signed")["score"] == 1.0
    assert compute_score("math", "\\boxed{3}", "0.5", reward_style="signed")["score"] == -1.0
    # cannot be checked -> the wrong score of the style, never better than a wrong answer
    unchecked = compute_score("math", "\\boxed{" + "9" * 5000 + "}", "0.5", reward_style="signed")
    assert unchecked["score"] == -1.0 and unchecked["reason"] == "answer_too_long"
    assert compute_score("math", "no answer", "0.5", reward_style="signed")["score"] == -1.0


def test_compute_score_rejects_bad_options():
    with pytest.raises(ValueError, match="reward_style"):
        compute_score("math", "\\boxed{1}", "1", reward_style="dapo")
    with pytest.raises(ValueError, match="timeout_s"):
        compute_score("math", "\\boxed{1}", "1", timeout_s=0)


def test_compute_score_accepts_verl_manager_kwargs():
    out = compute_score("math", "\\boxed{2}", "2", extra_info={"index": 0}, reward_router_address=None)
    assert out["acc"] is True


@pytest.mark.parametrize(
    "ground_truth,expected_acc,reason",
    [
        (72, True, "correct"),
        (0.5, False, "wrong"),  # pred 72 vs 0.5
        ("Natalia sold ... \n#### 72", True, "correct"),  # raw GSM8K solution as gold
        ("", False, "missing_ground_truth"),
        (None, False, "missing_ground_truth"),
        (float("nan"), False, "missing_ground_truth"),
    ],
)
def test_compute_score_ground_truth_forms(ground_truth, expected_acc, reason):
    out = compute_score("gsm8k", "\\boxed{72}", ground_truth)
    assert (out["acc"], out["reason"]) == (expected_acc, reason)


def test_reason_counts_are_recorded(verifier):
    reset_reward_reason_counts()
    compute_score("m", "\\boxed{1}", "1")
    compute_score("m", "\\boxed{2}", "1")
    compute_score("m", "nothing", "1")
    compute_score("m", "\\boxed{" + "{" * 60 + "}" * 60 + "}", "1")
    assert reward_reason_counts() == {"correct": 1, "wrong": 1, "no_answer": 1, "answer_too_deep": 1}


def test_result_keys_and_types_are_stable(verifier):
    """verl stacks the returned keys across the batch: every call must return the same keys."""
    outs = [
        compute_score("m", s, g)
        for s, g in [("\\boxed{1}", "1"), ("x", "1"), ("\\boxed{\\sqrt{2}}", "\\sqrt2"), ("\\boxed{1}", None)]
    ]
    for out in outs:
        assert set(out) == {"score", "acc", "pred", "reason"}
        assert isinstance(out["score"], float) and isinstance(out["acc"], bool)
        assert out["pred"] is None or isinstance(out["pred"], str)


# --------------------------------------------------------------------------------------------
# Adversarial inputs: < 1 s each, score 0, no side effect
# --------------------------------------------------------------------------------------------
def _adversarial_inputs(marker: str) -> list[tuple[str, str]]:
    code = f"__import__('os').system('touch {marker}')"
    depth = norm.MAX_BRACE_DEPTH
    return [
        ("python in a box", "\\boxed{" + code + "}"),
        ("python on an answer line", "Answer: " + code),
        ("python after ####", "#### " + code),
        ("exec in a box", "\\boxed{exec(\"open('" + marker + "','w')\")}"),
        ("python in \\text", "\\boxed{\\text{" + code + "}}"),
        ("shell substitution", "\\boxed{$(touch " + marker + ")}"),
        ("shell backticks", "Answer: `touch " + marker + "`; rm -rf " + marker + "_dir"),
        ("shell in ####", "#### ; touch " + marker + " && echo pwned"),
        ("lambda", "\\boxed{(lambda: __import__('os').system('touch " + marker + "'))()}"),
        ("1 MB of text", "a" * 1_000_000),
        ("1 MB in a box", "\\boxed{" + "1" * 1_000_000 + "}"),
        # the last statement counts (it is "2", wrong); see test_reward_constants.py for "1"
        ("1 MB of answer lines", "Answer: 2 " * 100_000),
        ("10,000 nested braces", "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"),
        ("10,000 open braces", "\\boxed{" + "{" * 10_000),
        ("10,000 boxes", "\\boxed{" * 10_000),
        ("1 MB of non-box commands", "\\fbox{2} " + "\\boxedx" * 150_000),
        ("lone surrogate in a box", "\\boxed{\ud800}"),
        ("lone surrogates around", "\udfff junk \\boxed{\udc00 \ud83d}"),
        ("nested fractions at the depth cap", "\\boxed{" + "\\frac{1}{" * (depth - 1) + "2" + "}" * (depth - 1) + "}"),
        ("100 nested fractions", "\\boxed{" + "\\frac{1}{" * 100 + "2" + "}" * 100 + "}"),
        ("100 nested parentheses", "\\boxed{" + "(" * 100 + "2" + ")" * 100 + "}"),
        ("unbalanced", "#### }}}{{\\frac{1}{"),
        ("control characters", "\\boxed{\x00\x01\x1b[31m}"),
    ]


@pytest.mark.parametrize("index", range(len(_adversarial_inputs("m"))))
def test_adversarial_input_is_fast_zero_and_harmless(verifier, tmp_path, monkeypatch, index):
    monkeypatch.chdir(tmp_path)  # a relative `touch` would land here
    marker = str(tmp_path / "PWNED")
    name, solution = _adversarial_inputs(marker)[index]
    start = time.perf_counter()
    out = compute_score("adversarial", solution, "1")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{name}: {elapsed:.2f} s"
    assert out["score"] == 0.0 and out["acc"] is False, name
    assert list(tmp_path.iterdir()) == [], f"{name}: side effect {list(tmp_path.iterdir())}"


def test_correct_answer_after_1mb_of_text_is_found_quickly(verifier):
    start = time.perf_counter()
    out = compute_score("m", "x " * 500_000 + "\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt2}")
    assert out["acc"] is True and time.perf_counter() - start < 1.0


def test_exponent_tower_times_out_softly_and_keeps_the_process(verifier):
    """``9^{9^{9}}`` makes sympy evaluate for minutes; the soft limit stops it, no restart."""
    pool = vp._pool()
    before = {p.proc.pid for p in pool._all}
    start = time.perf_counter()
    result = ac.check_equivalence("9^{9^{9}}", "1", timeout_s=1.0)
    elapsed = time.perf_counter() - start
    assert result == vp.CheckResult(False, "timeout")
    assert elapsed < 2.0
    assert {p.proc.pid for p in pool._all} & before, "the soft timeout should not kill the process"
    assert answers_equivalent("\\sqrt{4}", "2")  # still working


def test_hard_timeout_kills_a_stuck_verifier(monkeypatch):
    """A verifier stuck where signals cannot reach it (C code) is killed at the deadline.

    The stuck process is simulated by a worker that blocks SIGALRM and sleeps; the parent-side
    machinery under test (select deadline, kill, replacement) is the real one.
    """
    stuck_worker = (
        "import signal, sys, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM}); "
        "sys.stdout.write('{\"ready\": true}\\n'); sys.stdout.flush(); sys.stdin.readline(); time.sleep(600)"
    )
    monkeypatch.setattr(vp, "_WORKER_BOOT", stuck_worker)
    pool = vp._VerifierPool(1)
    start = time.perf_counter()
    result = pool.check("\\sqrt{2}", "2", timeout_s=0.5)
    elapsed = time.perf_counter() - start
    assert result == vp.CheckResult(False, "timeout")
    assert 0.5 <= elapsed < 3.0
    assert pool._all == set() and pool._idle == []  # the stuck process was killed, not reused
    pool.close()


def test_crashed_verifier_is_replaced(verifier):
    pool = vp._pool()
    for proc in list(pool._all):
        proc.proc.kill()
        proc.proc.wait()
    assert answers_equivalent("\\sqrt{9}", "3")


def test_guard_blocks_sympify_of_code_in_the_verifier(tmp_path):
    """The verifier's eval guard: sympify/parse_expr of code raises, numbers still parse."""
    import subprocess
    import sys

    marker = tmp_path / "PWNED"
    script = f"""
import runpy, sys
ns = runpy.run_path({vp.__file__!r}, run_name="not_the_worker")
state = {{"blocked": False}}
import sympy.physics.units
ns["_install_eval_guard"](state)
import sympy
assert sympy.Number("12.5") == sympy.Float("12.5") and sympy.Number("7") == 7
try:
    sympy.sympify("__import__('os').system('touch {marker}')")
except Exception as exc:
    print("blocked", type(exc).__name__, state["blocked"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "blocked _UnsafeParseBlocked True" in out.stdout
    assert not marker.exists()


@pytest.mark.parametrize(
    "text",
    [" " * 999 + "1", "1," * 499 + "1", "%" * 999, "\\text{" * 150, "1" + " percent" * 120, "a " * 499, "x=" * 499],
)
def test_normalisation_is_fast_on_worst_case_strings(text):
    """The in-process string work (regexes included) has no super-linear blow-up at the caps."""
    start = time.perf_counter()
    for _ in range(10):
        norm.normalize_answer(text)
        ac._looks_like_text(text)
        ac._input_problem(text)
    assert time.perf_counter() - start < 0.5


def test_input_caps():
    assert ac.check_equivalence("1" * (norm.MAX_ANSWER_CHARS + 1), "1").reason == "answer_too_long"
    assert ac.check_equivalence("1", "{" * 50 + "}" * 50).reason == "gold_too_deep"
    assert ac.check_equivalence("\\frac{1}{2", "1").reason == "answer_unbalanced"
    assert ac.check_equivalence(None, "1").reason == "bad_input_type"
