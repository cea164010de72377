"""A plain PyTorch/transformers GRPO loop: the diagnostic and test oracle for RL through verl.

Not a second trainer (users train with verl). It answers one question: *what gain do this model, these
data, this reward and these sampling settings allow in N steps*, with nothing between the policy and
the gradient: no vLLM, no Ray, no weight sync, no FSDP. If verl's path learns less than this loop
with the same settings, the difference is in verl's path (README, "Does it learn?").

Per step, like verl's GRPO with one mini-batch and one PPO epoch: sample ``n`` responses for each
of ``prompts_per_step`` prompts (transformers sampling at the rollout temperature), score them with
the recipe's reward, GRPO advantage per group (``grpo_advantages``, equal to verl's
``compute_grpo_outcome_advantage``), recompute the sampled tokens' log-probs at the same temperature
(verl's actor divides logits by the rollout temperature too), clipped policy loss with token-mean
aggregation (``clipped_pg_loss``, equal to verl's ``compute_policy_loss_vanilla`` + ``agg_loss``),
AdamW step with gradient clipping. Every ``eval_every`` steps: sampled P@1 on a validation split.

    python -m recipe.iib_lpo.demo.reference_learner --model <hf dir> --train <parquet> --val <parquet> \\
        --steps 40 --prompts-per-step 8 --n 8 --lr 1e-4 --out ref.json [--save-model ref_model]
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from recipe.iib_lpo.demo.warmstart import chat_prompt_ids, left_pad


@dataclass(frozen=True)
class ReferenceConfig:
    """One reference run; defaults follow the CPU demo's RL settings (``demo.pipeline.DemoPlan``)."""

    steps: int = 40
    prompts_per_step: int = 8
    n: int = 8  # samples per prompt (the GRPO group)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # verl's actor optimiser default
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    temperature: float = 1.0  # rollout temperature (verl's default)
    top_p: float = 1.0
    max_new_tokens: int = 64
    adv_eps: float = 1e-6  # verl's GRPO epsilon
    seed: int = 0
    eval_every: int = 10  # 0: no intermediate evaluation
    eval_problems: int = 100
    eval_n: int = 8
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "n", "max_new_tokens", "eval_problems", "eval_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReferenceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"ReferenceConfig: lr and temperature must be > 0 and top_p in (0, 1]; got {self}")


# ------------------------------------------------------------------------------ pure functions


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) per consecutive group of ``group_size``, unbiased std, as verl's GRPO.

    Groups of one are refused (verl would keep the raw reward there)."""
    if group_size < 2:
        raise ValueError(f"GRPO needs groups of >= 2 samples, got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of {group_size} entries, got shape {tuple(rewards.shape)}")
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)  # unbiased, as torch.std in verl
    return ((groups - mean) / (std + eps)).reshape(-1)


def clipped_pg_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                    clip_ratio_c: float = 3.0) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip with dual clip, token-mean over ``mask`` (shapes [B, T]; ``advantages`` [B] or [B, T]).

    Returns (loss, {pg_clipfrac, ppo_kl}) with verl's definitions: ppo_kl = mean(old - new) over
    tokens, pg_clipfrac = share of tokens where the clipped branch is the larger loss."""
    if advantages.ndim == 1:
        advantages = advantages[:, None].expand_as(log_probs)
    mask = mask.to(log_probs.dtype)
    denom = mask.sum().clamp_min(1.0)
    neg_kl = (log_probs - old_log_probs).clamp(-20.0, 20.0)
    ratio = torch.exp(neg_kl)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(-advantages * clip_ratio_c, clip1)
    per_token = torch.where(advantages < 0, loss_dual, clip1)
    loss = (per_token * mask).sum() / denom
    clipfrac = ((loss_clipped > loss_unclipped).to(mask.dtype) * mask).sum() / denom
    ppo_kl = (-neg_kl * mask).sum() / denom
    return loss, {"pg_clipfrac": float(clipfrac.detach()), "ppo_kl": float(ppo_kl.detach())}


# ------------------------------------------------------------------------------ model glue


def sample(model, prompts: Sequence[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int,
           eos_id: int, pad_id: int) -> list[list[int]]:
    """``n`` sampled responses per prompt (token ids up to and including EOS), prompt-major order."""
    ids, mask = left_pad(prompts, pad_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                             eos_token_id=eos_id, pad_token_id=pad_id)
    responses = []
    for row in out[:, ids.shape[1]:].tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        else:
            row = [t for t in row if t != pad_id] if pad_id != eos_id else row
        responses.append(row)
    return responses


def response_log_probs(model, prompts: Sequence[list[int]], responses: Sequence[list[int]],
                       temperature: float, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(response token | prefix) at ``temperature`` ([B, T], right-padded) and the response mask.

    Prompts are left-padded and responses right-padded in one sequence, position ids from the mask."""
    p_ids, p_mask = left_pad(prompts, pad_id)
    width = max(1, max(len(r) for r in responses))
    r_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    r_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        r_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        r_mask[i, : len(r)] = 1
    ids = torch.cat([p_ids, r_ids], dim=1)
    attn = torch.cat([p_mask, r_mask], dim=1)
    positions = (attn.cumsum(dim=1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits
    start = p_ids.shape[1]
    logits = logits[:, start - 1 : -1].float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, r_ids[..., None]).squeeze(-1)
    return log_probs, r_mask


def sampled_accuracy(model, tokenizer, rows: Sequence[dict], n: int, temperature: float, top_p: float,
                     max_new_tokens: int, seed: int, batch_prompts: int = 25) -> dict:
    """Mean reward over ``n`` samples per problem (P@1) and the per-problem means (for paired s.e.)."""
    from recipe.iib_lpo.reward.score import compute_score
    from recipe.iib_lpo.demo.tiny_models import IM_END, PAD_TOKEN

    eos_id, pad_id = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    torch.manual_seed(seed)
    per_problem = []
    for i in range(0, len(rows), batch_prompts):
        chunk = rows[i : i + batch_prompts]
        responses = sample(model, [chat_prompt_ids(tokenizer, r["messages"]) for r in chunk], n, temperature, top_p,
                           max_new_tokens, eos_id, pad_id)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        for j, row in enumerate(chunk):
            scores = [compute_score(row["data_source"], t, row["answer"])["score"] for t in texts[j * n : (j + 1) * n]]
            per_problem.append(sum(scores) / n)
    return {"p_at_1": sum(per_problem) / max(1, len(per_problem)), "per_problem": per_problem}


def train(model, tokenizer, train_rows: Sequence[dict], val_rows: Sequence[dict], config: ReferenceConfig,
          log: Callable[[str], None] = print) -> dict:
    """Run the loop on ``model`` in place; returns {config, curve (per step), evals (per eval point)}."""
    from recipe.iib_lpo.reward.score import compute_score
    from recipe.iib_lpo.trainer.step_metrics import zero_variance_group_share
    from recipe.iib_lpo.demo.tiny_models import IM_END, PAD_TOKEN

    if len(train_rows) < config.prompts_per_step:
        raise ValueError(f"{len(train_rows)} training problems, fewer than prompts_per_step={config.prompts_per_step}")
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    val = list(val_rows[: config.eval_problems])

    def evaluate(step: int) -> dict:
        model.eval()
        result = sampled_accuracy(model, tokenizer, val, config.eval_n, config.eval_temperature, config.eval_top_p,
                                  config.max_new_tokens, seed=config.seed + 12345)
        log(f"  reference step {step:3d}: validation P@1 {result['p_at_1']:.1%} on {len(val)} problems")
        return {"step": step, **result}

    evals = [evaluate(0)] if config.eval_every else []
    order: list[int] = []
    curve = []
    for step in range(1, config.steps + 1):
        started = time.perf_counter()
        if len(order) < config.prompts_per_step:
            more = list(range(len(train_rows)))
            rng.shuffle(more)
            order += more
        batch = [train_rows[order.pop()] for _ in range(config.prompts_per_step)]
        prompts = [chat_prompt_ids(tokenizer, r["messages"]) for r in batch]
        model.eval()
        responses = sample(model, prompts, config.n, config.temperature, config.top_p, config.max_new_tokens,
                           eos_id, pad_id)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards = torch.tensor([compute_score(batch[i // config.n]["data_source"], t, batch[i // config.n]["answer"])["score"]
                                for i, t in enumerate(texts)], dtype=torch.float32)
        advantages = grpo_advantages(rewards, config.n, config.adv_eps)
        model.train()
        expanded = [p for p in prompts for _ in range(config.n)]
        log_probs, mask = response_log_probs(model, expanded, responses, config.temperature, pad_id)
        loss, stats = clipped_pg_loss(log_probs, log_probs.detach(), advantages, mask, config.clip_low, config.clip_high)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
        optimizer.step()
        entropy_proxy = float(-(log_probs.detach() * mask).sum() / mask.sum())  # mean NLL of the samples
        record = {"step": step, "reward": float(rewards.mean()), "pg_loss": float(loss.detach()), "grad_norm": grad_norm,
                  "zero_variance_share": zero_variance_group_share(rewards.tolist(), [i // config.n for i in range(len(rewards))]), "sample_nll": entropy_proxy,
                  "response_length": float(mask.sum(dim=1).float().mean()), "seconds": time.perf_counter() - started,
                  **stats}
        curve.append(record)
        if step % 5 == 0 or step == config.steps:
            recent = curve[-5:]
            log(f"  reference step {step:3d}/{config.steps}: reward {sum(r['reward'] for r in recent) / len(recent):.3f} "
                f"(last 5)  zero-variance groups {record['zero_variance_share']:.2f}  grad norm {grad_norm:.2f}  "
                f"{record['seconds']:.1f} s/step")
        if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            evals.append(evaluate(step))
    model.eval()
    return {"config": asdict(config), "curve": curve, "evals": evals}


def paired_gain(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean of after - before over problems and its standard error."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError("paired_gain needs two equally long lists of >= 2 per-problem values")
    from recipe.iib_lpo.demo.report import mean_and_stderr

    return mean_and_stderr([b - a for a, b in zip(before, after)])


def main(argv: list[str] | None = None) -> int:
    import argparse

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe.iib_lpo.demo.warmstart import read_problem_rows, training_threads

    defaults = ReferenceConfig()
    parser = argparse.ArgumentParser(prog="python -m recipe.iib_lpo.demo.reference_learner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model folder (e.g. the demo's warm start)")
    parser.add_argument("--train", required=True, help="training parquet (data_prep layout)")
    parser.add_argument("--val", required=True, help="validation parquet (never the held-out split)")
    parser.add_argument("--out", required=True, help="JSON file for the curve and the evaluations")
    for name in ("steps", "prompts_per_step", "n", "max_new_tokens", "eval_every", "eval_problems", "eval_n", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "temperature", "top_p", "clip_low", "clip_high", "grad_clip", "weight_decay"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the idle cores)")
    parser.add_argument("--save-model", default="", help="HF folder for the trained policy (to evaluate it with "
                        "python -m recipe.iib_lpo.eval run, the same measurement as verl's checkpoints)")
    args = parser.parse_args(argv)
    config = ReferenceConfig(**{k: getattr(args, k) for k in ReferenceConfig.__dataclass_fields__ if hasattr(args, k)})
    torch.set_num_threads(args.threads or training_threads())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    result = train(model, tokenizer, read_problem_rows(args.train), read_problem_rows(args.val), config)
    if len(result["evals"]) >= 2:
        gain, se = paired_gain(result["evals"][0]["per_problem"], result["evals"][-1]["per_problem"])
        result["validation_gain"] = {"diff": gain, "se": se}
        print(f"validation P@1 {result['evals'][0]['p_at_1']:.1%} -> {result['evals'][-1]['p_at_1']:.1%}: "
              f"{gain:+.1%} (s.e. {se:.1%})")
    if args.save_model:
        model.save_pretrained(args.save_model)
        tokenizer.save_pretrained(args.save_model)
        result["model_path"] = str(Path(args.save_model).resolve())
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
