"""Fork sources and the round choreography of one prompt's sessions (in the worker's event loop).

A fork source (``ParentResult``) is an initial rollout (round 0) or the survivor of round r, with
the fork decision the next round's branches continue from. The sessions of a prompt meet in a
``_PromptGroup`` (``group_registry()``: one registry per event loop, keyed by (uid,
global_steps), dropped when all n sessions finished, at most ``max_groups`` kept):

- ``publish_source`` resolves round r's fork source of a parent; a source that does not fork, or
  a failure, resolves every later round too, so no session waits for a chain that stopped.
- ``fail_round``: a ranked round failed; its waiting branches and every later round of the
  lineage get the error (``ParentRolloutError``: verl marks the prompt ``failure``).
- Each branch of a ranked round (r < R) reports a ``BranchRecord``; the branch that completes
  the round runs ``select_round`` (``ib_step.round_keep_and_survivor`` over the branches' S_IB,
  then ``survivor_fork_decision``: the fork point inside the survivor's OWN continuation, seed
  ``fork_seeds(.., r + 1)``) and publishes the ``RoundOutcome``'s next fork source.

Pure: no verl (asyncio futures, torch tensors).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch

from recipe.iib_lpo.algorithm.branching import BranchingConfig, ForkDecision, choose_fork_position
from recipe.iib_lpo.algorithm.ib_step import round_keep_and_survivor
from recipe.iib_lpo.rollout.layout import SessionRole
from recipe.iib_lpo.rollout.seeds import fork_seeds

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

FORK_REASON_NO_SURVIVOR = "no_survivor"  # a ranked round kept no branch (only with ib.top_n=0, refused)


class ParentRolloutError(RuntimeError):
    """A branch's parent rollout failed, so the branch has nothing to fork from."""


@dataclass
class ParentResult:
    """A fork source: an initial rollout (``round_index`` 0) or the survivor of round r
    (``round_index`` r), with the fork decision the next round's branches continue from.

    ``decision.position`` is in response coordinates (for a survivor: inside its own
    continuation, after its inherited prefix). ``entropies`` covers the whole response (an
    inherited prefix carries its ancestors' entropies); ``response_logprobs`` likewise.
    ``fork_row``: the (top-k token ids, log-probs) of the sampling distribution at t*, the draw of
    ``branching.sibling_first_tokens=distinct``; None otherwise.
    """

    request_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float] | None
    entropies: torch.Tensor
    decision: ForkDecision
    min_global_steps: Any
    max_global_steps: Any
    session_id: int = -1
    round_index: int = 0
    fork_row: tuple[list[int], list[float]] | None = None


@dataclass
class BranchRecord:
    """A branch of a ranked round (round r < R), as it reports to the between-round selection."""

    branch_index: int
    session_id: int
    response_ids: list[int]
    response_logprobs: list[float] | None
    entropies: torch.Tensor
    prefix_length: int
    reward: float
    score: float
    min_global_steps: Any
    max_global_steps: Any


@dataclass(frozen=True)
class RoundOutcome:
    """The selection of one fork source's round: per-branch keep and S_IB, the survivor's branch
    index (None if nothing was kept) and the fork source it gives the next round."""

    keep: tuple[bool, ...]
    scores: tuple[float, ...]
    survivor: int | None
    next_source: ParentResult


@dataclass
class _RoundState:
    records: dict[int, BranchRecord]
    outcome: asyncio.Future


@dataclass
class _PromptGroup:
    parents: list[asyncio.Future]  # fork sources of round 1: the initial rollouts
    sources: dict[tuple[int, int], asyncio.Future] = field(default_factory=dict)  # (parent, round >= 2)
    rounds: dict[tuple[int, int], _RoundState] = field(default_factory=dict)  # (parent, ranked round)
    latents: dict[tuple[int, int], asyncio.Task] = field(default_factory=dict)  # (parent, round)
    finished_sessions: int = 0

    def source(self, parent: int, round_index: int) -> asyncio.Future:
        """The future of round ``round_index``'s fork source in the lineage of ``parent``."""
        if round_index == 1:
            return self.parents[parent]
        fut = self.sources.get((parent, round_index))
        if fut is None:
            fut = self.sources[(parent, round_index)] = asyncio.get_running_loop().create_future()
        return fut

    def round_state(self, parent: int, round_index: int) -> _RoundState:
        state = self.rounds.get((parent, round_index))
        if state is None:
            state = self.rounds[(parent, round_index)] = _RoundState({}, asyncio.get_running_loop().create_future())
        return state

    def futures(self) -> list[asyncio.Future]:
        return [*self.parents, *self.sources.values(), *(s.outcome for s in self.rounds.values())]


def publish_source(group: _PromptGroup, parent: int, round_index: int, rounds: int,
                   result: ParentResult | BaseException) -> None:
    """Resolve round ``round_index``'s fork source of ``parent`` (no-op for a future already done).

    A source that does not fork, or a failure, also resolves every later round: a chain that
    stops here makes the later rounds' sessions resamples (or fails them), never leaves them waiting.
    """
    for r in range(round_index, rounds + 1):
        fut = group.source(parent, r)
        if not fut.done():
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        if isinstance(result, ParentResult) and result.decision.should_fork:
            break  # the next round's source comes from this round's selection


def fail_round(group: _PromptGroup, parent: int, round_index: int, rounds: int, err: BaseException) -> None:
    """A ranked round failed: its waiting branches and every later round of the lineage get ``err``."""
    state = group.round_state(parent, round_index)
    if not state.outcome.done():
        state.outcome.set_exception(err)
    publish_source(group, parent, round_index + 1, rounds, err)


class _GroupRegistry:
    """Per-prompt rendezvous between the sessions of one prompt in one worker process.

    Keyed by (uid, global_steps) (verl may re-issue a prompt in a later step with the same uid).
    An entry is dropped when all n sessions finished; at most ``max_groups`` are kept (oldest
    dropped first) so prompts whose sessions never all arrive cannot leak memory.
    """

    def __init__(self, max_groups: int = 100_000):
        self._groups: OrderedDict[Any, _PromptGroup] = OrderedDict()
        self.max_groups = max_groups

    def get(self, key: Any, num_initial: int) -> _PromptGroup:
        group = self._groups.get(key)
        if group is None:
            loop = asyncio.get_running_loop()
            group = _PromptGroup(parents=[loop.create_future() for _ in range(num_initial)])
            self._groups[key] = group
            while len(self._groups) > self.max_groups:
                old_key, old = self._groups.popitem(last=False)
                logger.warning("dropping unfinished branching group %s (registry over %d)", old_key, self.max_groups)
                for fut in old.futures():
                    if not fut.done():
                        fut.set_exception(ParentRolloutError(f"group {old_key} evicted from the registry"))
        return group

    def session_finished(self, key: Any, total_sessions: int) -> None:
        group = self._groups.get(key)
        if group is None:
            return
        group.finished_sessions += 1
        if group.finished_sessions >= total_sessions:
            del self._groups[key]
            for fut in group.futures():  # nobody waits any more: silence "exception never retrieved"
                if fut.done() and not fut.cancelled():
                    fut.exception()

    def __len__(self) -> int:
        return len(self._groups)


# Futures belong to one event loop, so each loop gets its own registry (a verl worker has one).
_REGISTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def group_registry() -> _GroupRegistry:
    """The registry of the running event loop."""
    loop = asyncio.get_running_loop()
    registry = _REGISTRIES.get(loop)
    if registry is None:
        registry = _REGISTRIES[loop] = _GroupRegistry()
    return registry


def survivor_fork_decision(
    entropies: torch.Tensor, prefix_length: int, config: BranchingConfig, seed: int | None
) -> ForkDecision:
    """Where the next round forks a survivor: ``choose_fork_position`` over the survivor's OWN
    continuation (its entropies after the inherited prefix), shifted to response coordinates.

    The candidate window is t_min <= t < T_cont - t_margin inside the continuation, so a fork
    point is never inside the inherited prefix. ``seed`` is required by a random fork rule (``BranchingConfig.needs_seed``).
    """
    if not 0 <= prefix_length <= int(entropies.shape[0]):
        raise ValueError(f"prefix length {prefix_length} outside the survivor's {entropies.shape[0]} tokens")
    local = choose_fork_position(entropies[prefix_length:], config, seed=seed if config.needs_seed else None)
    if not local.should_fork:
        return ForkDecision(None, None, local.reason, int(entropies.shape[0]))
    return ForkDecision(
        position=prefix_length + local.position,
        entropy=local.entropy,
        reason=local.reason,
        num_tokens=int(entropies.shape[0]),
        candidates=tuple(prefix_length + c for c in local.candidates),
    )


def select_round(
    role: SessionRole, records: list[BranchRecord], source: ParentResult, *, top_n: int,
    branching: BranchingConfig, seed_key: str, global_steps: Any, rollout_seed: int, uid: Any,
) -> RoundOutcome:
    """The between-round selection of round ``role.round_index`` of ``source``'s lineage: keep and
    survivor from the branches' S_IB (``round_keep_and_survivor`` with ``top_n``), and the next
    round's fork source: the survivor, forked inside its own continuation (``survivor_fork_decision``
    with seed ``fork_seeds(seed_key, global_steps, parent, r + 1, rollout_seed)``), with the
    lineage's request id."""
    scores = torch.tensor([r.score for r in records], dtype=torch.float32)
    keep, best = round_keep_and_survivor(scores, top_n, role.round_index)
    next_round = role.round_index + 1
    if best is None:  # only with top_n=0, which rounds_problems refuses
        decision = ForkDecision(None, None, FORK_REASON_NO_SURVIVOR, 0)
        return RoundOutcome(tuple(keep), tuple(scores.tolist()), None, dataclasses.replace(source, decision=decision))
    survivor = records[best]
    fork_seed, _ = fork_seeds(seed_key, global_steps, role.parent_index, next_round, rollout_seed)
    decision = survivor_fork_decision(survivor.entropies, survivor.prefix_length, branching, fork_seed)
    if not decision.should_fork:
        logger.info("survivor (branch %d) of round %d of parent %d of %s not forked: %s", best, role.round_index,
                    role.parent_index, uid, decision.reason)
    next_source = ParentResult(
        request_id=source.request_id,  # the lineage's request id: sticky to the same replica
        prompt_ids=source.prompt_ids,
        response_ids=survivor.response_ids,
        response_logprobs=survivor.response_logprobs,
        entropies=survivor.entropies,
        decision=decision,
        min_global_steps=survivor.min_global_steps,
        max_global_steps=survivor.max_global_steps,
        session_id=survivor.session_id,
        round_index=role.round_index,
    )
    return RoundOutcome(tuple(keep), tuple(scores.tolist()), best, next_source)


async def wait_for_source(group: _PromptGroup, role: SessionRole, timeout_s: float, uid: Any) -> ParentResult:
    """Round r's fork source of ``role``'s lineage; a round-r branch waits at most r x ``timeout_s``
    (``parent_wait_timeout_s``: each round before it is one generation to wait for)."""
    timeout = timeout_s * role.round_index
    try:
        return await asyncio.wait_for(asyncio.shield(group.source(role.parent_index, role.round_index)),
                                      timeout=timeout)
    except asyncio.TimeoutError:
        if role.round_index == 1:
            raise ParentRolloutError(
                f"branch {role.branch_index} of prompt {uid}: parent {role.parent_index} did not finish "
                f"within iib_lpo.agent_loop.parent_wait_timeout_s={timeout_s}"
            ) from None
        raise ParentRolloutError(
            f"branch {role.branch_index} of round {role.round_index} of prompt {uid}: the survivor of "
            f"round {role.round_index - 1} of parent {role.parent_index} was not chosen within {timeout}s "
            f"({role.round_index} x iib_lpo.agent_loop.parent_wait_timeout_s)"
        ) from None


async def rank_in_round(
    group: _PromptGroup, role: SessionRole, record: BranchRecord,
    select: Callable[[list[BranchRecord]], RoundOutcome], *, num_branches: int, rounds: int, timeout_s: float, uid: Any,
) -> RoundOutcome:
    """Report this branch to its round's selection and wait for the outcome (at most ``timeout_s``);
    the branch that completes the round selects (``select``: ``select_round`` over the K records in
    branch order) and publishes the next round's fork source. A failed selection or a timeout fails
    the round and every later round of the lineage (``fail_round``)."""
    state = group.round_state(role.parent_index, role.round_index)
    state.records[role.branch_index] = record
    if len(state.records) == num_branches and not state.outcome.done():
        try:
            outcome = select([state.records[k] for k in range(num_branches)])
        except BaseException as err:
            fail_round(group, role.parent_index, role.round_index, rounds, ParentRolloutError(
                f"selecting the survivor of round {role.round_index} of parent {role.parent_index} of prompt "
                f"{uid} failed: {err!r}"))
            raise
        state.outcome.set_result(outcome)
        publish_source(group, role.parent_index, role.round_index + 1, rounds, outcome.next_source)
    try:
        return await asyncio.wait_for(asyncio.shield(state.outcome), timeout=timeout_s)
    except asyncio.TimeoutError:
        err = ParentRolloutError(
            f"branch {role.branch_index} of round {role.round_index} of prompt {uid}: the other branches "
            f"of parent {role.parent_index}'s round did not finish within "
            f"iib_lpo.agent_loop.parent_wait_timeout_s={timeout_s}"
        )
        fail_round(group, role.parent_index, role.round_index, rounds, err)
        raise err from None
