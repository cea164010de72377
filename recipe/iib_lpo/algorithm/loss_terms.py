"""Optional IB regulariser in the policy loss (METHOD.md step 8; off by default): its knob and
its per-token term. The aggregation into a scalar and the installation into verl's actor are
glue (``recipe.iib_lpo.trainer.loss``).

loss_IB = -lambda_reg * token_mean(A_t * H_t): the term the authors' code added (there called an
information-bottleneck regulariser, lambda_reg = 0.005). Minimising it raises the policy's
entropy on tokens of positive-advantage trajectories and lowers it on negative ones.
``A`` is treated as a constant (detached), the gradient flows through ``H``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LossTermsConfig", "ib_regularizer_terms"]


@dataclass(frozen=True)
class LossTermsConfig:
    """Knobs of the extra loss term (METHOD.md step 8; mirrored in the recipe YAML).

    Attributes:
        lambda_reg: weight of -token_mean(A * H). Default 0.0 (off): METHOD.md keeps the
            paper's loss plain PPO-clip; 0.005 is the authors' code value (parity runs).
    """

    lambda_reg: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.lambda_reg, (int, float)) and math.isfinite(self.lambda_reg) and self.lambda_reg >= 0):
            raise ValueError(f"LossTermsConfig.lambda_reg must be a finite number >= 0, got {self.lambda_reg!r}")


def ib_regularizer_terms(
    advantages: torch.Tensor, entropy: torch.Tensor, response_mask: torch.Tensor, lambda_reg: float
) -> torch.Tensor:
    """The per-token matrix A.detach() * H, ``[B, T]``, that -lambda_reg * agg_loss(...) reduces.

    Args:
        advantages, entropy, response_mask: ``[B, T]``.
        lambda_reg: checked as ``LossTermsConfig.lambda_reg``.

    Raises:
        ValueError: a bad lambda_reg, mismatched shapes, or NaN/inf at a masked position.
    """
    LossTermsConfig(lambda_reg=lambda_reg)
    if not (advantages.shape == entropy.shape == response_mask.shape) or entropy.ndim != 2:
        raise ValueError(
            "advantages, entropy and response_mask must all be [B, T]; got "
            f"{tuple(advantages.shape)}, {tuple(entropy.shape)}, {tuple(response_mask.shape)}"
        )
    masked = response_mask.to(torch.bool)
    for name, x in (("advantages", advantages), ("entropy", entropy)):
        bad = ~torch.isfinite(x) & masked
        if bool(bad.any()):
            raise ValueError(f"{name} is NaN/inf at masked position {tuple(torch.nonzero(bad)[0].tolist())}")
    return advantages.detach() * entropy
