"""``fork`` mode of the latent stage: prior, posterior and P trained through the frozen policy on
the policy's own fork continuations (issue 20; README "The latent" has the measurements).

Data (:func:`sample_own_forks`): for each training prompt the frozen policy samples a response with
vLLM at the rollout's temperature; the rollout's per-token entropy (the top-k estimate from vLLM's
log-probs) feeds the rollout's fork rule (``BranchingConfig``, the function the agent loop calls),
which picks t*; the
example is (chat prompt, r[:t*], r[t*:]). The parent's own tokens after t* are a sample of
pi(. | prompt, r[:t*]): what a plain branch would produce, with no extra generation.

Loss per example, batch mean (:func:`fork_latent_loss`), with v = alpha * P(z) added to the fork
token's embedding (as the rollout injects it; the paper code's inserted virtual token, trained
with this same loss, halved branch accuracy and was removed: README "The latent"):

    NLL(r[t*:] | prompt, r[:t*], v(z_q)), summed over tokens   z_q ~ q(z | e_x, e_y), reparameterised
  + beta * sum_d max(KL_d(q || p), free_bits)                batch-mean KL per dimension
  + hinge_weight * max(0, KL_fork(z_q) - fork_kl_target)

where KL_fork = KL(p(. | t*, v) || p(. | t*)) of the next-token distribution at the fork, at
temperature T, and e_x / e_y are the frozen text encoder's embeddings of the condition
(question + decoded prefix, ``build_condition_text``) and of the decoded continuation.

Why each term: the NLL (of the whole continuation, the ELBO's own scale: a per-token mean would
let the KL term outweigh it by the continuation's length and collapse the posterior) rewards z for carrying what the continuation does after the fork (the
posterior sees it), so different z lead to different continuations; the KL makes the prior, which
the rollout samples, cover the posterior's z; free bits keep the KL from collapsing z to the prior
(posterior collapse: z then carries nothing); the hinge bounds how far one z moves the policy at
the fork, which bounds how off-policy an injected branch is (the trainer recomputes log-probs
without z). P is a map into the top-r principal directions of the policy's input embeddings
(cvae.SpanProjector), so v lies where token embeddings vary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from recipe.iib_lpo.algorithm.branching import FORK_OK, BranchingConfig, choose_fork_position
from recipe.iib_lpo.latent.cvae import LatentCVAE, gaussian_kl_per_dim, reparameterize
from recipe.iib_lpo.latent.reference import (
    continuation_logits_batched,
    kl_divergence,
    latent_token_embedding,
    tempered_logprobs,
)
from recipe.iib_lpo.latent.sampler import build_condition_text

logger = logging.getLogger("iib_lpo.train_cvae")


@dataclass
class ForkExample:
    """One fork of the policy's own response: token ids and the texts the encoder sees."""

    context_ids: list[int]  # chat prompt + r[:t*]; its last token is the fork token
    continuation_ids: list[int]  # r[t*:] (cut to the training length)
    condition_text: str  # build_condition_text(question, decoded r[:t*])
    continuation_text: str  # decoded r[t*:]
    fork_position: int  # t*
    response_length: int


@dataclass
class ForkSampleStats:
    prompts: int = 0
    forks: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


@torch.no_grad()
def sample_own_forks(
    policy_path: str,
    tokenizer,
    prompts: Sequence[list[dict]],
    questions: Sequence[str],
    branching: BranchingConfig,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    max_continuation_tokens: int = 64,
    topk: int = 20,
    max_model_len: int | None = None,
    seed: int = 0,
) -> tuple[list[ForkExample], ForkSampleStats]:
    """The policy's own forks (module docstring): one response per prompt sampled by vLLM, as in the
    rollout, with the rollout's per-token entropy (top-``topk`` estimate of the sampling distribution,
    ``verl_patches.vllm_latent.topk_entropy_from_vllm_logprobs``) and fork rule. Responses too short
    to fork are skipped and counted (``stats.skipped``). The engine is shut down before returning."""
    import gc

    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from verl_patches.vllm_engine import offline_llm
    from verl_patches.vllm_latent import SAMPLING_LOGPROBS_MODE, topk_entropy_from_vllm_logprobs

    if len(prompts) != len(questions):
        raise ValueError(f"{len(prompts)} prompts but {len(questions)} questions")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling), got {temperature}")
    vocab_size = int(AutoConfig.from_pretrained(policy_path).vocab_size)
    prompt_ids = [_chat_ids(tokenizer, p) for p in prompts]
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    llm, _ = offline_llm(policy_path, dtype="auto", seed=seed, max_logprobs=topk, logprobs_mode=SAMPLING_LOGPROBS_MODE,
                         max_model_len=max_model_len or longest)
    try:
        params = [SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, logprobs=topk,
                                 seed=seed * 1_000_003 + i, detokenize=False) for i in range(len(prompt_ids))]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=True)
    finally:
        del llm
        gc.collect()
    stats = ForkSampleStats()
    examples: list[ForkExample] = []
    for index, (ids, output) in enumerate(zip(prompt_ids, outputs)):
        stats.prompts += 1
        completion = output.outputs[0]
        response = list(completion.token_ids)
        entropies = topk_entropy_from_vllm_logprobs(completion.logprobs, topk, vocab_size).estimate
        decision = choose_fork_position(entropies, branching, seed=seed * 1_000_003 + index)
        if decision.reason != FORK_OK:
            stats.skip(decision.reason)
            continue
        t = decision.position
        prefix_text = tokenizer.decode(response[:t], skip_special_tokens=True)
        examples.append(ForkExample(
            context_ids=ids + response[:t], continuation_ids=response[t : t + max_continuation_tokens],
            condition_text=build_condition_text(questions[index], prefix_text),
            continuation_text=tokenizer.decode(response[t:], skip_special_tokens=True),
            fork_position=t, response_length=len(response),
        ))
        stats.forks += 1
    for reason, count in sorted(stats.skipped.items()):
        logger.warning("own forks: skipped %d of %d responses: %s", count, stats.prompts, reason)
    if not examples:
        raise ValueError(f"no response of {stats.prompts} could be forked (skips: {stats.skipped})")
    return examples, stats


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


@dataclass(frozen=True)
class ForkLossConfig:
    """Weights of :func:`fork_latent_loss` (module docstring). Defaults: beta 1 (the ELBO's own
    weight), free bits 0.1 nats per dimension (z keeps at least that much information), fork-KL
    target 0.5 nats with weight 1 (one z moves the fork's next-token distribution by at most about
    that much), alpha 1 (the rollout's constant scale)."""

    beta: float = 1.0
    free_bits: float = 0.1
    fork_kl_target: float = 0.5
    hinge_weight: float = 1.0
    alpha: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beta", "free_bits", "fork_kl_target", "hinge_weight", "alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"ForkLossConfig.{name} must be finite and >= 0, got {value}")
        if not self.temperature > 0:
            raise ValueError(f"ForkLossConfig.temperature must be > 0, got {self.temperature}")


@dataclass
class ForkLossTerms:
    loss: torch.Tensor  # scalar
    nll: torch.Tensor  # [B] NLL of the continuation (summed over its tokens) with v(z_q)
    num_tokens: torch.Tensor  # [B] continuation lengths
    kl_per_dim: torch.Tensor  # [d_z] batch-mean KL(q || p) per dimension
    fork_kl: torch.Tensor  # [B] KL(p(.|t*, v) || p(.|t*))


def fork_kl(latent_logits: torch.Tensor, plain_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(a / T) || softmax(b / T)) per row of [..., V] logits (nats)."""
    return kl_divergence(tempered_logprobs(latent_logits, temperature), tempered_logprobs(plain_logits, temperature))


def fork_latent_loss(
    nll: torch.Tensor, kl_per_example_dim: torch.Tensor, fork_kl_values: torch.Tensor, config: ForkLossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fork-mode loss from its parts (module docstring): nll [B] (per continuation), KL per example and dim [B, d_z],
    fork KL [B] -> (scalar loss, batch-mean KL per dim [d_z]). Free bits act on the batch-mean KL
    of each dimension (a dimension below the floor gets no KL gradient)."""
    kl_per_dim = kl_per_example_dim.mean(dim=0)
    kl_term = torch.clamp(kl_per_dim, min=config.free_bits).sum()
    hinge = torch.relu(fork_kl_values - config.fork_kl_target).mean()
    return nll.mean() + config.beta * kl_term + config.hinge_weight * hinge, kl_per_dim


def fork_loss_terms(
    model: LatentCVAE,
    policy,
    examples: Sequence[ForkExample],
    e_x: torch.Tensor,
    e_y: torch.Tensor,
    config: ForkLossConfig,
    generator: torch.Generator | None = None,
) -> ForkLossTerms:
    """One batch of the fork-mode objective through the frozen policy (gradients reach prior,
    posterior and P only)."""
    mu_q, logvar_q = model.posterior_params(e_x, e_y)
    mu_p, logvar_p = model.prior_params(e_x)
    z = reparameterize(mu_q, logvar_q, generator)
    latents = latent_token_embedding(model.projector, z, config.alpha)
    contexts = [ex.context_ids for ex in examples]
    continuations = [ex.continuation_ids for ex in examples]
    logits = continuation_logits_batched(policy, contexts, continuations, list(latents))
    with torch.no_grad():
        plain_first = torch.stack([
            rows[0] for rows in continuation_logits_batched(policy, contexts, [c[:1] for c in continuations], None)
        ])
    nll = torch.stack([
        -torch.log_softmax(rows, dim=-1).gather(-1, torch.tensor(cont, device=rows.device).unsqueeze(-1)).sum()
        for rows, cont in zip(logits, continuations)
    ])
    fork_kl_values = fork_kl(torch.stack([rows[0] for rows in logits]), plain_first, config.temperature)
    loss, kl_per_dim = fork_latent_loss(
        nll, gaussian_kl_per_dim(mu_q, logvar_q, mu_p, logvar_p), fork_kl_values, config
    )
    return ForkLossTerms(loss=loss, nll=nll.detach(), num_tokens=torch.tensor([len(c) for c in continuations]),
                         kl_per_dim=kl_per_dim.detach(), fork_kl=fork_kl_values.detach())


@dataclass
class ForkEpochStats:
    epoch: int
    loss: float
    nll: float  # per token (comparable with :func:`plain_nll`)
    kl_per_dim: float
    fork_kl_median: float


def train_fork_latent(
    model: LatentCVAE,
    policy,
    examples: Sequence[ForkExample],
    e_x: torch.Tensor,
    e_y: torch.Tensor,
    config: ForkLossConfig,
    *,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    show_progress: bool = True,
) -> list[ForkEpochStats]:
    """Adam on prior, posterior and P through the frozen ``policy`` (module docstring); the
    projector's basis must already be set (``SpanProjector.set_basis``). Returns per-epoch means."""
    from tqdm.auto import tqdm

    if not (len(examples) == e_x.shape[0] == e_y.shape[0]) or not examples:
        raise ValueError(f"need one e_x and e_y row per example, got {len(examples)}, {e_x.shape[0]}, {e_y.shape[0]}")
    hidden = policy.get_input_embeddings().weight.shape[-1]
    if hidden != model.config.policy_hidden_size:
        raise ValueError(f"policy hidden size {hidden} but CVAE policy_hidden_size={model.config.policy_hidden_size}")
    policy.eval()
    policy.requires_grad_(False)
    device = next(model.parameters()).device
    e_x, e_y = e_x.to(device, torch.float32), e_y.to(device, torch.float32)
    params = [p for part in ("prior", "posterior", "projector") for p in getattr(model, part).parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator(device=device).manual_seed(seed)
    history = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=generator, device=device).tolist()
        sums = {"loss": 0.0, "nll": 0.0, "tokens": 0, "kl": 0.0}
        fork_kls = []
        bar = tqdm(range(0, len(order), batch_size), desc=f"fork latent {epoch + 1}/{epochs}",
                   disable=not show_progress, leave=False)
        for start in bar:
            idx = order[start : start + batch_size]
            terms = fork_loss_terms(model, policy, [examples[i] for i in idx], e_x[idx], e_y[idx], config, generator)
            if not torch.isfinite(terms.loss):
                raise FloatingPointError(f"fork-mode loss is {terms.loss.item()} at epoch {epoch + 1} (lower --lr?)")
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimizer.step()
            sums["loss"] += terms.loss.item() * len(idx)
            sums["nll"] += terms.nll.sum().item()
            sums["tokens"] += int(terms.num_tokens.sum())
            sums["kl"] += terms.kl_per_dim.mean().item() * len(idx)
            fork_kls.append(terms.fork_kl)
            bar.set_postfix(nll=f"{terms.nll.sum().item() / terms.num_tokens.sum().item():.3f}",
                            fork_kl=f"{terms.fork_kl.median().item():.3f}")
        n = len(examples)
        stats = ForkEpochStats(epoch + 1, sums["loss"] / n, sums["nll"] / max(sums["tokens"], 1), sums["kl"] / n,
                               float(torch.cat(fork_kls).median()))
        history.append(stats)
        logger.info("fork latent epoch %d: loss %.4f  NLL/token %.4f  KL/dim %.4f  median fork KL %.4f",
                    stats.epoch, stats.loss, stats.nll, stats.kl_per_dim, stats.fork_kl_median)
    model.eval()
    return history


@torch.no_grad()
def plain_nll(policy, examples: Sequence[ForkExample], batch_size: int = 32) -> float:
    """Per-token NLL of the examples' continuations under the policy without a latent (all tokens
    pooled: the baseline ``ForkEpochStats.nll`` is read against)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        logits = continuation_logits_batched(policy, [e.context_ids for e in chunk],
                                             [e.continuation_ids for e in chunk], None)
        for rows, ex in zip(logits, chunk):
            targets = torch.tensor(ex.continuation_ids, device=rows.device).unsqueeze(-1)
            total += float(-torch.log_softmax(rows, dim=-1).gather(-1, targets).sum())
            count += len(ex.continuation_ids)
    return total / max(count, 1)
