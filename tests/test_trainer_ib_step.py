"""The trainer's I2B-LPO step as pure functions, and dropped rows proven inert through verl's real loss.

No Ray, no vLLM: ``ib_step.iib_lpo_step`` (score, Top-N per fork source, advantage, masks) and
verl 0.9.1's ``ppo_loss`` with the token-mean denominator computed as verl's FSDP engine does
(``batch_num_tokens = loss_mask.sum()``).
"""

import pytest
import torch

from recipe.iib_lpo.algorithm.advantage import compute_iib_lpo_advantage
from recipe.iib_lpo.algorithm.ib import IBConfig, IBInputs
from recipe.iib_lpo.algorithm.ib_step import ROW_BRANCH, ROW_INITIAL, ROW_RESAMPLE, RowRole, filter_groups, iib_lpo_step

QUESTION = "Ava has 3 apples and buys 4 more. How many apples does she have?"
CONCISE = "3 + 4 = 7. \\boxed{7}"
LOOP = "3 + 4 = 3 + 4 = 3 + 4 = 3 + 4 = 3 + 4 = 3 + 4 = 7. \\boxed{7}"
WRONG = "3 * 4 = 12. \\boxed{12}"


def _traj(text, reward, n_tokens=10):
    return IBInputs(question=QUESTION, response=text, reward=reward, num_tokens=n_tokens, max_tokens=64)


def _layout():
    """One prompt, M=2 parents x K=3 branches; parent 1 was too short: its 3 'branches' are resamples."""
    roles = [RowRole("u", 0, 0, ROW_INITIAL), RowRole("u", 1, 1, ROW_INITIAL)]
    roles += [RowRole("u", 2 + k, 0, ROW_BRANCH) for k in range(3)]
    roles += [RowRole("u", 5 + k, 1, ROW_RESAMPLE) for k in range(3)]
    texts = [CONCISE, WRONG, LOOP, CONCISE, WRONG, LOOP, WRONG, CONCISE]
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    return roles, [_traj(t, r) for t, r in zip(texts, rewards)]


def test_filter_groups_keep_initials_and_resamples_out_of_competition():
    roles, _ = _layout()
    keys, originals = filter_groups(roles)
    assert originals == [True, True, False, False, False, True, True, True]
    # parent 0 and its branches share a group; each resample is a group of its own
    assert keys[0] == keys[2] == keys[3] == keys[4] == ("u", "parent", 0)
    assert len({keys[5], keys[6], keys[7]}) == 3 and keys[1] == ("u", "parent", 1)


def test_step_keeps_top_n_and_zeroes_dropped_rows():
    roles, trajs = _layout()
    mask = torch.ones(8, 6)
    mask[2:5, :2] = 0  # branch prefixes are trained through the parent
    result = iib_lpo_step(trajs, roles, mask, IBConfig(top_n=2), lambda_ib=0.5)
    # branches of parent 0: LOOP (r=1), CONCISE (r=1), WRONG (r=0) -> top-2 by S_IB keeps the two
    # correct ones (beta dominates), CONCISE above LOOP (repetition penalty); WRONG is dropped
    assert result.keep.tolist() == [True, True, True, True, False, True, True, True]
    assert float(result.scores[3]) > float(result.scores[2]) > float(result.scores[4])
    assert torch.equal(result.response_mask[4], torch.zeros(6))
    assert torch.equal(result.advantages[4], torch.zeros(6))
    assert torch.equal(result.response_mask[[0, 1, 2, 3, 5, 6, 7]], mask[[0, 1, 2, 3, 5, 6, 7]])
    # the advantage equals the pure function's over the kept group
    expected, _ = compute_iib_lpo_advantage(
        torch.tensor([t.reward for t in trajs]), result.scores, ["u"] * 8, result.keep, mask, 0.5
    )
    assert torch.equal(result.advantages, expected)
    with pytest.raises(ValueError, match="7 trajectories and 8 roles"):
        iib_lpo_step(trajs[:7], roles, mask, IBConfig(), lambda_ib=0.5)


def _nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _verl_loss(rows_idx, response_mask, advantages, old_log_probs, flat_values, offsets, prompt_len, resp_lens):
    """verl's ppo_loss on the rows ``rows_idx``, with the FSDP engine's batch_num_tokens rule."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig
    from verl.workers.utils.losses import ppo_loss

    seqs = [flat_values[offsets[i]: offsets[i + 1]] for i in rows_idx]
    nested_mask = _nested([response_mask[i, : resp_lens[i]] for i in rows_idx])
    data = TensorDict(
        {
            "prompts": _nested([torch.ones(prompt_len, dtype=torch.long) for _ in rows_idx]),
            "responses": _nested([torch.ones(resp_lens[i], dtype=torch.long) for i in rows_idx]),
            "response_mask": nested_mask,
            "loss_mask": nested_mask,
            "old_log_probs": _nested([old_log_probs[i, : resp_lens[i]] for i in rows_idx]),
            "advantages": _nested([advantages[i, : resp_lens[i]] for i in rows_idx]),
        },
        batch_size=[len(rows_idx)],
    )
    batch_num_tokens = int(data["loss_mask"].values().sum())  # verl/workers/engine/fsdp/transformer_impl.py
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=batch_num_tokens, global_batch_size=len(rows_idx))
    config = ActorConfig(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_high=0.28)
    loss, _ = ppo_loss(config, {"log_probs": _nested(seqs)}, data)
    return loss


def test_dropped_rows_give_the_loss_and_gradient_of_the_batch_without_them():
    roles, trajs = _layout()
    gen = torch.Generator().manual_seed(3)
    prompt_len, resp_lens = 3, [6, 5, 6, 4, 6, 6, 3, 5]
    mask = torch.zeros(8, 6)
    for i, n in enumerate(resp_lens):
        mask[i, :n] = 1
    mask[2:5, :2] = 0
    result = iib_lpo_step(trajs, roles, mask, IBConfig(top_n=2), lambda_ib=0.5)
    kept = [i for i in range(8) if result.keep[i]]
    assert len(kept) < 8
    old_lp = -torch.rand(8, 6, generator=gen)
    lengths = [prompt_len + n for n in resp_lens]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    base = -torch.rand(offsets[-1], generator=gen)

    flat_all = base.clone().requires_grad_(True)
    loss_all = _verl_loss(list(range(8)), result.response_mask, result.advantages, old_lp, flat_all, offsets,
                          prompt_len, resp_lens)
    loss_all.backward()
    flat_kept = base.clone().requires_grad_(True)
    loss_kept = _verl_loss(kept, result.response_mask, result.advantages, old_lp, flat_kept, offsets, prompt_len,
                           resp_lens)
    loss_kept.backward()
    assert loss_all.item() == pytest.approx(loss_kept.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(flat_all.grad, flat_kept.grad, rtol=1e-6, atol=1e-8)
    assert float(flat_kept.grad.abs().sum()) > 0

    # counter-check: zero advantage alone (mask left on) dilutes the token mean, so the losses differ
    loss_diluted = _verl_loss(list(range(8)), mask, result.advantages, old_lp, base.clone(), offsets, prompt_len,
                              resp_lens)
    assert abs(loss_diluted.item() - loss_kept.item()) > 1e-4
