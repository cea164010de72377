"""One training step's IB score, Top-N filter and advantage over a verl batch (METHOD.md 6-7).

Pure functions (lists and tensors in, tensors out); the trainer (``recipe.iib_lpo.trainer.ppo_trainer``) only
fetches the inputs from TransferQueue and writes the outputs back.

Filter groups: a branch competes with the other branches of its own fork source, keyed
(prompt uid, parent index, round): round-1 branches with the other round-1 branches of the same
initial rollout, a round-r branch (iterative rounds, ``iib_lpo.ib.rounds`` = R > 1) only with the
other round-r branches forked from the same round-(r-1) survivor. The initial rollout of that
parent is always kept. A resample (a branch session whose fork source was too short to fork,
``iib_is_resample``) was generated from the prompt like an initial rollout, so it is treated as
one: always kept, never competing in Top-N (it has a group of its own). Advantage groups are whole
prompts (uid): the initial rollouts, the resamples and every round's kept branches.

Rounds and the agent loop's decision (R > 1): the rollout already ranked rounds 1..R-1 to pick the
branch the next round forks from (``round_keep_and_survivor``, the same function and Top-N the
filter below uses). The trainer must keep exactly those branches: a survivor's continuation is the
inherited prefix (response_mask 0) of every branch forked from it, so dropping it would leave those
tokens untrained. Its own recomputation could differ (the ``entropy`` estimator reads the engine's
top-k entropies in the rollout and the actor's here; a reward check can time out once and not the
other time), so rows that carry the rollout's decision (``RowRole.loop_keep``) keep it, and the
recomputed Top-N is returned beside it (``IBStepResult.recomputed_keep``) for the agreement metric.
The last round has no recorded decision: the trainer's Top-N decides it, as with R = 1. Ties in the
Top-N are broken towards the lower session id (the rollout's branch order), whatever the batch order.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recipe.iib_lpo.algorithm.advantage import compute_iib_lpo_advantage, kept_loss_mask
from recipe.iib_lpo.algorithm.ib import (
    IBConfig,
    IBInputs,
    best_branch_per_fork_source,
    ib_estimator_spec,
    score_trajectories,
    topn_keep_mask,
)

__all__ = ["ROW_INITIAL", "ROW_BRANCH", "ROW_RESAMPLE", "RowRole", "row_kind", "row_role", "IBStepResult",
           "fork_source_key", "filter_groups", "round_keep_and_survivor", "rounds_problems", "iib_lpo_step"]


ROW_INITIAL, ROW_BRANCH, ROW_RESAMPLE = "initial", "branch", "resample"


@dataclass(frozen=True)
class RowRole:
    """What one row of the batch is, from the agent loop's ``extra_fields``.

    ``round_index``: 0 for an initial rollout, r for a branch session of round r (None -> 0 for an
    initial rollout, 1 otherwise: the single-round layout). ``loop_keep``: the agent loop's Top-N
    decision for a branch of a round it ranked (rounds 1..R-1 when R > 1), None when it made none.
    ``prefix_length``: the tokens a branch inherited from its fork source (``iib_prefix_length``, its
    fork position t*); 0 for initial rollouts and resamples. The row's own tokens, which the
    token-level IB estimators average over, are ``[prefix_length, response length)`` (``ib.own_tokens``).
    """

    uid: str
    session_id: int
    parent_index: int
    kind: str  # ROW_INITIAL, ROW_BRANCH (forked from parent_index's lineage) or ROW_RESAMPLE
    round_index: int | None = None
    loop_keep: bool | None = None
    prefix_length: int = 0

    def __post_init__(self) -> None:
        if self.kind not in (ROW_INITIAL, ROW_BRANCH, ROW_RESAMPLE):
            raise ValueError(f"row kind must be initial, branch or resample, got {self.kind!r}")
        if self.round_index is None:
            object.__setattr__(self, "round_index", 0 if self.kind == ROW_INITIAL else 1)
        if (self.kind == ROW_INITIAL) != (self.round_index == 0) or self.round_index < 0:
            raise ValueError(f"row {self.uid}/{self.session_id}: kind {self.kind!r} with round {self.round_index}")
        if self.loop_keep is not None and self.kind != ROW_BRANCH:
            raise ValueError(f"row {self.uid}/{self.session_id}: a {self.kind} row carries a Top-N decision")
        if self.prefix_length < 0 or (self.kind != ROW_BRANCH and self.prefix_length != 0):
            raise ValueError(f"row {self.uid}/{self.session_id}: a {self.kind} row with inherited prefix length "
                             f"{self.prefix_length} (only a branch inherits a prefix, of length >= 0)")


def row_kind(extra: Mapping[str, Any]) -> str:
    """ROW_INITIAL / ROW_BRANCH / ROW_RESAMPLE from the agent loop's ``extra_fields``."""
    if extra.get("iib_role") == "branch":
        return ROW_RESAMPLE if extra.get("iib_is_resample") else ROW_BRANCH
    return ROW_INITIAL


def row_role(uid: Any, session_id: Any, extra: Mapping[str, Any]) -> RowRole:
    """The ``RowRole`` of one batch row from its uid, session id and the agent loop's ``extra_fields``
    (``iib_round``: absent in a single-round rollout -> its default; ``iib_loop_keep``: 1/0 is the
    rollout's decision, -1 or absent none; ``iib_prefix_length``: required on a branch row)."""
    kind = row_kind(extra)
    if kind == ROW_BRANCH and extra.get("iib_prefix_length") is None:
        raise ValueError(f"row {uid}/{session_id}: a branch without iib_prefix_length in its extra_fields (the "
                         "branching agent loop writes it); its own tokens cannot be told from its inherited prefix")
    round_index = extra.get("iib_round")
    loop_keep = extra.get("iib_loop_keep", -1)
    loop_keep = None if loop_keep is None or int(loop_keep) < 0 else bool(int(loop_keep))
    return RowRole(uid=str(uid), session_id=int(session_id), parent_index=int(extra.get("iib_parent_index", -1)),
                   kind=kind, round_index=None if round_index is None else int(round_index),
                   loop_keep=loop_keep if kind == ROW_BRANCH else None,
                   prefix_length=int(extra["iib_prefix_length"]) if kind == ROW_BRANCH else 0)


@dataclass(frozen=True)
class IBStepResult:
    scores: torch.Tensor  # [B] float32 S_IB
    keep: torch.Tensor  # [B] bool
    advantages: torch.Tensor  # [B, T] float32
    returns: torch.Tensor  # [B, T] float32
    response_mask: torch.Tensor  # [B, T] the input mask with dropped rows zeroed
    recomputed_keep: torch.Tensor | None = None  # [B] bool: the trainer's own Top-N before the loop's decisions


def rounds_problems(ib: IBConfig, num_branches: int) -> list[str]:
    """Why ``ib.rounds > 1`` cannot run with these settings (empty when it can, or when R = 1).

    Shared by the rollout config (``agent_loop``) and the start-up check so both refuse with the same words.
    """
    if ib.rounds == 1:
        return []
    problems = []
    reason = ib_estimator_spec(ib.estimator).rounds_unsupported
    if reason is not None:
        problems.append(f"iib_lpo.ib.rounds={ib.rounds} with iib_lpo.ib.estimator={ib.estimator!r}: the rollout "
                        f"ranks each round's branches before the next round and cannot use this estimator: "
                        f"{reason}; use ngram or entropy, or ib.rounds=1")
    if ib.top_n == 0:
        problems.append(f"iib_lpo.ib.rounds={ib.rounds} with iib_lpo.ib.top_n=0: no branch survives a round, so "
                        "there is nothing to fork the next round from; use top_n >= 1 (or null) or ib.rounds=1")
    if num_branches < 1:
        problems.append(f"iib_lpo.ib.rounds={ib.rounds} with iib_lpo.num_branches={num_branches}: rounds re-fork "
                        "a round's best branch, so they need K >= 1 branches")
    return problems


def fork_source_key(role: RowRole) -> tuple:
    """The Top-N group of a branch row: (uid, "parent", i) for round 1 (the single-round key, shared
    with the initial rollout i), (uid, "parent", i, "round", r) for round r >= 2."""
    if role.round_index <= 1:
        return (role.uid, "parent", role.parent_index)
    return (role.uid, "parent", role.parent_index, "round", role.round_index)


def filter_groups(roles: Sequence[RowRole]) -> tuple[list[tuple], list[bool]]:
    """(Top-N group key, is_original) per row (module docstring)."""
    keys, originals = [], []
    for r in roles:
        if r.kind == ROW_RESAMPLE:
            keys.append((r.uid, "session", r.session_id))
        else:
            keys.append(fork_source_key(r))
        originals.append(r.kind != ROW_BRANCH)
    return keys, originals


def round_keep_and_survivor(scores: torch.Tensor, top_n: int | None, round_index: int) -> tuple[list[bool], int | None]:
    """Top-N of one fork source's round-``round_index`` branches and the one the next round forks from.

    ``scores[k]`` is the S_IB of branch k (in session order). The keep mask is ``ib.topn_keep_mask``
    over that one group (no original), the survivor ``ib.best_branch_per_fork_source`` (highest S_IB
    among the kept, ties -> lower k); None when nothing is kept. The agent loop calls this between
    rounds; ``iib_lpo_step`` runs the same ``topn_keep_mask`` on the same group (tests prove they agree).
    """
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    n = scores.shape[0]
    key = ("fork_source", round_index)
    keep = topn_keep_mask(scores, [key] * n, [False] * n, top_n)
    best = best_branch_per_fork_source(scores, [key] * n, [False] * n, keep, [round_index] * n, round_index)
    return [bool(x) for x in keep.tolist()], best.get(key)


def _session_ordered_keep(scores: torch.Tensor, keys: list[Hashable], originals: list[bool],
                          roles: Sequence[RowRole], top_n: int | None) -> torch.Tensor:
    """``topn_keep_mask`` with rows ordered by (uid, session id): ties go to the lower session id."""
    order = sorted(range(len(roles)), key=lambda i: (roles[i].uid, roles[i].session_id))
    index = torch.tensor(order, dtype=torch.long)
    ordered = topn_keep_mask(scores[index], [keys[i] for i in order], [originals[i] for i in order], top_n)
    keep = torch.zeros(len(roles), dtype=torch.bool)
    keep[index] = ordered
    return keep


def _apply_loop_decisions(keep: torch.Tensor, keys: list[Hashable], roles: Sequence[RowRole]) -> torch.Tensor:
    """Rows with the agent loop's decision keep it; a group must carry it on all its branches or none."""
    out = keep.clone()
    groups: dict[Hashable, list[int]] = {}
    for i, r in enumerate(roles):
        if r.kind == ROW_BRANCH:
            groups.setdefault(keys[i], []).append(i)
    for key, members in groups.items():
        decided = [i for i in members if roles[i].loop_keep is not None]
        if not decided:
            continue
        if len(decided) != len(members):
            raise ValueError(f"fork source {key!r}: {len(decided)} of {len(members)} branches carry the agent "
                             "loop's Top-N decision (all or none must)")
        for i in decided:
            out[i] = bool(roles[i].loop_keep)
    return out


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
        roles: per row, its prompt uid / parent / round / kind and the rollout's decision (``RowRole``).
        response_mask: ``[B, T]`` the rows' response masks (a branch's inherited prefix is 0).
        ib_config: estimator and ``top_n``.
        lambda_ib, eps: advantage knobs (``AdvantageConfig``).

    Returns:
        ``IBStepResult``; dropped rows have advantage 0 and an all-zero response mask, so they
        add nothing to the loss or to its token-mean denominator.

    Raises:
        ValueError: length mismatches, NaN/inf rewards or scores (naming the row), a fork source
            whose branches carry the rollout's decision only in part.
    """
    n = response_mask.shape[0]
    if len(trajectories) != n or len(roles) != n:
        raise ValueError(f"{len(trajectories)} trajectories and {len(roles)} roles for {n} rows")
    scores = score_trajectories(trajectories, ib_config)
    group_keys, originals = filter_groups(roles)
    recomputed = _session_ordered_keep(scores, group_keys, originals, roles, ib_config.top_n)
    keep = _apply_loop_decisions(recomputed, group_keys, roles)
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
    return IBStepResult(scores, keep, advantages, returns, kept_loss_mask(response_mask, keep), recomputed)
