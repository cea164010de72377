"""Conditional VAE over text-encoder embeddings + the latent projector P (METHOD.md, "The CVAE stage").

Networks (all MLPs, ``num_layers`` linear layers of width ``hidden_width``, SiLU in between):

* prior      p_psi(z | e_x)       = N(mu_p, diag exp(logvar_p))   -- queried at rollout time
* posterior  q_phi(z | e_x, e_y)  = N(mu_q, diag exp(logvar_q))   -- training only
* decoder    e_y_hat(e_x, z)                                       -- training only
* projector  P: R^{d_z} -> R^{policy hidden}                       -- the latent vector v = alpha * P(z)

P is either a free two-layer MLP (``projector_rank = 0``, paper code) or, with ``projector_rank
= r > 0``, an MLP to r coordinates in a fixed orthonormal basis B [hidden, r] of the top-r
principal directions of the policy's embedding matrix (:func:`embedding_principal_basis`), so
P(z) = B @ mlp(z) stays in the span the model reads its input embeddings from.

Losses: embedding mode (lars, prefix, lm; paper-code parity) ||e_y_hat - e_y||^2 + beta *
KL(q || p), averaged over the batch (the squared error summed over embedding dimensions, the KL
over latent dimensions). ``fork`` mode trains prior, posterior and P through the frozen policy on
its own fork continuations instead (latent/fork_training.py; the decoder is unused there).

Checkpoints are one ``torch.save`` file holding plain state dicts plus a header (format version,
CVAE config, encoder name, mode, condition scheme, training summary) so that a policy / encoder /
latent-size mismatch is caught at load time with a precise message instead of producing a silent
wrong latent. Files are read with ``weights_only=True`` (checkpoints may come from untrusted
places).

Condition scheme (decision, recorded in the header as ``condition_scheme``): what the prior was
trained on, and therefore how the rollout must query it. ``prefix`` and ``lm`` train the prior on
``build_condition_text(question, solution prefix)`` -> scheme ``"question_prefix"``: the rollout
queries it with question + response prefix r_i[:t*]. ``lars`` (paper-code parity) trains it on
the question alone -> scheme ``"question"``: the rollout queries it with the question alone (the
sampler drops the prefix through ``latent.sampler.prior_condition_text``, the function training
applies too), so a lars prior gives every fork point of a prompt the same latent distribution,
as in the paper's code, instead of being queried with texts it never saw. The scheme follows
from the mode (:data:`MODE_CONDITION_SCHEME`); the loader refuses a header where they disagree.

Injection (header field ``injection``, always "additive"): P's output is added to the fork
token's embedding (latent/reference.py), as in training and the rollout. Files whose header says
"inserted" (the paper code's virtual token, removed after the branch-quality measurement; README
"The latent") are refused with that reason.

Format history: version 2 added ``condition_scheme`` and changed how condition texts are cut to
the encoder's length (the question is kept, the prefix shortened from its start;
text_encoder.py). Version-1 checkpoints were trained on differently cut conditions and are
refused with that reason: retrain them with train_cvae. Version 3 added ``injection`` and the
span projector; a version-2 file was made for an inserted token and is refused like one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = "iib_lpo.cvae"
CHECKPOINT_FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (2, 3)  # 2 only to refuse it with its reason (module docstring)
LATENT_INJECTION = "additive"  # the header's ``injection`` (module docstring)
CVAE_MODES = ("fork", "lars", "prefix", "lm")
# What the prior is conditioned on (module docstring): the question alone, or question + prefix.
CONDITION_SCHEMES = ("question", "question_prefix")
MODE_CONDITION_SCHEME = {"fork": "question_prefix", "lars": "question", "prefix": "question_prefix",
                         "lm": "question_prefix"}

# log-variances are clamped to this range before exp(): an untrained or diverging network can
# otherwise emit logvar = +-100 and produce inf/0 standard deviations (NaN KL, NaN latents).
# How the K siblings of one fork draw their z (LatentCVAE.sample_prior).
SIBLING_COUPLINGS = ("independent", "orthogonal")

LOGVAR_MIN = -12.0
LOGVAR_MAX = 8.0


@dataclass
class CVAEConfig:
    """Sizes of the CVAE and the latent projector.

    embed_dim: width of the text encoder's pooled embedding (1536 for deberta-v2-xlarge, the
        paper code's encoder).
    latent_dim: d_z, default 128 (the paper code's RL setting; its README trains 1024).
    hidden_width: MLP width, default 256 (paper code).
    num_layers: linear layers per MLP, default 3 (paper code: "3-layer MLPs").
    policy_hidden_size: hidden size of the policy LM; the projector P maps z to this width. Must
        match the policy at rollout time (checked on load).
    projector_hidden_width: width of P's single hidden layer (decision: 256, the CVAE's width).
    projector_init_std: std of P's random init, default 0.01 (METHOD.md "lars" mode: P is a small
        random map, so alpha * P(z) starts as a weak signal).
    beta_kl: weight of the KL term, default 1.0 (the paper's loss has no weight; beta < 1 is the
        usual remedy for posterior collapse).
    projector_rank: 0 (default): P is a free MLP to the policy width; r > 0: P = B @ mlp(z) with B
        the top-r principal directions of the policy's embedding matrix (module docstring).
    """

    embed_dim: int = 1536
    latent_dim: int = 128
    hidden_width: int = 256
    num_layers: int = 3
    policy_hidden_size: int = 3584
    projector_hidden_width: int = 256
    projector_init_std: float = 0.01
    beta_kl: float = 1.0
    projector_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("embed_dim", "latent_dim", "hidden_width", "num_layers", "policy_hidden_size",
                     "projector_hidden_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CVAEConfig.{name} must be a positive int, got {value!r}")
        rank = self.projector_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= self.policy_hidden_size:
            raise ValueError(f"CVAEConfig.projector_rank must be an int in [0, policy_hidden_size], got {rank!r}")
        if not (self.projector_init_std > 0 and math.isfinite(self.projector_init_std)):
            raise ValueError(f"CVAEConfig.projector_init_std must be > 0, got {self.projector_init_std}")
        if not (self.beta_kl >= 0 and math.isfinite(self.beta_kl)):
            raise ValueError(f"CVAEConfig.beta_kl must be >= 0, got {self.beta_kl}")


def mlp(in_dim: int, hidden_width: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` linear layers with SiLU between them (no activation on the output)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    dims = [in_dim] + [hidden_width] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def gaussian_kl_per_dim(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, diag e^logvar_q) || N(mu_p, diag e^logvar_p)) per dimension, same shape as the inputs."""
    var_ratio = torch.exp(logvar_q - logvar_p)
    mean_term = (mu_q - mu_p).pow(2) * torch.exp(-logvar_p)
    return 0.5 * (var_ratio + mean_term - 1.0 + logvar_p - logvar_q)


def gaussian_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, diag e^logvar_q) || N(mu_p, diag e^logvar_p)) summed over the last dim -> [B]."""
    return gaussian_kl_per_dim(mu_q, logvar_q, mu_p, logvar_p).sum(dim=-1)


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I); differentiable in mu and logvar.

    ``generator`` may be one generator for the whole batch, or one per row of ``mu`` (dim 0):
    then row i's noise depends only on generator i, so a request's draws do not depend on which
    other requests share its batch (the latent service batches by timing).
    """
    if generator is None or isinstance(generator, torch.Generator):
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    else:
        generators = list(generator)
        if len(generators) != mu.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {mu.shape[0]} rows")
        eps = torch.stack(
            [torch.randn(mu.shape[1:], generator=g, device=mu.device, dtype=mu.dtype) for g in generators]
        ) if generators else torch.empty(mu.shape, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def _split_gaussian(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, logvar = params.chunk(2, dim=-1)
    return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class LatentProjector(nn.Module):
    """P: z (d_z) -> latent-token input embedding (policy hidden size); two linear layers."""

    def __init__(self, latent_dim: int, hidden_width: int, out_dim: int, init_std: float = 0.01):
        super().__init__()
        self.net = mlp(latent_dim, hidden_width, out_dim, num_layers=2)
        for module in self.net:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=init_std)
                nn.init.zeros_(module.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class SpanProjector(nn.Module):
    """P(z) = B @ mlp(z): a two-layer MLP to r coordinates in the fixed orthonormal basis B [hidden, r]
    (a buffer, saved with the weights; zeros until :meth:`set_basis`)."""

    def __init__(self, latent_dim: int, hidden_width: int, out_dim: int, rank: int, init_std: float = 0.01):
        super().__init__()
        self.net = LatentProjector(latent_dim, hidden_width, rank, init_std).net
        self.register_buffer("basis", torch.zeros(out_dim, rank))

    def set_basis(self, basis: torch.Tensor) -> None:
        if tuple(basis.shape) != tuple(self.basis.shape):
            raise ValueError(f"basis must have shape {tuple(self.basis.shape)}, got {tuple(basis.shape)}")
        gram = basis.T.to(torch.float64) @ basis.to(torch.float64)
        if not torch.allclose(gram, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-4):
            raise ValueError("basis columns must be orthonormal")
        self.basis.copy_(basis)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z) @ self.basis.T


def embedding_principal_basis(embedding_matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` principal directions [hidden, rank] (orthonormal columns) of the rows of a
    policy's input embedding matrix [V, hidden], centred; computed in float64."""
    rows = embedding_matrix.detach().to(torch.float64)
    if rows.dim() != 2 or not 1 <= rank <= min(rows.shape):
        raise ValueError(f"need a [V, hidden] matrix and 1 <= rank <= min(V, hidden), got {tuple(rows.shape)}, {rank}")
    _, _, vh = torch.linalg.svd(rows - rows.mean(dim=0, keepdim=True), full_matrices=False)
    return vh[:rank].T.contiguous().to(torch.float32)


def orthogonal_normal_noise(
    shape: Sequence[int], generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Noise [..., K, d] whose K rows are mutually orthogonal while each row is marginally N(0, I).

    Gram-Schmidt (QR) of K independent standard normal rows keeps each row's norm: the norm of
    a Gaussian vector is independent of its direction, and each orthogonalised direction is
    uniform on the sphere, so norm x direction is again N(0, I) per row. Needs K <= d.
    """
    *lead, k, d = shape
    if k > d:
        raise ValueError(f"orthogonal draws need K <= latent_dim, got K={k}, d={d}")
    g = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float64 if dtype == torch.float32 else dtype)
    q, r = torch.linalg.qr(g.transpose(-1, -2))  # q [..., d, K]
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    directions = (q * signs.unsqueeze(-2)).transpose(-1, -2)  # [..., K, d], row k spans like g_k
    return (directions * g.norm(dim=-1, keepdim=True)).to(dtype)


@dataclass
class CVAEOutput:
    loss: torch.Tensor  # scalar, recon + beta * KL (batch mean)
    recon: torch.Tensor  # [B] squared L2 error of the decoded embedding
    kl: torch.Tensor  # [B] KL(q || p)
    e_y_hat: torch.Tensor  # [B, embed_dim]
    z: torch.Tensor  # [B, latent_dim], posterior sample


class LatentCVAE(nn.Module):
    """Prior, posterior, decoder and the latent projector P in one module (one checkpoint)."""

    # Sub-modules whose state dicts a checkpoint must contain (in this order).
    PARTS = ("prior", "posterior", "decoder", "projector")

    def __init__(self, config: CVAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.prior = mlp(c.embed_dim, c.hidden_width, 2 * c.latent_dim, c.num_layers)
        self.posterior = mlp(2 * c.embed_dim, c.hidden_width, 2 * c.latent_dim, c.num_layers)
        self.decoder = mlp(c.embed_dim + c.latent_dim, c.hidden_width, c.embed_dim, c.num_layers)
        if c.projector_rank:
            self.projector = SpanProjector(
                c.latent_dim, c.projector_hidden_width, c.policy_hidden_size, c.projector_rank, c.projector_init_std
            )
        else:
            self.projector = LatentProjector(
                c.latent_dim, c.projector_hidden_width, c.policy_hidden_size, c.projector_init_std
            )

    def _check_embeddings(self, e: torch.Tensor, name: str, width: int) -> None:
        if e.dim() != 2 or e.shape[-1] != width:
            raise ValueError(f"{name} must have shape [B, {width}], got {tuple(e.shape)}")
        if not torch.isfinite(e).all():
            raise ValueError(f"{name} contains NaN or inf")

    def prior_params(self, e_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of p_psi(z | e_x), each [B, latent_dim]."""
        self._check_embeddings(e_x, "e_x", self.config.embed_dim)
        return _split_gaussian(self.prior(e_x))

    def posterior_params(self, e_x: torch.Tensor, e_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q_phi(z | e_x, e_y), each [B, latent_dim]."""
        self._check_embeddings(e_x, "e_x", self.config.embed_dim)
        self._check_embeddings(e_y, "e_y", self.config.embed_dim)
        return _split_gaussian(self.posterior(torch.cat([e_x, e_y], dim=-1)))

    def decode(self, e_x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([e_x, z], dim=-1))

    def sample_prior(
        self,
        e_x: torch.Tensor,
        num_samples: int,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        coupling: str = "independent",
    ) -> torch.Tensor:
        """num_samples draws from p_psi(z | e_x) per row: [B, num_samples, latent_dim].

        ``generator``: one for the batch, or one per row (see ``reparameterize``). ``coupling``
        (:data:`SIBLING_COUPLINGS`): "independent" draws, or "orthogonal": the siblings' noise
        vectors are mutually orthogonal, each still marginally N(0, I), so each z is marginally a
        prior draw (:func:`orthogonal_normal_noise`)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if coupling not in SIBLING_COUPLINGS:
            raise ValueError(f"coupling must be one of {SIBLING_COUPLINGS}, got {coupling!r}")
        mu, logvar = self.prior_params(e_x)
        mu = mu.unsqueeze(1).expand(-1, num_samples, -1)
        logvar = logvar.unsqueeze(1).expand(-1, num_samples, -1)
        if coupling == "independent":
            return reparameterize(mu, logvar, generator)
        shape = (num_samples, mu.shape[-1])
        if generator is None or isinstance(generator, torch.Generator):
            eps = torch.stack([orthogonal_normal_noise(shape, generator, mu.device, mu.dtype) for _ in range(mu.shape[0])]) \
                if mu.shape[0] else torch.empty(mu.shape, device=mu.device, dtype=mu.dtype)
        else:
            generators = list(generator)
            if len(generators) != mu.shape[0]:
                raise ValueError(f"{len(generators)} generators for a batch of {mu.shape[0]} rows")
            eps = torch.stack([orthogonal_normal_noise(shape, g, mu.device, mu.dtype) for g in generators]) \
                if generators else torch.empty(mu.shape, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(
        self, e_x: torch.Tensor, e_y: torch.Tensor, generator: torch.Generator | None = None
    ) -> CVAEOutput:
        mu_q, logvar_q = self.posterior_params(e_x, e_y)
        mu_p, logvar_p = self.prior_params(e_x)
        z = reparameterize(mu_q, logvar_q, generator)
        e_y_hat = self.decode(e_x, z)
        recon = (e_y_hat - e_y).pow(2).sum(dim=-1)
        kl = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)
        loss = (recon + self.config.beta_kl * kl).mean()
        return CVAEOutput(loss=loss, recon=recon, kl=kl, e_y_hat=e_y_hat, z=z)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class CVAECheckpointError(ValueError):
    """A CVAE checkpoint is malformed or does not fit the run's configuration."""


@dataclass
class CVAECheckpointInfo:
    """The header of a CVAE checkpoint (everything except the weights)."""

    config: CVAEConfig
    encoder_name: str
    mode: str
    condition_scheme: str  # "question" (lars) or "question_prefix" (fork, prefix, lm); see module docstring
    format_version: int = CHECKPOINT_FORMAT_VERSION
    train_summary: dict[str, Any] = dataclasses.field(default_factory=dict)


def save_cvae_checkpoint(
    path: str | Path,
    model: LatentCVAE,
    *,
    encoder_name: str,
    mode: str,
    train_summary: dict[str, Any] | None = None,
) -> Path:
    """Write model weights + header to ``path`` (one file, loadable with weights_only=True).

    train_summary: plain numbers / strings only (e.g. final ELBO, row counts, seed).
    The header's ``condition_scheme`` is ``MODE_CONDITION_SCHEME[mode]`` (not a free argument, so
    a checkpoint cannot claim a scheme its training did not use).
    """
    if mode not in CVAE_MODES:
        raise ValueError(f"mode must be one of {CVAE_MODES}, got {mode!r}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": dataclasses.asdict(model.config),
        "encoder_name": str(encoder_name),
        "mode": mode,
        "injection": LATENT_INJECTION,
        "condition_scheme": MODE_CONDITION_SCHEME[mode],
        "train_summary": dict(train_summary or {}),
        "state_dicts": {
            part: {k: v.detach().cpu().clone() for k, v in getattr(model, part).state_dict().items()}
            for part in LatentCVAE.PARTS
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crashed save never leaves a truncated checkpoint behind
    return path


def _header_field(payload: dict, key: str, path: Path) -> Any:
    if key not in payload:
        raise CVAECheckpointError(f"{path}: not a CVAE checkpoint (header field {key!r} missing)")
    return payload[key]


def load_cvae_checkpoint(
    path: str | Path,
    *,
    expected_embed_dim: int | None = None,
    expected_latent_dim: int | None = None,
    expected_policy_hidden_size: int | None = None,
    expected_encoder_name: str | None = None,
    expected_mode: str | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[LatentCVAE, CVAECheckpointInfo]:
    """Load and validate a checkpoint written by :func:`save_cvae_checkpoint`.

    The header's ``condition_scheme`` must be the one its mode trains (MODE_CONDITION_SCHEME);
    version-1 files are refused (module docstring). Every ``expected_*`` that is not None is
    compared with the header; a mismatch raises
    :class:`CVAECheckpointError` naming the field, the checkpoint value and the expected value.
    State dicts are checked key by key and shape by shape against a model built from the header
    config, so a hand-edited or truncated file fails with the offending parameter named.
    The model is returned in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise CVAECheckpointError(f"CVAE checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, disallowed globals
        raise CVAECheckpointError(f"{path}: cannot be read as a weights-only torch file: {exc}") from exc
    if not isinstance(payload, dict):
        raise CVAECheckpointError(f"{path}: not a CVAE checkpoint (top level is {type(payload).__name__})")
    fmt = _header_field(payload, "format", path)
    if fmt != CHECKPOINT_FORMAT:
        raise CVAECheckpointError(f"{path}: format {fmt!r} is not {CHECKPOINT_FORMAT!r}")
    version = _header_field(payload, "format_version", path)
    if version == 1:
        raise CVAECheckpointError(
            f"{path}: checkpoint format_version=1 predates the recorded condition scheme and the "
            f"question-preserving truncation of condition texts (format {CHECKPOINT_FORMAT_VERSION}); its prior "
            f"was trained on differently cut conditions, so retrain it with python -m recipe.iib_lpo.train_cvae"
        )
    if version not in READABLE_FORMAT_VERSIONS:
        raise CVAECheckpointError(
            f"{path}: checkpoint format_version={version} but this code reads versions {READABLE_FORMAT_VERSIONS}"
        )
    raw_config = _header_field(payload, "config", path)
    known = {f.name for f in dataclasses.fields(CVAEConfig)}
    if not isinstance(raw_config, dict) or set(raw_config) - known:
        extra = sorted(set(raw_config) - known) if isinstance(raw_config, dict) else raw_config
        raise CVAECheckpointError(f"{path}: config header has unknown fields {extra}")
    try:
        config = CVAEConfig(**raw_config)
    except (TypeError, ValueError) as exc:
        raise CVAECheckpointError(f"{path}: invalid config header: {exc}") from exc
    info = CVAECheckpointInfo(
        config=config,
        encoder_name=str(_header_field(payload, "encoder_name", path)),
        mode=str(_header_field(payload, "mode", path)),
        condition_scheme=str(_header_field(payload, "condition_scheme", path)),
        format_version=version,
        train_summary=dict(payload.get("train_summary") or {}),
    )
    if info.mode not in CVAE_MODES:
        raise CVAECheckpointError(f"{path}: unknown mode {info.mode!r} (known: {CVAE_MODES})")
    # version 2 predates the additive injection: its P was made for an inserted token
    injection = str(_header_field(payload, "injection", path)) if version >= 3 else "inserted"
    if injection != LATENT_INJECTION:
        raise CVAECheckpointError(
            f"{path}: injection={injection!r}, but the recipe adds the latent to the fork token's embedding "
            f"({LATENT_INJECTION!r}); the inserted virtual token was removed after it halved branch accuracy on "
            "the demo (README, 'The latent'): retrain with python -m recipe.iib_lpo.train_cvae"
        )
    if info.condition_scheme != MODE_CONDITION_SCHEME[info.mode]:
        raise CVAECheckpointError(
            f"{path}: condition_scheme={info.condition_scheme!r} but a {info.mode!r} checkpoint's prior is trained "
            f"on {MODE_CONDITION_SCHEME[info.mode]!r}; the rollout would query it with conditions it never saw"
        )

    expectations = [
        ("embed_dim", config.embed_dim, expected_embed_dim),
        ("latent_dim", config.latent_dim, expected_latent_dim),
        ("policy_hidden_size", config.policy_hidden_size, expected_policy_hidden_size),
        ("encoder_name", info.encoder_name, expected_encoder_name),
        ("mode", info.mode, expected_mode),
    ]
    for name, actual, expected in expectations:
        if expected is not None and actual != expected:
            raise CVAECheckpointError(f"{path}: checkpoint {name}={actual!r} but config expects {expected!r}")

    model = LatentCVAE(config)
    state_dicts = _header_field(payload, "state_dicts", path)
    if not isinstance(state_dicts, dict):
        raise CVAECheckpointError(f"{path}: 'state_dicts' is not a dict")
    for part in LatentCVAE.PARTS:
        if part not in state_dicts:
            raise CVAECheckpointError(f"{path}: checkpoint has no weights for '{part}'")
        module = getattr(model, part)
        wanted = module.state_dict()
        given = state_dicts[part]
        missing = sorted(set(wanted) - set(given))
        unexpected = sorted(set(given) - set(wanted))
        if missing or unexpected:
            raise CVAECheckpointError(
                f"{path}: '{part}' state dict does not match the config: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        for key, tensor in wanted.items():
            if tuple(given[key].shape) != tuple(tensor.shape):
                raise CVAECheckpointError(
                    f"{path}: '{part}.{key}' has shape {tuple(given[key].shape)} in the checkpoint but "
                    f"the header config implies {tuple(tensor.shape)}"
                )
            if not torch.isfinite(given[key]).all():
                raise CVAECheckpointError(f"{path}: '{part}.{key}' contains NaN or inf")
        module.load_state_dict(given, strict=True)
    model.to(map_location)
    model.eval()
    return model, info
