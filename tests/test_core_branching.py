"""Bifurcation-point rule (METHOD.md step 2)."""

from collections import Counter

import pytest
import torch

from recipe.iib_lpo.algorithm.branching import (
    FORK_OK,
    NO_FORK_TOO_SHORT,
    BranchingConfig,
    candidate_positions,
    choose_fork_position,
    choose_fork_positions,
)


def test_candidates_top_rho_excluding_edges():
    # 40 tokens; window = [1, 40 - 8) = 32 positions; ceil(0.1 * 32) = 4 candidates
    ent = torch.zeros(40)
    ent[0] = 9.0  # excluded by t_min=1
    ent[39] = 9.5  # excluded by t_margin=8
    ent[33] = 8.0  # excluded by t_margin=8 (33 >= 32)
    ent[5], ent[12], ent[20], ent[31], ent[2] = 5.0, 7.0, 6.0, 4.0, 3.0
    cfg = BranchingConfig(rho=0.1, t_min=1, t_margin=8)
    assert candidate_positions(ent, cfg) == (12, 20, 5, 31)
    # default rho=0.05: ceil(0.05 * 32) = 2
    assert candidate_positions(ent, BranchingConfig()) == (12, 20)


def test_at_least_one_candidate_and_ties_earliest_first():
    cfg = BranchingConfig(rho=0.05, t_min=0, t_margin=0)
    assert candidate_positions([0.1, 0.2, 0.3], cfg) == (2,)
    # all equal: stable tie-break keeps the earliest positions
    assert candidate_positions([1.0] * 50, BranchingConfig(rho=0.1, t_min=0, t_margin=0)) == (0, 1, 2, 3, 4)
    # ceil guard: 0.07 * 100 is 7.000000000000001 in floating point, still 7 positions
    assert len(candidate_positions(torch.rand(100), BranchingConfig(rho=0.07, t_min=0, t_margin=0))) == 7


def test_argmax_strategy_and_decision_fields():
    ent = [0.1, 0.9, 0.3, 0.95, 0.2, 0.1]
    decision = choose_fork_position(ent, BranchingConfig(rho=0.5, t_min=1, t_margin=1, strategy="argmax"))
    assert decision.position == 3 and decision.entropy == pytest.approx(0.95)
    assert decision.reason == FORK_OK and decision.should_fork and decision.num_tokens == 6
    assert decision.candidates == (3, 1)


def test_uniform_draw_is_reproducible_and_covers_omega():
    ent = torch.arange(100, dtype=torch.float32)  # window [1, 92): top ceil(0.05*91)=5 -> 91..87
    cfg = BranchingConfig()
    omega = candidate_positions(ent, cfg)
    assert omega == (91, 90, 89, 88, 87)
    assert choose_fork_position(ent, cfg, seed=3) == choose_fork_position(ent, cfg, seed=3)
    gen = torch.Generator().manual_seed(0)
    counts = Counter(choose_fork_position(ent, cfg, generator=gen).position for _ in range(2000))
    assert set(counts) == set(omega)
    # uniform: each of 5 positions ~400 of 2000 draws (binomial sd ~18)
    assert all(330 < c < 470 for c in counts.values()), counts


def test_too_short_is_explicit_no_fork():
    cfg = BranchingConfig()  # t_min=1, t_margin=8 -> needs T >= 10
    for length in (0, 1, 9):
        decision = choose_fork_position(torch.ones(length), cfg, seed=0)
        assert decision.position is None and decision.entropy is None
        assert decision.reason == NO_FORK_TOO_SHORT and not decision.should_fork
    assert choose_fork_position(torch.ones(10), cfg, seed=0).position == 1


def test_bad_input_raises_precisely():
    with pytest.raises(ValueError, match=r"NaN at response position\(s\) \[2\]"):
        choose_fork_position([0.1, 0.2, float("nan"), 0.3], BranchingConfig(t_margin=0), seed=0)
    with pytest.raises(ValueError, match="infinite"):
        choose_fork_position([0.1, float("inf")], BranchingConfig(t_margin=0), seed=0)
    with pytest.raises(ValueError, match="exactly one of generator= or seed="):
        choose_fork_position([0.1, 0.2, 0.3], BranchingConfig(t_margin=0))
    with pytest.raises(ValueError, match="1-D"):
        choose_fork_position(torch.zeros(2, 3), BranchingConfig(), seed=0)
    with pytest.raises(ValueError, match="rho"):
        BranchingConfig(rho=0.0)
    with pytest.raises(ValueError, match="strategy"):
        BranchingConfig(strategy="max")
    with pytest.raises(ValueError, match="t_min"):
        BranchingConfig(t_min=-1)


def test_batched_helper_list_and_padded():
    cfg = BranchingConfig(rho=0.2, t_min=1, t_margin=1)
    rows = [torch.rand(20, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    rows += [torch.ones(5), torch.ones(2)]
    out = choose_fork_positions(rows, cfg, seed=11)
    # same seed, same sequence of draws as calling one row at a time with one generator
    gen = torch.Generator().manual_seed(11)
    assert out == [choose_fork_position(r, cfg, generator=gen) for r in rows]
    assert out[-1].reason == NO_FORK_TOO_SHORT
    assert out[-2].position == 1  # window [1, 4) of equal entropies, 1 candidate, earliest
    assert all(d.position in d.candidates for d in out[:4])
    # padded tensor + lengths: padding (huge values) must not be picked
    padded = torch.full((6, 20), 100.0)
    lengths = [20, 20, 20, 20, 5, 2]
    for i, r in enumerate(rows):
        padded[i, : r.shape[0]] = r
    assert choose_fork_positions(padded, cfg, seed=11, lengths=lengths) == out
    with pytest.raises(ValueError, match="lengths is required"):
        choose_fork_positions(padded, cfg, seed=11)
    with pytest.raises(ValueError, match="response 1: entropy is NaN"):
        choose_fork_positions([torch.ones(12), torch.tensor([0.0, float("nan")])], cfg, seed=0)
