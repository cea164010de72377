"""Latent sampling for the fork points of one training step (METHOD.md steps 3-4).

condition text c = question + decoded prefix (:func:`build_condition_text`) -> the part of it the
prior was trained on (:func:`prior_condition_text`, per the checkpoint's condition scheme) ->
e = E(c) with the frozen text encoder (one batched call for all fork points) -> K prior draws
z ~ p_psi(z | e) -> latent-token embeddings alpha * P(z) (:func:`latent_token_embedding`, the one
definition).

Train/rollout agreement (decision): CVAE training (train_cvae.make_training_pairs) and the
rollout build every condition with the same two functions, ``prior_condition_text(
build_condition_text(question, prefix), scheme)``. For ``prefix`` / ``lm`` checkpoints (scheme
"question_prefix") that is question + prefix on both sides (a solution prefix cut at a step
boundary in training, r_i[:t*] at rollout). For ``lars`` checkpoints (scheme "question", the
paper code's prior trained on the question alone) the rollout's prefix is dropped, so the prior is
queried exactly as it was trained; the scheme comes from the checkpoint header and is checked
when the sampler loads it (cvae.load_cvae_checkpoint).

Deliberately free of Ray and vLLM: the agent loop wraps :class:`LatentSampler` in a batched Ray
actor (one actor per node, on the GPU, so the encoder runs once per step, not per branch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recipe.iib_lpo.latent.cvae import CONDITION_SCHEMES, LatentCVAE
from recipe.iib_lpo.latent.reference import latent_token_embedding
from recipe.iib_lpo.latent.text_encoder import CONDITION_SEPARATOR, split_condition_text


def build_condition_text(question: str, prefix_text: str) -> str:
    """The CVAE condition for a fork point: question text + decoded response prefix.

    The single definition shared by CVAE training (train_cvae.make_training_pairs: question +
    solution prefix, an empty prefix in "lars" mode) and rollout (agent loop: question +
    r_i[:t*]). The two parts are joined by ``text_encoder.CONDITION_SEPARATOR`` (always present,
    also for an empty prefix), so the text encoder can keep the whole question and shorten the
    prefix from its start when the condition exceeds its length limit. Any separator character
    inside the inputs is replaced by a space, so the split is unambiguous.
    """
    if not isinstance(question, str) or not isinstance(prefix_text, str):
        raise TypeError(
            f"question and prefix_text must be str, got {type(question).__name__}, {type(prefix_text).__name__}"
        )
    if not question.strip():
        raise ValueError("build_condition_text: empty question")
    question = question.replace(CONDITION_SEPARATOR, " ")
    prefix_text = prefix_text.replace(CONDITION_SEPARATOR, " ")
    return f"{question}{CONDITION_SEPARATOR}{prefix_text}"


def prior_condition_text(condition_text: str, condition_scheme: str) -> str:
    """The part of a :func:`build_condition_text` condition that a prior of ``condition_scheme``
    is conditioned on; applied in training (train_cvae) and at rollout (:class:`LatentSampler`).

    "question_prefix" (prefix / lm checkpoints): the condition unchanged. "question" (lars
    checkpoints): the prefix is dropped, i.e. ``build_condition_text(question, "")``. A plain
    text (no separator) is taken to be a question alone and returned unchanged.
    """
    if condition_scheme not in CONDITION_SCHEMES:
        raise ValueError(f"condition_scheme must be one of {CONDITION_SCHEMES}, got {condition_scheme!r}")
    if condition_scheme == "question_prefix":
        return condition_text
    parts = split_condition_text(condition_text)
    if parts is None:
        return condition_text
    return build_condition_text(parts[0], "")


@dataclass
class LatentSamples:
    """K latent-token embeddings per condition, plus what the trainer logs about them."""

    embeddings: torch.Tensor  # [N, K, policy_hidden] = alpha * P(z), float32
    z: torch.Tensor  # [N, K, d_z] prior draws
    z_norms: torch.Tensor  # [N, K] ||z||_2
    embedding_norms: torch.Tensor  # [N, K] ||alpha * P(z)||_2
    alpha: float


class LatentSampler:
    """Turns fork-point condition texts into latent-token embeddings.

    encoder: a :class:`recipe.iib_lpo.latent.text_encoder.TextEncoder` (anything with ``encode(list[str])
        -> Tensor[N, embed_dim]`` and ``embed_dim``); cvae: a trained :class:`LatentCVAE`
        (typically from ``load_cvae_checkpoint``); device: where the CVAE runs;
        condition_scheme: what the prior was trained on (the checkpoint's ``condition_scheme``;
        :meth:`from_checkpoint` takes it from the header). Condition texts are passed through
        :func:`prior_condition_text` with it before encoding.
    """

    def __init__(
        self,
        encoder,
        cvae: LatentCVAE,
        device: str | torch.device = "cpu",
        condition_scheme: str = "question_prefix",
    ):
        if int(encoder.embed_dim) != cvae.config.embed_dim:
            raise ValueError(
                f"text encoder embed_dim={encoder.embed_dim} but the CVAE expects embed_dim={cvae.config.embed_dim}"
            )
        if condition_scheme not in CONDITION_SCHEMES:
            raise ValueError(f"condition_scheme must be one of {CONDITION_SCHEMES}, got {condition_scheme!r}")
        self.condition_scheme = condition_scheme
        self.encoder = encoder
        self.device = torch.device(device)
        self.cvae = cvae.to(self.device).eval()
        self.cvae.requires_grad_(False)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_path,
        *,
        expected_policy_hidden_size: int | None = None,
        encoder_name_or_path: str | None = None,
        device: str | torch.device = "cpu",
        encoder_dtype: torch.dtype = torch.float32,
        micro_batch_size: int = 32,
    ) -> LatentSampler:
        """Build the sampler from a train_cvae checkpoint.

        The encoder is the one named in the checkpoint unless ``encoder_name_or_path`` overrides
        it (e.g. a local copy of the same model); its max length and truncation side are those
        used in training (recorded in the checkpoint), and the condition scheme is the header's
        (validated against the mode by the loader), so the prior is queried as it was trained.
        ``expected_policy_hidden_size`` (the policy's hidden size) is checked against P's width.
        """
        from recipe.iib_lpo.latent.cvae import load_cvae_checkpoint
        from recipe.iib_lpo.latent.text_encoder import TextEncoder

        cvae, info = load_cvae_checkpoint(
            checkpoint_path, expected_policy_hidden_size=expected_policy_hidden_size, map_location=device
        )
        encoder = TextEncoder(
            encoder_name_or_path or info.encoder_name,
            max_length=int(info.train_summary.get("encoder_max_length", 512)),
            truncation_side=str(info.train_summary.get("encoder_truncation_side", "left")),
            micro_batch_size=micro_batch_size,
            device=device,
            dtype=encoder_dtype,
        )
        return cls(encoder, cvae, device=device, condition_scheme=info.condition_scheme)

    @property
    def policy_hidden_size(self) -> int:
        return self.cvae.config.policy_hidden_size

    @torch.no_grad()
    def sample_latent_embeddings(
        self,
        condition_texts: Sequence[str],
        num_samples: int,
        alpha: float,
        generator: torch.Generator | None = None,
        coupling: str = "independent",
    ) -> LatentSamples | None:
        """K = num_samples latent-token embeddings for each of N condition texts.

        Returns None when alpha == 0: "no latent token" (plain resampling from the fork), and the
        encoder is not run at all. ``generator`` (on the CVAE's device) makes the draws
        reproducible: one generator for the call, or one per condition text, which makes each
        condition's draws independent of the rest of the batch. One encoder call covers all N
        conditions. ``condition_texts`` come from :func:`build_condition_text`; each is reduced to
        :func:`prior_condition_text` for this sampler's condition scheme before encoding.
        ``coupling``: how the K siblings' draws relate (cvae.SIBLING_COUPLINGS).
        """
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if alpha == 0.0:
            return None
        texts = list(condition_texts)
        c = self.cvae.config
        if not texts:
            empty = torch.empty(0, num_samples, dtype=torch.float32, device=self.device)
            return LatentSamples(
                embeddings=torch.empty(0, num_samples, c.policy_hidden_size, device=self.device),
                z=torch.empty(0, num_samples, c.latent_dim, device=self.device),
                z_norms=empty, embedding_norms=empty.clone(), alpha=alpha,
            )
        texts = [prior_condition_text(t, self.condition_scheme) for t in texts]
        e_x = self.encoder.encode(texts).to(device=self.device, dtype=torch.float32)
        if e_x.shape != (len(texts), c.embed_dim):
            raise ValueError(f"encoder returned shape {tuple(e_x.shape)}, expected ({len(texts)}, {c.embed_dim})")
        z = self.cvae.sample_prior(e_x, num_samples, generator=generator, coupling=coupling)
        embeddings = latent_token_embedding(self.cvae.projector, z, alpha)
        if not torch.isfinite(embeddings).all():
            raise FloatingPointError("latent embeddings contain NaN or inf (corrupt CVAE or encoder output)")
        return LatentSamples(
            embeddings=embeddings,
            z=z,
            z_norms=z.norm(dim=-1),
            embedding_norms=embeddings.norm(dim=-1),
            alpha=alpha,
        )

    @torch.no_grad()
    def z_usage(self, condition_texts: Sequence[str], continuation_texts: Sequence[str]) -> torch.Tensor:
        """Mean KL(q(z | x, y) || p(z | x)) per latent dimension [d_z] (nats) over N forks: how much
        the posterior, which sees the continuation y, departs from the prior, i.e. how much
        information z carries about y. ``condition_texts`` as for sampling; continuations are
        encoded as plain texts, as in training."""
        from recipe.iib_lpo.latent.cvae import gaussian_kl_per_dim

        texts = [prior_condition_text(t, self.condition_scheme) for t in condition_texts]
        continuations = list(continuation_texts)
        if len(texts) != len(continuations) or not texts:
            raise ValueError(f"need equal, non-zero numbers of conditions and continuations, got {len(texts)}, {len(continuations)}")
        e_x = self.encoder.encode(texts).to(device=self.device, dtype=torch.float32)
        e_y = self.encoder.encode(continuations).to(device=self.device, dtype=torch.float32)
        mu_q, logvar_q = self.cvae.posterior_params(e_x, e_y)
        mu_p, logvar_p = self.cvae.prior_params(e_x)
        return gaussian_kl_per_dim(mu_q, logvar_q, mu_p, logvar_p).mean(dim=0)
