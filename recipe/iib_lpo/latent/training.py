"""Train the CVAE (+ latent projector P) before RL (METHOD.md, "The CVAE stage").

    python -m recipe.iib_lpo.train_cvae --train-parquet train.parquet --out cvae.pt \
        --mode prefix --encoder microsoft/deberta-v2-xlarge --policy-model Qwen/Qwen2.5-7B

Input: parquet files written by ``data_prep.prepare`` (``extra_info.question`` and the reference
solution ``extra_info.<solution_key>``, default ``solution``). A row without solution text falls
back to ``extra_info.answer`` (counted, warned: an answer-only target carries little about the
reasoning); a row without a question or any target is skipped and counted.

Modes (every condition is ``prior_condition_text(build_condition_text(question, prefix),
MODE_CONDITION_SCHEME[mode])``, the functions the rollout uses too; see latent_sampler.py):
* ``fork``   (default, issue 20): prior, posterior and P (in the span of the policy's top
  principal embedding directions, ``--projector-rank``) trained through the frozen policy on its
  OWN fork continuations, with the posterior, free bits and a bound on the fork KL; the latent is
  added to the fork token's embedding. latent/fork_training.py says what and why. Needs
  ``--policy-model``; the encoder may be the policy itself (the demo does that).
* ``lars``   (paper-code parity): condition = question alone (empty prefix), target = full
  solution. The checkpoint records condition scheme "question" and the rollout queries the prior
  with the question alone (the fork's prefix is dropped), exactly as trained.
* ``prefix`` (recommended): condition = question + solution prefix, target = solution suffix,
  cut at random step boundaries (newlines and sentence ends), ``--cuts-per-example`` cuts per
  solution, seeded. Matches how the prior is queried at rollout (question + response prefix).
* ``lm``     (Optimus-style): first trains the CVAE as in ``prefix`` mode, then trains P alone
  through the frozen policy LM: maximise log p(suffix | chat prompt + prefix + latent token
  alpha * P(z)) with z ~ p(z | e_x) drawn from the (frozen, already trained) *prior*, the
  distribution the rollout draws from, so P is fitted to the inputs it will receive. (Posterior
  draws q(z | e_x, e_y) would carry information about the very suffix being scored, which no
  rollout latent carries, and lie where the prior puts little mass whenever KL(q || p) > 0.
  The price: the objective does not reward P for making different z's differ; diversity comes
  from the prior's spread.) Needs ``--policy-model``; costly (one LM forward/backward per
  pair), so it trains on at most ``--lm-max-pairs`` pairs with suffixes cut to
  ``--lm-max-suffix-tokens``.

Embeddings are pre-computed once (frozen encoder, batched); then the CVAE trains with Adam, a
tqdm bar per epoch, and ELBO / reconstruction / KL logged per epoch. The checkpoint is one file
with a header (dims, encoder, mode, policy hidden size, format version; see cvae.py).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recipe.iib_lpo.algorithm.branching import BranchingConfig
from recipe.iib_lpo.latent.cvae import CVAE_MODES, MODE_CONDITION_SCHEME, CVAEConfig, LatentCVAE, save_cvae_checkpoint
from recipe.iib_lpo.latent.sampler import build_condition_text, prior_condition_text

logger = logging.getLogger("iib_lpo.train_cvae")

# Candidate cut points: after a run of newlines, or after sentence-final punctuation followed by
# whitespace (so "3.5" or "e.g.x" never split). The cut lies after the whitespace, so a suffix
# starts at the first character of a step.
_STEP_BOUNDARY = re.compile(r"\n+|(?<=[.!?])[ \t]+")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingRow:
    question: str
    target: str  # reference solution (or the answer, when the dataset has no solution text)
    prompt: list | None = None  # the row's chat messages (used by "lm" mode)


@dataclass
class RowStats:
    rows_read: int = 0
    rows_used: int = 0
    answer_fallbacks: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _nonempty_str(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def load_training_rows(
    parquet_paths: Sequence[str | Path], solution_key: str = "solution", max_rows: int | None = None
) -> tuple[list[TrainingRow], RowStats]:
    """(question, target) rows from data_prep parquet files, with counts of fallbacks and skips."""
    import pandas as pd

    stats = RowStats()
    rows: list[TrainingRow] = []
    for path in parquet_paths:
        frame = pd.read_parquet(path)
        if "extra_info" not in frame.columns:
            raise ValueError(
                f"{path}: no 'extra_info' column (columns: {sorted(frame.columns)}); expected data_prep output"
            )
        has_prompt = "prompt" in frame.columns
        for i, extra in enumerate(frame["extra_info"]):
            stats.rows_read += 1
            if not isinstance(extra, dict):
                stats.skip("extra_info is not a dict")
                continue
            question = _nonempty_str(extra.get("question"))
            if question is None:
                stats.skip("no extra_info.question")
                continue
            target = _nonempty_str(extra.get(solution_key))
            if target is None:
                answer = extra.get("answer")
                target = _nonempty_str(answer if not isinstance(answer, (int, float)) else str(answer))
                if target is None:
                    stats.skip(f"no extra_info.{solution_key} and no extra_info.answer")
                    continue
                stats.answer_fallbacks += 1
            prompt = frame["prompt"].iloc[i] if has_prompt else None
            if prompt is not None and not isinstance(prompt, list):
                prompt = list(prompt)  # parquet lists come back as numpy arrays of dicts
            rows.append(TrainingRow(question=question, target=target, prompt=prompt))
            if max_rows is not None and len(rows) >= max_rows:
                break
        if max_rows is not None and len(rows) >= max_rows:
            break
    stats.rows_used = len(rows)
    if stats.answer_fallbacks:
        logger.warning(
            "%d of %d rows have no extra_info.%s: using extra_info.answer as the CVAE target instead "
            "(an answer-only target carries little information about the reasoning)",
            stats.answer_fallbacks, stats.rows_used, solution_key,
        )
    for reason, count in sorted(stats.skipped.items()):
        logger.warning("skipped %d rows: %s", count, reason)
    if not rows:
        raise ValueError(f"no usable training rows in {list(map(str, parquet_paths))} (skips: {stats.skipped})")
    return rows, stats


def step_boundaries(text: str) -> list[int]:
    """Character offsets where ``text`` may be cut into (prefix, suffix) at a step boundary.

    Only interior cuts: both the prefix and the suffix contain non-whitespace text.
    """
    content_end = len(text.rstrip())
    content_start = len(text) - len(text.lstrip())
    cuts = []
    for match in _STEP_BOUNDARY.finditer(text):
        cut = match.end()
        if content_start < match.start() and cut < content_end:
            cuts.append(cut)
    return cuts


def cut_at_random_step(text: str, rng: random.Random) -> tuple[str, str]:
    """(prefix, suffix) cut at a uniformly drawn step boundary; ("", text) if there is none."""
    cuts = step_boundaries(text)
    if not cuts:
        return "", text
    cut = rng.choice(cuts)
    return text[:cut], text[cut:]


@dataclass
class TrainingPair:
    condition: str  # prior_condition_text(build_condition_text(question, prefix), scheme of the mode)
    target: str
    prefix: str = ""
    prompt: list | None = None


def make_training_pairs(
    rows: Sequence[TrainingRow], mode: str, *, cuts_per_example: int = 1, seed: int = 0
) -> list[TrainingPair]:
    """Condition/target text pairs for ``mode`` ("lars": question -> solution; "prefix"/"lm":
    question + prefix -> suffix at ``cuts_per_example`` distinct random step boundaries).

    Every condition is ``prior_condition_text(build_condition_text(question, prefix),
    MODE_CONDITION_SCHEME[mode])``: the same functions the rollout applies to its fork points,
    so the prior is trained on conditions of exactly the form it is queried with."""
    if mode not in CVAE_MODES:
        raise ValueError(f"mode must be one of {CVAE_MODES}, got {mode!r}")
    if cuts_per_example < 1:
        raise ValueError(f"cuts_per_example must be >= 1, got {cuts_per_example}")
    scheme = MODE_CONDITION_SCHEME[mode]
    rng = random.Random(seed)
    pairs = []

    def condition(question: str, prefix: str) -> str:
        return prior_condition_text(build_condition_text(question, prefix), scheme)

    for row in rows:
        if mode == "lars":
            pairs.append(TrainingPair(condition(row.question, ""), row.target, "", row.prompt))
            continue
        cuts = step_boundaries(row.target)
        chosen = rng.sample(cuts, min(cuts_per_example, len(cuts))) if cuts else [0]
        for cut in sorted(chosen):
            prefix, suffix = row.target[:cut], row.target[cut:]
            pairs.append(TrainingPair(condition(row.question, prefix), suffix, prefix, row.prompt))
    return pairs


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class EpochStats:
    epoch: int
    loss: float  # recon + beta * KL (the training objective, = -ELBO up to constants when beta = 1)
    recon: float
    kl: float

    @property
    def elbo(self) -> float:
        """-(recon + KL): the unweighted ELBO, up to the Gaussian likelihood's constants."""
        return -(self.recon + self.kl)


def train_cvae_on_embeddings(
    model: LatentCVAE,
    e_x: torch.Tensor,
    e_y: torch.Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    show_progress: bool = True,
) -> list[EpochStats]:
    """Adam on prior/posterior/decoder (P is not touched by the ELBO). Returns per-epoch means."""
    if e_x.shape != e_y.shape or e_x.dim() != 2 or e_x.shape[0] == 0:
        raise ValueError(f"e_x and e_y must be equal non-empty [N, D] tensors, got {tuple(e_x.shape)}, {tuple(e_y.shape)}")
    for name, tensor in (("e_x", e_x), ("e_y", e_y)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or inf")
    device = next(model.parameters()).device
    e_x, e_y = e_x.to(device, torch.float32), e_y.to(device, torch.float32)
    params = [p for part in ("prior", "posterior", "decoder") for p in getattr(model, part).parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator(device=device).manual_seed(seed)
    history = []
    model.train()
    from tqdm.auto import tqdm

    for epoch in range(epochs):
        order = torch.randperm(e_x.shape[0], generator=generator, device=device)
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
        batches = range(0, e_x.shape[0], batch_size)
        bar = tqdm(batches, desc=f"cvae epoch {epoch + 1}/{epochs}", disable=not show_progress, leave=False)
        for start in bar:
            idx = order[start : start + batch_size]
            out = model(e_x[idx], e_y[idx], generator=generator)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"CVAE loss is {out.loss.item()} at epoch {epoch + 1} (lower --lr?)")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            n = idx.numel()
            sums["loss"] += out.loss.item() * n
            sums["recon"] += out.recon.sum().item()
            sums["kl"] += out.kl.sum().item()
            bar.set_postfix(loss=f"{out.loss.item():.4g}")
        total = e_x.shape[0]
        stats = EpochStats(epoch + 1, sums["loss"] / total, sums["recon"] / total, sums["kl"] / total)
        history.append(stats)
        logger.info(
            "epoch %d: ELBO %.5g  recon %.5g  KL %.5g  loss %.5g",
            stats.epoch, stats.elbo, stats.recon, stats.kl, stats.loss,
        )
    model.eval()
    return history


def train_projector_through_lm(
    model: LatentCVAE,
    policy,
    tokenizer,
    pairs: Sequence[TrainingPair],
    e_x: torch.Tensor,
    *,
    alpha: float = 1.0,
    epochs: int = 1,
    lr: float = 1e-3,
    max_suffix_tokens: int = 128,
    seed: int = 0,
    show_progress: bool = True,
) -> list[float]:
    """"lm" mode: train P only, maximising log p(suffix | prompt + prefix + alpha * P(z)) under the
    frozen policy, with z ~ p(z | e_x) drawn by ``model.sample_prior`` (the rollout's sampler) from
    the frozen prior; the posterior is not used (module docstring: P is fitted to the latents
    the rollout feeds it). ``e_x[i]`` is the condition embedding of ``pairs[i]``. Returns the
    mean suffix NLL per token per epoch.

    The context is the row's chat prompt (chat template, generation prompt) followed by the
    solution prefix, exactly what the policy has seen at a fork point.
    """
    from tqdm.auto import tqdm

    from recipe.iib_lpo.latent.reference import latent_token_embedding, score_continuation

    if any(p.prompt is None for p in pairs):
        raise ValueError("'lm' mode needs the parquet 'prompt' column (chat messages) for every row")
    hidden = policy.get_input_embeddings().weight.shape[-1]
    if hidden != model.config.policy_hidden_size:
        raise ValueError(f"policy hidden size {hidden} but CVAE policy_hidden_size={model.config.policy_hidden_size}")
    policy.eval()
    policy.requires_grad_(False)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.Adam(model.projector.parameters(), lr=lr)
    encoded = []
    for pair in pairs:
        context = tokenizer.apply_chat_template(list(pair.prompt), add_generation_prompt=True, tokenize=True)
        if not isinstance(context, list):  # transformers may return a BatchEncoding
            context = list(context["input_ids"])
        context = list(context) + tokenizer.encode(pair.prefix, add_special_tokens=False)
        suffix = tokenizer.encode(pair.target, add_special_tokens=False)[:max_suffix_tokens]
        encoded.append((context, suffix))
    history = []
    for epoch in range(epochs):
        total_nll, total_tokens = 0.0, 0
        order = torch.randperm(len(pairs), generator=generator, device=device).tolist()
        for i in tqdm(order, desc=f"P through LM {epoch + 1}/{epochs}", disable=not show_progress, leave=False):
            context, suffix = encoded[i]
            if not suffix:
                continue
            with torch.no_grad():  # the prior is frozen: only P learns here
                z = model.sample_prior(e_x[i : i + 1].to(device, torch.float32), 1, generator=generator)[0]
            latent = latent_token_embedding(model.projector, z[0], alpha)
            logprobs = score_continuation(policy, context, suffix, latent)
            nll = -logprobs.mean()
            optimizer.zero_grad(set_to_none=True)
            nll.backward()
            optimizer.step()
            total_nll += -logprobs.sum().item()
            total_tokens += len(suffix)
        mean_nll = total_nll / max(total_tokens, 1)
        history.append(mean_nll)
        logger.info("P through LM, epoch %d: suffix NLL/token %.5g", epoch + 1, mean_nll)
    return history


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipe.iib_lpo.train_cvae", description=__doc__.split("\n\n")[0])
    p.add_argument("--train-parquet", nargs="+", required=True, help="data_prep output parquet file(s)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--mode", choices=CVAE_MODES, default="fork", help="fork (default) | lars | prefix | lm")
    p.add_argument("--encoder", default="microsoft/deberta-v2-xlarge",
                   help="HF encoder id or local dir (default: deberta-v2-xlarge, as in the paper code)")
    p.add_argument("--encoder-max-length", type=int, default=512, help="tokens per text (default 512, paper code)")
    p.add_argument("--encoder-batch-size", type=int, default=32, help="texts per encoder forward (default 32)")
    p.add_argument("--encoder-truncation-side", choices=("left", "right"), default="left",
                   help="how long target texts are cut: left (default) keeps their end, right their start "
                        "(paper-code parity); conditions always keep the question and the end of the prefix")
    p.add_argument("--encoder-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="encoder precision (default float32; bfloat16 on GPU is ~free in accuracy)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available")
    policy = p.add_mutually_exclusive_group(required=True)
    policy.add_argument("--policy-model", help="policy LM dir/id: P's output width is its hidden_size ('lm' mode loads it)")
    policy.add_argument("--policy-hidden-size", type=int, help="P's output width, without reading a policy config")
    p.add_argument("--solution-key", default="solution",
                   help="extra_info field with the reference solution (default 'solution'; falls back to 'answer')")
    p.add_argument("--max-rows", type=int, default=None, help="use at most this many rows (default all)")
    p.add_argument("--cuts-per-example", type=int, default=1,
                   help="prefix/lm modes: distinct random step cuts per solution (default 1)")
    p.add_argument("--latent-dim", type=int, default=128, help="d_z (default 128: paper code's RL setting)")
    p.add_argument("--hidden-width", type=int, default=256, help="MLP width (default 256, paper code)")
    p.add_argument("--num-layers", type=int, default=3, help="linear layers per MLP (default 3, paper code)")
    p.add_argument("--projector-hidden-width", type=int, default=256, help="width of P's hidden layer (default 256)")
    p.add_argument("--projector-init-std", type=float, default=0.01,
                   help="std of P's random init (default 0.01, METHOD.md lars mode)")
    p.add_argument("--beta-kl", type=float, default=1.0, help="KL weight (default 1.0 = the paper's unweighted loss)")
    p.add_argument("--epochs", type=int, default=20, help="CVAE epochs over the pre-computed embeddings (default 20)")
    p.add_argument("--batch-size", type=int, default=64, help="CVAE batch size (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the CVAE (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of cuts, init, batching and sampling (default 0)")
    p.add_argument("--lm-alpha", type=float, default=1.0, help="lm and fork modes: alpha used while training P (default 1.0)")
    p.add_argument("--lm-epochs", type=int, default=1, help="lm mode: epochs over the lm pairs (default 1)")
    p.add_argument("--lm-lr", type=float, default=1e-3, help="lm mode: Adam learning rate of P (default 1e-3)")
    p.add_argument("--lm-max-pairs", type=int, default=2000, help="lm mode: pairs used to train P (default 2000)")
    p.add_argument("--lm-max-suffix-tokens", type=int, default=128,
                   help="lm mode: suffix tokens scored per pair (default 128)")
    fork = p.add_argument_group("fork mode (latent/fork_training.py)")
    fork.add_argument("--projector-rank", type=int, default=None,
                      help="r of P's principal-direction span (default: min(64, policy hidden) in fork mode, 0 = free "
                           "MLP otherwise)")
    fork.add_argument("--fork-temperature", type=float, default=1.0, help="sampling temperature of the own forks "
                      "and of the fork KL (default 1.0, the recipe's rollout temperature)")
    fork.add_argument("--fork-max-new-tokens", type=int, default=1024,
                      help="response length of the sampled parents (default 1024; set the rollout's response length)")
    fork.add_argument("--fork-max-continuation-tokens", type=int, default=64,
                      help="continuation tokens scored per fork (default 64)")
    fork.add_argument("--free-bits", type=float, default=0.1, help="KL floor per latent dim, nats (default 0.1)")
    fork.add_argument("--fork-kl-target", type=float, default=0.5, help="fork-KL hinge point, nats (default 0.5)")
    fork.add_argument("--hinge-weight", type=float, default=1.0, help="weight of the fork-KL hinge (default 1.0)")
    fork.add_argument("--rho", type=float, default=BranchingConfig.rho, help="fork rule: as iib_lpo.branching.rho")
    fork.add_argument("--t-min", type=int, default=BranchingConfig.t_min, help="fork rule: iib_lpo.branching.t_min")
    fork.add_argument("--t-margin", type=int, default=BranchingConfig.t_margin,
                      help="fork rule: iib_lpo.branching.t_margin")
    fork.add_argument("--fork-strategy", default=BranchingConfig.strategy,
                      help="fork rule: iib_lpo.branching.strategy (uniform | argmax)")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm bars")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from recipe.iib_lpo.latent.text_encoder import TextEncoder

    torch.manual_seed(args.seed)
    policy_model = tokenizer = None
    if args.policy_model:
        from transformers import AutoConfig

        policy_hidden = int(AutoConfig.from_pretrained(args.policy_model).hidden_size)
    else:
        if args.mode == "lm":
            raise SystemExit("--mode lm needs --policy-model (P is trained through the policy LM)")
        policy_hidden = args.policy_hidden_size

    rows, row_stats = load_training_rows(args.train_parquet, args.solution_key, args.max_rows)
    if args.mode == "fork":
        return _main_fork(args, rows, row_stats, policy_hidden)
    pairs = make_training_pairs(rows, args.mode, cuts_per_example=args.cuts_per_example, seed=args.seed)
    logger.info("%d rows -> %d (condition, target) pairs in %s mode", len(rows), len(pairs), args.mode)

    encoder = TextEncoder(
        args.encoder,
        max_length=args.encoder_max_length,
        micro_batch_size=args.encoder_batch_size,
        truncation_side=args.encoder_truncation_side,
        device=args.device,
        dtype=getattr(torch, args.encoder_dtype),
    )
    show = not args.no_progress
    e_x = encoder.encode([p.condition for p in pairs], show_progress=show)
    e_y = encoder.encode([p.target for p in pairs], show_progress=show)
    embed_dim = encoder.embed_dim
    del encoder  # free the encoder's memory before training (and before loading a policy)

    config = CVAEConfig(
        embed_dim=embed_dim,
        latent_dim=args.latent_dim,
        hidden_width=args.hidden_width,
        num_layers=args.num_layers,
        policy_hidden_size=policy_hidden,
        projector_hidden_width=args.projector_hidden_width,
        projector_init_std=args.projector_init_std,
        beta_kl=args.beta_kl,
    )
    model = LatentCVAE(config).to(args.device)
    history = train_cvae_on_embeddings(
        model, e_x, e_y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        show_progress=show,
    )
    summary = {
        "rows_used": row_stats.rows_used,
        "rows_read": row_stats.rows_read,
        "answer_fallbacks": row_stats.answer_fallbacks,
        "rows_skipped": sum(row_stats.skipped.values()),
        "pairs": len(pairs),
        "epochs": args.epochs,
        "seed": args.seed,
        "final_elbo": history[-1].elbo,
        "final_recon": history[-1].recon,
        "final_kl": history[-1].kl,
        "encoder_truncation_side": args.encoder_truncation_side,
        "encoder_max_length": args.encoder_max_length,
    }
    if args.mode == "lm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.policy_model)
        policy_model = AutoModelForCausalLM.from_pretrained(args.policy_model).to(args.device)
        n = min(len(pairs), args.lm_max_pairs)
        nll = train_projector_through_lm(
            model, policy_model, tokenizer, pairs[:n], e_x[:n], alpha=args.lm_alpha,
            epochs=args.lm_epochs, lr=args.lm_lr, max_suffix_tokens=args.lm_max_suffix_tokens,
            seed=args.seed, show_progress=show,
        )
        summary.update({"lm_pairs": n, "lm_alpha": args.lm_alpha, "lm_latent_source": "prior",
                        "lm_final_suffix_nll": nll[-1] if nll else math.nan})
    out = save_cvae_checkpoint(args.out, model, encoder_name=args.encoder, mode=args.mode,
                               train_summary=summary)
    logger.info("wrote %s (%s)", out, summary)
    return out


def _main_fork(args, rows: list[TrainingRow], row_stats: RowStats, policy_hidden: int) -> Path:
    """``--mode fork``: own forks of the frozen policy -> embeddings -> fork_training.train_fork_latent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe.iib_lpo.latent import fork_training
    from recipe.iib_lpo.latent.cvae import embedding_principal_basis
    from recipe.iib_lpo.latent.text_encoder import TextEncoder

    if not args.policy_model:
        raise SystemExit("--mode fork needs --policy-model (the latent is trained through the policy)")
    if any(r.prompt is None for r in rows):
        raise SystemExit("--mode fork needs the parquet 'prompt' column (chat messages) for every row")
    show = not args.no_progress
    branching = BranchingConfig(rho=args.rho, t_min=args.t_min, t_margin=args.t_margin, strategy=args.fork_strategy)
    loss_config = fork_training.ForkLossConfig(
        beta=args.beta_kl, free_bits=args.free_bits, fork_kl_target=args.fork_kl_target,
        hinge_weight=args.hinge_weight, alpha=args.lm_alpha, temperature=args.fork_temperature)
    tokenizer = AutoTokenizer.from_pretrained(args.policy_model)
    examples, fork_stats = fork_training.sample_own_forks(
        args.policy_model, tokenizer, [r.prompt for r in rows], [r.question for r in rows], branching,
        max_new_tokens=args.fork_max_new_tokens, temperature=args.fork_temperature,
        max_continuation_tokens=args.fork_max_continuation_tokens, seed=args.seed)
    policy = AutoModelForCausalLM.from_pretrained(args.policy_model, dtype=torch.float32).to(args.device)
    policy.requires_grad_(False)
    logger.info("%d prompts -> %d own forks (skipped %s)", fork_stats.prompts, fork_stats.forks, fork_stats.skipped)
    encoder = TextEncoder(args.encoder, max_length=args.encoder_max_length, micro_batch_size=args.encoder_batch_size,
                          truncation_side=args.encoder_truncation_side, device=args.device,
                          dtype=getattr(torch, args.encoder_dtype))
    e_x = encoder.encode([ex.condition_text for ex in examples], show_progress=show)
    e_y = encoder.encode([ex.continuation_text for ex in examples], show_progress=show)
    rank = args.projector_rank if args.projector_rank is not None else min(64, policy_hidden)
    config = CVAEConfig(
        embed_dim=encoder.embed_dim, latent_dim=args.latent_dim, hidden_width=args.hidden_width,
        num_layers=args.num_layers, policy_hidden_size=policy_hidden,
        projector_hidden_width=args.projector_hidden_width, projector_init_std=args.projector_init_std,
        beta_kl=args.beta_kl, projector_rank=rank)
    del encoder
    model = LatentCVAE(config).to(args.device)
    if rank:
        model.projector.set_basis(embedding_principal_basis(policy.get_input_embeddings().weight, rank).to(args.device))
    baseline = fork_training.plain_nll(policy, examples)
    history = fork_training.train_fork_latent(
        model, policy, examples, e_x, e_y, loss_config, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, show_progress=show)
    last = history[-1]
    summary = {
        "rows_used": row_stats.rows_used, "rows_read": row_stats.rows_read,
        "rows_skipped": sum(row_stats.skipped.values()), "forks": fork_stats.forks,
        "forks_skipped": sum(fork_stats.skipped.values()), "epochs": args.epochs, "seed": args.seed,
        "plain_nll": baseline, "final_nll": last.nll, "final_kl_per_dim": last.kl_per_dim,
        "final_fork_kl_median": last.fork_kl_median, "free_bits": args.free_bits,
        "fork_kl_target": args.fork_kl_target, "hinge_weight": args.hinge_weight, "alpha": args.lm_alpha,
        "fork_temperature": args.fork_temperature, "encoder_truncation_side": args.encoder_truncation_side,
        "encoder_max_length": args.encoder_max_length,
    }
    out = save_cvae_checkpoint(args.out, model, encoder_name=args.encoder, mode="fork",
                               train_summary=summary)
    logger.info("wrote %s: plain NLL/token %.4f -> with posterior z %.4f, KL/dim %.4f, median fork KL %.4f",
                out, baseline, last.nll, last.kl_per_dim, last.fork_kl_median)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
