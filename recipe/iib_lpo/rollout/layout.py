"""Session layout of one prompt's group: which verl session is which trajectory.

verl's V1 rollout starts ``rollout.n`` sessions of a prompt (``session_id`` = 0..n-1, one shared
``uid``); the branching loop reads them as M initial rollouts followed by, per parent, K branches
in each of R rounds: n = M * (1 + K * R) (``group_size``, ``check_group_layout``).

    session s <  M                : initial rollout i = s (round 0)
    session s >= M, j = s - M     : branch k = j % K of round r = (j % (K*R)) // K + 1 of parent i = j // (K*R)

``session_role`` / ``session_id_of`` map between the two. ``assemble_branch_trajectory`` builds a
branch's response: the fork source's r[:t*] (response_mask 0, its log-probs) + the continuation
(mask 1). Pure: no verl, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

AGENT_NAME = "iib_lpo_branching"  # the name the agent loop registers under (rollout.agent_loop)
ROLE_INITIAL = "initial"
ROLE_BRANCH = "branch"


@dataclass(frozen=True)
class SessionRole:
    """What session ``session_id`` of a prompt does."""

    role: str  # ROLE_INITIAL or ROLE_BRANCH
    parent_index: int  # i: the initial rollout this session is, or whose lineage it branches in
    branch_index: int  # k for a branch, -1 for an initial rollout
    round_index: int  # 0 for an initial rollout; r in 1..R for a branch of round r


def group_size(num_initial: int, num_branches: int, rounds: int = 1) -> int:
    """Sessions per prompt: M initial rollouts + K branches per parent in each of R rounds."""
    return num_initial * (1 + num_branches * rounds)


def check_group_layout(rollout_n: int, num_initial: int, num_branches: int, rounds: int = 1) -> None:
    """rollout.n must be M * (1 + K * R); raises a ValueError naming the numbers otherwise."""
    if not isinstance(num_initial, int) or num_initial < 1:
        raise ValueError(f"iib_lpo.num_initial_rollouts must be an int >= 1, got {num_initial!r}")
    if not isinstance(num_branches, int) or num_branches < 0:
        raise ValueError(f"iib_lpo.num_branches must be an int >= 0, got {num_branches!r}")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"iib_lpo.ib.rounds must be an int >= 1, got {rounds!r}")
    expected = group_size(num_initial, num_branches, rounds)
    if rollout_n != expected:
        if rounds == 1:
            raise ValueError(
                f"actor_rollout_ref.rollout.n={rollout_n} does not match the branching layout: "
                f"M={num_initial} initial rollouts x (1 + K={num_branches} branches) = {expected} sessions per prompt. "
                f"Set rollout.n={expected}, or change iib_lpo.num_initial_rollouts / iib_lpo.num_branches "
                f"(rollout.n must be divisible by 1 + K = {1 + num_branches})."
            )
        raise ValueError(
            f"actor_rollout_ref.rollout.n={rollout_n} does not match the branching layout: "
            f"M={num_initial} initial rollouts x (1 + K={num_branches} branches x R={rounds} rounds) = {expected} "
            f"sessions per prompt. Set rollout.n={expected}, or change iib_lpo.num_initial_rollouts / "
            f"iib_lpo.num_branches / iib_lpo.ib.rounds (rollout.n must be divisible by 1 + K x R = "
            f"{1 + num_branches * rounds})."
        )


def session_role(session_id: int, num_initial: int, num_branches: int, rounds: int = 1) -> SessionRole:
    """Sessions 0..M-1 are initial rollouts; session M + i*K*R + (r-1)*K + k is branch k of round r
    in the lineage of parent i (with R = 1: M + i*K + k, branch k of parent i)."""
    total = group_size(num_initial, num_branches, rounds)
    if not isinstance(session_id, int) or not 0 <= session_id < total:
        raise ValueError(
            f"session_id={session_id!r} outside [0, {total}) for M={num_initial}, K={num_branches}, R={rounds}"
        )
    if session_id < num_initial:
        return SessionRole(ROLE_INITIAL, session_id, -1, 0)
    j = session_id - num_initial
    per_parent = num_branches * rounds
    return SessionRole(ROLE_BRANCH, j // per_parent, j % num_branches, (j % per_parent) // num_branches + 1)


def session_id_of(role: SessionRole, num_initial: int, num_branches: int, rounds: int = 1) -> int:
    """The inverse of ``session_role``."""
    if role.role == ROLE_INITIAL:
        return role.parent_index
    return num_initial + role.parent_index * num_branches * rounds + (role.round_index - 1) * num_branches \
        + role.branch_index


def assemble_branch_trajectory(
    parent_response_ids: list[int],
    parent_logprobs: list[float] | None,
    fork_position: int,
    continuation_ids: list[int],
    continuation_logprobs: list[float] | None,
    response_length: int,
) -> tuple[list[int], list[int], list[float] | None]:
    """(response_ids, response_mask, log-probs) of a branch: r[:t*] (mask 0) + continuation (mask 1).

    Truncated to ``response_length``. Log-probs are None unless both sides have them.
    """
    if not 0 <= fork_position <= len(parent_response_ids):
        raise ValueError(f"fork position {fork_position} outside the parent response [0, {len(parent_response_ids)}]")
    if continuation_logprobs is not None and len(continuation_logprobs) != len(continuation_ids):
        raise ValueError(f"{len(continuation_logprobs)} log-probs for {len(continuation_ids)} continuation tokens")
    if parent_logprobs is not None and len(parent_logprobs) != len(parent_response_ids):
        raise ValueError(f"{len(parent_logprobs)} log-probs for {len(parent_response_ids)} parent tokens")
    prefix = list(parent_response_ids[:fork_position])
    response_ids = (prefix + list(continuation_ids))[:response_length]
    response_mask = ([0] * len(prefix) + [1] * len(continuation_ids))[:response_length]
    logprobs = None
    if parent_logprobs is not None and continuation_logprobs is not None:
        logprobs = (list(parent_logprobs[:fork_position]) + list(continuation_logprobs))[:response_length]
    return response_ids, response_mask, logprobs
