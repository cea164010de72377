"""How far the latent moves a branch's next-token distribution at the fork, over the latent schedule.

    python -m recipe.iib_lpo.demo.measure_latent_kl [--num-prompts 32] [--num-latents 8] [--out DIR]

For each of ``--num-prompts`` demo problems (data_prep.demo) the tiny random Qwen2
(tiny_models) samples a response; the fork point t* is chosen from its exact entropies with the
default BranchingConfig; ``--num-latents`` latents are drawn from the CVAE prior on question +
prefix (LatentSampler with a tiny encoder and a freshly initialised CVAE, i.e. the random "lars"
projector, or ``--cvae-checkpoint``). For each (prefix, z) the reference implementation
(latent_reference) gives the next-token distribution at the fork with the latent token
(q) and without it (p); the statistic is KL(p || q) in nats, at temperature 1.

Two schedules, evaluated at 0, 25, 50, 75 and 100 % of ``--total-steps``:
* new (LatentSchedule defaults): a branch gets the latent with probability p_inject(step) at the
  constant scale; a branch without it IS the plain model (KL 0), so the expected per-branch KL
  is p_inject(step) * KL_injected(scale). "drawn" is the mean over the actual per-branch
  Bernoulli draws (draw_latent_injection on derived seeds), a check of that mixture.
* old (the former alpha schedule, cosine 1.0 -> 0.1 on the embedding scale): every branch
  injected, KL_injected(alpha(step)).

Prints a markdown table and writes it with the raw numbers to ``--out``/latent_kl.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
OLD_ALPHA_INIT, OLD_ALPHA_MIN = 1.0, 0.1  # the former AlphaSchedule defaults (cosine)


def old_cosine_alpha(step: int, total_steps: int) -> float:
    """The former default alpha schedule: cosine from 1.0 to 0.1 on the embedding scale."""
    progress = min(step, total_steps) / total_steps
    return OLD_ALPHA_MIN + (OLD_ALPHA_INIT - OLD_ALPHA_MIN) * 0.5 * (1.0 + math.cos(math.pi * progress))


def next_token_logprobs(model, context_ids: list[int], latent: torch.Tensor | None) -> torch.Tensor:
    """log p(next token | context [+ latent token]) [V], from the reference forward pass. The latent is
    an INSERTED token: this diagnostic documents what the inserted token's scale did (README,
    "Latent schedule: measured effect"); the additive latent's scale is tested in
    tests/test_latent_reference_alpha_scale.py."""
    from recipe.iib_lpo.latent.reference import continuation_logits

    # The logits row of the first continuation token depends only on what precedes it, so any
    # token id works as the dummy continuation.
    return torch.log_softmax(continuation_logits(model, context_ids, [0], latent, "inserted")[0], dim=-1)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p || q) in nats from two log-probability vectors."""
    return float((logp.exp() * (logp - logq)).sum())


@torch.no_grad()
def fork_points(
    model, tokenizer, questions: list[str], max_new_tokens: int, seed: int
) -> list[tuple[str, list[int], list[int]]]:
    """(question, prompt ids, prefix r[:t*]) per question: a sampled response cut at its fork point."""
    from data_prep.prompt_template import build_chat_prompt
    from recipe.iib_lpo.algorithm.branching import BranchingConfig, choose_fork_position
    from recipe.iib_lpo.algorithm.entropy import entropy_from_logits
    from recipe.iib_lpo.latent.reference import continuation_logits, generate_with_latent

    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, question in enumerate(questions):
        prompt = tokenizer.apply_chat_template(build_chat_prompt(question), add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
        for attempt in range(8):
            response, _ = generate_with_latent(model, prompt, None, max_new_tokens, temperature=1.0,
                                               generator=generator)
            entropies = entropy_from_logits(continuation_logits(model, prompt, response, None))
            decision = choose_fork_position(entropies, BranchingConfig(), seed=seed * 100_000 + i * 10 + attempt)
            if decision.should_fork:
                out.append((question, prompt, response[: decision.position]))
                break
        else:
            raise RuntimeError(f"no forkable response for question {i} in 8 samples")
    return out


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.demo import make_demo_problems
    from recipe.iib_lpo.rollout.seeds import derived_seed
    from recipe.iib_lpo.algorithm.alpha_schedule import LatentSchedule, draw_latent_injection
    from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE
    from recipe.iib_lpo.latent.sampler import LatentSampler, build_condition_text
    from recipe.iib_lpo.latent.text_encoder import TextEncoder, build_tiny_encoder_dir
    from recipe.iib_lpo.demo.tiny_models import build_tiny_model_dir

    out_dir = Path(args.out)
    model_dir = build_tiny_model_dir(out_dir / "tiny_qwen2", family="qwen2", seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if args.cvae_checkpoint:
        sampler = LatentSampler.from_checkpoint(args.cvae_checkpoint,
                                                expected_policy_hidden_size=model.config.hidden_size)
        projector = f"checkpoint {args.cvae_checkpoint}"
    else:
        encoder = TextEncoder(str(build_tiny_encoder_dir(out_dir / "tiny_encoder", seed=args.seed)))
        torch.manual_seed(args.seed)
        cvae = LatentCVAE(CVAEConfig(embed_dim=int(encoder.embed_dim), latent_dim=16, hidden_width=64,
                                     policy_hidden_size=model.config.hidden_size, projector_hidden_width=64,
                                     projector_init_std=args.projector_init_std))
        sampler = LatentSampler(encoder, cvae)
        projector = f"random (init std {args.projector_init_std})"

    schedule = LatentSchedule()
    steps = [round(f * args.total_steps) for f in FRACTIONS]
    old_alphas = [old_cosine_alpha(s, args.total_steps) for s in steps]
    scales = sorted(set(old_alphas) | {schedule.scale})

    questions = [p["question"] for p in make_demo_problems(args.num_prompts, seed=args.seed)]
    forks = fork_points(model, tokenizer, questions, args.max_new_tokens, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    # kl[scale][i][k]: prompt i, latent k
    kl = {a: [] for a in scales}
    for question, prompt, prefix in forks:
        condition = build_condition_text(question, tokenizer.decode(prefix, skip_special_tokens=True))
        unit = sampler.sample_latent_embeddings([condition], args.num_latents, 1.0, generator=generator).embeddings[0]
        plain = next_token_logprobs(model, prompt + prefix, None)
        for a in scales:  # alpha * P(z) is linear in alpha: the same z at every scale
            kl[a].append([kl_divergence(plain, next_token_logprobs(model, prompt + prefix, a * unit[k]))
                          for k in range(args.num_latents)])

    def mean(values):
        flat = [v for row in values for v in row]
        return sum(flat) / len(flat)

    injected = mean(kl[schedule.scale])
    rows = []
    for fraction, step, alpha in zip(FRACTIONS, steps, old_alphas):
        p = schedule.p_inject(step, args.total_steps)
        # what the rollout does: one Bernoulli(p) draw per branch on a derived seed
        drawn = mean([[kl[schedule.scale][i][k]
                       if draw_latent_injection(p, derived_seed("measure", args.seed, step, i, k)) else 0.0
                       for k in range(args.num_latents)] for i in range(len(forks))])
        rows.append({"fraction": fraction, "step": step, "p_inject": p, "kl_injected": injected,
                     "kl_expected": p * injected, "kl_drawn": drawn, "old_alpha": alpha, "old_kl": mean(kl[alpha])})
    return {
        "model": "tiny random Qwen2 (tiny_models.build_tiny_model_dir)", "projector": projector,
        "num_prompts": len(forks), "num_latents": args.num_latents, "total_steps": args.total_steps,
        "schedule": dataclasses.asdict(schedule), "seed": args.seed,
        "mean_prefix_tokens": sum(len(f[2]) for f in forks) / len(forks), "rows": rows,
    }


def markdown_table(result: dict) -> str:
    """The README table: step, p_inject, injected KL, expected (drawn) KL per branch, old alpha and KL."""
    lines = [
        "| step | p_inject (new) | KL of an injected branch | expected KL per branch = p x KL (drawn) "
        "| old alpha | old KL (every branch) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['step']} | {r['p_inject']:.3f} | {r['kl_injected']:.3f} | {r['kl_expected']:.3f} "
            f"({r['kl_drawn']:.3f}) | {r['old_alpha']:.3f} | {r['old_kl']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/latent_kl", help="work/output directory (default outputs/latent_kl)")
    parser.add_argument("--num-prompts", type=int, default=32, help="demo problems = fork points (default 32)")
    parser.add_argument("--num-latents", type=int, default=8, help="latents z per fork point (default 8)")
    parser.add_argument("--total-steps", type=int, default=100, help="training steps of the schedule (default 100)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="length of the sampled responses (default 48)")
    parser.add_argument("--projector-init-std", type=float, default=0.01,
                        help="init std of the random projector P (default 0.01, CVAEConfig's 'lars' default)")
    parser.add_argument("--cvae-checkpoint", default=None,
                        help="a train_cvae checkpoint for the tiny model's hidden size instead of the random CVAE")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = measure(args)
    table = markdown_table(result)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latent_kl.json").write_text(json.dumps({**result, "table": table}, indent=1))
    print(f"{result['num_prompts']} fork points x {result['num_latents']} latents, projector {result['projector']}, "
          f"mean prefix {result['mean_prefix_tokens']:.1f} tokens; KL(plain || latent) in nats at the fork:")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
