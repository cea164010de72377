"""What alpha does to the latent (recipe/iib_lpo/latent/reference.py): it is added to the fork
token's row, so the effect shrinks with alpha and alpha = 0 is the plain model bit for bit (the
former inserted token's scale was removed by the input RMSNorm; README "Latent schedule").
"""

import torch

from recipe.iib_lpo.latent.reference import score_continuation


@torch.no_grad()
def test_additive_latent_fades_with_alpha_and_zero_is_the_plain_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    context, continuation = list(range(10, 40)), list(range(50, 66))
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm() * model.get_input_embeddings().weight.norm(dim=-1).mean()
    plain = score_continuation(model, context, continuation, None)
    deviation = {
        alpha: (score_continuation(model, context, continuation, alpha * direction) - plain).abs().max().item()
        for alpha in (1.0, 1e-2, 1e-4)
    }
    assert deviation[1.0] > 0.05, deviation
    # first order in alpha: 100x smaller alpha, ~100x smaller effect (a fixed "empty token" would not shrink)
    assert deviation[1e-2] < 0.05 * deviation[1.0] and deviation[1e-4] < 0.05 * deviation[1e-2], deviation
    assert torch.equal(score_continuation(model, context, continuation, 0.0 * direction), plain)
