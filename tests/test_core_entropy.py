"""Exact entropy from logits and the top-k estimate with its tail-mass bracket (METHOD.md step 1)."""

import math

import pytest
import torch

from recipe.iib_lpo.entropy import EntropyConfig, entropy_from_logits, estimate_entropy_from_topk

K = 20
V = 4096


def _reference_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    # straightforward float64 definition, -sum p log p over tokens with p > 0
    p = torch.softmax(logits.double() / temperature, dim=-1)
    terms = torch.where(p > 0, -p * torch.log(p), torch.zeros_like(p))
    return terms.sum(-1)


def test_uniform_and_one_hot_closed_form():
    logits = torch.zeros(3, 7)
    assert torch.allclose(entropy_from_logits(logits), torch.full((3,), math.log(7)), atol=1e-6)
    one_hot = torch.tensor([[0.0, -float("inf"), -float("inf")], [5.0, -1e9, -1e9]])
    assert torch.equal(entropy_from_logits(one_hot), torch.zeros(2))
    # two tokens with logits (0, log 3): p = (1/4, 3/4), H = -(1/4 ln 1/4 + 3/4 ln 3/4)
    two = torch.tensor([0.0, math.log(3.0)])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(two).item() == pytest.approx(expected, abs=1e-6)
    # temperature 2 on logits (0, 2 ln 3) is the same distribution
    assert entropy_from_logits(torch.tensor([0.0, 2 * math.log(3.0)]), temperature=2.0).item() == pytest.approx(
        expected, abs=1e-6
    )


def test_matches_reference_fp32_bf16_and_large_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 1000, generator=gen) * 3
    for temperature in (0.6, 1.0, 1.3):
        got = entropy_from_logits(logits, temperature)
        assert got.shape == (4, 5) and got.dtype == torch.float32
        assert torch.allclose(got.double(), _reference_entropy(logits, temperature), atol=1e-4)
    bf16 = logits.to(torch.bfloat16)
    got = entropy_from_logits(bf16)
    assert got.dtype == torch.float32
    # the upcast computes the entropy of the bf16 values exactly (to fp32 precision)
    assert torch.allclose(got.double(), _reference_entropy(bf16.float()), atol=1e-4)
    # shift invariance and no overflow with huge logits
    assert torch.allclose(entropy_from_logits(logits + 1e4), entropy_from_logits(logits), atol=2e-3)
    assert torch.isfinite(entropy_from_logits(logits * 1e3)).all()


def test_equals_verl_actor_entropy():
    # verl's actor computes entropy_from_logits(logits / temperature) for its `entropy` field
    from verl.utils.torch_functional import entropy_from_logits as verl_entropy

    logits = torch.randn(3, 7, 500, generator=torch.Generator().manual_seed(5)) * 4
    for temperature in (0.7, 1.0):
        assert torch.allclose(entropy_from_logits(logits, temperature), verl_entropy(logits / temperature), atol=1e-5)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="NaN"):
        entropy_from_logits(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(torch.zeros(3), temperature=0.0)
    with pytest.raises(ValueError, match="entirely -inf"):
        entropy_from_logits(torch.full((2, 3), -float("inf")))


def _families(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Logit batches [N, V]: Gaussian, Dirichlet, Zipf-like and peaked distributions."""
    fams = {}
    for std in (1.0, 3.0, 6.0):
        fams[f"gauss_std{std:g}"] = torch.randn(64, V, generator=generator, dtype=torch.float64) * std
    for alpha in (0.01, 0.1):
        gamma = torch.distributions.Gamma(torch.full((V,), alpha, dtype=torch.float64), 1.0)
        torch.manual_seed(int(torch.randint(10**6, (1,), generator=generator)))
        fams[f"dirichlet_{alpha:g}"] = gamma.sample((64,)).clamp(min=1e-300).log()
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    for s in (1.2, 2.0):
        fams[f"zipf_s{s:g}"] = -s * ranks.log() + 0.5 * torch.randn(64, V, generator=generator, dtype=torch.float64)
    peaked = torch.randn(64, V, generator=generator, dtype=torch.float64)
    peaked[:, 0] += torch.rand(64, generator=generator, dtype=torch.float64) * 20
    fams["peaked"] = peaked
    return fams


def test_topk_bracket_and_measured_error(capsys):
    gen = torch.Generator().manual_seed(1234)
    report = []
    for name, logits in _families(gen).items():
        exact = _reference_entropy(logits)
        topk = torch.log_softmax(logits, -1).topk(K, dim=-1).values
        # shuffle the top-k order: the estimator must not assume sorted input
        topk = topk[:, torch.randperm(K, generator=gen)]
        est = estimate_entropy_from_topk(topk, V)
        assert est.estimate.dtype == torch.float64
        assert (est.lower <= exact + 1e-9).all(), name
        assert (est.upper >= exact - 1e-9).all(), name
        assert torch.allclose(est.estimate, (est.lower + est.upper) / 2)
        err = (est.estimate - exact).abs()
        # the midpoint can never be further than half the bracket from the truth
        assert (err <= (est.upper - est.lower) / 2 + 1e-9).all()
        report.append(
            f"{name}: mean|err|={err.mean():.3f} max={err.max():.3f} H={exact.mean():.2f} m={est.tail_mass.mean():.3f}"
        )
        # regression guard on the measured accuracy (V=4096, k=20; values printed below)
        assert err.mean() < 0.75, report[-1]
        if est.tail_mass.mean() < 0.05:  # the LLM-like regime: top-20 covers > 95% of the mass
            assert err.mean() < 0.05, report[-1]
    with capsys.disabled():
        print("\n[top-20 entropy estimate, V=4096] " + "; ".join(report))


def test_topk_tight_cases_and_simple_bound():
    # top-k covers all the mass -> exact
    logits = torch.tensor([[2.0, 1.0, 0.0] + [-float("inf")] * 5], dtype=torch.float64)
    full = torch.log_softmax(logits, -1)
    est = estimate_entropy_from_topk(full[:, :3], vocab_size=8)
    assert est.lower.item() == pytest.approx(_reference_entropy(logits).item(), abs=1e-12)
    assert est.upper.item() == pytest.approx(est.lower.item(), abs=1e-12)
    # uniform over V: top-k = k tokens at 1/V; tail uniform at p_min -> both bounds exact = log V
    uniform = torch.full((1, K), -math.log(V), dtype=torch.float64)
    est = estimate_entropy_from_topk(uniform, V)
    assert est.lower.item() == pytest.approx(math.log(V), abs=1e-9)
    assert est.upper.item() == pytest.approx(math.log(V), abs=1e-9)
    # the vertex lower bound is at least the simple bound H_k + m * (-log p_min)
    gen = torch.Generator().manual_seed(7)
    logp = torch.log_softmax(torch.randn(32, V, generator=gen, dtype=torch.float64) * 2, -1).topk(K).values
    p = logp.exp()
    simple = -(p * logp).sum(-1) + (1 - p.sum(-1)) * (-logp.min(-1).values)
    assert (estimate_entropy_from_topk(logp, V).lower >= simple - 1e-9).all()


def test_topk_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        estimate_entropy_from_topk(torch.tensor([[-0.1, float("nan")]]), 10)
    with pytest.raises(ValueError, match="sum to"):
        estimate_entropy_from_topk(torch.log(torch.tensor([[0.7, 0.6]])), 10)
    with pytest.raises(ValueError, match="vocab_size"):
        estimate_entropy_from_topk(torch.log(torch.tensor([[0.5, 0.2]])), 1)
    # mass 0.3 cannot fit in 2 tail tokens each <= 0.1
    with pytest.raises(ValueError, match="tail mass"):
        estimate_entropy_from_topk(torch.log(torch.tensor([[0.6, 0.1]])), 4)
    with pytest.raises(ValueError, match="positive"):
        estimate_entropy_from_topk(torch.tensor([[0.5, -1.0]]), 10)


def test_entropy_config_defaults_and_validation():
    assert EntropyConfig() == EntropyConfig(source="logits", top_k=20)
    with pytest.raises(ValueError, match="source"):
        EntropyConfig(source="vllm")
    with pytest.raises(ValueError, match="top_k"):
        EntropyConfig(source="topk", top_k=0)
