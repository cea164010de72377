"""Latent-injection strength alpha over training steps ("dynamic decay", METHOD.md latent injection).

The latent token's input embedding is alpha * P(z). The paper reports that decaying the latent's
influence over training stabilises it; its schedule is not published, so four closed forms are
offered, each decaying from ``alpha_init`` to the floor ``alpha_min`` (s = min(step, total) / total):

* constant:     alpha = alpha_init
* linear:       alpha = alpha_init - (alpha_init - alpha_min) * s
* cosine:       alpha = alpha_min + (alpha_init - alpha_min) * (1 + cos(pi * s)) / 2
* exponential:  alpha = max(alpha_min, alpha_init * decay_rate ** step)   (per-step rate,
                independent of total_steps; reaches the floor in finite time)

alpha == 0 means NO latent token at all: callers must skip inserting the token (plain resampling
from t*, the ``latent.mode=none`` behaviour), not insert a zero embedding -- a zero-embedding
token is still a token the continuation attends to and shifts positions. ``latent_token_enabled``
is the one place that decides this.

What alpha scales (measured, tests/test_latent_reference_alpha_scale.py): Qwen2/Qwen3 RMS-normalise
every position's input before the first attention layer, so that layer sees only the direction of
alpha * P(z); alpha scales the latent's contribution to the residual stream, not its presence. As
alpha -> 0 the effect converges to a fixed "empty token" (on the tiny test model, a max log-prob
shift of ~0.4 at alpha = 1e-4 vs ~1.1 at alpha = 1), not to the plain model. A decaying schedule
therefore weakens the steering without ever removing the token; only alpha == 0 does that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AlphaSchedule", "SCHEDULES", "latent_alpha", "latent_token_enabled"]

SCHEDULES = ("constant", "linear", "cosine", "exponential")


def _check_number(name: str, value: float, *, low: float = 0.0, low_inclusive: bool = True, high: float | None = None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def latent_alpha(
    step: int,
    total_steps: int,
    schedule: str,
    alpha_init: float,
    alpha_min: float,
    decay_rate: float = 0.99,
) -> float:
    """alpha at training ``step`` (0-based) of ``total_steps`` (formulas in the module docstring).

    Steps past ``total_steps`` stay at the end value. ``decay_rate`` (in (0, 1]) is used by
    "exponential" only; 0.99 halves alpha about every 69 steps.

    Raises:
        ValueError: unknown schedule (listing the known ones), step < 0, total_steps < 1,
            negative/non-finite alphas, alpha_min > alpha_init, decay_rate outside (0, 1].
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown alpha schedule {schedule!r}; known: {list(SCHEDULES)}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    _check_number("alpha_init", alpha_init)
    _check_number("alpha_min", alpha_min)
    if alpha_min > alpha_init:
        raise ValueError(
            f"alpha_min={alpha_min} exceeds alpha_init={alpha_init}: a floor above the start is not a decay"
        )
    _check_number("decay_rate", decay_rate, low=0.0, low_inclusive=False, high=1.0)
    progress = min(step, total_steps) / total_steps
    if schedule == "constant":
        return float(alpha_init)
    if schedule == "linear":
        return float(alpha_init - (alpha_init - alpha_min) * progress)
    if schedule == "cosine":
        return float(alpha_min + (alpha_init - alpha_min) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return float(max(alpha_min, alpha_init * decay_rate**step))


def latent_token_enabled(alpha: float) -> bool:
    """True iff a latent token is inserted: alpha > 0 (alpha == 0 -> skip the token entirely)."""
    _check_number("alpha", alpha)
    return alpha > 0.0


@dataclass(frozen=True)
class AlphaSchedule:
    """Knobs of the alpha schedule (mirrored in the recipe YAML).

    Attributes:
        schedule: "constant" | "linear" | "cosine" | "exponential". Default "cosine" (decision:
            the paper reports dynamic decay helps; cosine keeps alpha near its start early,
            when the CVAE prior is most useful for exploration, and flattens at the floor).
        alpha_init: alpha at step 0. Default 1.0 (the latent embedding at the scale P was
            trained/initialised for).
        alpha_min: floor. Default 0.1 (decision): a floor of 0 would turn late training into
            plain resampling from t* (the ``latent.mode=none`` ablation), hiding the latent's
            effect; set 0 deliberately for that behaviour.
        decay_rate: per-step factor for "exponential". Default 0.99.
    """

    schedule: str = "cosine"
    alpha_init: float = 1.0
    alpha_min: float = 0.1
    decay_rate: float = 0.99

    def __post_init__(self) -> None:
        latent_alpha(0, 1, self.schedule, self.alpha_init, self.alpha_min, self.decay_rate)  # validates

    def alpha(self, step: int, total_steps: int) -> float:
        return latent_alpha(step, total_steps, self.schedule, self.alpha_init, self.alpha_min, self.decay_rate)
