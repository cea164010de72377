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
(tokens the engine generated for this session).

``rollout.custom``-style switch for the detokenization experiment: the trainer config's top-level
``bench.detokenize`` (default true = vLLM's default, what the trainer does today); false adds
``detokenize=False`` to the vLLM ``SamplingParams`` of every request of both loops.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

from recipe.iib_lpo.agent_loop import BranchingAgentLoop


def bench_agent_loop_config_path() -> str:
    """Absolute path of the YAML registering ``bench_grpo`` and ``bench_iib_lpo``."""
    return str(Path(__file__).resolve().parent / "agent_loops.yaml")


def _bench_options(config: Any) -> dict:
    raw = config.get("bench", None) if config is not None else None
    raw = dict(raw or {})
    return {"detokenize": bool(raw.get("detokenize", True))}


class BenchSingleTurnAgentLoop(SingleTurnAgentLoop):
    """verl's single_turn_agent with timestamps (the GRPO baseline's rollout)."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any):
        t_start = time.time()
        params = dict(sampling_params)
        params["max_tokens"] = int(self.response_length)
        if not _bench_options(self.config)["detokenize"]:
            params["detokenize"] = False
        output = await super().run(params, **kwargs)
        output.extra_fields.update({
            "bench_t_start": t_start,
            "bench_t_end": time.time(),
            "bench_generate_s": float(output.metrics.generate_sequences),
            "bench_latent_s": 0.0,
            "bench_wait_parent_s": 0.0,
            "bench_generated_length": len(output.response_ids),
        })
        return output


class BenchBranchingAgentLoop(BranchingAgentLoop):
    """The recipe's branching loop with phase timers (the I2B-LPO rollout)."""

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
        params = super()._sampling_params(sampling_params, max_tokens, seed)
        if not _bench_options(self.config)["detokenize"]:
            params["detokenize"] = False
        return params

    def _output(self, prompt_ids, response_ids, response_mask, logprobs, metrics, extra, token_output):
        extra = {
            **extra,
            "bench_t_start": self._bench["t_start"],
            "bench_t_end": time.time(),
            "bench_generate_s": float(metrics.get("generate_sequences", math.nan)),
            "bench_latent_s": float(metrics.get("latent_sampling", 0.0)),
            "bench_wait_parent_s": float(self._bench["wait_parent_s"]),
            "bench_generated_length": int(extra["iib_generated_length"]),
        }
        return super()._output(prompt_ids, response_ids, response_mask, logprobs, metrics, extra, token_output)
