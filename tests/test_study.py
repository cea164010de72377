"""The study's pieces without training: the paired statistics (known answers, a random-effects model),
the arms (equal budgets, DAPO's keys equal to the GPU script's, every arm passes the recipe's start-up
check) and the results built from synthetic cells (schema, partial studies, verdicts)."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from recipe.iib_lpo.study.arms import Arm, check_equal_budget, dapo_overrides, study_arms
from recipe.iib_lpo.study.stats import accuracy_matrix, crossed_bootstrap, per_seed_paired, spread, verdict

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "recipe" / "iib_lpo" / "config"


# ------------------------------------------------------------------------------------------ statistics


def test_accuracy_matrix_is_share_of_correct_samples_per_seed_and_problem():
    recs = {1: [{"problem_id": "b", "correct": [True, False, False, False]}, {"problem_id": "a", "correct": [True, True]}],
            0: [{"problem_id": "a", "correct": [False, False]}, {"problem_id": "b", "correct": [True, True, True, False]}]}
    np.testing.assert_allclose(accuracy_matrix(recs, ["a", "b"]), [[0.0, 0.75], [1.0, 0.25]])
    with pytest.raises(ValueError, match="seed 0: no eval record for 1 problems"):
        accuracy_matrix({0: recs[0]}, ["a", "b", "c"])
    with pytest.raises(ValueError, match="without samples"):
        accuracy_matrix({0: [{"problem_id": "a", "correct": []}]}, ["a"])


def test_crossed_bootstrap_known_answers_and_bad_input():
    const = crossed_bootstrap(np.full((3, 20), 0.05), num_resamples=500)
    assert const["diff"] == pytest.approx(0.05) and const["se"] == pytest.approx(0, abs=1e-12)
    assert const["ci"] == pytest.approx([0.05, 0.05]) and (const["seeds"], const["problems"]) == (3, 20)
    for bad in (np.zeros(5), np.zeros((2, 1)), np.array([[0.0, np.nan]])):
        with pytest.raises(ValueError):
            crossed_bootstrap(bad)


def test_crossed_bootstrap_one_seed_is_the_problem_paired_standard_error():
    d = np.random.default_rng(1).normal(0.02, 0.3, size=(1, 400))
    boot = crossed_bootstrap(d, num_resamples=4000)
    analytic = d.std(ddof=1) / math.sqrt(d.size)
    assert boot["se"] == pytest.approx(analytic, rel=0.1)
    assert boot["ci"][0] < d.mean() < boot["ci"][1]


def test_crossed_bootstrap_carries_the_seed_spread():
    """d[s, p] = a_s + b_p: the mean's spread is var(a)/S + var(b)/P. Resampling only problems (the mutation
    that forgets the seeds) would report sd(b)/sqrt(P), a third of the truth here."""
    rng = np.random.default_rng(2)
    seeds, problems = 30, 200
    a = rng.normal(0, 0.1, size=(seeds, 1))
    b = rng.normal(0, 0.1, size=(1, problems))
    d = a + b
    boot = crossed_bootstrap(d, num_resamples=4000)
    expected = math.sqrt(a.var(ddof=0) / seeds + b.var(ddof=0) / problems)
    assert boot["se"] == pytest.approx(expected, rel=0.15)
    assert boot["se"] > 2 * b.std() / math.sqrt(problems)


def test_per_seed_paired_verdict_and_spread():
    d = np.array([[0.0, 0.2], [0.1, 0.1]])
    rows = per_seed_paired(d)
    assert rows[0] == {"diff": pytest.approx(0.1), "se": pytest.approx(0.1)}
    assert rows[1]["se"] == pytest.approx(0.0)
    assert (verdict([0.01, 0.2]), verdict([-0.2, -0.01]), verdict([-0.01, 0.01])) == ("beats", "loses", "ties")
    st = spread([0.2, None, 0.4])
    assert st["mean"] == pytest.approx(0.3) and st["sd"] == pytest.approx(math.sqrt(0.02)) and st["n"] == 2
    assert spread([])["mean"] is None and spread([1.0])["sd"] is None


# ------------------------------------------------------------------------------------------ arms


def test_every_arm_has_the_same_trajectories_per_prompt():
    arms = study_arms(64)
    assert list(arms) == ["grpo", "dapo", "iib_lpo", "iib_lpo_latent", "no_ib_filter", "no_ib_reward", "rounds2"]
    assert check_equal_budget(arms.values()) == 10
    assert (arms["rounds2"].num_branches, arms["rounds2"].rounds) == (2, 2)
    with pytest.raises(ValueError, match="different trajectories per prompt"):
        check_equal_budget([arms["grpo"], Arm("x", "x", "grpo", "", num_branches=3)])
    with pytest.raises(ValueError, match="must be even"):
        study_arms(64, num_branches=3)


def _script_overrides(script: Path, env: dict) -> list[str]:
    """The ALGO_OVERRIDES=( ... ) lines of a launch script, comments dropped, $VARS substituted."""
    text = script.read_text()
    body = text[text.index("ALGO_OVERRIDES=(") + len("ALGO_OVERRIDES=("):]
    body = body[: body.index("\n)")]
    out = []
    for line in body.splitlines():
        line = line.split("#", 1)[0].strip().strip('"')
        if line:
            out.append(re.sub(r"\$(\w+)", lambda m: str(env[m.group(1)]), line))
    return out


def test_dapo_overrides_are_the_gpu_scripts_keys():
    script = _script_overrides(REPO / "run_scripts" / "run_qwen7b_dapo.sh",
                               {"OVERLONG_BUFFER_LEN": 1024, "OVERLONG_PENALTY": 1.0, "MAX_RESPONSE_LENGTH": 4096})
    ours = dapo_overrides(4096, 1024, 1.0)
    baseline = {"algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.name=vllm",
                "actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent",
                "actor_rollout_ref.rollout.agent.agent_loop_manager_class=null"}  # CpuRunSpec sets these for grpo
    assert sorted(ours) == sorted(x for x in script if x not in baseline)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        dapo_overrides(64, 65)


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="iib_lpo_trainer", overrides=list(overrides))


def test_every_arm_passes_the_recipes_start_up_check(tmp_path, tiny_qwen2_dir):
    """The overrides each cell hands the trainer compose and pass ``prepare_config`` (what the run does first)."""
    from recipe.iib_lpo.main import prepare_config
    from recipe.iib_lpo.study.driver import cell_spec, make_plan

    plan = make_plan()
    data = {"train": tmp_path / "t.parquet", "validation": tmp_path / "v.parquet"}
    seen = {}
    for name in plan.arms:
        arm = plan.arm(name)
        _, spec = cell_spec(plan, arm, 1, tmp_path, data, {"dir": tiny_qwen2_dir}, {"checkpoint": tmp_path / "c.pt"})
        config = _compose(spec.hydra_overrides())
        prepare_config(config, check_files=False)
        seen[name] = config
        assert config.actor_rollout_ref.rollout.n == 10 and config.data.seed == 1
    assert seen["dapo"].algorithm.filter_groups.enable and seen["dapo"].actor_rollout_ref.actor.clip_ratio_high == 0.28
    assert seen["grpo"].algorithm.adv_estimator == "grpo" and not seen["grpo"].algorithm.filter_groups.enable
    assert seen["no_ib_filter"].iib_lpo.ib.top_n == 4 and seen["iib_lpo"].iib_lpo.ib.top_n is None
    assert seen["no_ib_reward"].iib_lpo.advantage.lambda_ib == 0 and seen["iib_lpo"].iib_lpo.advantage.lambda_ib == 0.5
    assert (seen["rounds2"].iib_lpo.ib.rounds, seen["rounds2"].iib_lpo.num_branches) == (2, 2)
    assert seen["iib_lpo_latent"].iib_lpo.latent.mode == "cvae" and seen["iib_lpo"].iib_lpo.latent.mode == "none"


def test_bad_study_requests_are_refused():
    from recipe.iib_lpo.study.driver import make_plan

    with pytest.raises(ValueError, match="include the grpo arm"):
        make_plan(arms=["dapo"])
    with pytest.raises(ValueError, match="unknown arms"):
        make_plan(arms=["grpo", "ppo"])
    with pytest.raises(ValueError, match="distinct"):
        make_plan(seeds=(0, 0))


# ------------------------------------------------------------------------------------------ results


def _records(acc: dict[str, int], k: int = 4) -> list[dict]:
    return [{"problem_id": p, "correct": [i < c for i in range(k)]} for p, c in acc.items()]


def _cell(arm, seed, acc, metrics=None):
    p1 = sum(acc.values()) / (4 * len(acc))
    return {"arm": arm, "seed": seed, "wall_s": 100.0,
            "metrics": metrics or [{"step": s, "critic/score/mean": 0.5, "critic/rewards/mean": 0.5, "actor/entropy": 0.1,
                                    "timing_s/step": 10.0 if s == 1 else 4.0} for s in (1, 2, 3)],
            "eval": {"metrics": {"p_at_1": p1, "p_at_n": 0.9, "n": 4, "maj_at_n": 0.5, "mean_tokens": 30.0,
                                 "distinct_4": 0.25, "self_bleu_diversity": 0.05},
                     "records": _records(acc)}}


def test_results_schema_paired_differences_and_partial_flag(tmp_path):
    from recipe.iib_lpo.study.driver import make_plan
    from recipe.iib_lpo.study.report import build_results, generated_trajectories_per_step, render_markdown

    plan = make_plan(arms=["grpo", "dapo", "no_ib_reward"], seeds=(0, 1))
    problems = [f"p{i}" for i in range(30)]
    grpo = {p: 1 for p in problems}
    better = {p: 3 for p in problems}  # +50 points on every problem
    found = {"warm": {"metrics": _cell("w", 0, grpo)["eval"]["metrics"], "records": _records(grpo)},
             "cells": {"grpo_s0": _cell("grpo", 0, grpo), "grpo_s1": _cell("grpo", 1, grpo),
                       "dapo_s0": _cell("dapo", 0, better), "dapo_s1": _cell("dapo", 1, better),
                       "no_ib_reward_s0": _cell("no_ib_reward", 0, grpo)}}
    res = build_results(plan, found, "python -m recipe.iib_lpo.study")
    assert not res["complete"] and res["missing_cells"] == ["no_ib_reward_s1"] and res["complete_cells"] == 5
    assert res["headline"][0].startswith("PARTIAL: 5 of 6 cells")
    seeds = res["arms"]["dapo"]["seeds"]
    assert [e["seed"] for e in seeds] == [0, 1] and seeds[0]["p_at_1"] == pytest.approx(0.75)
    assert {"p_at_1", "p_at_k", "distinct4"} <= set(seeds[0]) and seeds[0]["step_s"] == pytest.approx(4.0)
    dapo = res["paired"]["dapo_minus_grpo"]
    assert dapo["diff"] == pytest.approx(0.5) and dapo["ci"] == pytest.approx([0.5, 0.5]) and dapo["verdict"] == "beats"
    tie = res["paired"]["no_ib_reward_minus_grpo"]
    assert tie["diff"] == 0 and tie["verdict"] == "ties" and tie["seeds"] == 1
    assert res["paired"]["dapo_minus_warm_start"]["diff"] == pytest.approx(0.5)
    md = render_markdown(res, [], "plots")
    assert "Partial: 5 of 6 cells" in md and "| DAPO | 2 | 75.0 (75.0-75.0) |" in md
    dyn = [{"step": 1, "critic/score/mean": 0.5, "training/filter_groups/evicted_samples": 3.0,
            "training/filter_groups/discarded_surplus_samples": 1.0}, {"step": 2, "critic/score/mean": 0.5}]
    assert generated_trajectories_per_step(dyn, 8, 10) == pytest.approx(10 * (8 + 2))
