"""How the latent is applied over training ("dynamic decay", METHOD.md latent injection).

The paper reports that decaying the latent's influence over training stabilises it; its schedule
is not published. This module decays the PROBABILITY that a branch gets a latent token:

    p_inject(step) = probability that one branch continues after a latent token; with
                     probability 1 - p_inject it is a plain resample from its fork point t*
                     (no token at all, latent status "skipped_by_schedule").
    scale          = the alpha of the latent token's embedding alpha * P(z): a constant.

Four closed forms, each from ``p_init`` to the floor ``p_min`` (s = min(step, total) / total):

* constant:     p = p_init
* linear:       p = p_init - (p_init - p_min) * s
* cosine:       p = p_min + (p_init - p_min) * (1 + cos(pi * s)) / 2
* exponential:  p = max(p_min, p_init * decay_rate ** step)   (per-step rate, independent of
                total_steps; reaches the floor in finite time)

Why the probability and not the scale (README "Latent schedule"): the schedule was designed for
the former inserted latent token, whose scale Qwen2/Qwen3's input RMSNorm removed (an alpha
schedule 1.0 -> 0.1 barely changed the branches). A branch without a latent is exactly the plain
model, so the expected shift of a branch is p_inject(step) times the shift of an injected branch:
the decay is real. The additive latent's scale matters as well (``scale``;
tests/test_latent_reference_alpha_scale.py).

The per-branch draw is :func:`draw_latent_injection` on a seed derived from the prompt, step,
parent and branch (``rollout.seeds.session_seeds``), so it is reproducible and independent of
batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SCHEDULES", "LatentSchedule", "draw_latent_injection", "inject_probability"]

SCHEDULES = ("constant", "linear", "cosine", "exponential")
_SEED_SPAN = 1 << 63  # derived seeds are uniform on [0, 2**63)


def _check_number(name: str, value: float, *, low: float = 0.0, low_inclusive: bool = True, high: float | None = None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def inject_probability(
    step: int,
    total_steps: int | None,
    kind: str,
    p_init: float,
    p_min: float,
    decay_rate: float = 0.99,
) -> float:
    """p_inject at training ``step`` (0-based) of ``total_steps`` (formulas in the module docstring).

    Steps past ``total_steps`` stay at the end value. ``total_steps`` is needed by "linear" and
    "cosine" only; ``decay_rate`` (in (0, 1]) is used by "exponential" only (0.99 halves p about
    every 69 steps).

    Raises:
        ValueError: unknown kind (listing the known ones), step < 0, total_steps < 1 (or None
            for linear/cosine), probabilities outside [0, 1], p_min > p_init, decay_rate
            outside (0, 1].
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown latent schedule kind {kind!r}; known: {list(SCHEDULES)}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    _check_number("p_init", p_init, high=1.0)
    _check_number("p_min", p_min, high=1.0)
    if p_min > p_init:
        raise ValueError(f"p_min={p_min} exceeds p_init={p_init}: a floor above the start is not a decay")
    _check_number("decay_rate", decay_rate, low=0.0, low_inclusive=False, high=1.0)
    if kind == "constant":
        return float(p_init)
    if kind == "exponential":
        return float(max(p_min, p_init * decay_rate**step))
    if total_steps is None or not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"a {kind!r} latent schedule needs total_steps, an int >= 1; got {total_steps!r}")
    progress = min(step, total_steps) / total_steps
    if kind == "linear":
        return float(p_init - (p_init - p_min) * progress)
    return float(p_min + (p_init - p_min) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def draw_latent_injection(p_inject: float, seed: int) -> bool:
    """Bernoulli(p_inject) decided by a 63-bit seed: True iff seed / 2**63 < p_inject (exactly).

    Deterministic; p_inject = 1 is always True and 0 always False. For seeds uniform on
    [0, 2**63) (``rollout.seeds.derived_seed``), P(True) = p_inject.
    """
    _check_number("p_inject", p_inject, high=1.0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < _SEED_SPAN:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    # Compared exactly (Python compares int and float without rounding): seed / 2**63 as a
    # float would round the largest seeds up to 1.0 and make p = 1 miss them.
    return seed < p_inject * _SEED_SPAN


@dataclass(frozen=True)
class LatentSchedule:
    """Knobs of the latent schedule (``iib_lpo.latent.schedule`` in the recipe YAML).

    Attributes:
        kind: "constant" | "linear" | "cosine" | "exponential". Default "cosine" (decision: the
            paper reports dynamic decay helps; cosine keeps p near its start early, when the
            CVAE prior is most useful for exploration, and flattens at the floor).
        p_init: probability that a branch gets a latent at step 0. Default 1.0 (every branch
            steered, the paper's setting).
        p_min: floor of the probability. Default 0.1 (decision): a floor of 0 would turn late
            training into plain resampling from t* (the ``latent.mode=none`` ablation); set 0
            deliberately for that behaviour.
        decay_rate: per-step factor for "exponential". Default 0.99.
        scale: alpha of the latent token's embedding alpha * P(z), constant over training.
            Default 1.0 (the scale P was trained / initialised for). Must be > 0: to remove
            latents use ``latent.mode=none`` or p_init = p_min = 0.
    """

    kind: str = "cosine"
    p_init: float = 1.0
    p_min: float = 0.1
    decay_rate: float = 0.99
    scale: float = 1.0

    def __post_init__(self) -> None:
        inject_probability(0, 1, self.kind, self.p_init, self.p_min, self.decay_rate)  # validates
        _check_number("latent.schedule.scale", self.scale, low=0.0, low_inclusive=False)

    @property
    def needs_total_steps(self) -> bool:
        return self.kind in ("linear", "cosine")

    def p_inject(self, step: int, total_steps: int | None = None) -> float:
        """Probability that a branch at training ``step`` (0-based) gets a latent token."""
        return inject_probability(step, total_steps, self.kind, self.p_init, self.p_min, self.decay_rate)
