"""The per-trajectory ``extra_fields`` the branching rollout hands the trainer, one builder per role.

``initial_extra_fields`` (an initial rollout) and ``branch_extra_fields`` (a branch session:
a fork of its round's fork source, or a flagged resample from the prompt) hold the field list;
the meaning of every field is in docs/ARCHITECTURE.md. ``LatentFields`` is the latent part of a
trajectory (default: no fork, no latent), ``LoopRank`` the rollout's own ranking of a branch of a
ranked round (default: not ranked here, ``iib_loop_keep`` = ``LOOP_KEEP_NONE``). The names and
values are read by the trainer (``ib_step``, ``step_metrics``): do not rename them. Pure: no verl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from recipe.iib_lpo.algorithm.branching import ForkDecision
from recipe.iib_lpo.rollout.layout import ROLE_BRANCH, ROLE_INITIAL, SessionRole
from recipe.iib_lpo.rollout.rounds import ParentResult

FORK_REASON_NO_BRANCHES = "not_a_parent"
LOOP_KEEP_NONE = -1  # iib_loop_keep of a trajectory whose round the rollout did not rank
# iib_latent_status of a trajectory
LATENT_INJECTED = "injected"  # a branch continued after the latent token
LATENT_SKIPPED_BY_SCHEDULE = "skipped_by_schedule"  # forked; the schedule's draw said no latent
LATENT_DISABLED = "disabled"  # a branch forked without latent: latent.mode=none
LATENT_PLACEHOLDER_IN_CONTEXT = "placeholder_in_context"  # forked without latent (see agent_loop._branch_prompt)
LATENT_NO_FORK = "no_fork"  # initial rollouts, and branches of a parent too short to fork


@dataclass(frozen=True)
class LatentFields:
    """iib_latent_{status,prob,scale,norm} of one trajectory."""

    status: str = LATENT_NO_FORK
    prob: float = 0.0  # p_inject at this step (a forked branch with latent.mode=cvae), else 0.0
    scale: float = 0.0  # embedding scale of the injected latent, 0.0 without one
    norm: float = math.nan  # norm of the injected latent, NaN without one

    def fields(self) -> dict[str, Any]:
        return {"iib_latent_prob": self.prob, "iib_latent_scale": self.scale, "iib_latent_norm": self.norm,
                "iib_latent_status": self.status}


@dataclass(frozen=True)
class LoopRank:
    """iib_loop_{keep,reward,ib_score}: the rollout's Top-N decision for a branch of a ranked round
    (1/0) and the r_v and S_IB it ranked with; -1 / NaN / NaN for every other trajectory."""

    keep: int = LOOP_KEEP_NONE
    reward: float = math.nan
    score: float = math.nan

    def fields(self) -> dict[str, Any]:
        return {"iib_loop_keep": self.keep, "iib_loop_reward": self.reward, "iib_loop_ib_score": self.score}


def initial_extra_fields(role: SessionRole, decision: ForkDecision, num_branches: int, generated_length: int,
                         num_cached_tokens: Any, entropies: torch.Tensor) -> dict[str, Any]:
    """An initial rollout: its own fork decision (``not_a_parent`` with K = 0), no latent, not ranked."""
    return {
        "iib_role": ROLE_INITIAL,
        "iib_parent_index": role.parent_index,
        "iib_branch_index": -1,
        "iib_round": 0,
        "iib_fork_source": -1,
        "iib_fork_source_length": -1,
        "iib_fork_position": decision.position if decision.position is not None else -1,
        "iib_fork_entropy": decision.entropy if decision.entropy is not None else math.nan,
        "iib_fork_reason": decision.reason if num_branches > 0 else FORK_REASON_NO_BRANCHES,
        "iib_is_resample": False,
        **LatentFields().fields(),
        "iib_prefix_length": 0,
        "iib_generated_length": generated_length,
        "iib_num_cached_tokens": num_cached_tokens,
        "iib_mean_entropy": float(entropies.mean()) if entropies.numel() else math.nan,
        **LoopRank().fields(),
        "iib_first_token_forced": False,
    }


def branch_extra_fields(role: SessionRole, source: ParentResult, fork_position: int, latent: LatentFields,
                        generated_length: int, num_cached_tokens: Any, mean_entropy: float, rank: LoopRank,
                        latent_sampling_s: float, first_token_forced: bool = False) -> dict[str, Any]:
    """A branch session of round ``role.round_index``: forked from ``source`` at ``fork_position``, or
    (``source`` did not fork) a flagged resample from the prompt with fork position 0.
    ``first_token_forced``: its token at t* was drawn with its siblings' (``sibling_first_tokens=distinct``)."""
    forked = source.decision.should_fork
    return {
        "iib_role": ROLE_BRANCH,
        "iib_parent_index": role.parent_index,
        "iib_branch_index": role.branch_index,
        "iib_round": role.round_index,
        "iib_fork_source": source.session_id if forked else -1,
        "iib_fork_source_length": len(source.response_ids) if forked else -1,
        "iib_fork_position": fork_position if forked else -1,
        "iib_fork_entropy": source.decision.entropy if source.decision.entropy is not None else math.nan,
        "iib_fork_reason": source.decision.reason,
        "iib_is_resample": not forked,
        **latent.fields(),
        "iib_prefix_length": fork_position,
        "iib_generated_length": generated_length,
        "iib_num_cached_tokens": num_cached_tokens,
        "iib_mean_entropy": mean_entropy,
        **rank.fields(),
        "iib_first_token_forced": first_token_forced,
        # verl's AgentLoopMetrics keeps only its own timers, so the encoder + prior time travels here
        "iib_latent_sampling_s": latent_sampling_s,
    }
