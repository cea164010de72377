"""The benchmark's agent loops: the production loops, instrumented (nothing else changes).

- ``bench_grpo`` = verl 0.9.1's ``single_turn_agent`` (what the GRPO baseline runs in the trainer,
  ``run_qwen7b_grpo.sh`` / ``cpu_run`` with ``algorithm=grpo``), plus ``max_tokens`` =
  ``rollout.response_length`` sent with the request (the server's own default is its start-up
  response length, which is the longest of the sweep) and the timestamps below.
- ``bench_iib_lpo`` = the recipe's ``BranchingAgentLoop`` (``iib_lpo_branching``), plus a timer
  around the wait for the parent and the timestamps below. Its own ``simple_timer`` metrics
  (``generate_sequences``, ``latent_sampling``) are copied into ``extra_fields``: verl's
  ``AgentLoopMetrics`` (a pydantic model with fixed fields) drops ``latent_sampling`` otherwise.

Fields added to every trajectory's ``extra_fields`` (seconds; ``time.time()`` of the agent-loop
worker, the same clock as the benchmark driver on one machine):
``bench_t_start`` / ``bench_t_end`` (the session's ``run()`` entered / output assembled),
``bench_generate_s`` (the engine call), ``bench_latent_s`` (encoder + prior, incl. waiting for a
sibling's request of the same fork point and the service's batching window; 0 without latent),
``bench_wait_parent_s`` (a branch waiting for its parent; 0 for others), ``bench_generated_length``
(tokens the engine generated for this session), ``bench_generate_calls`` ([start, end] of each
engine call of the session).

Switches for the experiments, in the trainer config's top-level ``bench`` group, applied to the
vLLM ``SamplingParams`` of every request of both loops: ``bench.detokenize`` (default null = as
the production loops send it: the branching loop ``detokenize=False``, verl's single-turn loop
vLLM's default True; true / false force it for both) and ``bench.flat_logprobs`` (default false;
true adds ``flat_logprobs=True``). ``bench_init_s`` in ``extra_fields``: the branching loop's
constructor time.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

from recipe.iib_lpo.rollout.agent_loop import BranchingAgentLoop


def bench_agent_loop_config_path() -> str:
    """Absolute path of the YAML registering ``bench_grpo`` and ``bench_iib_lpo``."""
    return str(Path(__file__).resolve().parent / "agent_loops.yaml")


def _bench_options(config: Any) -> dict:
    raw = config.get("bench", None) if config is not None else None
    raw = dict(raw or {})
    detokenize = raw.get("detokenize", None)
    return {"detokenize": None if detokenize is None else bool(detokenize),
            "flat_logprobs": bool(raw.get("flat_logprobs", False))}


def _apply_bench_options(config: Any, params: dict) -> dict:
    options = _bench_options(config)
    if options["detokenize"] is not None:  # None: as the production loop sends it
        params["detokenize"] = options["detokenize"]
    if options["flat_logprobs"]:
        params["flat_logprobs"] = True  # vLLM's FlatLogprobs container (fewer Python objects per step)
    return params


class _TimedClient:
    """The agent loop's LLM client, recording (start, end) wall times of each generate call."""

    def __init__(self, client: Any):
        self._client = client
        self.calls: list[list[float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def generate(self, *args: Any, **kwargs: Any):
        start = time.time()
        try:
            return await self._client.generate(*args, **kwargs)
        finally:
            self.calls.append([start, time.time()])


class BenchSingleTurnAgentLoop(SingleTurnAgentLoop):
    """verl's single_turn_agent with timestamps (the GRPO baseline's rollout)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.server_manager = _TimedClient(self.server_manager)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any):
        t_start = time.time()
        params = dict(sampling_params)
        params["max_tokens"] = int(self.response_length)
        _apply_bench_options(self.config, params)
        output = await super().run(params, **kwargs)
        output.extra_fields.update({
            "bench_t_start": t_start,
            "bench_t_end": time.time(),
            "bench_generate_s": float(output.metrics.generate_sequences),
            "bench_latent_s": 0.0,
            "bench_wait_parent_s": 0.0,
            "bench_generated_length": len(output.response_ids),
            "bench_generate_calls": list(self.server_manager.calls),
        })
        return output


class BenchBranchingAgentLoop(BranchingAgentLoop):
    """The recipe's branching loop with phase timers (the I2B-LPO rollout)."""

    def __init__(self, *args: Any, **kwargs: Any):
        started = time.perf_counter()
        super().__init__(*args, **kwargs)
        self._bench_init_s = time.perf_counter() - started
        self.server_manager = _TimedClient(self.server_manager)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any):
        self._bench = {"t_start": time.time(), "wait_parent_s": 0.0}
        return await super().run(sampling_params, **kwargs)

    async def _wait_for_source(self, group, role, kwargs):
        start = time.perf_counter()
        try:
            return await super()._wait_for_source(group, role, kwargs)
        finally:
            self._bench["wait_parent_s"] += time.perf_counter() - start

    def _sampling_params(self, sampling_params: dict, max_tokens: int, seed: int | None) -> dict:
        return _apply_bench_options(self.config, super()._sampling_params(sampling_params, max_tokens, seed))

    def _output(self, prompt_ids, response_ids, response_mask, logprobs, metrics, extra, token_output, stats):
        extra = {
            **extra,
            "bench_t_start": self._bench["t_start"],
            "bench_t_end": time.time(),
            "bench_generate_s": float(metrics.get("generate_sequences", math.nan)),
            "bench_latent_s": float(metrics.get("latent_sampling", 0.0)),
            "bench_wait_parent_s": float(self._bench["wait_parent_s"]),
            "bench_generated_length": int(extra["iib_generated_length"]),
            "bench_generate_calls": list(self.server_manager.calls),
            "bench_init_s": self._bench_init_s,
        }
        return super()._output(prompt_ids, response_ids, response_mask, logprobs, metrics, extra, token_output, stats)
