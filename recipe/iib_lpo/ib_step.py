"""One training step's IB score, Top-N filter and advantage over a verl batch (METHOD.md 6-7).

Pure functions (lists and tensors in, tensors out); the trainer (``recipe.iib_lpo.trainer``) only
fetches the inputs from TransferQueue and writes the outputs back.

Filter groups: a branch competes with the other branches of its own fork source, keyed
(prompt uid, parent index). The initial rollout of that parent is always kept. A resample (a
branch of a parent too short to fork, ``iib_is_resample``) was generated from the prompt like an
initial rollout, so it is treated as one: always kept, never competing in Top-N (it has a group
of its own). Advantage groups are whole prompts (uid): the initial rollouts, the resamples and
every kept branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recipe.iib_lpo.advantage import compute_iib_lpo_advantage, kept_loss_mask
from recipe.iib_lpo.ib import IBConfig, IBInputs, score_trajectories, topn_keep_mask

__all__ = ["ROW_INITIAL", "ROW_BRANCH", "ROW_RESAMPLE", "RowRole", "IBStepResult", "filter_groups", "iib_lpo_step"]


ROW_INITIAL, ROW_BRANCH, ROW_RESAMPLE = "initial", "branch", "resample"


@dataclass(frozen=True)
class RowRole:
    """What one row of the batch is, from the agent loop's ``extra_fields``."""

    uid: str
    session_id: int
    parent_index: int
    kind: str  # ROW_INITIAL, ROW_BRANCH (forked from parent_index) or ROW_RESAMPLE

    def __post_init__(self) -> None:
        if self.kind not in (ROW_INITIAL, ROW_BRANCH, ROW_RESAMPLE):
            raise ValueError(f"row kind must be initial, branch or resample, got {self.kind!r}")


@dataclass(frozen=True)
class IBStepResult:
    scores: torch.Tensor  # [B] float32 S_IB
    keep: torch.Tensor  # [B] bool
    advantages: torch.Tensor  # [B, T] float32
    returns: torch.Tensor  # [B, T] float32
    response_mask: torch.Tensor  # [B, T] the input mask with dropped rows zeroed


def filter_groups(roles: Sequence[RowRole]) -> tuple[list[tuple], list[bool]]:
    """(Top-N group key, is_original) per row (module docstring)."""
    keys, originals = [], []
    for r in roles:
        if r.kind == ROW_RESAMPLE:
            keys.append((r.uid, "session", r.session_id))
        else:
            keys.append((r.uid, "parent", r.parent_index))
        originals.append(r.kind != ROW_BRANCH)
    return keys, originals


def iib_lpo_step(
    trajectories: Sequence[IBInputs],
    roles: Sequence[RowRole],
    response_mask: torch.Tensor,
    ib_config: IBConfig,
    lambda_ib: float,
    eps: float = 1e-6,
) -> IBStepResult:
    """S_IB for every row, the Top-N keep mask, and A = z(r_v) + lambda_ib * z(S_IB) over kept rows.

    Args:
        trajectories: per row, the estimator inputs (``IBInputs.reward`` is r_v in [0, 1]).
        roles: per row, its prompt uid / parent / branch flag (``RowRole``).
        response_mask: ``[B, T]`` the rows' response masks (a branch's prefix is 0).
        ib_config: estimator and ``top_n``.
        lambda_ib, eps: advantage knobs (``AdvantageConfig``).

    Returns:
        ``IBStepResult``; dropped rows have advantage 0 and an all-zero response mask, so they
        add nothing to the loss or to its token-mean denominator.

    Raises:
        ValueError: length mismatches, NaN/inf rewards or scores (naming the row).
    """
    n = response_mask.shape[0]
    if len(trajectories) != n or len(roles) != n:
        raise ValueError(f"{len(trajectories)} trajectories and {len(roles)} roles for {n} rows")
    scores = score_trajectories(trajectories, ib_config)
    group_keys, originals = filter_groups(roles)
    keep = topn_keep_mask(scores, group_keys, originals, ib_config.top_n)
    rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float64)
    advantages, returns = compute_iib_lpo_advantage(
        verifiable_rewards=rewards,
        ib_scores=scores,
        group_ids=[r.uid for r in roles],
        keep_mask=keep,
        response_mask=response_mask,
        lambda_ib=lambda_ib,
        eps=eps,
    )
    return IBStepResult(scores, keep, advantages, returns, kept_loss_mask(response_mask, keep))
