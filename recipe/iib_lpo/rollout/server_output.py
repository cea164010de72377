"""Reading the rollout server's output: the top-k log-probs field and the per-token entropies from it.

``verl_patches.rollout_server`` (``rollout.name=iib_lpo_vllm``) fills ``TOPK_LOGPROBS_FIELD`` of a
generation's ``extra_fields`` with the [T, k] top-k log-probs when asked for ``num_topk_logprobs``;
``entropies_from_topk`` turns them into per-token entropy estimates of the sampling distribution
(``entropy.estimate_entropy_from_topk``) over V = ``policy_vocab_size`` (the width of the policy's
logits, which exceeds the tokenizer's size when the embedding table is padded). No verl.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from recipe.iib_lpo.algorithm.entropy import estimate_entropy_from_topk

TOPK_LOGPROBS_FIELD = "topk_logprobs"  # the key verl_patches.rollout_server fills


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
