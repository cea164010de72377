"""Known-answer tests of the honest branch metrics (issue 20 item 6): ``acc_branch`` split by latent
status, and the per-role importance-sampling metrics (``step_metrics.importance_sampling_metrics``,
called by ``IibLpoTrainer._importance_sampling_by_role``). Pure: hand-built rows and log-probs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from recipe.iib_lpo.algorithm.ib_step import ROW_BRANCH, ROW_INITIAL, ROW_RESAMPLE, RowRole
from recipe.iib_lpo.rollout.extra_fields import (
    LATENT_DISABLED,
    LATENT_INJECTED,
    LATENT_NO_FORK,
    LATENT_PLACEHOLDER_IN_CONTEXT,
    LATENT_SKIPPED_BY_SCHEDULE,
)
from recipe.iib_lpo.trainer.step_metrics import (
    VERL_ROLLOUT_IS_THRESHOLD_DEFAULT,
    importance_sampling_metrics,
    importance_weight_stats,
    iib_lpo_step_metrics,
    is_truncation_threshold,
)

LN2, LN4 = math.log(2.0), math.log(4.0)


def _extra(status: str, **kw):
    base = {"iib_fork_position": 4, "iib_fork_entropy": 1.0, "iib_fork_reason": "ok", "iib_generated_length": 10,
            "iib_prefix_length": 4, "iib_fork_source_length": 10, "iib_loop_reward": math.nan,
            "iib_latent_status": status}
    return {**base, **kw}


def _step_metrics(roles, extra, rewards):
    n = len(roles)
    return iib_lpo_step_metrics(roles, extra, torch.tensor(rewards, dtype=torch.float64), torch.zeros(n),
                                torch.ones(n, dtype=torch.bool), [5] * n, [0.0] * n)


# ----------------------------------------------------------------------------------------------
# acc_branch split
# ----------------------------------------------------------------------------------------------


def _batch():
    """1 initial, 3 injected branches (r 1, 1, 0), 3 plain ones (skipped by schedule r 0, placeholder
    r 0, disabled r 1) and a resample (r 1) that is in no branch set."""
    statuses = [LATENT_INJECTED, LATENT_INJECTED, LATENT_INJECTED, LATENT_SKIPPED_BY_SCHEDULE,
                LATENT_PLACEHOLDER_IN_CONTEXT, LATENT_DISABLED]
    roles = ([RowRole("u", 0, 0, ROW_INITIAL)] + [RowRole("u", 1 + b, 0, ROW_BRANCH) for b in range(6)]
             + [RowRole("u", 7, 0, ROW_RESAMPLE)])
    extra = ([_extra(LATENT_NO_FORK, iib_prefix_length=0, iib_fork_source_length=-1)] + [_extra(s) for s in statuses]
             + [_extra(LATENT_NO_FORK, iib_fork_position=-1, iib_prefix_length=0, iib_fork_reason="too_short")])
    rewards = [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    return roles, extra, rewards


def test_acc_branch_split_by_latent_status():
    m = _step_metrics(*_batch())
    assert m["iib_lpo/acc_initial"] == 0.0
    assert m["iib_lpo/acc_branch"] == pytest.approx(3 / 6)  # all six branches, not the resample
    assert m["iib_lpo/acc_branch_injected"] == pytest.approx(2 / 3)
    assert m["iib_lpo/acc_branch_plain"] == pytest.approx(1 / 3)
    assert m["iib_lpo/num_branch_injected"] == 3.0 and m["iib_lpo/num_branch_plain"] == 3.0


def test_acc_branch_split_empty_set_has_no_key():
    roles, extra, rewards = _batch()
    plain_statuses = (LATENT_SKIPPED_BY_SCHEDULE, LATENT_PLACEHOLDER_IN_CONTEXT, LATENT_DISABLED)
    only_injected = [{**e, "iib_latent_status": LATENT_INJECTED} if e["iib_latent_status"] in plain_statuses
                     else e for e in extra]
    m = _step_metrics(roles, only_injected, rewards)
    assert "iib_lpo/acc_branch_plain" not in m and m["iib_lpo/num_branch_plain"] == 0.0
    assert m["iib_lpo/acc_branch_injected"] == pytest.approx(3 / 6)
    only_plain = [{**e, "iib_latent_status": LATENT_SKIPPED_BY_SCHEDULE} if e["iib_latent_status"] == LATENT_INJECTED
                  else e for e in extra]
    m = _step_metrics(roles, only_plain, rewards)
    assert "iib_lpo/acc_branch_injected" not in m and m["iib_lpo/num_branch_injected"] == 0.0
    assert m["iib_lpo/acc_branch_plain"] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------------------------
# importance weights of one set of rows
# ----------------------------------------------------------------------------------------------


def test_importance_weight_stats_known_answer_masked_padding():
    # w = exp(old - rollout) = 1, 2, 4, 1/2 on the four response tokens; the padding (mask 0) would
    # be w = e^20 (clamped) and NaN if it counted
    old = torch.tensor([[-1.0, 0.0, 0.0, 5.0], [-3.0, 0.0, float("nan"), 0.0]], dtype=torch.float64)
    rollout = torch.tensor([[-1.0, -LN2, -LN4, -30.0], [-3.0 + LN2, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    s = importance_weight_stats(old, rollout, mask, threshold=2.0)
    assert s["weight_mean"] == pytest.approx(7.5 / 4)
    assert s["ess_ratio"] == pytest.approx(7.5**2 / (4 * 21.25))  # sum w = 7.5, sum w^2 = 21.25
    assert s["truncated_share"] == pytest.approx(1 / 4)  # only w = 4 is above 2 (w = 2 is not)
    assert importance_weight_stats(old, rollout, mask, threshold=1.5)["truncated_share"] == pytest.approx(2 / 4)
    # on-policy: every weight 1, ESS/n = 1, nothing truncated
    assert importance_weight_stats(rollout, rollout, mask, 2.0) == pytest.approx(
        {"weight_mean": 1.0, "ess_ratio": 1.0, "truncated_share": 0.0})
    assert importance_weight_stats(old, rollout, torch.zeros_like(mask), 2.0) == {}


# ----------------------------------------------------------------------------------------------
# importance weights per role
# ----------------------------------------------------------------------------------------------


def _is_batch():
    """Rows: initial (w 1, 1, 1), injected branch (w 4, 1/2; 3rd token padding), plain branch
    (skipped by schedule, w 1, 1, 1), resample (w 8, 8, 8: in no role)."""
    roles = [RowRole("u", 0, 0, ROW_INITIAL), RowRole("u", 1, 0, ROW_BRANCH), RowRole("u", 2, 0, ROW_BRANCH),
             RowRole("u", 3, 0, ROW_RESAMPLE)]
    extra = [_extra(LATENT_NO_FORK), _extra(LATENT_INJECTED), _extra(LATENT_SKIPPED_BY_SCHEDULE),
             _extra(LATENT_NO_FORK, iib_fork_position=-1)]
    rollout = torch.tensor([[-1.0, -2.0, -0.5], [-LN4, -0.1, -30.0], [-0.3, -0.2, -0.1], [-3 * LN2] * 3],
                           dtype=torch.float64)
    old = rollout + torch.tensor([[0.0, 0.0, 0.0], [LN4, -LN2, 30.0], [0.0, 0.0, 0.0], [3 * LN2] * 3],
                                 dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    return roles, extra, old, rollout, mask


def test_importance_sampling_metrics_by_role_known_answer():
    roles, extra, old, rollout, mask = _is_batch()
    m = importance_sampling_metrics(roles, extra, old, rollout, mask, threshold=2.0)
    p = "iib_lpo/is/"
    expected = {
        "initial": (1.0, 1.0, 0.0),
        "branch_injected": (2.25, 4.5**2 / (2 * 16.25), 1 / 2),  # w 4, 1/2
        "branch_plain": (1.0, 1.0, 0.0),
        "branch": (7.5 / 5, 7.5**2 / (5 * 19.25), 1 / 5),  # w 4, 1/2, 1, 1, 1
    }
    assert set(m) == {f"{p}{role}/{k}" for role in expected for k in ("weight_mean", "ess_ratio", "truncated_share")}
    for role, (mean, ess, trunc) in expected.items():
        assert m[f"{p}{role}/weight_mean"] == pytest.approx(mean), role
        assert m[f"{p}{role}/ess_ratio"] == pytest.approx(ess), role
        assert m[f"{p}{role}/truncated_share"] == pytest.approx(trunc), role


def test_importance_sampling_metrics_empty_role_has_no_keys():
    roles, extra, old, rollout, mask = _is_batch()
    # no injected branch: no is/branch_injected keys
    plain = [e if e["iib_latent_status"] != LATENT_INJECTED else {**e, "iib_latent_status": LATENT_DISABLED}
             for e in extra]
    m = importance_sampling_metrics(roles, plain, old, rollout, mask, 2.0)
    assert not any(k.startswith("iib_lpo/is/branch_injected/") for k in m)
    assert m["iib_lpo/is/branch_plain/weight_mean"] == pytest.approx(7.5 / 5)
    # initial rollouts only: no branch keys at all; a role whose tokens are all masked: none either
    m = importance_sampling_metrics(roles[:1], extra[:1], old[:1], rollout[:1], mask[:1], 2.0)
    assert set(m) == {f"iib_lpo/is/initial/{k}" for k in ("weight_mean", "ess_ratio", "truncated_share")}
    no_branch_tokens = mask.clone()
    no_branch_tokens[1:3] = 0
    m = importance_sampling_metrics(roles, extra, old, rollout, no_branch_tokens, 2.0)
    assert not any(k.startswith("iib_lpo/is/branch") for k in m) and "iib_lpo/is/initial/weight_mean" in m


# ----------------------------------------------------------------------------------------------
# threshold and the trainer's call site
# ----------------------------------------------------------------------------------------------


def test_truncation_threshold_is_verls():
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.trainer.ppo.rollout_corr_helper import _parse_rollout_is_threshold

    default = {f.name: f.default for f in dataclasses.fields(RolloutCorrectionConfig)}["rollout_is_threshold"]
    assert is_truncation_threshold(None) == VERL_ROLLOUT_IS_THRESHOLD_DEFAULT == float(default) == 2.0
    for spec in (2.0, 3, "1.5", "0.5_3.0"):  # TIS bound, or IcePop lower_upper -> the upper bound
        assert is_truncation_threshold(spec) == _parse_rollout_is_threshold(spec)[0]


def test_trainer_is_metrics_threshold_and_skips():
    from tensordict import TensorDict
    from verl.protocol import DataProto

    from recipe.iib_lpo.trainer.ppo_trainer import IibLpoTrainer

    roles, extra, old, rollout, mask = _is_batch()
    batch = {"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": mask}
    data = DataProto(batch=TensorDict(batch, batch_size=[4]))
    by_role = IibLpoTrainer._importance_sampling_by_role
    # the run's threshold: 5.0 truncates nothing; no config -> verl's 2.0 truncates w = 4
    key = "iib_lpo/is/branch_injected/truncated_share"
    assert by_role(data, roles, extra, {"rollout_is_threshold": 5.0})[key] == 0.0
    assert by_role(data, roles, extra, None)[key] == 0.5
    # bypass mode (old_log_probs are the rollout's) and a batch without rollout log-probs: no keys
    assert by_role(data, roles, extra, {"bypass_mode": True, "rollout_is_threshold": 2.0}) == {}
    del batch["rollout_log_probs"]
    no_rollout = DataProto(batch=TensorDict(batch, batch_size=[4]))
    assert by_role(no_rollout, roles, extra, {"rollout_is_threshold": 2.0}) == {}
