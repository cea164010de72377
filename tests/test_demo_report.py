"""The CPU demo report's verdict and comparisons (recipe/iib_lpo/demo_report.py): known-answer cases."""

import math

import pytest

from recipe.iib_lpo.demo_report import _paired_diff, outputs_changed, verdict


def _records(correct_per_problem, samples=None):
    return [{"problem_id": f"p{i}", "correct": c, "samples": (samples or {}).get(i, ["x"] * len(c))}
            for i, c in enumerate(correct_per_problem)]


def _result(correct_per_problem):
    records = _records(correct_per_problem)
    p1 = sum(sum(c) / len(c) for c in correct_per_problem) / len(correct_per_problem)
    return {"metrics": {"p_at_1": p1}, "records": records}


def test_paired_difference_closed_form():
    a = _records([[1, 1], [1, 0], [0, 0], [1, 1]])  # per problem 1, .5, 0, 1
    b = _records([[0, 0], [1, 0], [0, 0], [1, 0]])  # per problem 0, .5, 0, .5
    mean, se = _paired_diff(a, b)  # diffs 1, 0, 0, .5: mean .375, sample var (.390625+.140625*2+.015625)/3
    assert mean == pytest.approx(0.375)
    assert se == pytest.approx(math.sqrt((0.390625 + 2 * 0.140625 + 0.015625) / 3 / 4))
    assert all(math.isnan(x) for x in _paired_diff(a[:1], b[:1]))  # one problem: no standard error


def test_verdict_says_what_the_numbers_say():
    strong, weak = [[1, 1]] * 30 + [[0, 0]] * 10, [[0, 0]] * 30 + [[0, 0]] * 10
    beat = verdict({"iib_lpo": _result(strong), "grpo": _result(weak), "warm_start": _result(weak)})
    assert beat.startswith("I2B-LPO beat GRPO on this run: held-out P@1 75.0% vs 0.0%") and "warm start 0.0%" in beat
    lost = verdict({"iib_lpo": _result(weak), "grpo": _result(strong)})
    assert lost.startswith("I2B-LPO did not beat GRPO at this scale; GRPO scored higher")
    # one problem of 40 apart: within 2 s.e., so no winner is named
    close = verdict({"iib_lpo": _result([[1, 1]] + [[0, 0]] * 39), "grpo": _result([[0, 0]] * 40)})
    assert close.startswith("I2B-LPO did not beat GRPO beyond noise")
    assert verdict({"iib_lpo": _result(strong)}) is None  # nothing to compare


def test_outputs_changed_counts_problems_with_other_samples():
    a = _records([[1], [0], [1]], samples={0: ["a"], 1: ["b"], 2: ["c"]})
    b = _records([[1], [0], [1]], samples={0: ["a"], 1: ["B"], 2: ["c"]})
    assert outputs_changed(a, b) == {"problems": 3, "differ": 1}
    assert outputs_changed(a, a) == {"problems": 3, "differ": 0}
