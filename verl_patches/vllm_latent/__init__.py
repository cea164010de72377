"""One latent token per request inside vLLM 0.24, through supported extension points only.

A branch continues ``prompt + prefix`` with the latent vector v = alpha * P(z) (METHOD.md,
"Latent injection"; v is computed outside the engine) added to the fork token's input
embedding; see recipe/iib_lpo/latent/reference.py. v travels as a precomputed one-token multimodal embedding
into an out-of-tree subclass of vLLM's Qwen2/Qwen3 model registered through the ``vllm.general_plugins``
entry point (see verl_patches/README.md for the mechanism, its limits and measured numbers).

Public API (engine side needs vLLM; request side needs only torch):

- ``register()``: the ``vllm.general_plugins`` entry point; registers the latent architectures.
- ``latent_architecture_for(hf_architecture) -> str``
- ``latent_engine_kwargs(model_hf_architecture, placeholder_token_id) -> dict``: engine args.
- ``build_latent_prompt(prompt_token_ids, latent_embedding, placeholder_token_id) -> dict``:
  a vLLM ``TokensPrompt``; ``latent_embedding=None`` gives the plain prompt (a branch without a latent).
- ``topk_entropy_from_vllm_logprobs(step_logprobs, k, vocab_size) -> EntropyEstimate``:
  per-token entropy of the sampling distribution from vLLM's returned top-k log-probs.

Usage (offline ``vllm.LLM`` or verl's server, whose ``engine_kwargs.vllm`` takes the same dict)::

    kwargs = latent_engine_kwargs("Qwen2ForCausalLM", placeholder_token_id=151665)
    llm = LLM(model=path, **kwargs)
    prompt = build_latent_prompt(prompt_ids + prefix_ids, alpha * P(z), 151665)
    out = llm.generate(prompt, SamplingParams(temperature=1.0, logprobs=20))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from verl_patches.vllm_latent.spec import (
    LATENT_ARCHITECTURES,
    LATENT_MODALITY,
    MODEL_MODULE,
    PLACEHOLDER_CONFIG_KEY,
    SAMPLING_LOGPROBS_MODE,
)

__all__ = [
    "LATENT_ARCHITECTURES",
    "LATENT_MODALITY",
    "SAMPLING_LOGPROBS_MODE",
    "build_latent_prompt",
    "latent_architecture_for",
    "latent_engine_kwargs",
    "register",
    "topk_entropy_from_vllm_logprobs",
    "topk_logprobs_and_ids",
    "topk_logprobs_tensor",
]

def register() -> None:
    """Register the latent-token architectures with vLLM (``vllm.general_plugins`` entry point).

    vLLM calls this in every engine and worker process. Registration is by "module:Class" string,
    so nothing here imports torch-heavy model code; re-registration is harmless. With
    ``VERL_PLATFORM=cpu`` it also applies ``verl_patches.vllm_cpu_weight_sync``.
    """
    from vllm import ModelRegistry

    from verl_patches import vllm_cpu_weight_sync, weight_sync_probe

    for latent_arch in LATENT_ARCHITECTURES.values():
        ModelRegistry.register_model(latent_arch, f"{MODEL_MODULE}:{latent_arch}")
    vllm_cpu_weight_sync.apply()  # VERL_PLATFORM=cpu only: verl's weight sync on vLLM-CPU
    weight_sync_probe.apply()  # IIB_LPO_WEIGHT_PROBE_FILE only: fingerprints after each sync


def _check_placeholder_token_id(placeholder_token_id: Any) -> None:
    if not isinstance(placeholder_token_id, int) or isinstance(placeholder_token_id, bool) or placeholder_token_id < 0:
        raise ValueError(f"placeholder_token_id must be a non-negative int, got {placeholder_token_id!r}")


def latent_architecture_for(hf_architecture: str) -> str:
    """The latent-token architecture name for a stock HF architecture (e.g. Qwen2ForCausalLM)."""
    try:
        return LATENT_ARCHITECTURES[hf_architecture]
    except KeyError:
        raise ValueError(
            f"no latent-token model for architecture {hf_architecture!r}; supported: {sorted(LATENT_ARCHITECTURES)}"
        ) from None


def latent_engine_kwargs(model_hf_architecture: str, placeholder_token_id: int) -> dict[str, Any]:
    """vLLM engine args that serve the checkpoint with the latent-token architecture.

    ``placeholder_token_id`` marks the latent's position; its own embedding row is never read.
    Use an id no real text produces: a dedicated special token, or for real Qwen2.5 checkpoints
    one of the unused embedding rows >= 151665 (inside the embedding matrix, past the tokenizer).

    The dict goes to ``vllm.LLM(**kwargs)`` / ``AsyncEngineArgs`` or verl's
    ``actor_rollout_ref.rollout.engine_kwargs.vllm``. verl applies engine_kwargs after its own
    args, so this ``hf_overrides`` replaces verl's (which only carries quantization overrides):
    merge them if you quantize the rollout.
    """
    _check_placeholder_token_id(placeholder_token_id)
    return {
        "hf_overrides": {
            "architectures": [latent_architecture_for(model_hf_architecture)],
            PLACEHOLDER_CONFIG_KEY: placeholder_token_id,
        },
        # Embedding-only multimodal input: the latent is given as an embedding, no encoder runs.
        "enable_mm_embeds": True,
        # 0 raw "images" per prompt: vLLM then skips encoder profiling and memory for the (absent)
        # encoder. It also skips the item-count check for embeddings, which the processor does.
        "limit_mm_per_prompt": {LATENT_MODALITY: 0},
        # Branches share prompt + prefix; those blocks must come from the prefix cache.
        "enable_prefix_caching": True,
        "logprobs_mode": SAMPLING_LOGPROBS_MODE,
    }


def _as_latent_row(latent_embedding: torch.Tensor) -> torch.Tensor:
    if not isinstance(latent_embedding, torch.Tensor):
        raise TypeError(f"latent_embedding must be a torch.Tensor or None, got {type(latent_embedding).__name__}")
    if latent_embedding.numel() == 0 or any(size != 1 for size in latent_embedding.shape[:-1]):
        raise ValueError(
            f"latent_embedding must hold one vector of shape [hidden] (or [1, hidden], [1, 1, hidden]), "
            f"got shape {tuple(latent_embedding.shape)}"
        )
    if not latent_embedding.is_floating_point():
        raise TypeError(f"latent_embedding must be floating point, got {latent_embedding.dtype}")
    if not torch.isfinite(latent_embedding).all():
        raise ValueError("latent_embedding contains NaN or inf")
    # One [1 item, 1 token, hidden] tensor on CPU: the whole per-request payload is `hidden` floats.
    return latent_embedding.detach().to("cpu").reshape(1, 1, latent_embedding.shape[-1]).contiguous()


def build_latent_prompt(
    prompt_token_ids: Sequence[int],
    latent_embedding: torch.Tensor | None,
    placeholder_token_id: int,
) -> dict[str, Any]:
    """A vLLM ``TokensPrompt`` that continues ``prompt_token_ids`` with the latent.

    ``prompt_token_ids`` is the shared prompt + prefix (the prefix-cache hits come from it);
    ``latent_embedding`` is v = alpha * P(z), shape [hidden], in any float dtype (the model casts it
    to its own dtype). ``None`` (a branch without a latent) gives the plain prompt.

    The token ids are unchanged and v is added to the last one's embedding; the last token must not
    be the placeholder id (the engine's latent marker; the agent loop forks without a latent then).

    Never add ``multi_modal_uuids`` to the result: a caller-given id replaces the latent's content
    hash in the prefix-cache key, and a reused id would serve another latent's KV cache.
    """
    _check_placeholder_token_id(placeholder_token_id)
    token_ids = [int(t) for t in prompt_token_ids]
    if not token_ids:
        raise ValueError("prompt_token_ids is empty: a latent needs a prompt to follow")
    if latent_embedding is None:
        return {"prompt_token_ids": token_ids}
    if token_ids[-1] == placeholder_token_id:
        raise ValueError(
            f"the latent goes on the last prompt token, which is the placeholder id {placeholder_token_id}"
        )
    return {"prompt_token_ids": token_ids, "multi_modal_data": {LATENT_MODALITY: _as_latent_row(latent_embedding)}}


def topk_logprobs_and_ids(step_logprobs: Sequence[Mapping[int, Any]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, k] float32 log-probs, [T, k] int64 token ids) of the k most likely tokens per generated
    token, from vLLM's output, each row in decreasing log-prob order (ties: vLLM's order).

    ``step_logprobs`` is ``CompletionOutput.logprobs`` (one dict token_id -> Logprob per step).
    vLLM adds the sampled token to each dict when it is outside the top-k, so each dict holds k
    or k + 1 entries; the k largest are the top-k of the (processed) distribution.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values, ids = [], []
    for step, entries in enumerate(step_logprobs):
        if entries is None:
            raise ValueError(f"step {step} has no log-probs: request them with SamplingParams(logprobs=k)")
        ranked = sorted(((float(getattr(entry, "logprob", entry)), int(token)) for token, entry in entries.items()),
                        key=lambda pair: -pair[0])
        if len(ranked) < k:
            raise ValueError(f"step {step} has {len(ranked)} log-probs, fewer than k={k}: set SamplingParams(logprobs>=k)")
        values.append([v for v, _ in ranked[:k]])
        ids.append([t for _, t in ranked[:k]])
    if not values:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
    return torch.tensor(values, dtype=torch.float32), torch.tensor(ids, dtype=torch.int64)


def topk_logprobs_tensor(step_logprobs: Sequence[Mapping[int, Any]], k: int) -> torch.Tensor:
    """[T, k] float tensor of the k largest log-probs per generated token (:func:`topk_logprobs_and_ids`)."""
    return topk_logprobs_and_ids(step_logprobs, k)[0]


def topk_entropy_from_vllm_logprobs(step_logprobs: Sequence[Mapping[int, Any]], k: int, vocab_size: int):
    """Per-token entropy estimate [T] (nats) of the sampling distribution from vLLM's top-k log-probs.

    ``step_logprobs`` is ``CompletionOutput.logprobs`` of a request made with
    ``SamplingParams(logprobs>=k)`` on an engine started with ``latent_engine_kwargs`` (its
    ``logprobs_mode="processed_logprobs"`` makes these the log-probs of softmax(logits / T); with
    top_p < 1 or top_k > 0 they are of the truncated distribution instead). ``vocab_size`` is the
    model's logits width (``config.vocab_size``). Returns ``recipe.iib_lpo.algorithm.entropy.EntropyEstimate``
    (estimate, guaranteed lower/upper bracket, tail mass), all [T].
    """
    from recipe.iib_lpo.algorithm.entropy import estimate_entropy_from_topk

    return estimate_entropy_from_topk(topk_logprobs_tensor(step_logprobs, k), vocab_size)
