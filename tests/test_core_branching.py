"""Bifurcation-point rule (METHOD.md step 2)."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from recipe.iib_lpo.algorithm.branching import (
    FORK_OK,
    NO_FORK_TOO_SHORT,
    BranchingConfig,
    candidate_positions,
    choose_fork_position,
    choose_fork_positions,
    gumbel_top_k,
    sibling_first_tokens,
    without_replacement_log_ratios,
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


def test_gumbel_top_k_distinct_dominant_first_and_first_pick_is_a_plain_sample():
    logprobs = torch.log_softmax(torch.tensor([8.0, 0.0, 0.0, 0.0, 0.0, 0.0]), dim=-1)
    for seed in range(20):
        ids = gumbel_top_k(logprobs, 4, torch.Generator().manual_seed(seed)).tolist()
        assert len(ids) == 4 and len(set(ids)) == 4
        assert ids[0] == 0  # p(token 0) ~ 0.9966
    # tokens outside the support (top-p: -inf) never come back, even if k asks for more
    masked = torch.tensor([0.0, float("-inf"), math.log(0.5), float("-inf")])
    assert sorted(gumbel_top_k(masked, 4, torch.Generator().manual_seed(0)).tolist()) == [0, 2]
    # the first pick is distributed as p (mutation: dropping or flipping the noise fails this)
    probs = torch.tensor([0.6, 0.3, 0.1])
    gen = torch.Generator().manual_seed(0)
    firsts = [int(gumbel_top_k(probs.log(), 2, gen)[0]) for _ in range(3000)]
    freq = np.bincount(firsts, minlength=3) / len(firsts)
    np.testing.assert_allclose(freq, probs.numpy(), atol=0.03)


def test_without_replacement_log_ratios_known_values():
    logprobs = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    ratios = without_replacement_log_ratios(logprobs, [0, 1, 2])
    assert ratios == pytest.approx([0.0, -math.log(0.5), -math.log(0.2)])


def test_sibling_first_tokens_distinct_with_sequential_behaviour_logprobs():
    """The K siblings' tokens at t*: distinct, from the fork row's ids, with the behaviour log-prob of
    sequential sampling without replacement over the row renormalised (mass S)."""
    ids = [11, 22, 33, 44]
    lp = [math.log(0.5), math.log(0.2), math.log(0.15), math.log(0.05)]  # S = 0.9 (top-k of a larger vocab)
    for seed in range(30):
        tokens, behaviour = sibling_first_tokens(ids, lp, 3, seed)
        assert len(tokens) == 3 and len(set(tokens)) == 3 and set(tokens) <= set(ids)
        p = {i: math.exp(v) for i, v in zip(ids, lp)}
        remaining, want = 0.9, []
        for t in tokens:
            want.append(math.log(p[t] / remaining))
            remaining -= p[t]
        assert behaviour == pytest.approx(want, abs=1e-12)
        # same seed, same draw: every sibling of one fork point computes its own token alike
        assert sibling_first_tokens(ids, lp, 3, seed) == (tokens, behaviour)
    # K = support: the whole row, the last sibling's behaviour probability is 1 (nothing else left)
    tokens, behaviour = sibling_first_tokens(ids, lp, 4, 0)
    assert sorted(tokens) == sorted(ids) and behaviour[-1] == pytest.approx(0.0, abs=1e-9)
    # -inf entries (outside top-p) are never drawn, and K beyond the support returns the support only
    tokens, _ = sibling_first_tokens(ids, [0.0, float("-inf"), math.log(0.5), float("-inf")], 3, 1)
    assert sorted(tokens) == [11, 33]
    # the first sibling is an ordinary draw of the renormalised row (mutation: a fixed order fails this)
    firsts = [sibling_first_tokens(ids, lp, 2, s)[0][0] for s in range(3000)]
    freq = np.array([firsts.count(i) for i in ids]) / len(firsts)
    np.testing.assert_allclose(freq, np.exp(lp) / 0.9, atol=0.03)
    with pytest.raises(ValueError, match="as many ids"):
        sibling_first_tokens([1, 2], [0.0], 1, 0)
    with pytest.raises(ValueError, match="no finite"):
        sibling_first_tokens([1], [float("-inf")], 1, 0)
    with pytest.raises(ValueError, match="sibling_first_tokens"):
        BranchingConfig(sibling_first_tokens="orthogonal")
