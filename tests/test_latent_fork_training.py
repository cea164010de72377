"""The fork-mode latent stage (recipe/iib_lpo/latent/fork_training.py): the loss in closed form, the
true zero of the additive latent, a learnable fork that P learns through the frozen policy, and
the own-fork sampler with vLLM."""

from __future__ import annotations

import math

import pytest
import torch

from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE, embedding_principal_basis
from recipe.iib_lpo.latent.fork_training import (
    ForkExample,
    ForkLossConfig,
    fork_kl,
    fork_latent_loss,
    fork_loss_terms,
    plain_nll,
    train_fork_latent,
)


def test_fork_latent_loss_known_answer_free_bits_and_hinge():
    nll = torch.tensor([1.0, 3.0])
    kl = torch.tensor([[0.05, 0.3], [0.15, 0.1]], requires_grad=True)  # batch means per dim: 0.1, 0.2
    fkl = torch.tensor([0.2, 0.9])
    config = ForkLossConfig(beta=2.0, free_bits=0.15, fork_kl_target=0.5, hinge_weight=3.0)
    loss, kl_per_dim = fork_latent_loss(nll, kl, fkl, config)
    # 2 + 2 * (max(0.1, 0.15) + max(0.2, 0.15)) + 3 * mean(0, 0.4)
    assert loss.item() == pytest.approx(2.0 + 2.0 * 0.35 + 3.0 * 0.2)
    assert torch.allclose(kl_per_dim, torch.tensor([0.1, 0.2]))
    loss.backward()
    # the dimension under the floor gets no KL gradient; the other gets beta / batch
    assert torch.equal(kl.grad[:, 0], torch.zeros(2))
    assert torch.allclose(kl.grad[:, 1], torch.full((2,), 1.0))


def test_fork_kl_closed_form_and_zero():
    a = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    b = torch.zeros(1, 2)  # q = (1/2, 1/2)
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert fork_kl(a, b, 1.0).item() == pytest.approx(want, abs=1e-6)
    assert fork_kl(a, a, 0.7).item() == pytest.approx(0.0, abs=1e-7)
    # temperature divides the logits before the softmax
    assert fork_kl(2 * a, 2 * b, 2.0).item() == pytest.approx(want, abs=1e-6)


def _tiny_policy(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32).eval()
    policy.requires_grad_(False)
    return policy


def _model(policy, embed_dim=8, rank=16):
    hidden = policy.config.hidden_size
    model = LatentCVAE(CVAEConfig(embed_dim=embed_dim, latent_dim=4, hidden_width=32, num_layers=2,
                                  policy_hidden_size=hidden, projector_hidden_width=32, projector_rank=rank))
    model.projector.set_basis(embedding_principal_basis(policy.get_input_embeddings().weight, rank))
    return model


def _examples(n, a, b, generator):
    """Forks whose first continuation token is a or b (half each) after the same context; the
    'encoder' embedding of the continuation says which, the condition is uninformative noise."""
    context = [5 + (7 * i) % 300 for i in range(20)]
    examples, e_y = [], []
    for i in range(n):
        token = a if i % 2 == 0 else b
        examples.append(ForkExample(context, [token], "q", "c", 20, 21))
        e_y.append(torch.full((8,), 1.0 if token == a else -1.0))
    return examples, torch.randn(n, 8, generator=generator), torch.stack(e_y)


def test_zero_projector_gives_the_plain_model_exactly(tiny_qwen2_dir):
    policy = _tiny_policy(tiny_qwen2_dir)
    model = _model(policy)
    torch.nn.init.zeros_(model.projector.net[-1].weight)
    torch.nn.init.zeros_(model.projector.net[-1].bias)
    g = torch.Generator().manual_seed(0)
    examples, e_x, e_y = _examples(4, 100, 200, g)
    terms = fork_loss_terms(model, policy, examples, e_x, e_y, ForkLossConfig(), g)
    assert torch.equal(terms.fork_kl, torch.zeros(4))
    assert (terms.nll.sum() / terms.num_tokens.sum()).item() == pytest.approx(plain_nll(policy, examples), abs=1e-5)


def test_training_steers_the_fork_through_the_frozen_policy(tiny_qwen2_dir):
    """A fork with two one-token continuations: only a z that knows which (the posterior sees it)
    can lower their NLL, and it must learn to, through the frozen policy: NLL well below the plain
    model's, z carrying information (KL per dim clearly above 0; a constant shift of the fork token,
    the collapse of the old "lm" mode, cannot resolve a coin flip), the fork KL bounded by the hinge."""
    policy = _tiny_policy(tiny_qwen2_dir)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    model = _model(policy)
    g = torch.Generator().manual_seed(0)
    examples, e_x, e_y = _examples(32, 100, 200, g)
    baseline = plain_nll(policy, examples)
    config = ForkLossConfig(fork_kl_target=20.0, free_bits=0.5)
    history = train_fork_latent(model, policy, examples, e_x, e_y, config, epochs=60, batch_size=32, lr=1e-2,
                                seed=0, show_progress=False)
    # a z-independent shift of the fork token can at best make a and b equally likely (NLL ln 2 =
    # 0.69); the random model starts near ln V
    assert history[-1].nll < 0.69 - 0.2, (baseline, [h.nll for h in history])
    assert history[-1].kl_per_dim > 0.1
    # the hinge: with a low target the fork KL stays bounded
    bounded = train_fork_latent(_model(policy), policy, examples, e_x, e_y, ForkLossConfig(fork_kl_target=1.0, hinge_weight=10.0),
                                epochs=30, batch_size=32, lr=1e-2, seed=0, show_progress=False)
    assert bounded[-1].fork_kl_median < 1.5 < history[-1].fork_kl_median
    for key, value in policy.state_dict().items():
        assert torch.equal(value, before[key]), f"the frozen policy changed: {key}"


@pytest.mark.vllm
@pytest.mark.slow
def test_own_forks_follow_the_rollout_fork_rule(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    from recipe.iib_lpo.algorithm.branching import BranchingConfig
    from recipe.iib_lpo.latent.fork_training import sample_own_forks

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    prompts = [[{"role": "user", "content": f"What is {i} plus {i + 1}?"}] for i in range(6)]
    questions = [p[0]["content"] for p in prompts]
    branching = BranchingConfig(rho=0.2, t_min=2, t_margin=3)
    examples, stats = sample_own_forks(str(tiny_qwen2_dir), tokenizer, prompts, questions, branching,
                                       max_new_tokens=24, max_continuation_tokens=10, seed=3)
    assert stats.prompts == 6 and stats.forks + sum(stats.skipped.values()) == 6 and stats.forks >= 1
    for ex in examples:
        assert branching.t_min <= ex.fork_position < ex.response_length - branching.t_margin
        assert 1 <= len(ex.continuation_ids) <= 10
        assert ex.condition_text.startswith(questions[0][:8])
    with pytest.raises(ValueError, match="could be forked"):
        sample_own_forks(str(tiny_qwen2_dir), tokenizer, prompts, questions, BranchingConfig(t_margin=100),
                         max_new_tokens=24, seed=3)
