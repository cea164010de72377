"""Exact entropy from logits and the top-k estimate with its tail-mass bracket (METHOD.md step 1)."""

import math

import pytest
import torch

from recipe.iib_lpo.algorithm.entropy import EntropyConfig, EntropyEstimate, entropy_from_logits, estimate_entropy_from_topk

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
    with pytest.raises(ValueError, match="eps"):
        estimate_entropy_from_topk(torch.log(torch.tensor([[0.5, 0.2]])), 10, eps=-1.0)


# --- float rounding at the edge of the premise m <= (V - k) p_k --------------------------------

EPS32 = torch.finfo(torch.float32).eps


def _slack(topk32: torch.Tensor, topk64: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """How far float32 rounding of the input may move the bracket, per row: with every top-k
    log-prob off by at most e (measured against float64), known = -sum p l moves by at most
    e * sum p (1 + |l|) and the tail bounds by at most e * (1 + |log p_min|) (their slope in m),
    so 2 e (1 + max |l|); times 3 for margin (the worst seen here is e (1 + max |l|)), plus the
    float32 rounding of the returned values. CPU float32 log_softmax over 151936 equal tail
    logits errs by up to ~1e-3 (the sum of equal terms rounds the same way each time)."""
    e = (topk32.double() - topk64).abs().max(dim=-1).values
    return 6 * e * (1 + topk64.abs().max(dim=-1).values) + 1e-6 * (1 + exact)


def _rows_with_tail_at(kth_offset: float, vocab: int, rows: int, gen: torch.Generator) -> torch.Tensor:
    """float32 logits [rows, V]: k random top logits, then V - k tail logits all equal to the k-th
    logit minus ``kth_offset`` (0: the tail mass is exactly (V - k) p_k, the premise's boundary).
    Peaks of random height make the tail mass range from ~0 to ~1 across rows."""
    top = torch.randn(rows, K, generator=gen) * (0.5 + 3 * torch.rand(rows, 1, generator=gen))
    top[:, 0] += torch.rand(rows, generator=gen) * 15
    logits = (top.min(dim=-1, keepdim=True).values - kth_offset).expand(rows, vocab).clone()
    logits[:, :K] = top
    return logits[:, torch.randperm(vocab, generator=gen)]  # tail and top-k interleaved


def _check_bracket(logits: torch.Tensor, vocab: int) -> tuple[EntropyEstimate, torch.Tensor, torch.Tensor]:
    """float32 log_softmax -> top-k -> estimate: no raise, a valid bracket, and the float64 exact
    entropy of the same logits inside it up to the propagated input rounding (``_slack``)."""
    assert logits.dtype == torch.float32
    topk, index = torch.log_softmax(logits, dim=-1).topk(K, dim=-1)
    est = estimate_entropy_from_topk(topk, vocab)  # must not raise
    exact = _reference_entropy(logits)
    slack = _slack(topk, torch.log_softmax(logits.double(), dim=-1).gather(-1, index), exact)
    assert (est.lower <= est.estimate).all() and (est.estimate <= est.upper).all()
    # m is clamped into [0, (V - k) p_k] (1e-6: the float32 rounding of the returned m, 16 ulps)
    capacity = (vocab - K) * topk.double().exp().min(-1).values
    assert (est.tail_mass >= 0).all() and (est.tail_mass.double() <= capacity * (1 + 1e-6)).all()
    assert (est.lower.double() <= exact + slack).all(), (est.lower.double() - exact - slack).max()
    assert (est.upper.double() >= exact - slack).all(), (exact - est.upper.double() - slack).max()
    return est, exact, slack


@pytest.mark.parametrize("vocab", [380, 384, 151936])
def test_topk_float32_tail_at_kth_logit_never_raises_and_brackets_exact(vocab):
    # The tail tokens are copies of the k-th logit: exact arithmetic puts m exactly on the
    # capacity (V - k) p_k, float32 rounding of the log_softmax either side of it.
    for seed in range(40 if vocab < 1000 else 6):
        logits = _rows_with_tail_at(0.0, vocab, rows=32, gen=torch.Generator().manual_seed(seed))
        est, exact, slack = _check_bracket(logits, vocab)
        # On the boundary the tail is uniform at p_k: both bounds are the exact entropy.
        assert ((est.estimate.double() - exact).abs() <= slack).all()
        assert ((est.upper - est.lower).double() <= slack).all()


@pytest.mark.parametrize("vocab", [380, 151936])
@pytest.mark.parametrize("offset", [2**-20, 1e-4, 1e-2, 1.0])
def test_topk_float32_tail_just_below_kth_logit(vocab, offset):
    # Around the boundary from the legitimate side (the tail cannot be above the k-th token);
    # 2**-20 is 1-8 float32 ulps of logits of order 1-10: within rounding of the boundary.
    for seed in range(10 if vocab < 1000 else 2):
        gen = torch.Generator().manual_seed(100 + seed)
        _check_bracket(_rows_with_tail_at(offset, vocab, rows=32, gen=gen), vocab)


def test_topk_float32_tail_partly_at_kth_logit():
    # Half the tail equals the k-th logit, the rest is spread below it.
    vocab = 380
    for seed in range(20):
        gen = torch.Generator().manual_seed(200 + seed)
        logits = _rows_with_tail_at(0.0, vocab, rows=32, gen=gen)
        kth = logits.topk(K, dim=-1).values[:, -1:]
        spread = kth - torch.rand(logits.shape, generator=gen) * 5
        logits = torch.where((logits <= kth) & (torch.rand(logits.shape, generator=gen) < 0.5), spread, logits)
        _check_bracket(logits, vocab)


def _fake_server_row(vocab: int) -> torch.Tensor:
    """float64 log-probs of the row that failed on another CPU: 5 peaked logits, all others -8
    (so V - k tail tokens equal the k-th): m = (V - k) p_k exactly."""
    logits = torch.full((1, vocab), -8.0, dtype=torch.float64)
    logits[0, :5] = torch.tensor([4.0, 1.0, 0.5, 0.0, -1.0], dtype=torch.float64)
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("vocab", [384, 151936])
def test_topk_normaliser_rounding_is_tolerated_and_gross_errors_raise(vocab):
    # A log-normaliser rounded up by s shifts every log-prob by -s: m exceeds the capacity by
    # 1 - exp(-s). 2.07e-6 is what one CPU produced (the old fixed 1e-6 + 1e-4 m tolerance
    # raised); the documented float32 rule allows about EPS32 * V, so test well inside it
    # (a quarter) and far outside it (ten times).
    exact_lp = _fake_server_row(vocab)
    exact = _reference_entropy(exact_lp)
    for shift in (2.07e-6, 0.25 * EPS32 * vocab):
        topk = (exact_lp - shift).topk(K, dim=-1).values.float()
        est = estimate_entropy_from_topk(topk, vocab)
        slack = _slack(topk, exact_lp.topk(K, dim=-1).values, exact).item()
        assert est.lower.double().item() - slack <= exact.item() <= est.upper.double().item() + slack
        assert est.tail_mass.item() <= (vocab - K) * topk.double().exp().min().item() * (1 + 1e-6)
    with pytest.raises(ValueError, match=r"tail mass .* not even within float rounding"):
        estimate_entropy_from_topk((exact_lp - 10 * EPS32 * vocab).topk(K, dim=-1).values.float(), vocab)
    # From above: a normaliser rounded down by s scales the probabilities by exp(s). On a row
    # whose top k hold all the mass (the rest is -inf), a quarter of EPS32 * V passes as exact,
    # ten times that means the top k alone hold more than all the mass.
    full = torch.full((1, vocab), -float("inf"), dtype=torch.float64)
    top = torch.randn(K, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    full[0, :K] = torch.log_softmax(top, -1)
    topk = (full[:, :K] + 0.25 * EPS32 * vocab).float()
    est = estimate_entropy_from_topk(topk, vocab)
    assert est.tail_mass.item() == 0.0 and est.lower.item() == est.upper.item()
    exact = _reference_entropy(full)
    assert abs(est.estimate.item() - exact.item()) <= _slack(topk, full[:, :K], exact).item()
    with pytest.raises(ValueError, match="sum to"):
        estimate_entropy_from_topk((full[:, :K] + 10 * EPS32 * vocab).float(), vocab)


def test_topk_tolerance_follows_the_stated_precision():
    # The same float32-rounded values upcast to float64 claim float64 precision: the 2e-5
    # excess is then far beyond rounding. eps= states the precision they really have.
    vocab = 384
    topk = (_fake_server_row(vocab) - 2e-5).topk(K, dim=-1).values.float().double()
    with pytest.raises(ValueError, match="tail mass"):
        estimate_entropy_from_topk(topk, vocab)
    est = estimate_entropy_from_topk(topk, vocab, eps=EPS32)
    assert est.estimate.dtype == torch.float64
    exact = _reference_entropy(_fake_server_row(vocab))
    assert abs(est.estimate.item() - exact.item()) <= _slack(topk, _fake_server_row(vocab).topk(K).values, exact).item()


def test_entropy_config_defaults_and_validation():
    assert EntropyConfig() == EntropyConfig(source="logits", top_k=20)
    with pytest.raises(ValueError, match="source"):
        EntropyConfig(source="vllm")
    with pytest.raises(ValueError, match="top_k"):
        EntropyConfig(source="topk", top_k=0)
