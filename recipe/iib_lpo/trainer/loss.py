"""The policy loss with the optional IB regulariser (METHOD.md step 8), as verl's actor runs it.

Aggregation: verl's ``agg_loss`` with ``loss_agg_mode`` (default "token-mean": sum over the
masked tokens of the micro-batch divided by the number of masked tokens, or by the global
``batch_num_tokens`` times ``dp_size`` when verl supplies its global batch info), i.e. exactly
the aggregation verl uses for its own pg and entropy losses, so the term scales like them.

Why this is not a registered policy loss: in verl 0.9.1 the engine-based actor
(``verl/workers/utils/losses.py::ppo_loss``) calls a registered policy loss with
``old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights`` only; the entropy in ``model_output["entropy"]`` is not passed, so a
registered ``iib_lpo_vanilla_ib`` loss could not see H_t. (The legacy ``dp_actor.py`` is gone
from 0.9.1.) The supported hook that can see it is the worker's ``set_loss_fn(fn)``: the whole
loss ``fn(model_output=, data=, dp_group=)``. ``iib_lpo_ppo_loss`` below is such a function:
verl's own ``ppo_loss`` (PPO-clip / any registered ``policy_loss.loss_mode``, entropy bonus,
KL loss) plus the IB term. The recipe trainer installs it from a hook with
``actor_rollout_wg.set_loss_fn(functools.partial(iib_lpo_ppo_loss, config=<ActorConfig>,
lambda_reg=...))`` and must set ``actor.calculate_entropy=True`` so the engine computes H_t.
"""

from __future__ import annotations

from typing import Any

import torch

from recipe.iib_lpo.algorithm.loss_terms import LossTermsConfig, ib_regularizer_terms

__all__ = ["ib_regularizer_loss", "iib_lpo_ppo_loss"]


def ib_regularizer_loss(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    lambda_reg: float,
    loss_agg_mode: str = "token-mean",
    **global_batch_info: Any,
) -> torch.Tensor:
    """-lambda_reg * agg_loss(A * H, response_mask, loss_agg_mode), a scalar tensor.

    Args:
        advantages, entropy, response_mask: ``[B, T]``; advantages are detached.
        lambda_reg: >= 0; 0 returns an exact 0 that still depends on ``entropy`` (so it can be
            added to a loss without changing its graph's devices/dtypes).
        loss_agg_mode: verl aggregation mode (default "token-mean", verl's default).
        global_batch_info: forwarded to verl's ``agg_loss`` (dp_size, batch_num_tokens,
            global_batch_size, loss_scale_factor) when called inside a verl worker.
    """
    from verl.trainer.ppo.core_algos import agg_loss

    loss_mat = ib_regularizer_terms(advantages, entropy, response_mask, lambda_reg)
    return -float(lambda_reg) * agg_loss(
        loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **global_batch_info
    )


def iib_lpo_ppo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None, *, lambda_reg: float = 0.0):
    """verl's ``ppo_loss`` plus the IB regulariser; install with the worker's ``set_loss_fn``.

    Same contract as ``verl.workers.utils.losses.ppo_loss(config, model_output, data,
    dp_group)``; returns ``(loss, metrics)`` with ``metrics["actor/ib_reg_loss"]`` added when
    the term is on. Uses the same global batch info verl's ppo_loss just set on ``config``.

    Raises:
        ValueError: ``lambda_reg > 0`` but the engine computed no entropy
            (set ``actor_rollout_ref.actor.calculate_entropy=True``).
    """
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    LossTermsConfig(lambda_reg=lambda_reg)
    policy_loss, metrics = ppo_loss(config, model_output, data, dp_group)
    if lambda_reg == 0:
        return policy_loss, metrics
    entropy = model_output.get("entropy", None)
    if entropy is None:
        raise ValueError(
            "iib_lpo_ppo_loss: lambda_reg > 0 needs the per-token entropy; set "
            "actor_rollout_ref.actor.calculate_entropy=True"
        )
    entropy = no_padding_2_padding(entropy, data)
    padded = data.select("response_mask", "advantages").to_padded_tensor()
    response_mask = padded["response_mask"].to(bool)
    reg = ib_regularizer_loss(
        padded["advantages"], entropy, response_mask, lambda_reg, config.loss_agg_mode, **config.global_batch_info
    )
    # same rule as verl's ppo_loss: normalised by global batch info -> micro-batch metrics are summed
    metric_aggregation = (
        AggregationType.SUM
        if data["dp_size"] > 1
        or data["batch_num_tokens"] is not None
        or data["global_batch_size"] is not None
        or config.loss_scale_factor is not None
        else AggregationType.MEAN
    )
    metrics["actor/ib_reg_loss"] = Metric(value=reg.detach(), aggregation=metric_aggregation)
    return policy_loss + reg, metrics
