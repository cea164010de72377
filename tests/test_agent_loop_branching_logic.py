"""Tier 0: the branching agent loop's logic against a fake token-in/token-out server (no vLLM, no Ray).

The fake server is deterministic: its tokens, log-probs and top-k log-probs are a function of
(request seed, prompt ids, latent), and every call is recorded, so the tests can check exactly
what the loop sent (prompt + prefix + placeholder, sticky request ids, max_tokens) and what it
assembled (masks, log-prob alignment, fork points) against independently computed values.
"""

import asyncio
import math

import numpy as np
import pytest
import torch

from recipe.iib_lpo.rollout import manager
from recipe.iib_lpo.rollout.agent_loop import BranchingAgentLoop
from recipe.iib_lpo.rollout.config import BranchingRolloutConfig
from recipe.iib_lpo.rollout.layout import assemble_branch_trajectory, check_group_layout, session_role
from recipe.iib_lpo.rollout.rounds import ParentRolloutError
from recipe.iib_lpo.rollout.seeds import derived_seed
from recipe.iib_lpo.rollout.server_output import TOPK_LOGPROBS_FIELD, TOPK_TOKEN_IDS_FIELD
from recipe.iib_lpo.algorithm.branching import BranchingConfig, choose_fork_position
from recipe.iib_lpo.algorithm.entropy import estimate_entropy_from_topk
from recipe.iib_lpo.algorithm.ib import TextStats, text_stats
from recipe.iib_lpo.latent.sampler import LatentSamples
from verl.workers.rollout.replica import TokenOutput

pytestmark = pytest.mark.timeout(120)

PLACEHOLDER = 3
HIDDEN = 8
TOPK = 20
FORK_ROW_FIRST_ID = 100  # the fake's top-k token ids are 100..119 (clear of the tokenizer's special ids)
SPIKE = 13  # the response position whose sampling distribution is nearly flat (high entropy)


def _topk_rows(num_tokens: int, vocab: int, spike: int | None, tail_at_kth: bool = False) -> np.ndarray:
    """Top-k log-probs (float32 log_softmax, as vLLM) of a peaked distribution, except a
    near-uniform one at ``spike``.

    The peaked rows' other tokens decrease (-8 - 0.01 j), so the tail is strictly below the
    k-th token and its mass about a quarter of the estimator's capacity (V - k) p_k. With
    ``tail_at_kth`` they are all -8: the V - k tail tokens equal the k-th, m = (V - k) p_k
    exactly, and float32 rounding lands either side of that boundary depending on the CPU.
    """
    rows = []
    for t in range(num_tokens):
        if tail_at_kth:
            logits = torch.full((vocab,), -8.0)
        else:
            logits = -8.0 - 0.01 * torch.arange(vocab, dtype=torch.float32)
        logits[:5] = torch.tensor([4.0, 1.0, 0.5, 0.0, -1.0]) - 0.01 * (t % 7)
        if t == spike:
            logits = torch.zeros(vocab) - 0.001 * torch.arange(vocab, dtype=torch.float32)
        rows.append(torch.log_softmax(logits, -1).topk(TOPK).values.numpy())
    return np.stack(rows).astype(np.float32)


class FakeServer:
    """Stands in for verl's LLMServerClient: generate(request_id, *, prompt_ids, sampling_params, ...)."""

    def __init__(self, vocab: int, response_tokens: int = 40, fail_parent: int | None = None, short: bool = False,
                 tail_at_kth: bool = False, stop_id_in_fork_row: int | None = None):
        self.vocab = vocab
        # top-k ids: FORK_ROW_FIRST_ID + rank at every row (labels: the fake's tokens are random), one
        # replaced at the spike row
        self.stop_id_in_fork_row = stop_id_in_fork_row
        self.tail_at_kth = tail_at_kth
        self.response_tokens = response_tokens
        self.fail_prompt_calls = fail_parent
        self.short = short
        self.calls = []
        self.num_initial_calls = 0

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, num_topk_logprobs=0,
                       return_topk_token_ids=False, **kw):
        call = dict(request_id=request_id, prompt_ids=list(prompt_ids), image_data=image_data,
                    sampling_params=dict(sampling_params), num_topk_logprobs=num_topk_logprobs,
                    return_topk_token_ids=return_topk_token_ids)
        self.calls.append(call)
        is_initial = num_topk_logprobs > 0
        if is_initial:
            index = self.num_initial_calls
            self.num_initial_calls += 1
            if self.fail_prompt_calls is not None and index == self.fail_prompt_calls:
                raise RuntimeError("engine exploded")
        await asyncio.sleep(0.01)
        seed = sampling_params.get("seed")
        key = (seed if seed is not None else 0, tuple(prompt_ids),
               None if image_data is None else round(float(image_data.sum()), 5))
        rng = np.random.default_rng(abs(hash(key)) % (2**32) if seed is None else derived_seed(*key) % (2**32))
        n = 3 if (self.short and is_initial) else min(self.response_tokens, sampling_params["max_tokens"])
        tokens = [int(x) for x in rng.integers(4, self.vocab, size=n)]
        logprobs = [float(x) for x in -rng.uniform(0.1, 3.0, size=n)]
        call["returned"] = tokens
        extra = {"global_steps": 5, "min_global_steps": 5, "max_global_steps": 5, "num_cached_tokens": 0}
        if num_topk_logprobs:
            extra[TOPK_LOGPROBS_FIELD] = _topk_rows(n, self.vocab, SPIKE, self.tail_at_kth)[:, :num_topk_logprobs]
            if return_topk_token_ids:
                ids = np.tile(np.arange(num_topk_logprobs, dtype=np.int64) + FORK_ROW_FIRST_ID, (n, 1))
                if self.stop_id_in_fork_row is not None and n > SPIKE:
                    ids[SPIKE, 5] = self.stop_id_in_fork_row
                extra[TOPK_TOKEN_IDS_FIELD] = ids
        return TokenOutput(token_ids=tokens, log_probs=logprobs, stop_reason="completed", extra_fields=extra)


class FakeSampler:
    """LatentSampler stand-in: embedding[n, k] = (n + 1) * 10 + k in every coordinate; counts calls."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def sample_latent_embeddings(self, texts, num_samples, alpha, generator=None, coupling="independent"):
        self.calls.append((list(texts), num_samples, alpha))
        n = len(texts)
        base = torch.arange(n, dtype=torch.float32)[:, None] * 10 + 10 + torch.arange(num_samples)[None, :]
        emb = alpha * base[:, :, None].expand(n, num_samples, HIDDEN).clone()
        z = torch.ones(n, num_samples, 4)
        return LatentSamples(embeddings=emb, z=z, z_norms=z.norm(dim=-1), embedding_norms=emb.norm(dim=-1), alpha=alpha)


def _config(model_dir, *, M=2, K=3, n=None, mode="cvae", strategy="argmax", t_margin=8, seed=None, timeout=30.0,
            first_tokens="independent", rounds=None):
    from verl_patches.verl_cpu_testing import compose_cpu_trainer_config

    iib = {
        "num_initial_rollouts": M,
        "num_branches": K,
        "branching": {"rho": 0.05, "t_min": 1, "t_margin": t_margin, "strategy": strategy,
                      "sibling_first_tokens": first_tokens},
        "entropy": {"source": "topk", "top_k": TOPK},
        "latent": {
            "mode": mode,
            "placeholder_token_id": PLACEHOLDER,
            # every forked branch gets its latent (p_inject = 1), at embedding scale 0.5
            "schedule": {"kind": "constant", "p_init": 1.0, "p_min": 1.0, "scale": 0.5},
            "service": {"backend": "in_process", "max_batch_size": 64, "max_wait_ms": 30},
        },
        "agent_loop": {"parent_wait_timeout_s": timeout, "sampling_seed": seed},
        **({"ib": {"rounds": rounds}} if rounds is not None else {}),
    }
    return compose_cpu_trainer_config(model_dir, rollout_n=n if n is not None else M * (1 + K),
                                      response_length=48, extra={"iib_lpo": iib})


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))


async def _run_group(config, tokenizer, server, sampler, sessions=None, uid="u1", drop=()):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    BranchingAgentLoop.sampler_factory = staticmethod(lambda: sampler)
    n = config.actor_rollout_ref.rollout.n
    sessions = range(n) if sessions is None else sessions
    # data_source and extra_info.index: the row fields the loop keys its seeds on, as data_prep writes them
    kwargs = dict(raw_prompt=[{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}],
                  data_source="demo_arith",
                  extra_info={"question": "Tom has 3 apples and buys 4 more. How many?", "index": 7},
                  uid=uid, global_steps=5, index=7)
    for key in drop:
        kwargs.pop(key, None)

    async def one(session_id):
        loop = BranchingAgentLoop(
            trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tokenizer, processor=None,
            dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data), hf_model_type="qwen2",
        )
        session = {} if "session_id" in drop else {"session_id": session_id}
        return await loop.run({"temperature": 1.0, "top_p": 1.0, "logprobs": True}, **session, **kwargs)

    return await asyncio.wait_for(asyncio.gather(*[one(s) for s in sessions], return_exceptions=True), 60)


def test_session_roles_and_layout_error():
    roles = [session_role(s, 2, 3) for s in range(8)]
    assert [(r.role, r.parent_index, r.branch_index) for r in roles] == [
        ("initial", 0, -1), ("initial", 1, -1),
        ("branch", 0, 0), ("branch", 0, 1), ("branch", 0, 2),
        ("branch", 1, 0), ("branch", 1, 1), ("branch", 1, 2),
    ]
    check_group_layout(8, 2, 3)
    with pytest.raises(ValueError, match=r"rollout.n=7 .* M=2 .* K=3 .* = 8 .*divisible by 1 \+ K = 4"):
        check_group_layout(7, 2, 3)
    with pytest.raises(ValueError, match="session_id=8 outside"):
        session_role(8, 2, 3)


def test_assemble_branch_trajectory_known_answer():
    ids, mask, lps = assemble_branch_trajectory([5, 6, 7, 8], [-1.0, -2.0, -3.0, -4.0], 2, [9, 10, 11],
                                                   [-0.5, -0.6, -0.7], response_length=4)
    assert ids == [5, 6, 9, 10] and mask == [0, 0, 1, 1] and lps == [-1.0, -2.0, -0.5, -0.6]
    with pytest.raises(ValueError, match="2 log-probs for 3 continuation tokens"):
        assemble_branch_trajectory([5], None, 1, [1, 2, 3], [-1.0, -1.0], 8)


@pytest.mark.parametrize("tail_at_kth", [False, True], ids=["tail_below_kth", "tail_at_kth_boundary"])
def test_group_branches_masks_logprobs_and_sticky_ids(tiny_qwen2_dir, tokenizer, tail_at_kth):
    config = _config(tiny_qwen2_dir)
    server, sampler = FakeServer(len(tokenizer), tail_at_kth=tail_at_kth), FakeSampler()
    outputs = asyncio.run(_run_group(config, tokenizer, server, sampler))
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    initial_calls = [c for c in server.calls if c["num_topk_logprobs"]]
    branch_calls = [c for c in server.calls if not c["num_topk_logprobs"]]
    assert len(initial_calls) == 2 and len(branch_calls) == 6
    prompt_ids = outputs[0].prompt_ids
    # Fork point: recomputed independently from the fake top-k rows (argmax strategy -> the spike).
    rows = torch.as_tensor(_topk_rows(40, len(tokenizer), SPIKE, tail_at_kth))
    entropies = estimate_entropy_from_topk(rows, len(tokenizer)).estimate
    expected = choose_fork_position(entropies, BranchingConfig(rho=0.05, t_min=1, t_margin=8, strategy="argmax"))
    assert expected.position == SPIKE
    for i in range(2):
        parent = outputs[i]
        assert parent.extra_fields["iib_role"] == "initial" and parent.response_mask == [1] * 40
        assert parent.extra_fields["iib_fork_position"] == SPIKE
        assert math.isclose(parent.extra_fields["iib_fork_entropy"], float(entropies[SPIKE]), rel_tol=1e-5)
        for k in range(3):
            branch = outputs[2 + 3 * i + k]
            ef = branch.extra_fields
            assert (ef["iib_role"], ef["iib_parent_index"], ef["iib_branch_index"]) == ("branch", i, k)
            assert ef["iib_fork_position"] == SPIKE and ef["iib_prefix_length"] == SPIKE
            assert branch.prompt_ids == prompt_ids
            assert branch.response_ids[:SPIKE] == parent.response_ids[:SPIKE]
            assert branch.response_mask == [0] * SPIKE + [1] * (len(branch.response_ids) - SPIKE)
            assert branch.response_logprobs[:SPIKE] == parent.response_logprobs[:SPIKE]
            assert len(branch.response_logprobs) == len(branch.response_ids) == 48  # 13 prefix + 35 new
            assert ef["iib_generated_length"] == 48 - SPIKE
            assert ef["iib_latent_scale"] == 0.5 and ef["iib_latent_prob"] == 1.0
            assert ef["iib_latent_status"] == "injected"
            assert ef["iib_latent_sampling_s"] > 0  # the encoder + prior timer, which verl's metrics drop
    # Each branch request: parent's request id, prompt + prefix (the additive latent rides on the
    # prefix's last token: no placeholder), its own latent.
    parent_tokens = {c["request_id"]: c["returned"] for c in initial_calls}
    assert len(parent_tokens) == 2
    for c in branch_calls:
        assert c["prompt_ids"][: len(prompt_ids)] == prompt_ids and PLACEHOLDER not in c["prompt_ids"]
        assert len(c["prompt_ids"]) == len(prompt_ids) + SPIKE
        # sticky: the request id is the one of the parent whose prefix it continues
        assert c["prompt_ids"][len(prompt_ids) :] == parent_tokens[c["request_id"]][:SPIKE]
        assert c["sampling_params"]["max_tokens"] == 48 - SPIKE
        assert tuple(c["image_data"].shape) == (1, 1, HIDDEN)
    # One sampler call for both fork points (batched), K draws each, and each branch got draw k.
    assert len(sampler.calls) == 1 and sampler.calls[0][1] == 3 and len(sampler.calls[0][0]) == 2
    values = sorted({float(c["image_data"][0, 0, 0]) for c in branch_calls})
    assert values == [0.5 * v for v in (10, 11, 12, 20, 21, 22)]
    assert sampler.calls[0][0][0].startswith("Tom has 3 apples")
    # no request asks vLLM for text: nothing reads it (BENCHMARKS.md: detokenizing top-k was the main cost)
    assert all(c["sampling_params"]["detokenize"] is False for c in server.calls)
    # the IB estimator's text statistics, computed as each trajectory finished, are those of the
    # returned tokens decoded as the trainer decodes them
    question = "Tom has 3 apples and buys 4 more. How many?"
    for out in outputs:
        expected_stats = text_stats(question, tokenizer.decode(out.response_ids, skip_special_tokens=True))
        assert TextStats.from_extra_fields(out.extra_fields) == expected_stats


def test_latent_mode_none_forks_without_latent(tiny_qwen2_dir, tokenizer):
    config = _config(tiny_qwen2_dir, mode="none")
    server, sampler = FakeServer(len(tokenizer)), FakeSampler()
    outputs = asyncio.run(_run_group(config, tokenizer, server, sampler))
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    assert sampler.calls == []
    prompt_len = len(outputs[0].prompt_ids)
    for c in server.calls:
        if not c["num_topk_logprobs"]:
            assert c["image_data"] is None and len(c["prompt_ids"]) == prompt_len + SPIKE
    assert all(o.extra_fields["iib_latent_scale"] == 0.0 and o.extra_fields["iib_latent_prob"] == 0.0
               for o in outputs[2:])
    assert all(o.extra_fields["iib_latent_status"] == "disabled" for o in outputs[2:])
    assert all(math.isnan(o.extra_fields["iib_latent_norm"]) for o in outputs[2:])


def _behaviour_logprobs(row_ids, row_logprobs, tokens):
    """Closed form: sibling j's token drawn from the fork row renormalised over what siblings < j left."""
    p = {int(t): math.exp(float(v)) for t, v in zip(row_ids, row_logprobs)}
    remaining, out = sum(p.values()), []
    for t in tokens:
        out.append(math.log(p[t] / remaining))
        remaining -= p[t]
    return out


def test_distinct_first_tokens_force_each_siblings_token_at_the_fork(tiny_qwen2_dir, tokenizer):
    """sibling_first_tokens=distinct: the initial rollout asks for the top-k ids; the K siblings of a
    fork point send prompt + r[:t*] + their own token, all K distinct and from the fork row, with the
    behaviour log-prob of sampling without replacement in the response and one token less to generate."""
    config = _config(tiny_qwen2_dir, mode="none", first_tokens="distinct")
    server, sampler = FakeServer(len(tokenizer)), FakeSampler()
    outputs = asyncio.run(_run_group(config, tokenizer, server, sampler))
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    initial_calls = [c for c in server.calls if c["num_topk_logprobs"]]
    assert len(initial_calls) == 2 and all(c["return_topk_token_ids"] for c in initial_calls)
    row_ids = [FORK_ROW_FIRST_ID + j for j in range(TOPK)]
    row_lp = _topk_rows(40, len(tokenizer), SPIKE)[SPIKE]
    prompt_len = len(outputs[0].prompt_ids)
    for i in range(2):
        parent = outputs[i]
        assert parent.extra_fields["iib_first_token_forced"] is False
        siblings = [outputs[2 + 3 * i + k] for k in range(3)]
        firsts = [b.response_ids[SPIKE] for b in siblings]
        assert len(set(firsts)) == 3 and set(firsts) <= set(row_ids)
        want = _behaviour_logprobs(row_ids, row_lp, firsts)
        for b, lp in zip(siblings, want):
            assert b.extra_fields["iib_first_token_forced"] is True
            assert b.response_logprobs[SPIKE] == pytest.approx(lp, abs=1e-6)
            assert b.response_ids[:SPIKE] == parent.response_ids[:SPIKE]
            assert b.response_mask == [0] * SPIKE + [1] * (len(b.response_ids) - SPIKE)
            assert len(b.response_ids) == len(b.response_logprobs) == 48  # 13 prefix + forced + 34 generated
            assert b.extra_fields["iib_generated_length"] == 48 - SPIKE
    branch_calls = [c for c in server.calls if not c["num_topk_logprobs"]]
    assert len(branch_calls) == 6
    for c in branch_calls:
        assert len(c["prompt_ids"]) == prompt_len + SPIKE + 1 and c["sampling_params"]["max_tokens"] == 48 - SPIKE - 1
        assert not c["return_topk_token_ids"]
    # the forced token is the last prompt token of the request (what the engine continues from)
    sent = sorted(c["prompt_ids"][-1] for c in branch_calls)
    assert sent == sorted(o.response_ids[SPIKE] for o in outputs[2:])


def test_distinct_first_token_that_ends_the_sequence_generates_nothing(tiny_qwen2_dir, tokenizer):
    """K = k = 20: every token of the fork row goes to one sibling, so the stop token in it does too;
    that sibling ends at t* + 1 with no engine call."""
    eos = tokenizer.eos_token_id
    assert eos is not None
    config = _config(tiny_qwen2_dir, M=1, K=TOPK, mode="none", first_tokens="distinct")
    server = FakeServer(len(tokenizer), stop_id_in_fork_row=eos)
    outputs = asyncio.run(_run_group(config, tokenizer, server, FakeSampler()))
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    branches = outputs[1:]
    ended = [b for b in branches if b.response_ids[SPIKE] == eos]
    assert len(ended) == 1 and ended[0].response_ids == outputs[0].response_ids[:SPIKE] + [eos]
    assert ended[0].response_mask == [0] * SPIKE + [1]
    assert len([c for c in server.calls if not c["num_topk_logprobs"]]) == TOPK - 1
    assert sorted(b.response_ids[SPIKE] for b in branches) == sorted(
        [eos] + [FORK_ROW_FIRST_ID + j for j in range(TOPK) if j != 5])


def test_distinct_first_tokens_refuse_latents_and_ranked_rounds(tiny_qwen2_dir):
    with pytest.raises(ValueError, match="latent.mode=none"):
        BranchingRolloutConfig.from_trainer_config(_config(tiny_qwen2_dir, mode="cvae", first_tokens="distinct"))
    with pytest.raises(ValueError, match="rounds=1 only"):
        BranchingRolloutConfig.from_trainer_config(
            _config(tiny_qwen2_dir, mode="none", first_tokens="distinct", rounds=2, n=2 * (1 + 3 * 2)))


def test_too_short_parent_gives_flagged_plain_resamples(tiny_qwen2_dir, tokenizer):
    config = _config(tiny_qwen2_dir, M=1, K=2)
    server, sampler = FakeServer(len(tokenizer), short=True), FakeSampler()
    outputs = asyncio.run(_run_group(config, tokenizer, server, sampler))
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    assert len(outputs) == 3 and len(outputs[0].response_ids) == 3
    prompt_ids = outputs[0].prompt_ids
    for branch in outputs[1:]:
        assert branch.extra_fields["iib_fork_reason"] == "too_short"
        assert branch.extra_fields["iib_fork_position"] == -1 and branch.extra_fields["iib_prefix_length"] == 0
        assert branch.response_mask == [1] * len(branch.response_ids) and len(branch.response_ids) == 40
    for c in server.calls[1:]:
        assert c["prompt_ids"] == prompt_ids and c["image_data"] is None
    assert sampler.calls == []


def test_parent_failure_releases_its_branches_only(tiny_qwen2_dir, tokenizer):
    config = _config(tiny_qwen2_dir)
    server, sampler = FakeServer(len(tokenizer), fail_parent=0), FakeSampler()
    outputs = asyncio.run(_run_group(config, tokenizer, server, sampler))
    failed = [i for i, o in enumerate(outputs) if isinstance(o, BaseException)]
    # The first initial request to reach the server failed: that parent and its 3 branches fail.
    assert len(failed) == 4
    parent = failed[0]
    assert parent in (0, 1) and failed[1:] == [2 + 3 * parent + k for k in range(3)]
    assert isinstance(outputs[parent], RuntimeError) and "engine exploded" in str(outputs[parent])
    for i in failed[1:]:
        assert isinstance(outputs[i], ParentRolloutError) and "engine exploded" in str(outputs[i])


def test_branch_times_out_when_parent_never_runs(tiny_qwen2_dir, tokenizer):
    config = _config(tiny_qwen2_dir, M=1, K=1, timeout=0.3)
    outputs = asyncio.run(_run_group(config, tokenizer, FakeServer(len(tokenizer)), FakeSampler(), sessions=[1],
                                     uid="orphan"))
    assert isinstance(outputs[0], ParentRolloutError) and "did not finish within" in str(outputs[0])


def test_missing_session_id_is_a_clear_error(tiny_qwen2_dir, tokenizer):
    config = _config(tiny_qwen2_dir, M=1, K=1)
    outputs = asyncio.run(_run_group(config, tokenizer, FakeServer(len(tokenizer)), FakeSampler(), sessions=[0],
                                     drop=("session_id",)))
    assert isinstance(outputs[0], ValueError) and "'session_id' and 'uid'" in str(outputs[0])


def test_missing_topk_logprobs_is_a_clear_error(tiny_qwen2_dir, tokenizer):
    class PlainServer(FakeServer):
        async def generate(self, request_id, **kw):
            out = await super().generate(request_id, **kw)
            out.extra_fields.pop(TOPK_LOGPROBS_FIELD, None)
            return out

    config = _config(tiny_qwen2_dir, M=1, K=1)
    outputs = asyncio.run(_run_group(config, tokenizer, PlainServer(len(tokenizer)), FakeSampler()))
    assert isinstance(outputs[0], RuntimeError) and "rollout.name=iib_lpo_vllm" in str(outputs[0])
    assert isinstance(outputs[1], ParentRolloutError)


def test_layout_mismatch_fails_every_session(tiny_qwen2_dir, tokenizer):
    config = _config(tiny_qwen2_dir, n=6)
    outputs = asyncio.run(_run_group(config, tokenizer, FakeServer(len(tokenizer)), FakeSampler(), sessions=[0, 1]))
    assert all(isinstance(o, ValueError) and "rollout.n=6" in str(o) for o in outputs)


def test_deterministic_under_a_seed(tiny_qwen2_dir, tokenizer):
    config = _config(tiny_qwen2_dir, strategy="uniform", seed=123)

    def run():
        server = FakeServer(len(tokenizer))
        outputs = asyncio.run(_run_group(config, tokenizer, server, FakeSampler()))
        assert not [o for o in outputs if isinstance(o, BaseException)], outputs
        # every request carries its own seed, distinct per session
        assert len({c["sampling_params"]["seed"] for c in server.calls}) == len(server.calls) == 8
        return [(o.response_ids, o.response_mask, o.response_logprobs, o.extra_fields["iib_fork_position"])
                for o in outputs]

    first, second = run(), run()
    assert first == second
    assert first[0][0] != first[1][0]  # the two initial rollouts differ


def test_latent_schedule_by_global_step(tiny_qwen2_dir):
    from recipe.iib_lpo.algorithm.alpha_schedule import LatentSchedule

    cfg = BranchingRolloutConfig.from_trainer_config(_config(tiny_qwen2_dir))
    assert cfg.latent_probability(5) == 1.0 and cfg.schedule.scale == 0.5
    # verl's global step g is 1-based (schedule step g - 1): linear from 1 to 0 over 10 steps
    lin = BranchingRolloutConfig(latent_mode="cvae", placeholder_token_id=3, total_steps=10,
                                    schedule=LatentSchedule(kind="linear", p_init=1.0, p_min=0.0))
    assert lin.latent_probability(1) == 1.0 and math.isclose(lin.latent_probability(6), 0.5)
    assert lin.latent_probability(50) == 0.0
    none = BranchingRolloutConfig(latent_mode="none")
    assert none.latent_probability(3) == 0.0
    with pytest.raises(ValueError, match="total_training_steps"):
        BranchingRolloutConfig(latent_mode="cvae", placeholder_token_id=3, schedule=LatentSchedule(kind="cosine")).latent_probability(2)


def test_placeholder_in_prefix_forks_without_latent(tiny_qwen2_dir, tokenizer):
    class PlaceholderServer(FakeServer):
        async def generate(self, request_id, **kw):
            out = await super().generate(request_id, **kw)
            if kw.get("num_topk_logprobs"):
                out.token_ids[2] = PLACEHOLDER  # the policy emitted the placeholder token
            return out

    config = _config(tiny_qwen2_dir, M=1, K=2)
    server, sampler = PlaceholderServer(len(tokenizer)), FakeSampler()
    outputs = asyncio.run(_run_group(config, tokenizer, server, sampler))
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    for branch in outputs[1:]:
        assert branch.extra_fields["iib_latent_status"] == "placeholder_in_context"
        assert branch.extra_fields["iib_latent_scale"] == 0.0 and branch.extra_fields["iib_fork_position"] == SPIKE
        assert branch.response_ids[:SPIKE] == outputs[0].response_ids[:SPIKE]
    assert sampler.calls == [] and all(c["image_data"] is None for c in server.calls)


def test_manager_rejects_wrong_rollout_n_before_starting_workers(tiny_qwen2_dir):
    pytest.importorskip("transfer_queue")
    with pytest.raises(ValueError, match="rollout.n=5 does not match"):
        manager.IibLpoAgentLoopManagerTQ(config=_config(tiny_qwen2_dir, n=5), llm_client=None)
