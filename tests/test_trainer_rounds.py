"""Iterative IB rounds in training: the start-up check of the layout, the per-round metrics as pure
functions, and verl 0.9.1's real trainer on CPU with ``iib_lpo.ib.rounds=2`` for 2 steps.

The CPU run (marked slow) is ``python -m recipe.iib_lpo.main +profile=cpu`` in a subprocess, like
tests/test_trainer_cpu.py, with M = 1 initial rollout x (1 + K = 2 branches x R = 2 rounds) = 5
trajectories per prompt and the parity reward (tests/helpers/parity_reward.py: a random tiny model
never answers the demo problems, so the math reward would be 0 everywhere). Every assertion is on
what the run wrote: verl's metrics JSONL, the weight fingerprints after each sync, and verl's
generation dump with each row's step (``trainer.rollout_data_dir``), checked row by row.
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from recipe.iib_lpo.algorithm.ib_step import ROW_BRANCH, ROW_INITIAL, ROW_RESAMPLE, RowRole
from recipe.iib_lpo.trainer.startup_checks import RecipeConfigError, check_iib_lpo_config
from recipe.iib_lpo.trainer.step_metrics import iib_lpo_step_metrics

RUN_TIMEOUT_S = 1200
PARITY_REWARD = Path(__file__).resolve().parent / "helpers" / "parity_reward.py"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipe" / "iib_lpo" / "config"


def _compose(overrides=()):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="iib_lpo_trainer", overrides=list(overrides))


# ----------------------------------------------------------------------------------------------
# Start-up check (no Ray)
# ----------------------------------------------------------------------------------------------


def test_startup_check_layout_with_rounds():
    base = ["iib_lpo.latent.mode=none", "iib_lpo.ib.rounds=2"]
    check_iib_lpo_config(_compose(base + ["actor_rollout_ref.rollout.n=14"]), check_files=False)  # 2 x (1 + 3 x 2)
    with pytest.raises(RecipeConfigError, match=r"rollout.n=8 but .*num_branches=3 x iib_lpo.ib.rounds=2\) = 14 "
                                                 r"sessions per prompt: set rollout.n=14"):
        check_iib_lpo_config(_compose(base), check_files=False)
    with pytest.raises(RecipeConfigError, match=r"estimator='ibro'.*whole prompt group"):
        check_iib_lpo_config(_compose(base + ["actor_rollout_ref.rollout.n=14", "iib_lpo.ib.estimator=ibro"]),
                             check_files=False)
    with pytest.raises(RecipeConfigError, match=r"top_n=0: no branch survives"):
        check_iib_lpo_config(_compose(base + ["actor_rollout_ref.rollout.n=14", "iib_lpo.ib.top_n=0"]),
                             check_files=False)
    # R = 1 is the single-round check, unchanged
    check_iib_lpo_config(_compose(["iib_lpo.latent.mode=none"]), check_files=False)


# ----------------------------------------------------------------------------------------------
# Per-round metrics (pure)
# ----------------------------------------------------------------------------------------------


def _extra(**kw):
    base = {"iib_fork_position": -1, "iib_fork_entropy": math.nan, "iib_fork_reason": "ok", "iib_generated_length": 10,
            "iib_prefix_length": 0, "iib_fork_source_length": -1, "iib_loop_reward": math.nan}
    return {**base, **kw}


def test_round_metrics_known_answer():
    # one prompt, M=1, K=2, R=2: initial (forked at 4 of 20), round 1 forked from it, round 2 from
    # round 1's survivor (session 2, forked at 12 of its 20 tokens)
    roles = [RowRole("u", 0, 0, ROW_INITIAL),
             RowRole("u", 1, 0, ROW_BRANCH, 1, False), RowRole("u", 2, 0, ROW_BRANCH, 1, True),
             RowRole("u", 3, 0, ROW_BRANCH, 2), RowRole("u", 4, 0, ROW_BRANCH, 2)]
    extra = [_extra(iib_fork_position=4, iib_fork_entropy=2.0, iib_generated_length=20),
             _extra(iib_fork_position=4, iib_fork_entropy=2.0, iib_fork_source_length=20, iib_loop_reward=0.0),
             _extra(iib_fork_position=4, iib_fork_entropy=2.0, iib_fork_source_length=20, iib_loop_reward=1.0),
             _extra(iib_fork_position=12, iib_fork_entropy=1.0, iib_fork_source_length=20),
             _extra(iib_fork_position=12, iib_fork_entropy=1.0, iib_fork_source_length=20)]
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    scores = torch.tensor([-0.1, -0.2, 0.8, 0.7, -0.3])
    keep = torch.tensor([True, False, True, True, False])
    recomputed = torch.tensor([True, True, False, True, False])  # the trainer disagreed on round 1
    m = iib_lpo_step_metrics(roles, extra, rewards, scores, keep, [5] * 5, [0.0] * 5, recomputed_keep=recomputed)
    assert m["iib_lpo/round0/acc"] == 0.0 and m["iib_lpo/round1/acc"] == 0.5 and m["iib_lpo/round2/acc"] == 0.5
    assert m["iib_lpo/round1/keep_rate"] == 0.5 and m["iib_lpo/round2/keep_rate"] == 0.5
    assert m["iib_lpo/round1/ib_score_kept"] == pytest.approx(0.8) and m["iib_lpo/round2/ib_score_kept"] == pytest.approx(0.7)
    assert m["iib_lpo/round1/fork_pos_frac"] == pytest.approx(0.2) and m["iib_lpo/round2/fork_pos_frac"] == pytest.approx(0.6)
    assert m["iib_lpo/round1/fork_entropy"] == 2.0 and m["iib_lpo/round2/fork_entropy"] == 1.0
    assert m["iib_lpo/round1/fork_rate"] == 1.0 and m["iib_lpo/round2/fork_reason/ok"] == 1.0
    assert m["iib_lpo/round1/keep_agreement"] == 0.0 and "iib_lpo/round2/keep_agreement" not in m
    assert m["iib_lpo/round1/reward_agreement"] == 1.0
    # a lineage that stopped: round 2 sessions are resamples of a too-short survivor
    roles[3:] = [RowRole("u", 3, 0, ROW_RESAMPLE, 2), RowRole("u", 4, 0, ROW_RESAMPLE, 2)]
    extra[3:] = [_extra(iib_fork_reason="too_short"), _extra(iib_fork_reason="too_short")]
    m = iib_lpo_step_metrics(roles, extra, rewards, scores, keep, [5] * 5, [0.0] * 5, recomputed_keep=recomputed)
    assert m["iib_lpo/round2/fork_rate"] == 0.0 and m["iib_lpo/round2/fork_reason/too_short"] == 1.0
    assert "iib_lpo/round2/keep_rate" not in m and m["iib_lpo/round2/acc"] == 0.5


# ----------------------------------------------------------------------------------------------
# The real trainer on CPU, R = 2, 2 steps
# ----------------------------------------------------------------------------------------------

M, K, R = 1, 2, 2


@pytest.fixture(scope="module")
def rounds_run(tmp_path_factory, tiny_qwen2_dir):
    from recipe.iib_lpo.trainer.cpu_run import CpuRunSpec, run_cpu_training
    from recipe.iib_lpo.demo.data import prepare_demo_data

    root = tmp_path_factory.mktemp("trainer_rounds")
    data_dir = prepare_demo_data(root, num_problems=48, seed=0)
    spec = CpuRunSpec(
        model_dir=Path(tiny_qwen2_dir), train_file=data_dir / "demo_train.parquet",
        val_file=data_dir / "demo_val.parquet", out_dir=root / "iib_lpo_r2", algorithm="iib_lpo", steps=2,
        num_initial=M, num_branches=K, rounds=R, cvae_checkpoint=None,  # latent.mode=none: forks + rounds, no CVAE
        dump_rollouts=True,  # each row's step: role, round, fork source, S_IB, keep
        overrides=[f"reward.custom_reward_function.path={PARITY_REWARD}",
                   # 2 prompts x 5 rows: the CPU profile's micro batches of 8 do not divide 10
                   "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=5",
                   "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=5",
                   "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=5"],
    )
    run = run_cpu_training(spec, timeout_s=RUN_TIMEOUT_S)
    if os.environ.get("IIB_LPO_KEEP_RUN_METRICS"):  # where to copy the metrics for a report
        Path(os.environ["IIB_LPO_KEEP_RUN_METRICS"]).write_text(json.dumps(run.metrics(), indent=1))
    return run


def _round_problems(rows: list[dict]) -> list[str]:
    """What in one step's rows (the trainer's dump, M = 1, K = 2, R = 2, top_n = ceil(K/2) = 1)
    contradicts the rounds: per prompt, each round's forked branches keep exactly the one with the
    highest S_IB (round 1 by the rollout's decision, round 2 by the trainer's Top-N), the initial
    rollout and resamples are kept, and round 2 forks from round 1's kept branch."""
    problems = []
    prompts: dict[str, list[dict]] = {}
    for row in rows:
        prompts.setdefault(row["uid"].rsplit("_", 2)[0], []).append(row)
    for uid, group in prompts.items():
        assert len(group) == M * (1 + K * R), (uid, len(group))
        if not all(r["iib_keep"] for r in group if r["iib_role"] != "branch"):
            problems.append(f"{uid}: an initial rollout or resample was dropped")
        for rnd in (1, 2):
            branches = sorted((r for r in group if r["iib_role"] == "branch" and r["iib_round"] == rnd),
                              key=lambda r: r["iib_session_id"])
            if not branches:
                continue  # this round's sessions are resamples (a fork source too short)
            best = max(branches, key=lambda r: (r["iib_ib_score"], -r["iib_session_id"]))
            kept = [r["iib_session_id"] for r in branches if r["iib_keep"]]
            if kept != [best["iib_session_id"]]:
                problems.append(f"{uid} round {rnd}: kept sessions {kept}, highest S_IB is {best['iib_session_id']} "
                                f"(scores {[r['iib_ib_score'] for r in branches]})")
            if rnd == 2:
                survivor = [r["iib_session_id"] for r in group if r["iib_round"] == 1 and r["iib_keep"]
                            and r["iib_role"] == "branch"]
                sources = {r["iib_fork_source"] for r in branches}
                if sources != set(survivor) or len(survivor) != 1:
                    problems.append(f"{uid}: round 2 forked from sessions {sources}, round 1 kept {survivor}")
    return problems


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_two_rounds_train_two_steps_on_cpu(rounds_run):
    run = rounds_run
    assert not run.timed_out, f"run timed out; log: {run.log}"
    assert run.returncode == 0, f"rc={run.returncode}; tail of {run.log}:\n" + run.log.read_text()[-3000:]
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == [1, 2]
    prints = run.weight_fingerprints()
    assert len(prints) == 3 and all(a != b for a, b in zip(prints, prints[1:])), prints
    dumped = run.rollout_rows()
    assert sorted(dumped) == [1, 2]
    for m in metrics:
        assert m["actor/pg_loss"] != 0 and 0 < m["critic/score/mean"] < 1
        rows = dumped[m["step"]]
        problems = _round_problems(rows)
        for r in (0, 1, 2):  # the logged accuracy of each round is the mean r_v of that round's rows
            scores = [row["score"] for row in rows if row["iib_round"] == r]
            if m[f"iib_lpo/round{r}/acc"] != pytest.approx(sum(scores) / len(scores)):
                problems.append(f"iib_lpo/round{r}/acc={m[f'iib_lpo/round{r}/acc']}, rows' mean {sum(scores) / len(scores)}")
        assert problems == [], f"step {m['step']}: " + "\n".join(problems)
        assert m["iib_lpo/round1/fork_rate"] + m.get("iib_lpo/round1/fork_reason/too_short", 0) == pytest.approx(1)
        if m["iib_lpo/round1/fork_rate"] > 0:
            # the rollout ranked round 1 (top_n = ceil(2/2) = 1 of 2), verl's reward and the trainer's Top-N agree
            assert m["iib_lpo/round1/keep_rate"] == 0.5
            assert m["iib_lpo/round1/keep_agreement"] == 1.0 and m["iib_lpo/round1/reward_agreement"] == 1.0
        assert "iib_lpo/round2/keep_agreement" not in m  # the last round is the trainer's alone
    # over the two steps, round 2 forked a survivor of round 1 at least once
    forked2 = [m for m in metrics if m.get("iib_lpo/round2/fork_rate", 0) > 0]
    assert forked2, [{k: v for k, v in m.items() if "round" in k} for m in metrics]
    for m in forked2:
        assert m["iib_lpo/round2/keep_rate"] == 0.5 and math.isfinite(m["iib_lpo/round2/ib_score_kept"])
