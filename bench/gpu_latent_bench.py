"""GPU measurements of the latent token and the latent service (issue 11, "GPU"), torch + transformers only.

    python bench/gpu_latent_bench.py --out $OUT/gpu_latent_bench.json      # on a lent GPU (H100/H200)
    python bench/gpu_latent_bench.py --tiny --out /tmp/gpu_tiny.json       # the same code, tiny shapes, CPU

Needs no vLLM, Ray, verl, download or data: every model is built from a config with random
weights (seeded). Imports from this repository only ``recipe.iib_lpo.latent.reference``,
``recipe.iib_lpo.latent.cvae`` and ``recipe.iib_lpo.latent.text_encoder.mean_pool`` (torch-only modules).

Sections (each writes its figures and its peak memory into one JSON; ``--sections`` picks some):

1. ``precision`` -- a Qwen2.5-7B-shaped model (28 layers, hidden 3584, GQA 28/4, vocab 152064) in
   fp32 and a bf16 copy of the same weights. A continuation is sampled by the fp32 model after
   context + latent token (``latent.reference.generate_with_latent``, latent = P(z) of a random
   CVAE projector, z ~ N(0, I)), then scored by both with ``latent.reference.score_continuation``:
   |log p_bf16 - log p_fp32| per token (max / mean / p99) and KL(fp32 || bf16) of the next-token
   distributions, with the latent and, for comparison, for the same tokens without it; plus the
   latent's own effect in fp32 (|log p with - without|) as the scale the precision error is
   compared with.
2. ``generation`` -- bf16 decoding throughput of K branches of one shared context with and without
   the latent token (``latent.reference.generate_with_latents_batched``: context prefill once, then
   one batched latent step, then decoding), and the forward passes / positions each variant runs
   (counted with a forward hook): the latent adds exactly one position per branch.
3. ``encoder`` -- encoder + prior throughput at the rollout's batch sizes (fork points per latent
   service call: 8 ... 64 = max_batch_size): a DeBERTa-v2-xlarge-shaped encoder (24 layers, hidden
   1536, random weights, bf16 on GPU) on condition texts of S tokens (random ids: tokenization is
   CPU work, not measured), mean pooling, the CVAE prior (K = 3 draws per fork point) and P to the
   policy width (3584), as ``LatentSampler.sample_latent_embeddings`` does.

Timings are medians of ``--repeats`` runs after a warm-up, synchronised on CUDA. Peak memory is
``torch.cuda.max_memory_allocated`` per section (reset at its start); on CPU it is not reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

SECTIONS = ("precision", "generation", "encoder")

# Qwen/Qwen2.5-7B config.json (sizes only; no download)
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY_QWEN = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
# microsoft/deberta-v2-xlarge config.json (sizes only)
DEBERTA_V2_XLARGE = dict(vocab_size=128100, hidden_size=1536, num_hidden_layers=24, num_attention_heads=24,
                         intermediate_size=6144, max_position_embeddings=512, relative_attention=True,
                         position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                         pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
                         layer_norm_eps=1e-7, max_relative_positions=-1, hidden_act="gelu")
TINY_DEBERTA = dict(DEBERTA_V2_XLARGE, vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=128, position_buckets=32)




# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, list[float], object]:
    """(median seconds, all seconds, last result) of ``repeats`` calls after one warm-up call."""
    result = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


@contextlib.contextmanager
def _peak_memory(device: torch.device, into: dict, key: str = "peak_memory_gib"):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        if device.type == "cuda":
            into[key] = torch.cuda.max_memory_allocated(device) / 2**30


def _from_config(auto_cls, config, dtype: torch.dtype, device: torch.device, attn: str | None = "sdpa"):
    """A random-weight model built directly on ``device`` (transformers 4.x and 5.x)."""
    kwargs = {"attn_implementation": attn} if attn else {}
    with torch.device(device):
        try:
            model = auto_cls.from_config(config, dtype=dtype, **kwargs)
        except TypeError:
            model = auto_cls.from_config(config, torch_dtype=dtype, **kwargs)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_policy(tiny: bool, device: torch.device, seed: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**(TINY_QWEN if tiny else QWEN25_7B))
    torch.manual_seed(seed)
    return _from_config(AutoModelForCausalLM, config, torch.float32, device)


def build_projector(hidden: int, seed: int, device: torch.device):
    from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE

    torch.manual_seed(seed)
    cvae = LatentCVAE(CVAEConfig(policy_hidden_size=hidden, projector_init_std=0.5 if hidden <= 256 else 0.05))
    return cvae.to(device).eval().requires_grad_(False)


class ForwardCounter:
    """Counts the policy's forward calls and the positions (tokens) they process."""

    def __init__(self, model):
        self.calls = 0
        self.positions = 0
        self._handle = model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        x = embeds if embeds is not None else ids
        self.calls += 1
        self.positions += int(x.shape[0] * x.shape[1])

    def reset(self):
        self.calls, self.positions = 0, 0

    def close(self):
        self._handle.remove()


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------


def section_precision(policy_fp32, device, args) -> tuple[dict, object]:
    """bf16 vs fp32 log-probs of latent branches (module docstring, 1). Returns (figures, bf16 model)."""
    from recipe.iib_lpo.latent.reference import (continuation_logits, generate_with_latent,
                                                 latent_token_embedding, score_continuation)

    out: dict = {}
    with _peak_memory(device, out):
        policy_bf16 = copy.deepcopy(policy_fp32).to(torch.bfloat16)
        hidden = policy_fp32.config.hidden_size
        vocab = policy_fp32.config.vocab_size
        cvae = build_projector(hidden, args.seed, device)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        rows = []
        for i in range(args.precision_samples):
            context = torch.randint(0, vocab, (args.context_len,), generator=gen, device=device).tolist()
            z = torch.randn(cvae.config.latent_dim, generator=gen, device=device)
            latent = latent_token_embedding(cvae.projector, z, 1.0).to(torch.float32)
            cont, _ = generate_with_latent(policy_fp32, context, latent, args.continuation_len, temperature=1.0,
                                           generator=gen)
            with torch.no_grad():
                lp32 = score_continuation(policy_fp32, context, cont, latent)
                lp16 = score_continuation(policy_bf16, context, cont, latent)
                lp32_plain = score_continuation(policy_fp32, context, cont, None)
                lp16_plain = score_continuation(policy_bf16, context, cont, None)
                kl = _kl(continuation_logits(policy_fp32, context, cont, latent),
                         continuation_logits(policy_bf16, context, cont, latent))
                kl_plain = _kl(continuation_logits(policy_fp32, context, cont, None),
                               continuation_logits(policy_bf16, context, cont, None))
            d = (lp16 - lp32).abs()
            d_plain = (lp16_plain - lp32_plain).abs()
            effect = (lp32 - lp32_plain).abs()
            rows.append({
                "latent_norm": float(latent.norm()),
                "abs_diff_max": float(d.max()), "abs_diff_mean": float(d.mean()),
                "abs_diff_p99": float(torch.quantile(d.float(), 0.99)),
                "abs_diff_first8_mean": float(d[:8].mean()),
                "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                "plain_abs_diff_max": float(d_plain.max()), "plain_abs_diff_mean": float(d_plain.mean()),
                "plain_kl_mean": float(kl_plain.mean()),
                "latent_effect_fp32_mean": float(effect.mean()), "latent_effect_fp32_first8_mean":
                    float(effect[:8].mean()),
                "sum_logprob_abs_diff": float((lp16.sum() - lp32.sum()).abs()),
                "num_tokens": len(cont),
            })
        out["samples"] = rows
        for key in ("abs_diff_max", "abs_diff_mean", "abs_diff_p99", "kl_mean", "kl_max", "plain_abs_diff_max",
                    "plain_abs_diff_mean", "plain_kl_mean", "latent_effect_fp32_mean", "sum_logprob_abs_diff"):
            out[key] = statistics.mean(r[key] for r in rows)
        out["abs_diff_max_over_samples"] = max(r["abs_diff_max"] for r in rows)
        out["context_len"], out["continuation_len"] = args.context_len, args.continuation_len
    return out, policy_bf16


def _kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits_p.float(), -1)
    lq = torch.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def section_generation(policy, device, args) -> dict:
    """Decoding throughput with / without the latent token, and the forward work each runs."""
    from recipe.iib_lpo.latent.reference import generate_with_latents_batched, latent_token_embedding

    out: dict = {"rows": {}}
    hidden = policy.config.hidden_size
    vocab = policy.config.vocab_size
    cvae = build_projector(hidden, args.seed, device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    context = torch.randint(0, vocab, (args.context_len,), generator=gen, device=device).tolist()
    counter = ForwardCounter(policy)
    try:
        for batch in args.gen_batches:
            z = torch.randn(batch, cvae.config.latent_dim, generator=gen, device=device)
            latents = latent_token_embedding(cvae.projector, z, 1.0).to(torch.float32)
            row: dict = {}
            with _peak_memory(device, row):
                for name, lat in (("with_latent", latents), ("without_latent", None)):
                    def run(lat=lat):
                        g = torch.Generator(device=device).manual_seed(args.seed)
                        return generate_with_latents_batched(policy, context, lat, args.new_tokens,
                                                             temperature=1.0, generator=g, num_samples=batch)
                    seconds, all_s, result = _timed(run, device, args.repeats)
                    counter.reset()
                    run()
                    generated = sum(len(ids) for ids, _ in result)
                    row[name] = {"seconds": seconds, "all_seconds": all_s, "generated_tokens": generated,
                                 "tokens_per_s": generated / seconds, "forward_calls": counter.calls,
                                 "forward_positions": counter.positions}
            w, wo = row["with_latent"], row["without_latent"]
            row["extra_forward_calls"] = w["forward_calls"] - wo["forward_calls"]
            row["extra_positions"] = w["forward_positions"] - wo["forward_positions"]
            row["slowdown"] = w["seconds"] / wo["seconds"]
            out["rows"][str(batch)] = row
    finally:
        counter.close()
    out["context_len"], out["new_tokens"], out["dtype"] = args.context_len, args.new_tokens, str(policy.dtype)
    return out


def section_encoder(device, args) -> dict:
    """Encoder + prior + P throughput at the latent service's batch sizes (module docstring, 3)."""
    from transformers import AutoModel, DebertaV2Config

    from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE
    from recipe.iib_lpo.latent.reference import latent_token_embedding
    from recipe.iib_lpo.latent.text_encoder import mean_pool

    out: dict = {"rows": []}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with _peak_memory(device, out, "model_memory_gib"):
        torch.manual_seed(args.seed)
        encoder = _from_config(AutoModel, DebertaV2Config(**(TINY_DEBERTA if args.tiny else DEBERTA_V2_XLARGE)),
                               dtype, device, attn=None)  # DeBERTa has its own (eager) attention only
        policy_hidden = (TINY_QWEN if args.tiny else QWEN25_7B)["hidden_size"]
        embed_dim = encoder.config.hidden_size
        cvae = LatentCVAE(CVAEConfig(embed_dim=embed_dim, policy_hidden_size=policy_hidden)).to(device).eval()
    vocab = encoder.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for seq_len in args.encoder_seq_lens:
        for batch in args.encoder_batches:
            ids = torch.randint(5, vocab, (batch, seq_len), generator=gen, device=device)
            mask = torch.ones_like(ids)

            @torch.no_grad()
            def run(ids=ids, mask=mask, batch=batch):
                hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                e_x = mean_pool(hidden, mask).to(torch.float32)
                z = cvae.sample_prior(e_x, args.num_branches, generator=None)
                return latent_token_embedding(cvae.projector, z, 1.0)

            row: dict = {"seq_len": seq_len, "batch": batch}
            with _peak_memory(device, row):
                seconds, all_s, emb = _timed(run, device, args.repeats)
            assert emb.shape == (batch, args.num_branches, policy_hidden)
            row.update({"seconds": seconds, "all_seconds": all_s, "ms_per_fork_point": 1000 * seconds / batch,
                        "fork_points_per_s": batch / seconds, "encoder_tokens_per_s": batch * seq_len / seconds})
            out["rows"].append(row)
    out["encoder_dtype"] = str(dtype)
    out["encoder_params_m"] = sum(p.numel() for p in encoder.parameters()) / 1e6
    return out


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ["OUT"]) / "gpu_latent_bench.json" if os.environ.get("OUT") else \
        REPO_ROOT / "outputs" / "bench" / "gpu_latent_bench.json"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (runs on CPU in seconds)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--context-len", type=int, default=None, help="prompt + prefix tokens before the fork")
    parser.add_argument("--continuation-len", type=int, default=None)
    parser.add_argument("--precision-samples", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--gen-batches", type=_ints, default=None, help="branches decoded together, e.g. 3,24")
    parser.add_argument("--encoder-batches", type=_ints, default=None, help="fork points per call, e.g. 8,16,32,64")
    parser.add_argument("--encoder-seq-lens", type=_ints, default=None)
    parser.add_argument("--num-branches", type=int, default=3, help="K latent draws per fork point")
    args = parser.parse_args(argv)
    small = args.tiny
    defaults = dict(repeats=1 if small else 3, context_len=48 if small else 512,
                    continuation_len=16 if small else 256, precision_samples=2 if small else 4,
                    new_tokens=8 if small else 128, gen_batches=[3] if small else [3, 24],
                    encoder_batches=[2, 4] if small else [8, 16, 32, 64],
                    encoder_seq_lens=[32] if small else [256, 512])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    import transformers

    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": small, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k != "out"}, "sections": {},
    }
    started = time.perf_counter()
    policy = policy_bf16 = None
    if "precision" in sections or "generation" in sections:
        t = time.perf_counter()
        policy = build_policy(small, device, args.seed)
        result["policy_build_s"] = time.perf_counter() - t
        result["policy_params_b"] = sum(p.numel() for p in policy.parameters()) / 1e9
    if "precision" in sections:
        result["sections"]["precision"], policy_bf16 = section_precision(policy, device, args)
        _write(args.out, result)
    if "generation" in sections:
        if policy_bf16 is None:
            policy_bf16 = copy.deepcopy(policy).to(torch.bfloat16)
        del policy  # free the fp32 copy before decoding
        policy = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        gen_model = policy_bf16 if device.type == "cuda" or not small else policy_bf16.float()
        result["sections"]["generation"] = section_generation(gen_model, device, args)
        _write(args.out, result)
    del policy, policy_bf16
    if "encoder" in sections:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["sections"]["encoder"] = section_encoder(device, args)
    if device.type == "cuda":
        result["peak_memory_gib_total"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["wall_s"] = time.perf_counter() - started
    _write(args.out, result)
    print(json.dumps(_headline(result), indent=2))
    return 0


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))


def _headline(result: dict) -> dict:
    """The figures BENCHMARKS.md quotes."""
    s = result["sections"]
    out = {k: result.get(k) for k in ("date", "device_name", "torch", "transformers", "tiny", "wall_s",
                                      "peak_memory_gib_total")}
    if "precision" in s:
        p = s["precision"]
        out["precision"] = {k: p[k] for k in ("abs_diff_mean", "abs_diff_max_over_samples", "kl_mean",
                                               "plain_abs_diff_mean", "plain_kl_mean", "latent_effect_fp32_mean")}
    if "generation" in s:
        out["generation"] = {b: {"tokens_per_s_with": r["with_latent"]["tokens_per_s"],
                                 "tokens_per_s_without": r["without_latent"]["tokens_per_s"],
                                 "slowdown": r["slowdown"], "extra_forward_calls": r["extra_forward_calls"],
                                 "extra_positions": r["extra_positions"]} for b, r in s["generation"]["rows"].items()}
    if "encoder" in s:
        out["encoder"] = [{k: r[k] for k in ("seq_len", "batch", "ms_per_fork_point", "fork_points_per_s")}
                          for r in s["encoder"]["rows"]]
    return out


if __name__ == "__main__":
    sys.exit(main())
