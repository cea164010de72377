"""Latent strength schedule alpha(step) (METHOD.md, latent injection "dynamic decay")."""

import math

import pytest

from recipe.iib_lpo.alpha_schedule import SCHEDULES, AlphaSchedule, latent_alpha, latent_token_enabled


def test_closed_form_values():
    # total 100 steps, from 1.0 to floor 0.2
    assert latent_alpha(37, 100, "constant", 1.0, 0.2) == 1.0
    assert latent_alpha(0, 100, "linear", 1.0, 0.2) == pytest.approx(1.0)
    assert latent_alpha(25, 100, "linear", 1.0, 0.2) == pytest.approx(1.0 - 0.8 * 0.25)  # 0.8
    assert latent_alpha(100, 100, "linear", 1.0, 0.2) == pytest.approx(0.2)
    assert latent_alpha(50, 100, "cosine", 1.0, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)  # cos(pi/2) = 0 -> 0.6
    assert latent_alpha(25, 100, "cosine", 1.0, 0.2) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert latent_alpha(10, 100, "exponential", 1.0, 0.2, decay_rate=0.9) == pytest.approx(0.9**10)  # 0.3487
    assert latent_alpha(20, 100, "exponential", 1.0, 0.2, decay_rate=0.9) == pytest.approx(0.2)  # 0.9^20=0.12 -> floor
    # past the end: stays at the end value
    assert latent_alpha(500, 100, "cosine", 1.0, 0.2) == pytest.approx(0.2)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_monotone_non_increasing_and_floor(schedule):
    values = [latent_alpha(s, 50, schedule, 0.8, 0.05, decay_rate=0.95) for s in range(0, 80)]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert min(values) >= 0.05 - 1e-12
    assert values[0] == pytest.approx(0.8)
    if schedule != "constant":
        assert values[-1] == pytest.approx(0.05)


def test_alpha_zero_means_no_latent_token():
    assert latent_alpha(10, 10, "linear", 1.0, 0.0) == 0.0
    assert not latent_token_enabled(latent_alpha(10, 10, "linear", 1.0, 0.0))
    assert latent_token_enabled(latent_alpha(0, 10, "linear", 1.0, 0.0))
    assert not latent_token_enabled(AlphaSchedule(schedule="constant", alpha_init=0.0, alpha_min=0.0).alpha(3, 10))
    with pytest.raises(ValueError):
        latent_token_enabled(-0.1)


def test_dataclass_mirrors_function_and_validates():
    sched = AlphaSchedule(schedule="linear", alpha_init=1.0, alpha_min=0.1)
    assert sched.alpha(5, 10) == latent_alpha(5, 10, "linear", 1.0, 0.1)
    assert AlphaSchedule().alpha(0, 10) == 1.0  # defaults: cosine from 1.0 to 0.1
    assert AlphaSchedule().alpha(10, 10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"unknown alpha schedule 'step'; known: \['constant', 'linear'"):
        AlphaSchedule(schedule="step")
    with pytest.raises(ValueError, match="alpha_init"):
        latent_alpha(0, 10, "linear", -1.0, 0.0)
    with pytest.raises(ValueError, match="alpha_min"):
        latent_alpha(0, 10, "linear", 1.0, -0.1)
    with pytest.raises(ValueError, match="exceeds alpha_init"):
        latent_alpha(0, 10, "linear", 0.1, 0.5)
    with pytest.raises(ValueError, match="step"):
        latent_alpha(-1, 10, "linear", 1.0, 0.0)
    with pytest.raises(ValueError, match="total_steps"):
        latent_alpha(0, 0, "linear", 1.0, 0.0)
    with pytest.raises(ValueError, match="decay_rate"):
        latent_alpha(0, 10, "exponential", 1.0, 0.0, decay_rate=1.5)
    with pytest.raises(ValueError, match="alpha_init"):
        latent_alpha(0, 10, "cosine", float("nan"), 0.0)
