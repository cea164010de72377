"""IB regulariser -lambda_reg * token_mean(A * H) and the full actor loss built on verl's ppo_loss."""

import pytest
import torch

from recipe.iib_lpo.algorithm.loss_terms import LossTermsConfig
from recipe.iib_lpo.trainer.loss import ib_regularizer_loss, iib_lpo_ppo_loss


def test_regularizer_hand_computed():
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]])
    ent = torch.tensor([[0.5, 1.0, 9.0], [0.25, 0.75, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # masked A*H: 0.5, 1.0, -0.5, -1.5 -> sum -0.5 over 4 tokens -> mean -0.125; x -0.1 -> +0.0125
    loss = ib_regularizer_loss(adv, ent, mask, lambda_reg=0.1)
    assert loss.item() == pytest.approx(0.0125)
    loss.backward()
    # d/dH = -0.1 * A / 4 on masked tokens, 0 elsewhere; advantages are not differentiated
    expected_grad = torch.tensor([[-0.025, -0.025, 0.0], [0.05, 0.05, 0.0]])
    assert torch.allclose(ent.grad, expected_grad)
    # equals verl's agg_loss token-mean, and lambda 0 is an exact zero
    from verl.trainer.ppo.core_algos import agg_loss

    assert loss.item() == pytest.approx(-0.1 * agg_loss(adv * ent.detach(), mask, "token-mean").item())
    assert ib_regularizer_loss(adv, ent, mask, 0.0).item() == 0.0
    # NaN in an unmasked slot is ignored only if masked out; in a masked-in slot it raises
    ent_nan = ent.detach().clone()
    ent_nan[0, 2] = float("nan")
    assert torch.isfinite(ib_regularizer_loss(adv, ent_nan, mask, 0.1))
    ent_nan[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"entropy is NaN/inf at masked position \(1, 0\)"):
        ib_regularizer_loss(adv, ent_nan, mask, 0.1)
    with pytest.raises(ValueError, match="lambda_reg"):
        LossTermsConfig(lambda_reg=-0.1)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        ib_regularizer_loss(adv, ent[:, :2], mask, 0.1)


def _actor_batch():
    """A padded-mode micro-batch as verl's engine hands it to the loss function.

    model_output tensors are flat over the valid tokens of each sequence (prompt + response,
    no padding); the response log-prob of token j sits at flat index seq_start + P - 1 + j.
    """
    from tensordict import TensorDict

    from verl.utils import tensordict_utils as tu

    gen = torch.Generator().manual_seed(0)
    b, p, r = 3, 2, 4
    lengths = [4, 3, 2]
    response_mask = (torch.arange(r)[None, :] < torch.tensor(lengths)[:, None]).float()
    attention_mask = torch.cat([torch.ones(b, p), response_mask], dim=1).long()
    log_prob = -torch.rand(b, r, generator=gen)
    old_log_prob = log_prob + 0.3 * torch.randn(b, r, generator=gen)  # some ratios get clipped
    entropy = torch.rand(b, r, generator=gen) * 2
    advantages = torch.randn(b, 1, generator=gen) * response_mask
    flat_lp, flat_ent = [], []
    for i, n in enumerate(lengths):
        seq_lp = torch.zeros(p + n)
        seq_ent = torch.zeros(p + n)
        seq_lp[p - 1 : p - 1 + n] = log_prob[i, :n]
        seq_ent[p - 1 : p - 1 + n] = entropy[i, :n]
        flat_lp.append(seq_lp)
        flat_ent.append(seq_ent)
    data = TensorDict(
        {
            "prompts": torch.ones(b, p, dtype=torch.long),
            "responses": torch.ones(b, r, dtype=torch.long),
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "old_log_probs": old_log_prob,
            "advantages": advantages,
        },
        batch_size=[b],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    model_output = {"log_probs": torch.cat(flat_lp), "entropy": torch.cat(flat_ent)}
    return data, model_output, (log_prob, old_log_prob, entropy, advantages, response_mask)


def _actor_config():
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_high=0.28)


def test_full_loss_equals_verl_ppo_loss_plus_term():
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.utils.losses import ppo_loss

    data, model_output, (log_prob, old_lp, entropy, adv, mask) = _actor_batch()
    verl_loss, _ = ppo_loss(_actor_config(), model_output, data)
    ours, metrics = iib_lpo_ppo_loss(_actor_config(), model_output, data, lambda_reg=0.0)
    assert ours.item() == verl_loss.item()  # lambda 0: exactly verl's loss
    # verl's ppo_loss is its vanilla PPO-clip here (no KL loss, entropy_coeff 0)
    vanilla, _ = compute_policy_loss_vanilla(old_lp, log_prob, adv, mask.bool(), "token-mean", _actor_config())
    assert verl_loss.item() == pytest.approx(vanilla.item(), abs=1e-6)
    with_term, metrics = iib_lpo_ppo_loss(_actor_config(), model_output, data, lambda_reg=0.005)
    term = -0.005 * (adv * entropy * mask).sum() / mask.sum()
    assert with_term.item() == pytest.approx(verl_loss.item() + term.item(), abs=1e-7)
    assert metrics["actor/ib_reg_loss"].values[0] == pytest.approx(term.item(), abs=1e-7)
    # without entropy in the model output the term cannot be computed: precise error
    with pytest.raises(ValueError, match="calculate_entropy=True"):
        iib_lpo_ppo_loss(_actor_config(), {"log_probs": model_output["log_probs"]}, data, lambda_reg=0.005)
