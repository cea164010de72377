"""Per-step I2B-LPO metrics from the agent loop's ``extra_fields`` (pure; logged under ``iib_lpo/``).

Every metric is a plain float so verl's tracker (console, wandb, tensorboard, JSONL) logs it.
Meanings (README, "Metrics"):
- ``fork_rate``: share of initial rollouts that were forked; ``fork_reason/<r>``: share per reason.
- ``fork_pos_frac``: mean t*/L of forked parents; ``fork_entropy``: mean H(t*).
- ``latent_status/<s>``: share of branches per latent status; ``latent_prob``/``latent_scale``/
  ``latent_norm``: means over branches (scale 0 for branches without a latent; norm over
  injected ones); ``latent_sampling_s``: mean seconds a branch spent getting its latent (encoder +
  prior, incl. the service's batching window).
- ``ib_score_kept`` / ``ib_score_dropped``: mean S_IB of the kept / dropped branches (initial
  rollouts, always kept, would blur the comparison); ``keep_rate``: kept share of branches.
- ``acc_initial`` / ``acc_branch``: mean r_v of initial rollouts / branches (resamples of a parent
  too short to fork are in neither). ``acc_branch_injected`` / ``acc_branch_plain``: mean r_v of the
  branches whose ``iib_latent_status`` is ``injected`` / anything else (forked without a latent:
  skipped by the schedule, latent disabled, placeholder in context); omitted when the set is empty.
  ``num_branch_injected`` / ``num_branch_plain``: how many branches each of those means is over.
- ``prefix_cache_hit``: cached prompt tokens / (prompt + prefix) tokens over forked branches.
- ``generated_tokens_per_prompt`` and ``generated_vs_plain``: tokens the engine generated per
  prompt, and that over what a plain group of the same size would generate (n x the mean length
  of the initial rollouts).
- ``response_length``: mean response length (prefix + continuation); ``rep4``: mean share of
  repeated 4-grams (``ib.TextStats.rep4``, as the IB score uses it) of the responses.

Per round (``round<r>/``, r = 0 for the initial rollouts, 1..R for the branch sessions of round r;
logged for R = 1 too, so an R = 1 and an R = 2 run compare round by round):
- ``round<r>/acc``: mean r_v of the round's rows (branches and resamples; round 0: initial rollouts).
- ``round<r>/keep_rate``: kept share of the round's branches; ``round<r>/ib_score_kept`` /
  ``round<r>/ib_score_dropped``: mean S_IB of its kept / dropped branches.
- ``round<r>/fork_rate``: share of the round's fork sources (one per prompt and parent: the initial
  rollout for r = 1, round r-1's survivor after) that forked; ``round<r>/fork_reason/<reason>``: share
  per reason (``ok``, ``too_short``: the source or an earlier one in its lineage could not fork);
  ``round<r>/fork_pos_frac``: mean t*/L of the fork points (L = the source's response length);
  ``round<r>/fork_entropy``: mean H(t*).
- ``round<r>/keep_agreement``: for a round the rollout ranked (r < R), the share of its branches
  where the trainer's recomputed Top-N equals the rollout's decision (which the trainer applies);
  ``round<r>/reward_agreement``: the share where the r_v the rollout ranked with equals verl's.

Importance sampling (``importance_sampling_metrics``, ``is/<role>/``, role in ``initial``, ``branch``,
``branch_injected``, ``branch_plain``, the rows of the ``acc_*`` split above): per response token,
w = exp(old_log_prob - rollout_log_prob), the actor's recomputed log-prob (it never sees z) over the
one vLLM sampled with (with z for an injected branch); ``weight_mean``, ``ess_ratio`` (ESS/n) and
``truncated_share`` (w above verl's truncation threshold) over the role's tokens. The threshold is
the run's ``algorithm.rollout_correction.rollout_is_threshold`` (iib_lpo_trainer.yaml sets 2.0; an
IcePop ``"lower_upper"`` spec -> its upper bound), else verl 0.9.1's default 2.0. Not logged in verl's
bypass mode (old log-probs are then the rollout's) or without rollout log-probs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from recipe.iib_lpo.algorithm.ib_step import ROW_BRANCH, ROW_INITIAL, RowRole
from recipe.iib_lpo.rollout.extra_fields import LATENT_INJECTED

PREFIX = "iib_lpo/"
# verl 0.9.1's default of algorithm.rollout_correction.rollout_is_threshold (RolloutCorrectionConfig,
# verl/trainer/config/algorithm/rollout_correction.yaml): the truncation threshold of a run whose
# config holds none
VERL_ROLLOUT_IS_THRESHOLD_DEFAULT = 2.0
# verl's SAFETY_BOUND (rollout_corr_helper): its token IS clamps log-ratios to +-20 before exp, so
# one wild token reads as a large weight instead of inf
IS_LOG_RATIO_BOUND = 20.0


def zero_variance_group_share(rewards: Sequence[float], group_ids: Sequence[Any]) -> float:
    """Share of groups (trajectories of one prompt, ``group_ids`` = verl's uid) whose rewards are all
    equal: their group-normalised advantage is 0, so they carry no learning signal. Logged for every
    algorithm as ``diagnostics/zero_variance_groups``."""
    if len(rewards) != len(group_ids) or not len(rewards):
        raise ValueError(f"zero_variance_group_share: {len(rewards)} rewards for {len(group_ids)} group ids")
    groups: dict[Any, list[float]] = {}
    for reward, gid in zip(rewards, group_ids):
        groups.setdefault(gid, []).append(float(reward))
    return sum(max(g) == min(g) for g in groups.values()) / len(groups)


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else math.nan


def role_rows(roles: Sequence[RowRole], extra_fields: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Row indices per role of the ``acc_*`` and ``is/*`` metrics: ``initial`` (ROW_INITIAL),
    ``branch`` (ROW_BRANCH; resamples are in neither), and the branches split by latent status into
    ``branch_injected`` (``iib_latent_status`` == ``injected``) and ``branch_plain`` (any other)."""
    branch = [i for i, r in enumerate(roles) if r.kind == ROW_BRANCH]
    injected = [i for i in branch if extra_fields[i].get("iib_latent_status") == LATENT_INJECTED]
    return {
        "initial": [i for i, r in enumerate(roles) if r.kind == ROW_INITIAL],
        "branch": branch,
        "branch_injected": injected,
        "branch_plain": [i for i in branch if extra_fields[i].get("iib_latent_status") != LATENT_INJECTED],
    }


def iib_lpo_step_metrics(
    roles: Sequence[RowRole],
    extra_fields: Sequence[dict[str, Any]],
    rewards: torch.Tensor,
    scores: torch.Tensor,
    keep: torch.Tensor,
    prompt_lengths: Sequence[int],
    rep4: Sequence[float],
    recomputed_keep: torch.Tensor | None = None,
) -> dict[str, float]:
    """The metrics listed in the module docstring, keyed ``iib_lpo/<name>``; undefined ones omitted."""
    n = len(roles)
    if not (len(extra_fields) == rewards.shape[0] == scores.shape[0] == keep.shape[0] == len(prompt_lengths)
            == len(rep4) == n):
        raise ValueError("iib_lpo_step_metrics: every per-row input must have one entry per row")
    split = role_rows(roles, extra_fields)
    initial, branches = split["initial"], split["branch"]
    out: dict[str, float] = {}
    reasons = Counter(str(extra_fields[i].get("iib_fork_reason")) for i in initial)
    for reason, count in reasons.items():
        out[f"fork_reason/{reason}"] = count / len(initial)
    forked = [i for i in initial if int(extra_fields[i].get("iib_fork_position", -1)) >= 0]
    out["fork_rate"] = len(forked) / len(initial) if initial else math.nan
    out["fork_pos_frac"] = _mean(
        [extra_fields[i]["iib_fork_position"] / max(1, extra_fields[i]["iib_generated_length"]) for i in forked]
    )
    out["fork_entropy"] = _mean([extra_fields[i].get("iib_fork_entropy") for i in forked])
    statuses = Counter(str(extra_fields[i].get("iib_latent_status")) for i in branches)
    for status, count in statuses.items():
        out[f"latent_status/{status}"] = count / len(branches)
    out["latent_prob"] = _mean([extra_fields[i].get("iib_latent_prob") for i in branches])
    out["latent_scale"] = _mean([extra_fields[i].get("iib_latent_scale") for i in branches])
    out["latent_norm"] = _mean([extra_fields[i].get("iib_latent_norm") for i in branches])
    out["latent_sampling_s"] = _mean([extra_fields[i].get("iib_latent_sampling_s") for i in branches])
    keep_list = keep.tolist()
    out["ib_score_kept"] = _mean([float(scores[i]) for i in branches if keep_list[i]])
    out["ib_score_dropped"] = _mean([float(scores[i]) for i in branches if not keep_list[i]])
    out["keep_rate"] = _mean([1.0 if keep_list[i] else 0.0 for i in branches])
    out["acc_initial"] = _mean([float(rewards[i]) for i in initial])
    out["acc_branch"] = _mean([float(rewards[i]) for i in branches])
    # the latent's effect on accuracy, apart from plain resampling at the same fork point
    for name in ("branch_injected", "branch_plain"):
        out[f"acc_{name}"] = _mean([float(rewards[i]) for i in split[name]])
        out[f"num_{name}"] = float(len(split[name]))
    hits = [
        (extra_fields[i].get("iib_num_cached_tokens"), prompt_lengths[i] + int(extra_fields[i]["iib_prefix_length"]))
        for i in branches
        if int(extra_fields[i].get("iib_fork_position", -1)) >= 0
    ]
    hits = [(c, total) for c, total in hits if c is not None and total > 0]
    out["prefix_cache_hit"] = sum(c for c, _ in hits) / sum(t for _, t in hits) if hits else math.nan
    uids = {r.uid for r in roles}
    generated = sum(int(e.get("iib_generated_length", 0)) for e in extra_fields)
    out["generated_tokens_per_prompt"] = generated / len(uids) if uids else math.nan
    plain = len(roles) * _mean([extra_fields[i]["iib_generated_length"] for i in initial])
    out["generated_vs_plain"] = generated / plain if plain and not math.isnan(plain) else math.nan
    out["response_length"] = _mean(
        [int(e.get("iib_prefix_length", 0)) + int(e.get("iib_generated_length", 0)) for e in extra_fields]
    )
    out["rep4"] = _mean(rep4)
    out.update(round_metrics(roles, extra_fields, rewards, scores, keep, recomputed_keep))
    # undefined means (no branches, nothing dropped, ...) are left out rather than logged as NaN
    return {PREFIX + k: v for k, v in out.items() if not math.isnan(v)}


def round_metrics(
    roles: Sequence[RowRole],
    extra_fields: Sequence[dict[str, Any]],
    rewards: torch.Tensor,
    scores: torch.Tensor,
    keep: torch.Tensor,
    recomputed_keep: torch.Tensor | None = None,
) -> dict[str, float]:
    """The ``round<r>/...`` metrics of the module docstring (keys without the ``iib_lpo/`` prefix;
    undefined means are NaN)."""
    out: dict[str, float] = {}
    keep_list = [bool(x) for x in keep.tolist()]
    recomputed = None if recomputed_keep is None else [bool(x) for x in recomputed_keep.tolist()]
    for rd in sorted({r.round_index for r in roles}):
        p = f"round{rd}/"
        rows = [i for i, r in enumerate(roles) if r.round_index == rd]
        out[p + "acc"] = _mean([float(rewards[i]) for i in rows])
        if rd == 0:
            continue
        branches = [i for i in rows if roles[i].kind == ROW_BRANCH]
        out[p + "keep_rate"] = _mean([1.0 if keep_list[i] else 0.0 for i in branches])
        out[p + "ib_score_kept"] = _mean([float(scores[i]) for i in branches if keep_list[i]])
        out[p + "ib_score_dropped"] = _mean([float(scores[i]) for i in branches if not keep_list[i]])
        sources: dict[tuple, dict[str, Any]] = {}  # one fork decision per (prompt, parent) and round
        for i in rows:
            sources.setdefault((roles[i].uid, roles[i].parent_index), extra_fields[i])
        forked = [e for e in sources.values() if int(e.get("iib_fork_position", -1)) >= 0]
        out[p + "fork_rate"] = len(forked) / len(sources) if sources else math.nan
        for reason, count in Counter(str(e.get("iib_fork_reason")) for e in sources.values()).items():
            out[p + f"fork_reason/{reason}"] = count / len(sources)
        out[p + "fork_pos_frac"] = _mean([
            int(e["iib_fork_position"]) / max(1, int(e.get("iib_fork_source_length", -1))) for e in forked
            if int(e.get("iib_fork_source_length", -1)) > 0
        ])
        out[p + "fork_entropy"] = _mean([e.get("iib_fork_entropy") for e in forked])
        decided = [i for i in branches if roles[i].loop_keep is not None]
        if recomputed is not None and decided:
            out[p + "keep_agreement"] = _mean([1.0 if recomputed[i] == roles[i].loop_keep else 0.0 for i in decided])
        loop_rewards = [(float(extra_fields[i].get("iib_loop_reward", math.nan)), float(rewards[i])) for i in decided]
        loop_rewards = [(a, b) for a, b in loop_rewards if not math.isnan(a)]
        if loop_rewards:
            out[p + "reward_agreement"] = _mean([1.0 if abs(a - b) < 1e-6 else 0.0 for a, b in loop_rewards])
    return out


def is_truncation_threshold(spec: Any = None) -> float:
    """The upper truncation threshold of verl's ``rollout_is_threshold`` spec: a float or float-like
    string (TIS bound), or an IcePop ``"lower_upper"`` string (its upper bound); ``None`` (the run's
    config holds no value) -> ``VERL_ROLLOUT_IS_THRESHOLD_DEFAULT``."""
    if spec is None:
        return VERL_ROLLOUT_IS_THRESHOLD_DEFAULT
    if isinstance(spec, bool):
        raise TypeError("rollout_is_threshold must be a float or a string, not a boolean")
    upper = float(str(spec).strip().split("_", 1)[-1]) if isinstance(spec, str) else float(spec)
    if not upper > 0:
        raise ValueError(f"rollout_is_threshold upper bound must be positive, got {spec!r}")
    return upper


def importance_weight_stats(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    threshold: float,
) -> dict[str, float]:
    """Token importance weights w = exp(old_log_probs - rollout_log_probs) over the tokens where
    ``response_mask`` is set (all three tensors the same shape; padding and masked tokens do not
    count), as ``weight_mean`` (mean w), ``ess_ratio`` ((sum w)^2 / (n sum w^2), 1 when on-policy)
    and ``truncated_share`` (share of tokens with w > ``threshold``, the ones verl's TIS clamps).
    The log-ratio is clamped to +-``IS_LOG_RATIO_BOUND`` as verl does; float64. No tokens -> {}."""
    if not (old_log_probs.shape == rollout_log_probs.shape == response_mask.shape):
        raise ValueError(f"importance_weight_stats: shapes {tuple(old_log_probs.shape)}, "
                         f"{tuple(rollout_log_probs.shape)}, {tuple(response_mask.shape)} differ")
    # select rather than multiply: padding may hold inf/NaN log-probs, and 0 * inf is NaN
    mask = response_mask.bool()
    n = int(mask.sum())
    if n == 0:
        return {}
    log_ratio = old_log_probs.to(torch.float64)[mask] - rollout_log_probs.to(torch.float64)[mask]
    w = torch.exp(log_ratio.clamp(-IS_LOG_RATIO_BOUND, IS_LOG_RATIO_BOUND))
    return {
        "weight_mean": float(w.mean()),
        "ess_ratio": float(w.sum() ** 2 / (n * (w * w).sum())),
        "truncated_share": float((w > threshold).double().mean()),
    }


def importance_sampling_metrics(
    roles: Sequence[RowRole],
    extra_fields: Sequence[dict[str, Any]],
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    threshold: float,
) -> dict[str, float]:
    """``importance_weight_stats`` of each role of ``role_rows`` (rows of the [rows, tokens] tensors),
    keyed ``iib_lpo/is/<role>/<stat>``; a role without rows or unmasked tokens gives no keys.

    ``old_log_probs`` must be the actor's recomputed log-probs (verl's decoupled mode), not the
    rollout's copied over (bypass mode), or every weight is 1. ``threshold``: the run's
    ``algorithm.rollout_correction.rollout_is_threshold`` through ``is_truncation_threshold``."""
    if not (len(roles) == len(extra_fields) == old_log_probs.shape[0]):
        raise ValueError("importance_sampling_metrics: every per-row input must have one entry per row")
    out: dict[str, float] = {}
    for role, rows in role_rows(roles, extra_fields).items():
        if not rows:
            continue
        idx = torch.tensor(rows, dtype=torch.long, device=old_log_probs.device)
        stats = importance_weight_stats(old_log_probs[idx], rollout_log_probs[idx], response_mask[idx], threshold)
        out.update({f"{PREFIX}is/{role}/{k}": v for k, v in stats.items()})
    return out
