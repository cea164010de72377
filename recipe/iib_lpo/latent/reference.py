"""Latent injection, REFERENCE implementation in plain PyTorch / transformers (Qwen2, Qwen3).

METHOD.md, "Latent injection". A branch gets the latent vector v = alpha * P(z)
(:func:`latent_token_embedding`) ADDED to the input embedding of the fork token, the last context
token: e = E[r_{t*-1}] + v. No position is added, so v = 0 (alpha = 0) is exactly the plain
model, bit for bit: the latent has a true zero, and its scale matters (nothing renormalises a sum
before the first layer's RMSNorm sees the whole row). The paper code's alternative, one inserted
virtual token with embedding v, has no zero (RMSNorm removes its scale) and was removed after the
branch-quality measurement under the same fork training (README, "The latent").

``latent_embedding=None`` means no latent at all: exactly the plain model.

This module is the ground truth the vLLM implementation (verl_patches/vllm_latent) must match
within 1e-4 on the tiny test models. It favours clarity over speed; it is also used to train P
through the frozen policy (latent/training.py), which is why the scoring functions are
differentiable (they do not disable autograd; wrap calls in ``torch.no_grad()`` when scoring).

Log-prob conventions:
* Scoring returns float32 ``log_softmax(logits)`` of the given tokens: raw, untempered (the
  rollout's log-probs equal these only at temperature 1 with no truncation or banned token).
* Generation returns, per sampled token, either the raw log-prob (``logprobs_mode=
  "raw_logprobs"``, this function's default and vLLM's engine default: temperature 1, no
  truncation) or the log-prob under the distribution actually sampled from, after temperature
  and top-p renormalisation (``"processed_logprobs"``). The latter is what this project's
  rollout returns: verl 0.9.1 passes ``rollout.logprobs_mode`` (default
  ``"processed_logprobs"``) to vLLM, and the recipe's rollout server refuses any other mode
  when top-k log-probs are requested (``verl_patches.vllm_latent.spec.SAMPLING_LOGPROBS_MODE``),
  so compare rollout log-probs with ``"processed_logprobs"`` here (vLLM's processed log-probs
  also include top-k, penalties and banned tokens, which this reference does not implement).
  verl's actor recomputes ``log_softmax(logits / temperature)``: tempered, not raw, and
  without top-p. ``temperature=0`` is greedy decoding; its processed log-probs are defined
  equal to the raw ones (vLLM's greedy processed log-probs are likewise untempered).

The model must be in eval mode (dropout off); inputs are token id lists, one sequence each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


def tempered_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """verl's actor view of the policy: ``log_softmax(logits / temperature)`` in float32 (no top-p)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.log_softmax(logits.to(torch.float32) / float(temperature), dim=-1)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats per row of two [..., V] log-prob tensors over the same support (0 log 0 = 0;
    inf where q has no mass and p has some). Differentiable where p > 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(dim=-1)


def latent_token_embedding(projector: nn.Module, z: torch.Tensor, alpha: float) -> torch.Tensor:
    """The latent vector ``alpha * P(z)``: z [..., d_z] -> [..., hidden].

    The single definition used by the sampler (rollout), training and the reference: the vector
    added to the fork token's embedding. alpha must be finite and >= 0; alpha = 0 gives zeros
    (exactly the plain model).
    """
    alpha = float(alpha)
    if not (alpha >= 0.0 and alpha < float("inf")):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    return alpha * projector(z)


# --------------------------------------------------------------------------------------------
# Input construction
# --------------------------------------------------------------------------------------------


def _as_id_tensor(ids: Sequence[int], device: torch.device, name: str, vocab_size: int | None = None) -> torch.Tensor:
    ids_list = [int(t) for t in ids]
    if vocab_size is not None and any(t < 0 or t >= vocab_size for t in ids_list):
        bad = next(t for t in ids_list if t < 0 or t >= vocab_size)
        raise ValueError(f"{name} contains token id {bad} outside the model's vocabulary [0, {vocab_size})")
    return torch.tensor(ids_list, dtype=torch.long, device=device).reshape(len(ids_list))


def _embed_ids(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(ids)


def _check_latent(model: nn.Module, latent_embedding: torch.Tensor) -> None:
    hidden = model.get_input_embeddings().weight.shape[-1]
    if latent_embedding.shape != (hidden,):
        raise ValueError(
            f"latent_embedding must have shape [{hidden}] (the model's hidden size), "
            f"got {tuple(latent_embedding.shape)}"
        )
    if not torch.isfinite(latent_embedding).all():
        raise ValueError("latent_embedding contains NaN or inf")


def add_to_fork_token(fork_embedding: torch.Tensor, latent_embedding: torch.Tensor) -> torch.Tensor:
    """The additive injection e = E[fork] + v, computed in the embedding's dtype (as the engine
    does: verl_patches/vllm_latent/model.py), so v = 0 returns ``fork_embedding`` bit for bit."""
    return fork_embedding + latent_embedding.to(device=fork_embedding.device, dtype=fork_embedding.dtype)


def build_input_embeddings(
    model: nn.Module,
    context_ids: Sequence[int],
    continuation_ids: Sequence[int],
    latent_embedding: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """Input embeddings [T, hidden] of context + continuation, with the latent (if any) added to the
    context's last token, and the prefix length (len(context)). The latent is cast to the model's
    embedding dtype and device, as the engine would store it; it needs a non-empty context.
    """
    table = model.get_input_embeddings().weight
    device = table.device
    vocab_size = table.shape[0]
    context = _as_id_tensor(context_ids, device, "context_ids", vocab_size)
    continuation = _as_id_tensor(continuation_ids, device, "continuation_ids", vocab_size)
    context_embeds = _embed_ids(model, context)
    if latent_embedding is not None:
        _check_latent(model, latent_embedding)
        if context.numel() == 0:
            raise ValueError("a latent needs a non-empty context (it is added to the last token)")
        context_embeds = torch.cat(
            [context_embeds[:-1], add_to_fork_token(context_embeds[-1:], latent_embedding.reshape(1, -1))]
        )
    pieces = [context_embeds, _embed_ids(model, continuation)]
    prefix_len = context.numel()
    if prefix_len == 0 and continuation.numel() > 0:
        raise ValueError("cannot score a continuation with an empty context")
    return torch.cat(pieces, dim=0), prefix_len


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def continuation_logits(
    model: nn.Module,
    context_ids: Sequence[int],
    continuation_ids: Sequence[int],
    latent_embedding: torch.Tensor | None,
) -> torch.Tensor:
    """Logits float32 [len(continuation), V] predicting each continuation token given context,
    [latent] and the earlier continuation tokens. One full forward pass (no KV cache)."""
    embeds, prefix_len = build_input_embeddings(model, context_ids, continuation_ids, latent_embedding)
    n_cont = embeds.shape[0] - prefix_len
    if n_cont == 0:
        vocab_size = model.get_output_embeddings().weight.shape[0]
        return torch.empty(0, vocab_size, dtype=torch.float32, device=embeds.device)
    position_ids = torch.arange(embeds.shape[0], device=embeds.device).unsqueeze(0)
    logits = model(inputs_embeds=embeds.unsqueeze(0), position_ids=position_ids, use_cache=False).logits[0]
    # logits at position p predict the token at p + 1
    return logits[prefix_len - 1 : prefix_len - 1 + n_cont].to(torch.float32)


def score_continuation(
    model: nn.Module,
    context_ids: Sequence[int],
    continuation_ids: Sequence[int],
    latent_embedding: torch.Tensor | None,
) -> torch.Tensor:
    """log p(continuation_j | context, [latent], continuation_<j) for each j: float32 [len(continuation)].

    One full forward pass (no KV cache): this is also the "no-cache recomputation" against which
    cached generation is checked.
    """
    logits = continuation_logits(model, context_ids, continuation_ids, latent_embedding)
    targets = _as_id_tensor(continuation_ids, logits.device, "continuation_ids")
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def continuation_logits_batched(
    model: nn.Module,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    latent_embeddings: Sequence[torch.Tensor | None] | None,
    *,
    padding_side: str = "right",
) -> list[torch.Tensor]:
    """:func:`continuation_logits` for several sequences in one padded forward pass (differentiable
    in the latents): float32 [len(continuation_i), V] per row.

    latent_embeddings: one entry (tensor [hidden] or None) per sequence, or None for "no latent
    anywhere". Rows are padded on ``padding_side`` ("right" or "left"); padding is excluded by the
    attention mask and each row gets explicit contiguous position ids starting at 0 at its first
    real token, so every row's result equals the unbatched one up to float reordering.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if latent_embeddings is None:
        latent_embeddings = [None] * len(contexts)
    if len(latent_embeddings) != len(contexts):
        raise ValueError(f"{len(contexts)} contexts but {len(latent_embeddings)} latent embeddings")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not contexts:
        return []
    rows = [
        build_input_embeddings(model, ctx, cont, lat)
        for ctx, cont, lat in zip(contexts, continuations, latent_embeddings)
    ]
    table = model.get_input_embeddings().weight
    device, dtype = table.device, table.dtype
    batch, max_len = len(rows), max(r[0].shape[0] for r in rows)
    pieces, masks, positions, offsets = [], [], [], []
    for row, _ in rows:
        length = row.shape[0]
        pad = max_len - length
        offset = 0 if padding_side == "right" else pad
        offsets.append(offset)
        filler = torch.zeros(pad, table.shape[-1], dtype=dtype, device=device)
        pieces.append(torch.cat([row, filler]) if padding_side == "right" else torch.cat([filler, row]))
        mask = torch.zeros(max_len, dtype=torch.long, device=device)
        mask[offset : offset + length] = 1
        masks.append(mask)
        position = torch.zeros(max_len, dtype=torch.long, device=device)
        position[offset : offset + length] = torch.arange(length, device=device)
        positions.append(position)
    logits = model(
        inputs_embeds=torch.stack(pieces), attention_mask=torch.stack(masks), position_ids=torch.stack(positions),
        use_cache=False,
    ).logits
    results = []
    for b, (row, prefix_len) in enumerate(rows):
        n_cont = row.shape[0] - prefix_len
        start = offsets[b] + prefix_len - 1
        results.append(logits[b, start : start + n_cont].to(torch.float32))
    return results


def score_continuations_batched(
    model: nn.Module,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    latent_embeddings: Sequence[torch.Tensor | None] | None,
    *,
    padding_side: str = "right",
) -> list[torch.Tensor]:
    """:func:`score_continuation` for several sequences in one padded forward pass
    (:func:`continuation_logits_batched` says how rows are padded and positioned)."""
    all_logits = continuation_logits_batched(
        model, contexts, continuations, latent_embeddings, padding_side=padding_side
    )
    results = []
    for logits, cont in zip(all_logits, continuations):
        targets = _as_id_tensor(cont, logits.device, "continuation_ids")
        results.append(torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    return results


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf the logits outside the smallest set of top tokens whose probability >= top_p.

    logits [..., V]; the most likely token is always kept; top_p = 1 returns logits unchanged.
    """
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly better tokens
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [B, V] -> (tokens [B], raw logprobs [B], processed logprobs [B]).

    raw = log_softmax(logits); processed = log-probs of the temperature-scaled, top-p-renormalised
    distribution that was sampled from (equal to raw for greedy, temperature = 0).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.to(torch.float32)
    raw = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        tokens = torch.argmax(logits, dim=-1)
        processed = raw
    else:
        processed = torch.log_softmax(top_p_filter(logits / temperature, top_p), dim=-1)
        tokens = torch.multinomial(processed.exp(), 1, generator=generator).squeeze(-1)
    pick = tokens.unsqueeze(-1)
    return tokens, raw.gather(-1, pick).squeeze(-1), processed.gather(-1, pick).squeeze(-1)


def _check_generation_args(max_new_tokens: int, logprobs_mode: str) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")


def _decode(
    model: nn.Module,
    first_logits: torch.Tensor,
    cache,
    next_position: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int | None,
    generator: torch.Generator | None,
    logprobs_mode: str,
) -> list[tuple[list[int], torch.Tensor]]:
    """Incremental decoding of B rows that share the same length, from the logits of the last
    prefix position [B, V] and the KV cache of the prefix. Rows stop after EOS (included)."""
    batch = first_logits.shape[0]
    device = first_logits.device
    tokens_out: list[list[int]] = [[] for _ in range(batch)]
    logprobs_out: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logits = first_logits
    for step in range(max_new_tokens):
        tokens, raw, processed = sample_next_tokens(logits, temperature, top_p, generator)
        chosen = raw if logprobs_mode == "raw_logprobs" else processed
        for b in range(batch):
            if not finished[b]:
                tokens_out[b].append(int(tokens[b]))
                logprobs_out[b].append(chosen[b])
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        position_ids = torch.full((batch, 1), next_position + step, dtype=torch.long, device=device)
        out = model(
            inputs_embeds=_embed_ids(model, tokens.unsqueeze(-1)),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1]
    return [
        (ids, torch.stack(lps).to(torch.float32) if lps else torch.empty(0, dtype=torch.float32, device=device))
        for ids, lps in zip(tokens_out, logprobs_out)
    ]


@torch.no_grad()
def generate_with_latent(
    model: nn.Module,
    context_ids: Sequence[int],
    latent_embedding: torch.Tensor | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    *,
    logprobs_mode: str = "raw_logprobs",
) -> tuple[list[int], torch.Tensor]:
    """Sample a continuation of context (+ latent token): (token ids, float32 log-probs per token).

    The context and the latent are run in one forward pass that fills the KV cache; each new
    token is then one incremental step at the next contiguous position. Generation stops after
    ``eos_token_id`` (included in the output) or ``max_new_tokens``. See the module docstring
    for ``logprobs_mode``.
    """
    from transformers import DynamicCache

    _check_generation_args(max_new_tokens, logprobs_mode)
    embeds, prefix_len = build_input_embeddings(model, context_ids, [], latent_embedding)
    if prefix_len == 0:
        raise ValueError("generate_with_latent needs a non-empty context or a latent token")
    if max_new_tokens == 0:
        return [], torch.empty(0, dtype=torch.float32, device=embeds.device)
    cache = DynamicCache(config=model.config)
    out = model(
        inputs_embeds=embeds.unsqueeze(0),
        position_ids=torch.arange(prefix_len, device=embeds.device).unsqueeze(0),
        past_key_values=cache,
        use_cache=True,
    )
    [(ids, logprobs)] = _decode(
        model, out.logits[:, -1], out.past_key_values, prefix_len, max_new_tokens, temperature, top_p,
        eos_token_id, generator, logprobs_mode,
    )
    return ids, logprobs


@torch.no_grad()
def generate_with_latents_batched(
    model: nn.Module,
    context_ids: Sequence[int],
    latent_embeddings: torch.Tensor | Sequence[torch.Tensor] | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    *,
    num_samples: int | None = None,
    logprobs_mode: str = "raw_logprobs",
) -> list[tuple[list[int], torch.Tensor]]:
    """Several continuations of ONE shared context, one per latent (the K branches of a fork).

    The context's KV cache is computed once (batch 1) and expanded to the K rows; then the K
    latent positions are run as one batched step (the fork token, the context's last, with
    E[fork] + v_k at its own position, after a shared cache of the context before it), then decoding proceeds in batch. ``latent_embeddings=None`` means K = ``num_samples`` plain continuations (alpha = 0).
    Returns a list of (token ids, log-probs) per row, each as :func:`generate_with_latent` would.
    Random draws differ from K separate calls (one generator consumed in batch order); greedy
    results are equal up to float reordering.
    """
    from transformers import DynamicCache

    _check_generation_args(max_new_tokens, logprobs_mode)
    if latent_embeddings is None:
        if num_samples is None or num_samples < 1:
            raise ValueError("latent_embeddings=None needs num_samples >= 1")
        batch = num_samples
    else:
        if not isinstance(latent_embeddings, torch.Tensor):
            latent_embeddings = torch.stack(list(latent_embeddings))
        if latent_embeddings.dim() != 2:
            raise ValueError(f"latent_embeddings must be [K, hidden], got {tuple(latent_embeddings.shape)}")
        for row in latent_embeddings:
            _check_latent(model, row)
        batch = latent_embeddings.shape[0]
        if num_samples is not None and num_samples != batch:
            raise ValueError(f"num_samples={num_samples} but {batch} latent embeddings were given")
    if batch == 0:
        return []
    embeds, n_ctx = build_input_embeddings(model, context_ids, [], None)
    if n_ctx == 0:
        raise ValueError("generate_with_latents_batched needs a non-empty shared context")
    device = embeds.device
    if max_new_tokens == 0:
        return [([], torch.empty(0, dtype=torch.float32, device=device)) for _ in range(batch)]
    # With latents the fork token's row differs per branch, so only the context before it is shared.
    n_shared = n_ctx - 1 if latent_embeddings is not None else n_ctx
    cache = DynamicCache(config=model.config)
    if n_shared > 0:
        out = model(
            inputs_embeds=embeds[:n_shared].unsqueeze(0),
            position_ids=torch.arange(n_shared, device=device).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        cache.batch_repeat_interleave(batch)  # shared prefix: computed once, expanded to K rows
    next_position = n_ctx
    if latent_embeddings is None:
        last_logits = out.logits[:, -1].expand(batch, -1)
    else:
        step = add_to_fork_token(embeds[n_ctx - 1 :].expand(batch, -1), latent_embeddings).unsqueeze(1)
        out = model(
            inputs_embeds=step,
            position_ids=torch.full((batch, 1), n_ctx - 1, dtype=torch.long, device=device),
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        last_logits = out.logits[:, -1]
    return _decode(
        model, last_logits, cache, next_position, max_new_tokens, temperature, top_p, eos_token_id,
        generator, logprobs_mode,
    )
