"""CVAE networks, closed-form KL, training signal and checkpoint validation (recipe/iib_lpo/latent/cvae.py)."""

import pytest
import torch

from recipe.iib_lpo.latent.cvae import (
    CVAECheckpointError,
    CVAEConfig,
    LatentCVAE,
    gaussian_kl,
    load_cvae_checkpoint,
    save_cvae_checkpoint,
)
from recipe.iib_lpo.latent.training import train_cvae_on_embeddings

SMALL = dict(embed_dim=8, latent_dim=4, hidden_width=32, num_layers=3, policy_hidden_size=16,
             projector_hidden_width=16)

def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    lv_q, lv_p = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    ours = gaussian_kl(mu_q, lv_q, mu_p, lv_p)
    q = torch.distributions.Independent(torch.distributions.Normal(mu_q, torch.exp(0.5 * lv_q)), 1)
    p = torch.distributions.Independent(torch.distributions.Normal(mu_p, torch.exp(0.5 * lv_p)), 1)
    expected = torch.distributions.kl_divergence(q, p)
    assert ours.shape == (5,)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # KL of a distribution with itself is 0; against N(0, I) it has the textbook form
    torch.testing.assert_close(gaussian_kl(mu_q, lv_q, mu_q, lv_q), torch.zeros(5), atol=1e-6, rtol=0)
    standard = 0.5 * (lv_q.exp() + mu_q.pow(2) - 1 - lv_q).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu_q, lv_q, torch.zeros_like(mu_q), torch.zeros_like(lv_q)), standard)

def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="latent_dim"):
        CVAEConfig(latent_dim=0)
    with pytest.raises(ValueError, match="beta_kl"):
        CVAEConfig(beta_kl=-1.0)

def test_shapes_projector_init_and_bad_input():
    torch.manual_seed(0)
    model = LatentCVAE(CVAEConfig(embed_dim=8, latent_dim=4, hidden_width=32, policy_hidden_size=600,
                                  projector_hidden_width=400))
    e_x, e_y = torch.randn(3, 8), torch.randn(3, 8)
    out = model(e_x, e_y)
    assert out.e_y_hat.shape == (3, 8) and out.z.shape == (3, 4) and out.kl.shape == (3,)
    assert torch.isclose(out.loss, (out.recon + out.kl).mean())
    assert sum(isinstance(m, torch.nn.Linear) for m in model.prior) == 3  # 3-layer MLPs
    weights = torch.cat([m.weight.flatten() for m in model.projector.net if isinstance(m, torch.nn.Linear)])
    assert abs(weights.std().item() - 0.01) < 1e-3  # METHOD.md: P random init with std 0.01
    assert model.projector(torch.randn(2, 4)).shape == (2, 600)
    with pytest.raises(ValueError, match=r"e_x must have shape \[B, 8\]"):
        model.prior_params(torch.randn(3, 9))
    with pytest.raises(ValueError, match="NaN"):
        model.prior_params(torch.full((1, 8), float("nan")))

def test_prior_samples_differ_and_are_reproducible():
    torch.manual_seed(0)
    model = LatentCVAE(CVAEConfig(**SMALL))
    e_x = torch.randn(2, 8)
    z1 = model.sample_prior(e_x, 5, generator=torch.Generator().manual_seed(3))
    z2 = model.sample_prior(e_x, 5, generator=torch.Generator().manual_seed(3))
    assert z1.shape == (2, 5, 4)
    assert torch.equal(z1, z2)
    for row in z1:  # the K samples of one condition are distinct
        assert torch.cdist(row, row).add(torch.eye(5) * 1e9).min() > 1e-3
    # their mean approaches the prior mean with many draws
    mu, _ = model.prior_params(e_x)
    many = model.sample_prior(e_x, 20000, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(many.mean(1), mu, atol=0.05, rtol=0)

def _toy_data(n=512, seed=0):
    """e_y = tanh(A e_x) + c_k with a hidden discrete factor k: e_x alone cannot predict e_y, so a
    useful latent must carry k (KL > 0), and the ELBO can only approach its optimum through z."""
    g = torch.Generator().manual_seed(seed)
    e_x = torch.randn(n, 8, generator=g)
    a = torch.randn(8, 8, generator=g)
    centers = 2.0 * torch.randn(4, 8, generator=g)
    k = torch.randint(0, 4, (n,), generator=g)
    e_y = torch.tanh(e_x @ a) + centers[k] + 0.05 * torch.randn(n, 8, generator=g)
    return e_x, e_y

def test_elbo_improves_and_latent_carries_the_hidden_factor():
    torch.manual_seed(0)
    e_x, e_y = _toy_data()
    model = LatentCVAE(CVAEConfig(**SMALL))
    history = train_cvae_on_embeddings(model, e_x, e_y, epochs=30, batch_size=64, lr=3e-3, show_progress=False)
    first, last = history[0], history[-1]
    assert last.elbo > first.elbo
    assert last.loss < 0.3 * first.loss
    assert last.kl > 0.5  # the posterior is not collapsed onto the prior
    # the variance of the hidden centers (~4 per dim * 8 dims = 32) is what e_x cannot explain;
    # reconstruction through the posterior must explain most of it
    assert last.recon < 8.0
    # decoding with the posterior mean beats decoding with the prior mean: z carries k
    with torch.no_grad():
        mu_q, _ = model.posterior_params(e_x, e_y)
        mu_p, _ = model.prior_params(e_x)
        err_q = (model.decode(e_x, mu_q) - e_y).pow(2).sum(-1).mean()
        err_p = (model.decode(e_x, mu_p) - e_y).pow(2).sum(-1).mean()
    assert err_q < 0.5 * err_p

def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LatentCVAE(CVAEConfig(**SMALL)).eval()
    path = save_cvae_checkpoint(tmp_path / "c.pt", model, encoder_name="tiny-enc", mode="prefix",
                                train_summary={"final_elbo": -1.5, "rows_used": 3})
    loaded, info = load_cvae_checkpoint(path, expected_embed_dim=8, expected_latent_dim=4,
                                        expected_policy_hidden_size=16, expected_encoder_name="tiny-enc",
                                        expected_mode="prefix")
    assert info.config == model.config and info.mode == "prefix" and info.encoder_name == "tiny-enc"
    assert info.condition_scheme == "question_prefix" and info.format_version == 3
    assert info.train_summary == {"final_elbo": -1.5, "rows_used": 3}
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    e_x, z = torch.randn(2, 8), torch.randn(2, 4)
    assert torch.equal(model.prior(e_x), loaded.prior(e_x))
    assert torch.equal(model.projector(z), loaded.projector(z))

def test_checkpoint_mismatches_fail_precisely(tmp_path):
    torch.manual_seed(0)
    model = LatentCVAE(CVAEConfig(**{**SMALL, "latent_dim": 64}))
    path = save_cvae_checkpoint(tmp_path / "c.pt", model, encoder_name="enc-a", mode="lars")
    with pytest.raises(CVAECheckpointError, match="checkpoint latent_dim=64 but config expects 128"):
        load_cvae_checkpoint(path, expected_latent_dim=128)
    with pytest.raises(CVAECheckpointError, match="policy_hidden_size=16 but config expects 3584"):
        load_cvae_checkpoint(path, expected_policy_hidden_size=3584)
    with pytest.raises(CVAECheckpointError, match="encoder_name='enc-a' but config expects 'enc-b'"):
        load_cvae_checkpoint(path, expected_encoder_name="enc-b")
    with pytest.raises(CVAECheckpointError, match="mode='lars' but config expects 'prefix'"):
        load_cvae_checkpoint(path, expected_mode="prefix")

    payload = torch.load(path, weights_only=True)
    payload["state_dicts"]["decoder"]["0.weight"] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "shape.pt")
    with pytest.raises(CVAECheckpointError, match=r"'decoder.0.weight' has shape \(3, 3\) in the checkpoint"):
        load_cvae_checkpoint(tmp_path / "shape.pt")

    payload = torch.load(path, weights_only=True)
    del payload["state_dicts"]["prior"]["2.bias"]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(CVAECheckpointError, match=r"'prior' state dict .*missing keys \['2.bias'\]"):
        load_cvae_checkpoint(tmp_path / "missing.pt")

    payload = torch.load(path, weights_only=True)
    del payload["state_dicts"]["projector"]
    torch.save(payload, tmp_path / "noproj.pt")
    with pytest.raises(CVAECheckpointError, match="no weights for 'projector'"):
        load_cvae_checkpoint(tmp_path / "noproj.pt")

    _, lars_info = load_cvae_checkpoint(path)
    assert lars_info.condition_scheme == "question"  # lars priors are trained on the question alone

    payload = torch.load(path, weights_only=True)
    payload["condition_scheme"] = "question_prefix"  # a header claiming a scheme its mode did not train
    torch.save(payload, tmp_path / "scheme.pt")
    with pytest.raises(CVAECheckpointError, match="condition_scheme='question_prefix' but a 'lars' checkpoint"):
        load_cvae_checkpoint(tmp_path / "scheme.pt")

    payload = torch.load(path, weights_only=True)
    del payload["condition_scheme"]
    torch.save(payload, tmp_path / "noscheme.pt")
    with pytest.raises(CVAECheckpointError, match="'condition_scheme' missing"):
        load_cvae_checkpoint(tmp_path / "noscheme.pt")

    payload = torch.load(path, weights_only=True)
    del payload["condition_scheme"]
    payload["format_version"] = 1  # written before the scheme was recorded
    torch.save(payload, tmp_path / "v1.pt")
    with pytest.raises(CVAECheckpointError, match="format_version=1 .* retrain"):
        load_cvae_checkpoint(tmp_path / "v1.pt")

    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "version.pt")
    with pytest.raises(CVAECheckpointError, match="format_version=99"):
        load_cvae_checkpoint(tmp_path / "version.pt")

    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CVAECheckpointError, match="not a CVAE checkpoint"):
        load_cvae_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CVAECheckpointError, match="does not exist"):
        load_cvae_checkpoint(tmp_path / "nope.pt")

class _Arbitrary:  # a pickled class: weights_only loading must refuse it
    pass

def test_checkpoint_loading_is_weights_only(tmp_path):
    torch.save({"format": "iib_lpo.cvae", "payload": _Arbitrary()}, tmp_path / "evil.pt")
    with pytest.raises(CVAECheckpointError, match="weights-only"):
        load_cvae_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file")
    with pytest.raises(CVAECheckpointError, match="cannot be read"):
        load_cvae_checkpoint(tmp_path / "junk.pt")


def test_per_row_generators_make_draws_independent_of_the_batch():
    """Row i drawn with its own generator equals the same row drawn alone with that seed."""
    from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE

    torch.manual_seed(0)
    cvae = LatentCVAE(CVAEConfig(embed_dim=8, latent_dim=4, hidden_width=16, policy_hidden_size=8))
    e_x = torch.randn(3, 8)
    batch = cvae.sample_prior(e_x, 5, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = cvae.sample_prior(e_x[1:2], 5, generator=[torch.Generator().manual_seed(8)])
    # (allclose, not equal: the prior MLP's matmul may round differently for a batch of 1)
    assert torch.allclose(batch[1], alone[0], atol=1e-6)
    other_seed = cvae.sample_prior(e_x[1:2], 5, generator=[torch.Generator().manual_seed(7)])
    assert not torch.allclose(batch[1], other_seed[0], atol=1e-2)
    with pytest.raises(ValueError, match="2 generators for a batch of 3 rows"):
        cvae.sample_prior(e_x, 5, generator=[torch.Generator(), torch.Generator()])


def test_inserted_and_version_2_checkpoints_are_refused_with_the_reason(tmp_path):
    model = LatentCVAE(CVAEConfig(**SMALL))
    path = save_cvae_checkpoint(tmp_path / "c.pt", model, encoder_name="enc", mode="prefix")
    payload = torch.load(path, weights_only=True)
    assert payload["injection"] == "additive" and load_cvae_checkpoint(path)[1].format_version == 3
    payload["injection"] = "inserted"
    torch.save(payload, tmp_path / "inserted.pt")
    with pytest.raises(CVAECheckpointError, match="injection='inserted'.*removed.*retrain"):
        load_cvae_checkpoint(tmp_path / "inserted.pt")
    # version 2 had no header field: its P was made for an inserted token
    payload["format_version"] = 2
    del payload["injection"]
    torch.save(payload, tmp_path / "v2.pt")
    with pytest.raises(CVAECheckpointError, match="injection='inserted'"):
        load_cvae_checkpoint(tmp_path / "v2.pt")


def test_span_projector_stays_in_the_principal_span_and_round_trips(tmp_path):
    from recipe.iib_lpo.latent.cvae import embedding_principal_basis

    torch.manual_seed(0)
    # embedding rows that vary along 3 directions only (plus a common offset the centring removes)
    directions = torch.linalg.qr(torch.randn(16, 3))[0]
    table = torch.randn(50, 3) @ torch.diag(torch.tensor([5.0, 3.0, 1.0])) @ directions.T + 7.0
    basis = embedding_principal_basis(table, 3)
    # the same span: projecting the true directions onto the basis loses nothing
    assert torch.allclose(basis @ (basis.T @ directions), directions, atol=1e-5)
    assert torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-5)
    model = LatentCVAE(CVAEConfig(**{**SMALL, "projector_rank": 3}))
    model.projector.set_basis(basis)
    out = model.projector(torch.randn(5, 4))
    assert out.shape == (5, 16)
    assert torch.allclose(out - (out @ basis) @ basis.T, torch.zeros_like(out), atol=1e-5)  # no part outside the span
    with pytest.raises(ValueError, match="orthonormal"):
        model.projector.set_basis(2 * basis)
    path = save_cvae_checkpoint(tmp_path / "s.pt", model, encoder_name="enc", mode="fork")
    loaded, info = load_cvae_checkpoint(path)
    assert info.config.projector_rank == 3 and torch.equal(loaded.projector.basis, model.projector.basis)
    z = torch.randn(2, 4)
    assert torch.equal(loaded.projector(z), model.projector(z))


def test_orthogonal_sibling_draws_are_orthogonal_and_marginally_standard_normal():
    from recipe.iib_lpo.latent.cvae import orthogonal_normal_noise

    g = torch.Generator().manual_seed(0)
    eps = orthogonal_normal_noise((4000, 4, 8), g)
    gram = eps @ eps.transpose(-1, -2)
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    assert float(off.abs().max()) < 1e-4
    # every sibling slot is marginally N(0, I): mean 0, covariance I (4000 draws: s.e. ~0.016 per entry)
    for k in range(4):
        rows = eps[:, k].to(torch.float64)
        assert float(rows.mean(0).abs().max()) < 0.08
        assert float((rows.T @ rows / rows.shape[0] - torch.eye(8, dtype=torch.float64)).abs().max()) < 0.1
    independent = torch.randn(4000, 4, 8, generator=g)
    cos_ind = torch.nn.functional.cosine_similarity(independent[:, 0], independent[:, 1], dim=-1).abs().mean()
    assert float(cos_ind) > 0.2  # independent siblings are not orthogonal: the coupling does something
    model = LatentCVAE(CVAEConfig(**SMALL))
    z = model.sample_prior(torch.randn(3, 8), 4, generator=torch.Generator().manual_seed(1), coupling="orthogonal")
    assert z.shape == (3, 4, 4)
    with pytest.raises(ValueError, match="K <= latent_dim"):
        model.sample_prior(torch.randn(1, 8), 5, coupling="orthogonal")
    with pytest.raises(ValueError, match="coupling must be one of"):
        model.sample_prior(torch.randn(1, 8), 2, coupling="antithetic")
