"""Helpers for CPU tests of the latent token in vLLM (tests/ is not a package, so they live here).

``tiny_cpu_llm`` starts a vLLM engine on CPU in seconds (ENVIRONMENT.md settings); the other
functions compute the transformers reference the engine must match.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# vLLM reads these when the engine starts; set before the first engine of the process.
CPU_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in-process: starts in seconds
    "HF_HUB_OFFLINE": "1",
    "TORCH_COMPILE_DISABLE": "1",
}

# CPU attention needs a KV block size that is a multiple of 32.
CPU_BLOCK_SIZE = 32

# KV cache per engine. A tiny model needs 512 bytes per token, so 64 MiB holds >100k tokens; the
# usual VLLM_CPU_KVCACHE_SPACE=1 (GiB, the smallest the env var allows, and it overrides this when
# set) costs 1 GiB per engine, and vLLM does not release an in-process engine's memory on `del`.
CPU_KV_CACHE_BYTES = 64 * 1024 * 1024


def hf_architecture(model_dir: str | Path) -> str:
    """The (single) architecture named in a checkpoint's config.json."""
    architectures = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    if len(architectures) != 1:
        raise ValueError(f"{model_dir}: expected exactly one architecture in config.json, got {architectures}")
    return architectures[0]


def tiny_cpu_llm(
    model_dir: str | Path,
    *,
    placeholder_token_id: int | None,
    max_model_len: int = 512,
    max_num_seqs: int = 32,
    seed: int = 0,
    **engine_overrides: Any,
):
    """A ``vllm.LLM`` for a tiny checkpoint on CPU (float32, eager, prefix caching on).

    ``placeholder_token_id=None`` starts the stock architecture; otherwise the latent-token one.
    """
    for key, value in CPU_ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    from vllm import LLM

    from verl_patches.vllm_latent import SAMPLING_LOGPROBS_MODE, latent_engine_kwargs

    if placeholder_token_id is None:
        kwargs: dict[str, Any] = {"enable_prefix_caching": True, "logprobs_mode": SAMPLING_LOGPROBS_MODE}
    else:
        kwargs = latent_engine_kwargs(hf_architecture(model_dir), placeholder_token_id)
    kwargs.update(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        block_size=CPU_BLOCK_SIZE,
        kv_cache_memory_bytes=CPU_KV_CACHE_BYTES,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        seed=seed,
    )
    kwargs.update(engine_overrides)
    return LLM(**kwargs)


def load_reference_model(model_dir: str | Path):
    """The same checkpoint in transformers (float32, eval mode): the reference side."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def sampled_logprobs(completion) -> torch.Tensor:
    """Log-prob vLLM reported for each sampled token of a ``CompletionOutput``: float32 [T]."""
    if completion.logprobs is None:
        raise ValueError("no log-probs in the output: request them with SamplingParams(logprobs=k)")
    return torch.tensor(
        [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
        dtype=torch.float32,
    )


@torch.no_grad()
def reference_logits(
    model,
    context_ids: Sequence[int],
    continuation_ids: Sequence[int],
    latent_embedding: torch.Tensor | None,
) -> torch.Tensor:
    """Full logits [len(continuation), V] predicting each continuation token (the reference, no grad)."""
    from recipe.iib_lpo.latent.reference import continuation_logits

    return continuation_logits(model, context_ids, continuation_ids, latent_embedding)
