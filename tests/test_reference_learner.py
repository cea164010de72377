"""The reference learner (recipe.iib_lpo.demo.reference_learner): its GRPO advantage and clipped loss equal
verl's own functions, and the loop learns a task a correct policy gradient must learn."""

import numpy as np
import pytest
import torch

from recipe.iib_lpo.demo.reference_learner import (
    ReferenceConfig,
    clipped_pg_loss,
    grpo_advantages,
    paired_gain,
)
from recipe.iib_lpo.trainer.step_metrics import zero_variance_group_share


def test_grpo_advantages_equal_verl():
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    gen = torch.Generator().manual_seed(0)
    n, groups, width = 8, 6, 5
    rewards = (torch.rand(groups * n, generator=gen) > 0.6).float()
    rewards[:n] = 1.0  # one zero-variance group
    token_rewards = torch.zeros(groups * n, width)
    token_rewards[:, -1] = rewards
    mask = torch.ones(groups * n, width)
    expected, _ = compute_grpo_outcome_advantage(token_rewards, mask, np.repeat(np.arange(groups), n))
    ours = grpo_advantages(rewards, n)
    torch.testing.assert_close(ours, expected[:, 0], rtol=0, atol=1e-6)
    assert torch.all(ours[:n] == 0)  # no signal from a group whose rewards are all equal
    with pytest.raises(ValueError):
        grpo_advantages(rewards, 1)
    with pytest.raises(ValueError):
        grpo_advantages(rewards[:-1], n)


@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28)])
def test_clipped_loss_equals_verl_vanilla_token_mean(clip):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config import ActorConfig

    gen = torch.Generator().manual_seed(1)
    b, t = 6, 7
    old = -torch.rand(b, t, generator=gen) * 3
    new = old + torch.randn(b, t, generator=gen) * 0.5  # ratios far outside [0.8, 1.2]: clipping active
    adv = torch.randn(b, generator=gen)
    mask = (torch.rand(b, t, generator=gen) > 0.3).float()
    config = ActorConfig(strategy="fsdp", clip_ratio_low=clip[0], clip_ratio_high=clip[1], clip_ratio_c=3.0,
                         ppo_micro_batch_size_per_gpu=1, rollout_n=1)
    expected, metrics = compute_policy_loss_vanilla(old, new, adv[:, None].expand(b, t), mask, "token-mean", config)
    loss, stats = clipped_pg_loss(new, old, adv, mask, *clip, clip_ratio_c=3.0)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert stats["pg_clipfrac"] == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
    assert stats["ppo_kl"] == pytest.approx(metrics["actor/ppo_kl"], abs=1e-6)
    assert 0 < stats["pg_clipfrac"] < 1


def test_on_policy_gradient_is_the_advantage_weighted_log_likelihood():
    """ratio = 1 on the first (only) epoch: d loss / d logp = -A / #tokens on every unmasked token."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = clipped_pg_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    expected = -(adv[:, None] * mask) / mask.sum()
    torch.testing.assert_close(logp.grad, expected)
    assert stats["pg_clipfrac"] == 0 and stats["ppo_kl"] == 0


def test_zero_variance_group_share_and_paired_gain():
    assert zero_variance_group_share([1.0, 1, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]) == 0.5
    assert zero_variance_group_share([1.0, 1, 0, 1, 0, 0], ["a", "b", "a", "b", "c", "c"]) == 2 / 3  # by id, any order
    with pytest.raises(ValueError):
        zero_variance_group_share([1.0], [0, 1])
    diff, se = paired_gain([0.0, 0.5, 1.0, 0.25], [0.5, 0.5, 1.0, 0.75])
    assert diff == pytest.approx(0.25)
    assert se == pytest.approx(np.std([0.5, 0.0, 0.0, 0.5], ddof=1) / 2)
    with pytest.raises(ValueError):
        paired_gain([0.1], [0.2])
    with pytest.raises(ValueError):
        ReferenceConfig(steps=0)


def test_cli_saves_the_trained_policy(tmp_path, tiny_qwen2_dir):
    """``--save-model`` writes the policy *after* training: it loads, and it is not the input model."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from recipe.iib_lpo.demo.data import prepare_demo_data
    from recipe.iib_lpo.demo.reference_learner import main

    data = prepare_demo_data(tmp_path, num_problems=16, seed=0)
    saved = tmp_path / "policy"
    # the tiny random model never scores, so every group has zero variance and the policy loss is 0:
    # weight decay makes the one AdamW step change the weights whatever the rewards were
    assert main(["--model", str(tiny_qwen2_dir), "--train", str(data / "demo_train.parquet"),
                 "--val", str(data / "demo_val.parquet"), "--steps", "1", "--prompts-per-step", "2", "--n", "2",
                 "--max-new-tokens", "4", "--eval-every", "0", "--weight-decay", "0.5", "--lr", "1e-2",
                 "--threads", "1", "--out", str(tmp_path / "ref.json"), "--save-model", str(saved)]) == 0
    assert json.loads((tmp_path / "ref.json").read_text())["model_path"] == str(saved.resolve())
    before = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).state_dict()
    after = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).state_dict()
    assert before.keys() == after.keys()
    assert (saved / "tokenizer_config.json").exists()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "the saved policy equals the input model: it was saved before training or not at all"
