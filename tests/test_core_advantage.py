"""I2B-LPO advantage A = z(r_v) + lambda_ib * z(S_IB) over kept group members (METHOD.md step 7)."""

import math

import numpy as np
import pytest
import torch

from recipe.iib_lpo.algorithm.advantage import (
    AdvantageConfig,
    compute_iib_lpo_advantage,
    kept_loss_mask,
)

EPS = 1e-6


def _mask(lengths, width=6, prefix=None):
    mask = torch.zeros(len(lengths), width)
    for i, n in enumerate(lengths):
        start = 0 if prefix is None else prefix[i]
        mask[i, start:n] = 1.0
    return mask


def test_hand_computed_group():
    # group "a": rows 0-2 kept, row 3 dropped (its big reward/score must not move the stats)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    scores = torch.tensor([0.9, 0.2, -0.5, 5.0])
    keep = torch.tensor([True, True, True, False])
    # row 1 and 2 are branches: inherited prefix tokens 0..1 carry mask 0
    mask = _mask([6, 5, 4, 6], prefix=[0, 2, 2, 0])
    adv, ret = compute_iib_lpo_advantage(rewards, scores, ["a"] * 4, keep, mask, lambda_ib=0.5, eps=EPS)
    # z(r_v): mean 1/3; deviations (2/3, -1/3, -1/3); unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3
    s_r = math.sqrt(1 / 3) + EPS
    z_r = [(2 / 3) / s_r, (-1 / 3) / s_r, (-1 / 3) / s_r]
    # z(S): mean 0.2; deviations (0.7, 0, -0.7); unbiased var = 0.98 / 2 = 0.49 -> std 0.7
    s_s = 0.7 + EPS
    z_s = [0.7 / s_s, 0.0, -0.7 / s_s]
    expected = [z_r[i] + 0.5 * z_s[i] for i in range(3)]  # ~ [1.6547, -0.5774, -1.0774]
    for i in range(3):
        row = adv[i][mask[i].bool()]
        assert torch.allclose(row, torch.full_like(row, expected[i]), atol=1e-5)
    assert torch.equal(adv * (1 - mask), torch.zeros_like(adv))  # masked tokens (incl. branch prefix) are 0
    assert torch.equal(adv[3], torch.zeros(6))  # dropped row
    assert torch.equal(adv, ret) and adv.dtype == torch.float32
    # loss weight of the dropped row is zeroed as well
    assert torch.equal(kept_loss_mask(mask, keep), mask * torch.tensor([[1.0], [1.0], [1.0], [0.0]]))


def test_degenerate_groups_give_zero():
    # g1 constant rewards and scores; g2 single member; g3 everything but the parent dropped;
    # g4 constant rewards, varying scores -> only the IB term: two members z = +-1/sqrt(2)
    groups = ["g1", "g1", "g2", "g3", "g3", "g3", "g4", "g4"]
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    scores = torch.tensor([0.3, 0.3, 0.7, 0.1, 0.9, 0.2, 0.4, 0.1])
    keep = torch.tensor([True, True, True, True, False, False, True, True])
    mask = torch.ones(8, 3)
    adv, _ = compute_iib_lpo_advantage(rewards, scores, groups, keep, mask, lambda_ib=2.0)
    assert torch.equal(adv[:6], torch.zeros(6, 3))
    # g4: deviations +-0.15, unbiased std = 0.3 / sqrt(2); z = +-0.15 / (0.3/sqrt 2) = +-1/sqrt(2); x lambda 2
    z = 0.15 / (0.3 / math.sqrt(2) + EPS)
    assert torch.allclose(adv[6], torch.full((3,), 2 * z), atol=1e-5)
    assert torch.allclose(adv[7], torch.full((3,), -2 * z), atol=1e-5)
    # a constant term is exactly 0: naive float32 (x - mean) / (std + eps) over seven 0.7s gives ~0.056
    same = torch.full((7,), 0.7)
    naive = (same - same.mean()) / (same.std() + EPS)
    assert naive.abs().max() > 0.01  # the failure mode the zero-variance rule prevents
    ones = torch.ones(7, dtype=torch.bool)
    adv_same, _ = compute_iib_lpo_advantage(same, same, [0] * 7, ones, torch.ones(7, 2), 1.0)
    assert torch.equal(adv_same, torch.zeros(7, 2))


def test_int_tensor_and_numpy_object_groups_agree():
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(12, generator=gen) > 0.5).float()
    scores = torch.randn(12, generator=gen)
    keep = torch.rand(12, generator=gen) > 0.3
    mask = torch.ones(12, 4)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    uids = np.array([f"uid-{i}" for i in ids.tolist()], dtype=object)
    a1, _ = compute_iib_lpo_advantage(rewards, scores, ids, keep, mask, 0.5)
    a2, _ = compute_iib_lpo_advantage(rewards, scores, uids, keep, mask, 0.5)
    assert torch.equal(a1, a2)
    assert torch.isfinite(a1).all()


def test_bad_input_raises():
    mask = torch.ones(3, 2)
    keep = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"verifiable_rewards\[2\] is nan"):
        compute_iib_lpo_advantage(torch.tensor([1.0, 0.0, float("nan")]), torch.zeros(3), [0, 0, 0], keep, mask, 0.5)
    with pytest.raises(ValueError, match=r"ib_scores\[0\] is inf"):
        compute_iib_lpo_advantage(torch.zeros(3), torch.tensor([float("inf"), 0.0, 0.0]), [0, 0, 0], keep, mask, 0.5)
    with pytest.raises(ValueError, match="lambda_ib"):
        compute_iib_lpo_advantage(torch.zeros(3), torch.zeros(3), [0, 0, 0], keep, mask, -1.0)
    with pytest.raises(ValueError, match="group_ids has 2 entries"):
        compute_iib_lpo_advantage(torch.zeros(3), torch.zeros(3), [0, 0], keep, mask, 0.5)
    with pytest.raises(TypeError, match="bool"):
        compute_iib_lpo_advantage(torch.zeros(3), torch.zeros(3), [0, 0, 0], torch.ones(3), mask, 0.5)
    with pytest.raises(ValueError, match="eps"):
        AdvantageConfig(eps=0.0)


def _grpo_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [2, 3, 5, 4]
    uids = np.array([f"p{g}" for g, n in enumerate(sizes) for _ in range(n)], dtype=object)
    b = len(uids)
    lengths = torch.randint(1, 9, (b,), generator=gen)
    mask = (torch.arange(8)[None, :] < lengths[:, None]).float()
    rewards = torch.randint(0, 2, (b,), generator=gen).float()
    rewards[:2] = torch.tensor([1.0, 1.0])  # one constant group
    token_rewards = torch.zeros(b, 8)
    token_rewards[torch.arange(b), lengths - 1] = rewards  # outcome reward on the last token
    return token_rewards, mask, uids, rewards


def test_lambda_zero_all_kept_equals_verl_grpo():
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    token_rewards, mask, uids, rewards = _grpo_batch()
    verl_adv, verl_ret = compute_grpo_outcome_advantage(token_rewards, mask, uids, epsilon=EPS)
    ours, _ = compute_iib_lpo_advantage(
        rewards, torch.randn(len(uids)), uids, torch.ones(len(uids), dtype=torch.bool), mask, lambda_ib=0.0, eps=EPS
    )
    assert torch.allclose(ours, verl_adv, atol=1e-6)
