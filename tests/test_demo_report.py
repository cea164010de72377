"""The CPU demo report (recipe/iib_lpo/demo/report.py): known-answer cases for the verdict, the
comparisons, the smoothing, verl's validation series, the summary dict, and the plots and report
written from synthetic metrics (no trainer, no vLLM)."""

import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from recipe.iib_lpo.demo.report import (
    _diagnostic_series,
    _paired_diff,
    build_summary,
    diagnostic_stats,
    outputs_changed,
    smooth,
    solution_kind_shares,
    validation_series,
    verdict,
    write_plots,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


# ------------------------------------------------------------------------------ smoothing, validation


def test_smooth_is_a_trailing_moving_average():
    assert smooth([0, 1, 2, 3], 2) == pytest.approx([0, 0.5, 1.5, 2.5])
    # window 3: the first points average over what exists so far
    assert smooth([3, 0, 6, 0, 3], 3) == pytest.approx([3, 1.5, 3, 2, 3])
    assert smooth([1, 5], 1) == [1, 5] and smooth([], 5) == []
    assert smooth([2, 4, 6], 10) == pytest.approx([2, 3, 4])  # window longer than the series
    with pytest.raises(ValueError):
        smooth([1.0], 0)


def test_validation_series_picks_verls_core_mean_key():
    rows = [
        # verl's val_before_train row: validation keys only, step 0; two data sources (one with a "/")
        {"step": 0, "val-core/openai/gsm8k/acc/mean@4": 0.25, "val-core/demo/acc/mean@4": 0.75,
         "val-aux/openai/gsm8k/reward/mean@4": 0.9, "val-core/openai/gsm8k/acc/best@4/mean": 0.99,
         "val-aux/openai/gsm8k/acc/std@4": 0.1, "val-aux/num_turns/mean": 2.0},
        {"step": 1, "critic/score/mean": 0.3},  # a training step without validation
        # several N for one source: the largest N's mean@N; a source logging only "reward"
        {"step": 2, "critic/score/mean": 0.4, "val-core/demo/acc/mean@2": 0.1, "val-core/demo/acc/mean@8": 0.5,
         "val-core/other/reward/mean@8": 0.7},
        {"step": 3, "critic/score/mean": 0.4, "val-core/demo/acc/mean@8": float("nan")},  # NaN: skipped
    ]
    steps, values = validation_series(rows)
    assert steps == [0, 2]
    assert values == pytest.approx([0.5, 0.6])  # mean(0.25, 0.75); mean(0.5, 0.7)
    # a source with both variables: "acc" (verl's core variable when the reward returns it) wins
    assert validation_series([{"step": 5, "val-core/d/acc/mean@4": 0.2, "val-core/d/reward/mean@4": 0.9}]) == ([5], [0.2])
    assert validation_series([{"step": 1, "critic/score/mean": 1.0}]) == ([], [])


def test_diagnostic_stats_median_and_range_over_steps():
    rows = [{"step": 1, "actor/grad_norm": 3.0}, {"step": 2, "actor/grad_norm": 1.0, "actor/ppo_kl": 0.5},
            {"step": 3, "actor/grad_norm": 2.0, "actor/ppo_kl": float("nan")}, {"step": 4, "actor/grad_norm": 10.0}]
    stats = diagnostic_stats(rows)
    assert stats["actor/grad_norm"] == {"median": 2.5, "min": 1.0, "max": 10.0, "steps": 4}  # mean would be 4
    assert stats["actor/ppo_kl"] == {"median": 0.5, "min": 0.5, "max": 0.5, "steps": 1}
    assert "actor/entropy" not in stats  # never logged
    # the mismatch panel: rollout_probs_diff_mean, else rollout_corr/k3_kl, else nothing
    both = [{"step": 1, "training/rollout_probs_diff_mean": 0.1, "rollout_corr/k3_kl": 0.9}]
    k3_only = [{"step": 1, "rollout_corr/k3_kl": 0.9}, {"step": 2, "rollout_corr/k3_kl": 0.8}]
    assert _diagnostic_series(both, "training/rollout_probs_diff_mean", "rollout_corr/k3_kl") == (
        [1], [0.1], "training/rollout_probs_diff_mean")
    assert _diagnostic_series(k3_only, "training/rollout_probs_diff_mean", "rollout_corr/k3_kl") == (
        [1, 2], [0.9, 0.8], "rollout_corr/k3_kl")
    assert _diagnostic_series(rows, "actor/entropy", None)[:2] == ([], [])


# ------------------------------------------------------------------------------------------ summary


@dataclass
class _Plan:
    """The DemoPlan attributes the report reads (a stand-in, so the test does not depend on the
    pipeline's presets)."""

    algos: tuple = ("iib_lpo", "grpo")
    steps: int = 3
    seed: int = 7
    prompts_per_step: int = 4
    num_initial: int = 2
    num_branches: int = 1
    max_response_length: int = 32
    actor_lr: float = 1e-5
    eval_problems: int = 3
    eval_n: int = 4
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_max_tokens: int = 32
    test_freq: int = 2
    heldout_size: int = 10

    @property
    def trajectories_per_prompt(self) -> int:
        return self.num_initial * (1 + self.num_branches)


def _eval_result(correct_per_problem):
    records = _records(correct_per_problem)
    n = len(correct_per_problem[0])
    p1 = sum(sum(c) / len(c) for c in correct_per_problem) / len(correct_per_problem)
    pn = sum(1.0 for c in correct_per_problem if any(c)) / len(correct_per_problem)
    return {"metrics": {"p_at_1": p1, "p_at_n": pn, "n": n, "num_problems": len(correct_per_problem), "maj_at_n": p1,
                        "mean_tokens": 10.0, "distinct_1": 0.5, "distinct_4": 0.5, "self_bleu_diversity": 0.5,
                        "rep4": 0.0},
            "records": records}


# 3 problems x 4 samples; per-problem accuracy
WARM = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]    # .25, 0, .5
GRPO = [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]    # .5, 0, .75
IIB = [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]     # 1, .25, .5


def _se(diffs):
    mean = sum(diffs) / len(diffs)
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def test_build_summary_shape_and_paired_differences():
    results = {"warm_start": _eval_result(WARM), "grpo": _eval_result(GRPO), "iib_lpo": _eval_result(IIB),
               "warm_start_repeat": _eval_result(WARM)}
    paths = {"warm_start": Path("/w"), "grpo": "/g", "iib_lpo": "/i", "warm_start_repeat": "/w"}
    validation = {"grpo": {"steps": [2], "p_at_1": [0.5]}}
    s = build_summary(_Plan(), results, paths, validation)
    assert set(s) == {"heldout", "paired", "models", "settings", "validation", "solution_kinds"}
    assert set(s["heldout"]) == {"warm_start", "grpo", "iib_lpo"}  # the control is left out
    assert set(s["paired"]) == {"grpo_minus_warm_start", "iib_lpo_minus_warm_start", "iib_lpo_minus_grpo"}
    assert s["models"] == {"warm_start": {"path": "/w"}, "grpo": {"path": "/g"}, "iib_lpo": {"path": "/i"}}
    assert s["validation"] is validation

    h = s["heldout"]["iib_lpo"]
    assert set(h) == {"p_at_1", "p_at_k", "k", "se", "num_problems"}
    assert h["p_at_1"] == pytest.approx(1.75 / 3) and h["p_at_k"] == 1.0 and h["k"] == 4 and h["num_problems"] == 3
    assert h["se"] == pytest.approx(_se([1, 0.25, 0.5]))  # per-problem accuracies, sample s.d. / sqrt(3)
    # hand-computed per-problem differences
    expected = {"grpo_minus_warm_start": [0.25, 0.0, 0.25], "iib_lpo_minus_warm_start": [0.75, 0.25, 0.0],
                "iib_lpo_minus_grpo": [0.5, 0.25, -0.25]}
    for key, diffs in expected.items():
        d = s["paired"][key]
        assert set(d) == {"diff", "se", "num_problems"} and d["num_problems"] == 3
        assert d["diff"] == pytest.approx(sum(diffs) / 3), key
        assert d["se"] == pytest.approx(_se(diffs)), key
    # iib_lpo - grpo: diffs .5, .25, -.25: mean 1/6, s.e. sqrt(((1/3)^2 + (1/12)^2 + (5/12)^2) / 2 / 3)
    assert s["paired"]["iib_lpo_minus_grpo"]["se"] == pytest.approx(math.sqrt((1 / 9 + 1 / 144 + 25 / 144) / 6))

    assert s["settings"] == {"steps": 3, "prompts_per_step": 4, "trajectories_per_prompt": 4, "actor_lr": 1e-5,
                             "seed": 7, "max_response_length": 32, "eval_problems": 3, "eval_n": 4,
                             "eval_temperature": 0.6, "eval_top_p": 0.95, "test_freq": 2, "heldout_size": 10}
    # only the models present are paired; an undefined s.e. (one problem) is None
    one = build_summary(_Plan(), {"grpo": _eval_result([[1, 0]]), "iib_lpo": _eval_result([[1, 1]])}, {})
    assert set(one["paired"]) == {"iib_lpo_minus_grpo"} and one["models"] == {} and one["validation"] is None
    assert one["paired"]["iib_lpo_minus_grpo"] == {"diff": None, "se": None, "num_problems": 1}
    assert one["heldout"]["grpo"]["se"] is None


# ------------------------------------------------------------------------------------ plots, report


ZERO_VARIANCE = {"iib_lpo": [0.5, 0.25, 0.375, 0.125, 0.25, 0.5], "grpo": [0.75] * 6}  # exact in binary


def _synthetic_runs(steps=6):
    """Per-step rows as verl logs them, with a step-0 validation-only row (val_before_train) and
    validation at steps 3 and 6; GRPO logs k3_kl instead of rollout_probs_diff_mean."""
    runs = {}
    for algo, base in (("iib_lpo", 0.3), ("grpo", 0.2)):
        rows = [{"step": 0, "val-core/demo/acc/mean@4": base}]
        for t in range(1, steps + 1):
            m = {"step": t, "critic/score/mean": base + 0.05 * t + (0.1 if t % 2 else -0.1),
                 "actor/entropy": 1.0 - 0.05 * t, "response_length/mean": 20.0 + t, "timing_s/step": 5.0,
                 "diagnostics/zero_variance_groups": ZERO_VARIANCE[algo][t - 1], "actor/grad_norm": 1.0 + 0.1 * t,
                 "actor/pg_clipfrac": 0.01 * t, "actor/ppo_kl": 1e-4 * t, "actor/pg_loss": -0.01,
                 "training/rollout_probs_diff_max": 0.2}
            if algo == "iib_lpo":
                m.update({"training/rollout_probs_diff_mean": 0.01, "iib_lpo/acc_initial": base + 0.04 * t,
                          "iib_lpo/acc_branch": base + 0.03 * t, "iib_lpo/fork_rate": 0.8, "iib_lpo/keep_rate": 0.5,
                          "iib_lpo/latent_status/injected": 0.9, "iib_lpo/ib_score_kept": 0.2,
                          "iib_lpo/ib_score_dropped": -0.1})
            else:
                m["rollout_corr/k3_kl"] = 0.002
            if t % 3 == 0:
                m["val-core/demo/acc/mean@4"] = base + 0.02 * t
            rows.append(m)
        runs[algo] = rows
    return runs


def _assert_png(path: Path):
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000, path


def test_write_plots_writes_every_png_including_diagnostics(tmp_path):
    results = {"warm_start": _eval_result(WARM), "grpo": _eval_result(GRPO), "iib_lpo": _eval_result(IIB)}
    written = write_plots(_synthetic_runs(), results, tmp_path / "plots")
    names = {p.name for p in written}
    assert names == {"reward_accuracy.png", "diagnostics.png", "entropy.png", "response_length.png", "step_time.png",
                     "fork_keep_rates.png", "ib_scores.png", "final_eval.png"}
    for path in written:
        _assert_png(path)
    # a run without I2B-LPO, without eval results and without the diagnostic keys still gets both main plots
    bare = {"grpo": [{"step": 1, "critic/score/mean": 0.5}, {"step": 2, "critic/score/mean": 0.25}]}
    names = {p.name for p in write_plots(bare, {}, tmp_path / "bare")}
    assert {"reward_accuracy.png", "diagnostics.png"} <= names and "fork_keep_rates.png" not in names
    _assert_png(tmp_path / "bare" / "diagnostics.png")


class _FakeRun:
    def __init__(self, rows, out_dir):
        self._rows, self.out_dir, self.log = rows, out_dir, out_dir / "train.log"

    def metrics(self):
        return self._rows


def test_write_report_sections_and_summary(tmp_path):
    runs = _synthetic_runs()
    results = {"warm_start": _eval_result(WARM), "grpo": _eval_result(GRPO), "iib_lpo": _eval_result(IIB),
               "warm_start_repeat": _eval_result(WARM)}
    warm = {"config": {"hidden_size": 8, "num_layers": 1, "vocab_size": 64, "steps": 1, "batch_size": 1,
                       "sft_problems": 1, "lr": 1e-3},
            "num_parameters": 1000, "sft_seconds": 1.0, "validation_greedy_accuracy": 0.5, "validation_problems": 3,
            "loss_curve": [{"step": 1, "loss": 1.0}]}
    ctx = {algo: {"run": _FakeRun(rows, tmp_path / "runs" / algo)} for algo, rows in runs.items()}
    ctx.update({"eval": {"results": results, "results_md": tmp_path / "eval.md", "dir": tmp_path / "eval"},
                "warm": {"record": warm}, "eval_models": {"grpo": tmp_path / "g", "iib_lpo": "/i"}})
    result = write_report(_Plan(), tmp_path, ctx, {"warm": 1.0})
    report = (tmp_path / "report.md").read_text()
    assert "| warm start |" in report and "**Outcome.** I2B-LPO did not beat GRPO" in report
    assert "## Diagnostics" in report and "## Paired differences (held-out P@1)" in report
    assert "| I2B-LPO - GRPO | +16.7% |" in report and "| GRPO - warm start | +16.7% |" in report
    # I2B-LPO's zero-variance shares sorted .125 .25 .25 .375 .5 .5: median .3125
    assert "I2B-LPO: zero-variance groups: median 0.31 of prompts carried no signal (range 0.12-0.50)" in report
    assert "GRPO: zero-variance groups: median 0.75 of prompts carried no signal" in report
    assert "| `diagnostics/zero_variance_groups` | 0.312 | 0.125 - 0.5 | 6 |" in report
    assert "| `rollout_corr/k3_kl` | 0.002 |" in report  # GRPO's
    assert "step 0: 30.0%, step 3: 36.0%, step 6: 42.0%" in report  # I2B-LPO's validation, step 0 included
    assert "| 0 | - |" not in report  # the validation-only row is not a training-table row
    s = result["summary"]
    assert s["models"] == {"grpo": {"path": str(tmp_path / "g")}, "iib_lpo": {"path": "/i"}}
    assert s["validation"]["grpo"] == {"steps": [0, 3, 6], "p_at_1": pytest.approx([0.2, 0.26, 0.32])}
    assert {p.name for p in result["plots"]} >= {"reward_accuracy.png", "diagnostics.png", "final_eval.png"}


# (start, ops) = 5 + 4 = 9, 9 * 2 = 18, 18 - 1 = 17
KIND_PROBLEMS = {"p0": (5, [["add", 4], ["mul", 2], ["sub", 1]]), "p1": (2, [["div", 2], ["add", 1]])}
RIGHT0 = "5 + 4 = 9.\n9 * 2 = 18.\n18 - 1 = 17.\nThe answer is \\boxed{17}."
MISREAD0 = "5 + 4 = 9.\n9 * 2 = 18.\n18 + 1 = 19.\nThe answer is \\boxed{19}."
SLIP1 = "2 / 2 = 1.\n1 + 1 = 3.\nThe answer is \\boxed{3}."
RIGHT1 = "2 / 2 = 1.\n1 + 1 = 2.\nThe answer is \\boxed{2}."


def test_solution_kind_shares_counts_every_sample():
    records = [{"problem_id": "p0", "samples": [RIGHT0, MISREAD0, MISREAD0, "garbage"]},
               {"problem_id": "p1", "samples": [SLIP1, RIGHT1, RIGHT1, RIGHT1]}]
    shares = solution_kind_shares(records, KIND_PROBLEMS)
    # 8 samples: right 4, misread 2, slip 1, other 1 -- each against its own problem (RIGHT1 under p0 would be other)
    assert shares == {"right": 0.5, "misread": 0.25, "arithmetic_slip": 0.125, "other": 0.125, "samples": 8}
    with pytest.raises(ValueError, match="p9"):
        solution_kind_shares([{"problem_id": "p9", "samples": [RIGHT0]}], KIND_PROBLEMS)
    with pytest.raises(ValueError, match="no samples"):
        solution_kind_shares([], KIND_PROBLEMS)


def test_solution_kinds_plot_and_summary(tmp_path):
    kinds = {"warm_start": {"right": 0.3, "misread": 0.35, "arithmetic_slip": 0.3, "other": 0.05, "samples": 80},
             "grpo": {"right": 0.5, "misread": 0.15, "arithmetic_slip": 0.3, "other": 0.05, "samples": 80}}
    written = write_plots({"grpo": [{"step": 1, "critic/score/mean": 0.5}]}, {}, tmp_path, kinds)
    assert "solution_kinds.png" in {p.name for p in written}
    _assert_png(tmp_path / "solution_kinds.png")
    summary = build_summary(_Plan(), {"warm_start": _eval_result(WARM)}, {}, None, kinds)
    assert summary["solution_kinds"] == kinds
