"""Latent schedule p_inject(step) and the per-branch draw (METHOD.md, latent injection "dynamic decay")."""

import math
import random

import pytest

from recipe.iib_lpo.algorithm.alpha_schedule import SCHEDULES, LatentSchedule, draw_latent_injection, inject_probability


def test_closed_form_values():
    # total 100 steps, from 1.0 to floor 0.2
    assert inject_probability(37, 100, "constant", 1.0, 0.2) == 1.0
    assert inject_probability(0, 100, "linear", 1.0, 0.2) == pytest.approx(1.0)
    assert inject_probability(25, 100, "linear", 1.0, 0.2) == pytest.approx(1.0 - 0.8 * 0.25)  # 0.8
    assert inject_probability(100, 100, "linear", 1.0, 0.2) == pytest.approx(0.2)
    assert inject_probability(50, 100, "cosine", 1.0, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)  # cos(pi/2) = 0 -> 0.6
    assert inject_probability(25, 100, "cosine", 1.0, 0.2) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert inject_probability(10, 100, "exponential", 1.0, 0.2, decay_rate=0.9) == pytest.approx(0.9**10)  # 0.3487
    assert inject_probability(20, 100, "exponential", 1.0, 0.2, decay_rate=0.9) == pytest.approx(0.2)  # 0.12 -> floor
    # past the end: stays at the end value
    assert inject_probability(500, 100, "cosine", 1.0, 0.2) == pytest.approx(0.2)
    # constant and exponential do not need total_steps; linear and cosine do
    assert inject_probability(3, None, "constant", 0.4, 0.0) == 0.4
    assert inject_probability(2, None, "exponential", 0.8, 0.0, decay_rate=0.5) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="'cosine' latent schedule needs total_steps"):
        inject_probability(2, None, "cosine", 1.0, 0.1)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_monotone_non_increasing_and_floor(kind):
    values = [inject_probability(s, 50, kind, 0.8, 0.05, decay_rate=0.95) for s in range(0, 80)]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert min(values) >= 0.05 - 1e-12
    assert values[0] == pytest.approx(0.8)
    if kind != "constant":
        assert values[-1] == pytest.approx(0.05)


def test_draw_is_a_threshold_on_the_seed():
    half = 1 << 62  # u = 0.5 exactly
    assert draw_latent_injection(0.75, half) and not draw_latent_injection(0.25, half)
    assert draw_latent_injection(1.0, (1 << 63) - 1)  # p = 1: always, even for the largest seed
    assert not draw_latent_injection(0.0, 0)  # p = 0: never, even for seed 0
    with pytest.raises(ValueError, match="p_inject"):
        draw_latent_injection(1.5, 0)
    with pytest.raises(ValueError, match="seed"):
        draw_latent_injection(0.5, 1 << 63)


def test_draw_frequency_matches_the_probability():
    # 4000 uniform 63-bit seeds (as rollout.seeds.derived_seed gives): the fraction injected is p
    # within 5 standard errors.
    n = 4000
    rng = random.Random(0)
    for p in (0.1, 0.55, 0.9):
        hits = sum(draw_latent_injection(p, rng.getrandbits(63)) for _ in range(n))
        assert abs(hits / n - p) < 5 * math.sqrt(p * (1 - p) / n), (p, hits)


def test_dataclass_mirrors_function_and_validates():
    sched = LatentSchedule(kind="linear", p_init=1.0, p_min=0.1)
    assert sched.p_inject(5, 10) == inject_probability(5, 10, "linear", 1.0, 0.1)
    assert LatentSchedule().p_inject(0, 10) == 1.0  # defaults: cosine from 1.0 to 0.1, scale 1.0
    assert LatentSchedule().p_inject(10, 10) == pytest.approx(0.1)
    assert LatentSchedule().scale == 1.0 and LatentSchedule().needs_total_steps
    assert not LatentSchedule(kind="exponential").needs_total_steps
    with pytest.raises(ValueError, match=r"unknown latent schedule kind 'step'; known: \['constant', 'linear'"):
        LatentSchedule(kind="step")
    with pytest.raises(ValueError, match="scale"):
        LatentSchedule(scale=0.0)
    with pytest.raises(ValueError, match="p_init"):
        inject_probability(0, 10, "linear", 1.5, 0.0)  # a probability above 1
    with pytest.raises(ValueError, match="p_init"):
        inject_probability(0, 10, "linear", -1.0, 0.0)
    with pytest.raises(ValueError, match="p_min"):
        inject_probability(0, 10, "linear", 1.0, -0.1)
    with pytest.raises(ValueError, match="exceeds p_init"):
        inject_probability(0, 10, "linear", 0.1, 0.5)
    with pytest.raises(ValueError, match="step"):
        inject_probability(-1, 10, "linear", 1.0, 0.0)
    with pytest.raises(ValueError, match="total_steps"):
        inject_probability(0, 0, "linear", 1.0, 0.0)
    with pytest.raises(ValueError, match="decay_rate"):
        inject_probability(0, 10, "exponential", 1.0, 0.0, decay_rate=1.5)
    with pytest.raises(ValueError, match="p_init"):
        inject_probability(0, 10, "cosine", float("nan"), 0.0)
