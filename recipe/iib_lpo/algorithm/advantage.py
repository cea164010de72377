"""I2B-LPO advantage (METHOD.md step 7), pure (this module imports no verl).

A(r) = z(r_v) + lambda_ib * z(S_IB), with the z-scores taken over the KEPT members of each
prompt group (originals + surviving branches of all rounds):
z(x) = (x - mean_G x) / (std_G x + eps), std = the unbiased (n - 1) sample std, i.e.
``torch.std`` -- the same convention as verl's GRPO (``compute_grpo_outcome_advantage``), so
``lambda_ib = 0`` with every trajectory kept reproduces verl's GRPO advantage exactly for
groups of two or more.

Deliberate differences from verl's GRPO:
* a group with a single kept member gets advantage 0 (verl gives such a row its raw reward,
  mean 0 / std 1): one sample has no group baseline, and a raw reward would be a biased,
  unnormalised signal of a different scale than every other row;
* a term with zero variance in the group (all kept values exactly equal) contributes exactly 0
  (without the check, float rounding of the mean divided by eps can turn 1e-9 into 1e-3);
* dropped trajectories (keep_mask False) get advantage 0 AND must get loss weight 0: a zero
  advantage alone still lets their tokens count in the token-mean denominator and dilute the
  gradient, so the trainer must also zero their ``response_mask`` (``kept_loss_mask``).

Why this is not a verl advantage estimator (``register_adv_est``): in verl 0.9.1 a registered
estimator receives only ``token_level_rewards``, ``response_mask``, ``config``, ``index`` (uid)
and ``reward_baselines`` (``ray_trainer.compute_advantage``), and verl calls it only from
``PPOTrainer._compute_advantage``, which the recipe trainer replaces for ``adv_estimator=iib_lpo``
(it needs the IB scores and the Top-N keep mask, which need per-row ``extra_fields``). So nothing
is registered; ``algorithm.adv_estimator=iib_lpo`` selects the recipe trainer's step
(``recipe.iib_lpo.trainer.ppo_trainer``), and verl's stock trainer cannot run it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "AdvantageConfig",
    "compute_iib_lpo_advantage",
    "kept_loss_mask",
    "group_zscore",
    "ADV_ESTIMATOR_NAME",
]

ADV_ESTIMATOR_NAME = "iib_lpo"


DROPPED_ROWS_MODES = ("remove", "mask")


@dataclass(frozen=True)
class AdvantageConfig:
    """Knobs of the I2B-LPO advantage (METHOD.md step 7; the recipe YAML mirrors them).

    Attributes:
        lambda_ib: weight of z(S_IB) next to z(r_v). Default 0.5 (decision; the paper's value is
            not known): in groups of equal correctness (z(r_v) = 0, where plain GRPO has no
            signal at all) the IB term alone orders the trajectories, while z(r_v) keeps twice
            the weight so correctness stays the dominant signal. 0 reduces to GRPO on the kept
            set (ablation "no IB self-reward").
        eps: added to the group std, as verl's GRPO ``epsilon`` (default 1e-6).
        dropped_rows: what the actor update does with rows the IB filter dropped (they carry
            advantage 0 and an all-zero loss mask either way). "remove" (default): they are left
            out of the update batch, so their tokens cost no forward/backward; "mask": they go
            through it and add nothing to the loss (the behaviour before; the A/B for the
            training-step cost). Under verl's token-mean (the default) the two give the same
            update; under a seq-mean ``loss_agg_mode`` "remove" averages over the kept rows where
            "mask" divided by every row of the mini-batch.
    """

    lambda_ib: float = 0.5
    eps: float = 1e-6
    dropped_rows: str = "remove"

    def __post_init__(self) -> None:
        if not (isinstance(self.lambda_ib, (int, float)) and math.isfinite(self.lambda_ib) and self.lambda_ib >= 0):
            raise ValueError(f"AdvantageConfig.lambda_ib must be a finite number >= 0, got {self.lambda_ib!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"AdvantageConfig.eps must be a finite number > 0, got {self.eps!r}")
        if self.dropped_rows not in DROPPED_ROWS_MODES:
            raise ValueError(f"AdvantageConfig.dropped_rows must be one of {DROPPED_ROWS_MODES}, got {self.dropped_rows!r}")


def _group_key_list(group_ids: torch.Tensor | Sequence[Hashable] | np.ndarray, n: int) -> list[Hashable]:
    if isinstance(group_ids, torch.Tensor):
        if group_ids.ndim != 1:
            raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
        keys = group_ids.tolist()
    else:
        keys = [k.item() if isinstance(k, np.generic) else k for k in group_ids]
    if len(keys) != n:
        raise ValueError(f"group_ids has {len(keys)} entries for {n} trajectories")
    return keys


def _finite_vector(x: torch.Tensor | Sequence[float], n: int | None, what: str) -> torch.Tensor:
    vec = torch.as_tensor(x).detach()
    if vec.ndim != 1:
        raise ValueError(f"{what} must be 1-D [B], got shape {tuple(vec.shape)}")
    if n is not None and vec.shape[0] != n:
        raise ValueError(f"{what} has {vec.shape[0]} entries, expected {n}")
    vec = vec.to("cpu", torch.float64)
    bad = ~torch.isfinite(vec)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{what}[{i}] is {float(vec[i])} (NaN/inf input)")
    return vec


def group_zscore(
    values: torch.Tensor, groups: dict[Hashable, list[int]], keep: Sequence[bool], eps: float
) -> torch.Tensor:
    """z-score of float64 ``values`` within each group over the kept members (module docstring).

    Kept members of groups with >= 2 kept members and non-constant values get
    (x - mean) / (std_unbiased + eps); everything else gets exactly 0.
    """
    out = torch.zeros_like(values)
    for members in groups.values():
        kept = [i for i in members if keep[i]]
        if len(kept) < 2:
            continue
        idx = torch.tensor(kept)
        vals = values[idx]
        if bool((vals == vals[0]).all()):
            continue
        out[idx] = (vals - vals.mean()) / (vals.std(unbiased=True) + eps)
    return out


def compute_iib_lpo_advantage(
    verifiable_rewards: torch.Tensor,
    ib_scores: torch.Tensor,
    group_ids: torch.Tensor | Sequence[Hashable],
    keep_mask: torch.Tensor,
    response_mask: torch.Tensor,
    lambda_ib: float,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A = z(r_v) + lambda_ib * z(S_IB) per kept trajectory, broadcast over its response tokens.

    Args:
        verifiable_rewards: ``[B]`` r_v.
        ib_scores: ``[B]`` S_IB (may be anything finite for dropped rows; they are not used).
        group_ids: ``[B]`` prompt group of each row (int tensor, or a sequence/np array of
            hashables such as verl's uid strings).
        keep_mask: ``[B]`` bool, False = dropped by the IB filter.
        response_mask: ``[B, T]`` 1 for tokens trained through this row (a branch's inherited
            prefix carries 0, METHOD.md step 4).
        lambda_ib: weight of the IB term, finite and >= 0.
        eps: added to the std.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` float32 (returns = advantages, as in verl's
        GRPO), zero on masked tokens and on dropped rows. The loss weight of dropped rows is
        zeroed separately with ``kept_loss_mask`` (see module docstring).

    Raises:
        ValueError: NaN/inf in rewards or IB scores (naming the index), shape mismatches,
            negative or non-finite lambda_ib, non-positive eps.
    """
    AdvantageConfig(lambda_ib=lambda_ib, eps=eps)  # validates both
    if response_mask.ndim != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    n = response_mask.shape[0]
    rewards = _finite_vector(verifiable_rewards, n, "verifiable_rewards")
    scores = _finite_vector(ib_scores, n, "ib_scores")
    keep_t = torch.as_tensor(keep_mask)
    if keep_t.shape != (n,):
        raise ValueError(f"keep_mask must be [B]={n}, got shape {tuple(keep_t.shape)}")
    if keep_t.dtype != torch.bool:
        raise TypeError(f"keep_mask must be a bool tensor, got {keep_t.dtype}")
    keep = keep_t.tolist()
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(_group_key_list(group_ids, n)):
        groups.setdefault(key, []).append(i)
    advantage = group_zscore(rewards, groups, keep, eps)
    if lambda_ib != 0:
        advantage = advantage + lambda_ib * group_zscore(scores, groups, keep, eps)
    advantage = advantage * keep_t.to(torch.float64)
    mask = response_mask.detach().to("cpu", torch.float64)
    token_adv = (advantage.unsqueeze(-1) * mask).to(torch.float32).to(response_mask.device)
    return token_adv, token_adv.clone()


def kept_loss_mask(response_mask: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """``response_mask * keep`` (same dtype as response_mask): dropped rows carry no loss weight."""
    keep_t = torch.as_tensor(keep_mask, device=response_mask.device)
    if keep_t.shape != (response_mask.shape[0],) or keep_t.dtype != torch.bool:
        raise ValueError(
            f"keep_mask must be a bool [B]={response_mask.shape[0]} tensor, got {keep_t.dtype} {tuple(keep_t.shape)}"
        )
    return response_mask * keep_t.unsqueeze(-1).to(response_mask.dtype)
