"""The latent token inside vLLM 0.24 (CPU) against the transformers reference, Qwen2 and Qwen3.

One latent-token engine (+ one stock engine for the alpha = 0 comparison) per model family,
shared by every test of the module. The latent architecture is registered only through the
``vllm.general_plugins`` entry point (nothing here calls ``register()``), so engine start also
tests the plugin. Numbers the README reports (parity error, cache hits, entropy-estimate error,
overhead) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PARITY_TOL = 1e-4
TOPK = 20
BLOCK = 32  # verl_patches.vllm_latent.testing.CPU_BLOCK_SIZE


@dataclass
class Engines:
    family: str
    model_dir: object
    llm: object  # latent-token architecture
    stock: object  # stock architecture, same checkpoint
    ref: object  # transformers model
    placeholder: int
    hidden: int
    vocab: int


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def engines(request, tiny_qwen2_dir, tiny_qwen3_dir):
    from recipe.iib_lpo.demo.tiny_models import latent_placeholder_token_id
    from verl_patches.vllm_latent.testing import load_reference_model, tiny_cpu_llm

    model_dir = tiny_qwen2_dir if request.param == "qwen2" else tiny_qwen3_dir
    placeholder = latent_placeholder_token_id(model_dir)
    llm = tiny_cpu_llm(model_dir, placeholder_token_id=placeholder)
    stock = tiny_cpu_llm(model_dir, placeholder_token_id=None)
    ref = load_reference_model(model_dir)
    yield Engines(
        family=request.param,
        model_dir=model_dir,
        llm=llm,
        stock=stock,
        ref=ref,
        placeholder=placeholder,
        hidden=ref.config.hidden_size,
        vocab=ref.config.vocab_size,
    )
    del llm, stock
    gc.collect()


def _latent(seed: int, hidden: int) -> torch.Tensor:
    # Norm ~ sqrt(hidden): large against the tiny model's token embeddings (std 0.02), so the
    # latent visibly steers the continuation.
    return torch.randn(hidden, generator=torch.Generator().manual_seed(seed))


def _prompt(start: int, length: int, placeholder: int) -> list[int]:
    """Deterministic token ids in [4, 384) (ids 0-3 are special), never the placeholder."""
    ids = [4 + (start + 7 * i) % 380 for i in range(length)]
    assert placeholder not in ids
    return ids


def _params(seed: int, max_tokens: int = 12, temperature: float = 1.0, logprobs: int = TOPK):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=temperature, max_tokens=max_tokens, seed=seed, logprobs=logprobs, ignore_eos=True
    )


def _reference(e: Engines, context, continuation, latent) -> torch.Tensor:
    from recipe.iib_lpo.latent.reference import score_continuation

    with torch.no_grad():
        return score_continuation(e.ref, context, continuation, latent)


def _check_parity(e: Engines, output, context, latent) -> float:
    """Max |vLLM - reference| over the sampled tokens' log-probs of one request; asserts the tolerance."""
    from verl_patches.vllm_latent.testing import sampled_logprobs

    completion = output.outputs[0]
    got = sampled_logprobs(completion)
    want = _reference(e, context, list(completion.token_ids), latent)
    err = float((got - want).abs().max())
    assert err < PARITY_TOL, f"{e.family}: vLLM vs reference log-prob error {err:.3e}"
    return err


def test_latent_continuations_match_reference_and_depend_on_z(engines):
    from verl_patches.vllm_latent import build_latent_prompt

    e = engines
    contexts = [_prompt(11, 45, e.placeholder), _prompt(200, 70, e.placeholder)]
    latents = [_latent(1, e.hidden), _latent(2, e.hidden)]
    requests, meta = [], []
    for ctx in contexts:
        for lat in latents:
            requests.append(build_latent_prompt(ctx, lat, e.placeholder))
            meta.append((ctx, lat))
        requests.append(build_latent_prompt(ctx, None, e.placeholder))
        meta.append((ctx, None))
    # Same seed for every request: differences between the z's come from z, not from the RNG.
    outputs = e.llm.generate(requests, [_params(seed=7)] * len(requests), use_tqdm=False)
    errors = [_check_parity(e, out, ctx, lat) for out, (ctx, lat) in zip(outputs, meta)]
    print(f"\n[{e.family}] latent parity: max |logprob error| = {max(errors):.2e} over {len(errors)} requests")

    from verl_patches.vllm_latent import topk_logprobs_tensor
    from verl_patches.vllm_latent.testing import reference_logits

    for c_idx, ctx in enumerate(contexts):
        out_z1, out_z2, out_plain = outputs[3 * c_idx : 3 * c_idx + 3]
        # Different z -> a different next-token distribution right after the latent: in the
        # reference, and vLLM's returned top-k at that step is the reference's for each z.
        first_step = []
        for out, lat in ((out_z1, latents[0]), (out_z2, latents[1])):
            completion = out.outputs[0]
            ref_logprobs = torch.log_softmax(reference_logits(e.ref, ctx, list(completion.token_ids[:1]), lat)[0], -1)
            got = topk_logprobs_tensor(completion.logprobs[:1], TOPK)[0]
            assert torch.allclose(got, ref_logprobs.topk(TOPK).values, atol=PARITY_TOL)
            first_step.append(ref_logprobs)
        assert float((first_step[0] - first_step[1]).abs().max()) > 0.1
        # ...and different sampled continuations (same seed, so only z differs).
        assert out_z1.outputs[0].token_ids != out_z2.outputs[0].token_ids
        assert out_z1.outputs[0].token_ids != out_plain.outputs[0].token_ids


def test_alpha_zero_is_plain_generation(engines):
    """No latent (alpha = 0): no placeholder, same tokens and log-probs as the stock architecture."""
    from verl_patches.vllm_latent import build_latent_prompt

    e = engines
    ctx = _prompt(5, 60, e.placeholder)
    prompt = build_latent_prompt(ctx, None, e.placeholder)
    assert prompt == {"prompt_token_ids": ctx}
    ours = e.llm.generate([prompt], _params(seed=3, max_tokens=16), use_tqdm=False)[0]
    stock = e.stock.generate([prompt], _params(seed=3, max_tokens=16), use_tqdm=False)[0]
    assert ours.outputs[0].token_ids == stock.outputs[0].token_ids
    from verl_patches.vllm_latent.testing import sampled_logprobs

    assert torch.allclose(sampled_logprobs(ours.outputs[0]), sampled_logprobs(stock.outputs[0]), atol=1e-6)
    _check_parity(e, ours, ctx, None)
    # verl's vLLMHttpServer always sends a (possibly empty) multi_modal_data dict.
    verl_style = e.llm.generate(
        [{"prompt_token_ids": ctx, "multi_modal_data": {}}], _params(seed=3, max_tokens=16), use_tqdm=False
    )[0]
    assert verl_style.outputs[0].token_ids == stock.outputs[0].token_ids


def test_prefix_cache_is_shared_and_latents_never_leak(engines):
    from verl_patches.vllm_latent import LATENT_MODALITY, build_latent_prompt

    e = engines
    e.llm.reset_prefix_cache()
    ctx = _prompt(300, 70, e.placeholder)  # 2 full blocks (64 tokens) + 6
    full_prefix_blocks = (len(ctx) // BLOCK) * BLOCK
    z1, z2 = _latent(11, e.hidden), _latent(12, e.hidden)

    # The parent rollout: plain prompt, fills the cache.
    parent = e.llm.generate([build_latent_prompt(ctx, None, e.placeholder)], _params(seed=1), use_tqdm=False)[0]
    assert parent.num_cached_tokens == 0

    # Two branches with different z, submitted together: both reuse the parent's full blocks and
    # both match the reference with their own z.
    branch_1, branch_2 = e.llm.generate(
        [build_latent_prompt(ctx, z1, e.placeholder), build_latent_prompt(ctx, z2, e.placeholder)],
        [_params(seed=2)] * 2,
        use_tqdm=False,
    )
    assert branch_1.num_cached_tokens == full_prefix_blocks
    assert branch_2.num_cached_tokens == full_prefix_blocks
    _check_parity(e, branch_1, ctx, z1)
    _check_parity(e, branch_2, ctx, z2)

    # The same branch again with z1, then with z2 (identical token ids): the blocks before the fork
    # token's block are shared, the fork token's block is keyed by the latent's content hash, and
    # each request matches the reference with its own z (KV computed with z1 never serves z2).
    again_z1 = e.llm.generate([build_latent_prompt(ctx, z1, e.placeholder)], _params(seed=2), use_tqdm=False)[0]
    then_z2 = e.llm.generate([build_latent_prompt(ctx, z2, e.placeholder)], _params(seed=2), use_tqdm=False)[0]
    print(
        f"\n[{e.family}] prefix cache (block {BLOCK}): parent 0, branches "
        f"{branch_1.num_cached_tokens}/{len(ctx)}; again z1 {again_z1.num_cached_tokens}, then z2 {then_z2.num_cached_tokens}"
    )
    assert again_z1.num_cached_tokens == full_prefix_blocks and then_z2.num_cached_tokens == full_prefix_blocks
    assert again_z1.outputs[0].token_ids == branch_1.outputs[0].token_ids
    _check_parity(e, again_z1, ctx, z1)
    _check_parity(e, then_z2, ctx, z2)


def test_zero_additive_latent_is_bit_equal_to_the_plain_prompt(engines):
    """The additive latent's true zero inside the engine: v = 0 gives the plain request's tokens and
    log-probs bit for bit (same batch, same seed), and a non-zero v moves them."""
    from verl_patches.vllm_latent import build_latent_prompt
    from verl_patches.vllm_latent.testing import sampled_logprobs

    e = engines
    ctx = _prompt(9, 45, e.placeholder)
    v = _latent(5, e.hidden)
    plain, zero, moved = e.llm.generate(
        [build_latent_prompt(ctx, None, e.placeholder), build_latent_prompt(ctx, 0 * v, e.placeholder),
         build_latent_prompt(ctx, v, e.placeholder)], [_params(seed=7)] * 3, use_tqdm=False)
    assert zero.outputs[0].token_ids == plain.outputs[0].token_ids
    assert torch.equal(sampled_logprobs(zero.outputs[0]), sampled_logprobs(plain.outputs[0]))
    assert moved.outputs[0].token_ids != plain.outputs[0].token_ids
    _check_parity(e, moved, ctx, v)


def test_placeholder_in_prefix_stays_a_token_and_latent_takes_the_last(engines):
    """A policy may generate the placeholder id: inside the prefix it stays an ordinary token
    (embedded from its row, as in the reference); the latent goes on the last prompt token."""
    from verl_patches.vllm_latent import build_latent_prompt

    e = engines
    ctx = _prompt(40, 20, e.placeholder) + [e.placeholder] + _prompt(90, 15, e.placeholder)
    z = _latent(21, e.hidden)
    out = e.llm.generate([build_latent_prompt(ctx, z, e.placeholder)], _params(seed=5), use_tqdm=False)[0]
    _check_parity(e, out, ctx, z)


def test_requests_that_break_the_one_latent_contract_are_rejected(engines):
    from verl_patches.vllm_latent import LATENT_MODALITY

    e = engines
    ctx = _prompt(60, 10, e.placeholder)
    z = _latent(31, e.hidden)
    two = {"prompt_token_ids": ctx + [e.placeholder, e.placeholder], "multi_modal_data": {LATENT_MODALITY: torch.stack([z, z]).reshape(2, 1, -1)}}
    with pytest.raises(Exception, match="at most one latent"):
        e.llm.generate([two], _params(seed=0), use_tqdm=False)
    with_uuid = {
        "prompt_token_ids": ctx + [e.placeholder],
        "multi_modal_data": {LATENT_MODALITY: z.reshape(1, 1, -1)},
        "multi_modal_uuids": {LATENT_MODALITY: ["reused-id"]},
    }
    with pytest.raises(Exception, match="multi_modal_uuids"):
        e.llm.generate([with_uuid], _params(seed=0), use_tqdm=False)
    wrong_width = {"prompt_token_ids": ctx + [e.placeholder], "multi_modal_data": {LATENT_MODALITY: torch.zeros(1, 1, e.hidden + 1)}}
    with pytest.raises(Exception, match="hidden dimension"):
        e.llm.generate([wrong_width], _params(seed=0), use_tqdm=False)
    # The engine still serves valid requests afterwards.
    from verl_patches.vllm_latent import build_latent_prompt

    out = e.llm.generate([build_latent_prompt(ctx, z, e.placeholder)], _params(seed=0), use_tqdm=False)[0]
    _check_parity(e, out, ctx, z)


def _request_bytes(llm, prompt) -> int:
    """Size of the engine-core request vLLM serialises for a prompt (what crosses processes)."""
    from vllm.v1.serial_utils import MsgpackEncoder

    engine = llm.llm_engine
    request = engine.input_processor.process_inputs(
        "payload-probe", prompt, _params(seed=0), supported_tasks=engine.get_supported_tasks()
    )
    return sum(len(memoryview(buf).cast("B")) for buf in MsgpackEncoder().encode(request))


def test_payload_is_one_hidden_vector_per_request(engines):
    from verl_patches.vllm_latent import LATENT_MODALITY, build_latent_prompt

    e = engines
    z = _latent(41, e.hidden)
    extra = {}
    for length in (20, 400):
        ctx = _prompt(3, length, e.placeholder)
        latent_prompt = build_latent_prompt(ctx, z, e.placeholder)
        assert latent_prompt["multi_modal_data"][LATENT_MODALITY].numel() == e.hidden
        plain_same_length = build_latent_prompt(ctx, None, e.placeholder)
        extra[length] = _request_bytes(e.llm, latent_prompt) - _request_bytes(e.llm, plain_same_length)
    print(f"\n[{e.family}] serialized request overhead of the latent: {extra} bytes (hidden={e.hidden}, fp32)")
    # The latent adds its hidden floats plus constant metadata (hash, placeholder range), and
    # that extra does not grow with the sequence: 380 more tokens would be 380*hidden*4 bytes
    # for a full-sequence embeds prompt.
    assert 4 * e.hidden <= extra[20] < 4 * e.hidden + 2048
    assert abs(extra[400] - extra[20]) <= 64


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_sampling_logprobs_are_tempered_and_topk_entropy_error(engines, temperature):
    """processed_logprobs = log_softmax(logits / T); the top-20 entropy estimate brackets the exact one.

    T = 2.0 flattens the tiny model's peaked distributions, so the top-20 misses real tail mass.
    """
    from recipe.iib_lpo.algorithm.entropy import entropy_from_logits
    from verl_patches.vllm_latent import build_latent_prompt, topk_entropy_from_vllm_logprobs, topk_logprobs_tensor
    from verl_patches.vllm_latent.testing import reference_logits, sampled_logprobs

    e = engines
    requests, meta = [], []
    for i in range(6):
        ctx = _prompt(500 + 13 * i, 30, e.placeholder)
        lat = _latent(60 + i, e.hidden) if i % 2 == 0 else None
        requests.append(build_latent_prompt(ctx, lat, e.placeholder))
        meta.append((ctx, lat))
    outputs = e.llm.generate(
        requests, [_params(seed=i, max_tokens=16, temperature=temperature) for i in range(6)], use_tqdm=False
    )
    errors, exacts, tails = [], [], []
    for out, (ctx, lat) in zip(outputs, meta):
        completion = out.outputs[0]
        logits = reference_logits(e.ref, ctx, list(completion.token_ids), lat)
        tempered = torch.log_softmax(logits / temperature, dim=-1)
        tokens = torch.tensor(completion.token_ids)
        # The sampled token's log-prob is that of the tempered distribution, not the raw one.
        assert torch.allclose(sampled_logprobs(completion), tempered.gather(-1, tokens[:, None])[:, 0], atol=PARITY_TOL)
        assert torch.allclose(topk_logprobs_tensor(completion.logprobs, TOPK), tempered.topk(TOPK).values, atol=PARITY_TOL)
        estimate = topk_entropy_from_vllm_logprobs(completion.logprobs, TOPK, e.vocab)
        exact = entropy_from_logits(logits, temperature)
        assert bool((estimate.lower <= exact + 1e-4).all() and (exact <= estimate.upper + 1e-4).all())
        errors.append((estimate.estimate - exact).abs())
        exacts.append(exact)
        tails.append(estimate.tail_mass)
    errors, exacts, tails = torch.cat(errors), torch.cat(exacts), torch.cat(tails)
    print(
        f"\n[{e.family}] top-{TOPK} entropy estimate vs exact (T={temperature}, V={e.vocab}, {errors.numel()} tokens): "
        f"mean |err| {errors.mean():.4f} nats, max {errors.max():.4f}; exact H mean {exacts.mean():.3f}, "
        f"tail mass mean {tails.mean():.3f}"
    )


def test_load_weights_accepts_a_stock_state_dict(engines, tmp_path):
    """Policy weights sync through the inherited ``load_weights`` with stock HF names.

    verl's worker extension calls ``model.load_weights(iterable of (HF name, tensor))`` on the live
    rollout model. On CPU, vLLM packs linear weights for oneDNN after loading and drops the
    originals, so a bare second call cannot work there (for the stock class too); vLLM's
    ``reload_weights`` wraps the very same ``load_weights`` call in its layerwise-reload bracket,
    which restores the checkpoint-format parameters first. That is what runs here.
    """
    from recipe.iib_lpo.demo.tiny_models import build_tiny_model_dir
    from verl_patches.vllm_latent import build_latent_prompt
    from verl_patches.vllm_latent.testing import load_reference_model

    e = engines
    other_dir = build_tiny_model_dir(tmp_path / "other", family=e.family, seed=1)
    other = load_reference_model(other_dir)
    ctx = _prompt(77, 40, e.placeholder)
    z = _latent(71, e.hidden)

    def sync_from(model):
        state = [(name, tensor.detach().clone()) for name, tensor in model.state_dict().items()]
        assert all(not name.startswith("image") for name, _ in state)  # a stock Qwen state dict
        e.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state), "is_checkpoint_format": True})
        # vLLM 0.24's reload_weights clears only the worker's encoder cache, not the scheduler's
        # record of it; resync both (verl's direct load_weights touches neither, which is fine:
        # the latent's "encoder" is the identity, its cached output does not depend on weights).
        e.llm.llm_engine.reset_encoder_cache()
        e.llm.reset_prefix_cache()  # cached KV belongs to the old weights

    sync_from(other)
    try:
        out = e.llm.generate([build_latent_prompt(ctx, z, e.placeholder)], _params(seed=9), use_tqdm=False)[0]
        saved_ref, e.ref = e.ref, other
        try:
            _check_parity(e, out, ctx, z)  # now matches the NEW weights
        finally:
            e.ref = saved_ref
        before = _reference(e, ctx, list(out.outputs[0].token_ids), z)
        from verl_patches.vllm_latent.testing import sampled_logprobs

        assert float((sampled_logprobs(out.outputs[0]) - before).abs().max()) > 1e-2  # and not the old ones
    finally:
        sync_from(e.ref)  # restore the module's engine for the tests that follow
    out = e.llm.generate([build_latent_prompt(ctx, z, e.placeholder)], _params(seed=9), use_tqdm=False)[0]
    _check_parity(e, out, ctx, z)


def test_overhead_of_injection_vs_plain(engines):
    """Timings only (printed, not asserted; the CI machine is shared and noisy).

    32 requests x 32 tokens: latent requests vs plain requests of the same length on the latent
    engine, and plain requests on the stock engine; median of 3 interleaved runs, prefix cache
    reset before each. Also the request-side cost: vLLM input processing per request.
    """
    import statistics

    from verl_patches.vllm_latent import build_latent_prompt

    e = engines
    n_requests, n_tokens, ctx_len, reps = 32, 32, 40, 3
    params = [_params(seed=i, max_tokens=n_tokens, logprobs=None) for i in range(n_requests)]

    def prompts(with_latent: bool, offset: int):
        out = []
        for i in range(n_requests):
            ctx = _prompt(offset + 31 * i, ctx_len, e.placeholder)
            # Same prompt length either way: the plain prompt gets one ordinary token instead.
            out.append(
                build_latent_prompt(ctx, _latent(1000 + i, e.hidden), e.placeholder)
                if with_latent
                else build_latent_prompt(ctx + [ctx[0]], None, e.placeholder)
            )
        return out

    def run(llm, with_latent: bool, offset: int) -> tuple[float, float]:
        llm.reset_prefix_cache()
        batch = prompts(with_latent, offset)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(batch, params, use_tqdm=False)
        # The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so process CPU time
        # counts its work and is less sensitive than wall time to other jobs on the machine.
        elapsed = (time.perf_counter() - start_wall, time.process_time() - start_cpu)
        assert all(len(o.outputs[0].token_ids) == n_tokens for o in outs)
        return elapsed

    def input_processing_ms(with_latent: bool) -> float:
        engine = e.llm.llm_engine
        batch = prompts(with_latent, 7)
        start = time.perf_counter()
        for i, prompt in enumerate(batch):
            engine.input_processor.process_inputs(
                f"probe-{i}", prompt, params[i], supported_tasks=engine.get_supported_tasks()
            )
        return 1000 * (time.perf_counter() - start) / n_requests

    run(e.llm, True, 0)  # warm-up
    run(e.stock, False, 0)
    timings = {"latent": [], "plain": [], "stock": []}
    for rep in range(reps):
        timings["latent"].append(run(e.llm, True, 100 * rep))
        timings["plain"].append(run(e.llm, False, 100 * rep))
        timings["stock"].append(run(e.stock, False, 100 * rep))
    wall = {k: 1000 * min(w for w, _ in v) / n_requests for k, v in timings.items()}
    cpu = {k: 1000 * statistics.median(c for _, c in v) / n_requests for k, v in timings.items()}
    proc_latent, proc_plain = input_processing_ms(True), input_processing_ms(False)
    print(
        f"\n[{e.family}] {n_requests} requests x {n_tokens} tokens (prompt {ctx_len + 1}), {reps} runs each, "
        "ms per request as wall (min) / process CPU (median): "
        + ", ".join(f"{k} {wall[k]:.2f} / {cpu[k]:.2f}" for k in wall)
        + f"; latent - plain {wall['latent'] - wall['plain']:+.2f} / {cpu['latent'] - cpu['plain']:+.2f},"
        f" latent - stock {wall['latent'] - wall['stock']:+.2f} / {cpu['latent'] - cpu['stock']:+.2f};"
        f" input processing {proc_latent:.2f} vs {proc_plain:.2f} ms/request (latent vs plain)"
    )
