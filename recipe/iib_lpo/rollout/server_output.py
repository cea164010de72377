"""Reading the rollout server's output: the top-k log-probs field and the per-token entropies from it.

``verl_patches.rollout_server`` (``rollout.name=iib_lpo_vllm``) fills ``TOPK_LOGPROBS_FIELD`` of a
generation's ``extra_fields`` with the [T, k] top-k log-probs when asked for ``num_topk_logprobs``;
``entropies_from_topk`` turns them into per-token entropy estimates of the sampling distribution
(``entropy.estimate_entropy_from_topk``) over V = ``policy_vocab_size`` (the width of the policy's
logits, which exceeds the tokenizer's size when the embedding table is padded). With
``return_topk_token_ids`` the server also fills ``TOPK_TOKEN_IDS_FIELD``; ``fork_row`` reads the
(ids, log-probs) of one position from the two, and ``stop_token_ids`` is the set of ids at which
the engine ends a sequence. No verl.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from recipe.iib_lpo.algorithm.entropy import estimate_entropy_from_topk

TOPK_LOGPROBS_FIELD = "topk_logprobs"  # the key verl_patches.rollout_server fills
TOPK_TOKEN_IDS_FIELD = "topk_token_ids"  # ... and that of their ids (return_topk_token_ids=True)


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


def fork_row(extra_fields: dict, position: int, what: str) -> tuple[list[int], list[float]]:
    """(token ids, log-probs) of the k most likely tokens at response ``position`` of a generation made
    with ``num_topk_logprobs=k, return_topk_token_ids=True``."""
    ids, logprobs = extra_fields.get(TOPK_TOKEN_IDS_FIELD), extra_fields.get(TOPK_LOGPROBS_FIELD)
    if ids is None or logprobs is None:
        raise RuntimeError(
            f"the rollout server returned no '{TOPK_TOKEN_IDS_FIELD}' / '{TOPK_LOGPROBS_FIELD}' for {what}: "
            "sibling_first_tokens=distinct needs actor_rollout_ref.rollout.name=iib_lpo_vllm (verl_patches.rollout_server)"
        )
    ids, logprobs = np.asarray(ids), np.asarray(logprobs)
    if ids.shape != logprobs.shape or ids.ndim != 2 or not 0 <= position < ids.shape[0]:
        raise RuntimeError(f"top-k ids {ids.shape} / log-probs {logprobs.shape} of {what} have no row {position}")
    return [int(t) for t in ids[position]], [float(v) for v in logprobs[position]]


@functools.lru_cache(maxsize=16)
def stop_token_ids(model_path: str, tokenizer_eos_id: int | None) -> frozenset[int]:
    """The ids that end a sequence in the engine: the tokenizer's EOS and the model's
    ``generation_config.eos_token_id`` (an int or a list; vLLM stops on each)."""
    from transformers import GenerationConfig

    ids = set() if tokenizer_eos_id is None else {int(tokenizer_eos_id)}
    try:
        eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's EOS only, as vLLM does
        eos = None
    ids.update(int(t) for t in ([] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos]))
    return frozenset(ids)
