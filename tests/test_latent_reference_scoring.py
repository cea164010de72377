"""Latent-token scoring reference (recipe/iib_lpo/latent/reference.py), Qwen2 and Qwen3 tiny models."""

import pytest
import torch

from recipe.iib_lpo.latent.cvae import LatentProjector
from recipe.iib_lpo.latent.reference import (
    latent_token_embedding,
    score_continuation,
    score_continuations_batched,
    top_p_filter,
)

CONTEXT = [1, 40, 41, 42, 43, 44, 45]
CONTINUATION = [50, 51, 52, 53, 54]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


def _latent(seed, hidden=64, scale=1.0):
    return scale * torch.randn(hidden, generator=torch.Generator().manual_seed(seed))


def _plain_logprobs(model, context, continuation):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    rows = logprobs[len(context) - 1 : len(context) - 1 + len(continuation)]
    return rows.gather(-1, torch.tensor(continuation)[:, None]).squeeze(-1)


@torch.no_grad()
def test_no_latent_is_exactly_the_plain_model(model):
    ours = score_continuation(model, CONTEXT, CONTINUATION, None)
    assert ours.dtype == torch.float32 and ours.shape == (len(CONTINUATION),)
    assert torch.equal(ours, _plain_logprobs(model, CONTEXT, CONTINUATION))
    assert torch.equal(score_continuation(model, CONTEXT, [], None), torch.empty(0))


@torch.no_grad()
def test_additive_latent_is_added_to_the_last_context_token(model):
    # v = E[t] - E[last] turns the fork token into token t, at the same position: the sum sits in
    # the last context row, no position is added
    table = model.get_input_embeddings().weight
    token = 77
    latent = table[token] - table[CONTEXT[-1]]
    ours = score_continuation(model, CONTEXT, CONTINUATION, latent)
    torch.testing.assert_close(ours, _plain_logprobs(model, CONTEXT[:-1] + [token], CONTINUATION), atol=1e-5, rtol=0)
    # v = 0 is the plain model bit for bit
    assert torch.equal(score_continuation(model, CONTEXT, CONTINUATION, torch.zeros(table.shape[-1])),
                       _plain_logprobs(model, CONTEXT, CONTINUATION))
    with pytest.raises(ValueError, match="needs a non-empty context"):
        score_continuation(model, [], CONTINUATION, latent)


@torch.no_grad()
def test_different_latents_give_different_next_token_distributions(model):
    plain = score_continuation(model, CONTEXT, CONTINUATION, None)
    a = score_continuation(model, CONTEXT, CONTINUATION, _latent(1))
    b = score_continuation(model, CONTEXT, CONTINUATION, _latent(2))
    assert (a - b).abs().max() > 1e-2
    assert (a - plain).abs().max() > 1e-2
    # deterministic
    assert torch.equal(a, score_continuation(model, CONTEXT, CONTINUATION, _latent(1)))


def test_bad_latent_shapes_and_values(model):
    with pytest.raises(ValueError, match=r"shape \[64\]"):
        score_continuation(model, CONTEXT, CONTINUATION, torch.zeros(63))
    with pytest.raises(ValueError, match="NaN"):
        score_continuation(model, CONTEXT, CONTINUATION, torch.full((64,), float("nan")))
    with pytest.raises(ValueError, match="token id 100000 outside the model's vocabulary"):
        score_continuation(model, CONTEXT, [5, 100000], None)
    with pytest.raises(ValueError, match="empty context"):
        score_continuation(model, [], CONTINUATION, None)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@torch.no_grad()
def test_batched_equals_unbatched(model, padding_side):
    contexts = [CONTEXT, CONTEXT[:3], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68], CONTEXT]
    continuations = [CONTINUATION, CONTINUATION[:2], [70, 71, 72], []]
    latents = [_latent(1), None, _latent(2, scale=0.3), _latent(4)]
    batched = score_continuations_batched(model, contexts, continuations, latents, padding_side=padding_side)
    assert len(batched) == 4
    for ctx, cont, lat, got in zip(contexts, continuations, latents, batched):
        torch.testing.assert_close(got, score_continuation(model, ctx, cont, lat), atol=1e-5, rtol=0)
    no_latent = score_continuations_batched(model, contexts[:2], continuations[:2], None, padding_side=padding_side)
    torch.testing.assert_close(no_latent[1], score_continuation(model, contexts[1], continuations[1], None),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        score_continuations_batched(model, contexts[:2], continuations[:1], None)


def test_latent_token_embedding_is_alpha_times_projector():
    torch.manual_seed(0)
    projector = LatentProjector(latent_dim=4, hidden_width=8, out_dim=64)
    z = torch.randn(3, 4)
    torch.testing.assert_close(latent_token_embedding(projector, z, 0.25), 0.25 * projector(z))
    assert latent_token_embedding(projector, z[0], 1.0).shape == (64,)
    with pytest.raises(ValueError, match="alpha"):
        latent_token_embedding(projector, z, -1.0)
    with pytest.raises(ValueError, match="alpha"):
        latent_token_embedding(projector, z, float("nan"))


def test_top_p_filter_known_answer():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()  # noqa: E731
    assert kept(0.4) == [True, False, False, False]
    assert kept(0.75) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    shuffled = logits[[2, 0, 3, 1]]  # order-independent
    assert torch.isfinite(top_p_filter(shuffled, 0.75)).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(logits, 0.0)
