"""Tier 0: iterative IB rounds (``iib_lpo.ib.rounds`` = R > 1) of the branching agent loop, against a
fake token-in/token-out server (no vLLM, no Ray).

The fake server knows nothing about rounds: its tokens, log-probs and top-k rows are functions of
the request (seed, prompt), every call is recorded, and the tests compute what the loop must have
done independently (session layout, fork points from the top-k rows, the survivor from the reward
and ``ngram_ib_score``) and compare it with what the loop sent and assembled.

Controls: ``agent_loop.sampling_seed`` is set, so every request carries the per-session seed
``session_seeds(..).sampling``; the test asks the server to put a marker token into the
continuation of chosen sessions, and the (patched, counting) reward gives 1 exactly to responses
whose continuation holds a marker. So the test decides which branch of each round is correct, and
with beta = 1 dominating S_IB it is the survivor the next round must fork from.
"""

import asyncio
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recipe.iib_lpo.rollout import in_loop_reward
from recipe.iib_lpo.rollout.agent_loop import BranchingAgentLoop
from recipe.iib_lpo.rollout.config import BranchingRolloutConfig
from recipe.iib_lpo.rollout.layout import SessionRole, check_group_layout, group_size, session_id_of, session_role
from recipe.iib_lpo.rollout.rounds import ParentRolloutError, survivor_fork_decision
from recipe.iib_lpo.rollout.seeds import derived_seed, fork_seeds, prompt_seed_key, session_seeds
from recipe.iib_lpo.rollout.server_output import TOPK_LOGPROBS_FIELD
from recipe.iib_lpo.algorithm.branching import BranchingConfig, choose_fork_position
from recipe.iib_lpo.algorithm.entropy import estimate_entropy_from_topk
from recipe.iib_lpo.algorithm.ib import IBConfig, IBInputs, TextStats, ngram_ib_score, score_trajectories, trajectory_ib_inputs
from recipe.iib_lpo.algorithm.ib_step import ROW_BRANCH, ROW_RESAMPLE, iib_lpo_step, round_keep_and_survivor, row_role
from recipe.iib_lpo.latent.sampler import LatentSamples
from verl.workers.rollout.replica import TokenOutput

pytestmark = pytest.mark.timeout(180)

PLACEHOLDER = 3
HIDDEN = 8
TOPK = 20
SPIKE = 13  # position (from the start of each generated continuation) of the one near-flat distribution
RESPONSE_LENGTH = 64
QUESTION = "Tom has 3 apples and buys 4 more. How many?"
SAMPLING_SEED = 123
ROLLOUT_SEED = 0  # compose_cpu_trainer_config's actor_rollout_ref.rollout.seed
MARKER_IDS = (101, 102, 103)  # tokens only "correct" continuations contain


def _topk_rows(num_tokens: int, vocab: int) -> np.ndarray:
    rows = []
    for t in range(num_tokens):
        logits = -8.0 - 0.01 * torch.arange(vocab, dtype=torch.float32)
        logits[:5] = torch.tensor([4.0, 1.0, 0.5, 0.0, -1.0])
        if t == SPIKE:
            logits = -0.001 * torch.arange(vocab, dtype=torch.float32)
        rows.append(torch.log_softmax(logits, -1).topk(TOPK).values.numpy())
    return np.stack(rows).astype(np.float32)


class FakeServer:
    """Deterministic stand-in for verl's LLMServerClient; records every call.

    ``correct``: sampling seeds whose continuation gets the marker tokens; ``short``: seeds whose
    continuation is 4 tokens; ``fail``: seeds whose request raises.
    """

    def __init__(self, vocab: int, correct=(), short=(), fail=()):
        self.vocab = vocab
        self.correct, self.short, self.fail = set(correct), set(short), set(fail)
        self.calls = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, num_topk_logprobs=0, **kw):
        seed = sampling_params.get("seed")
        call = dict(request_id=request_id, prompt_ids=list(prompt_ids), image_data=image_data, seed=seed,
                    sampling_params=dict(sampling_params), num_topk_logprobs=num_topk_logprobs, index=len(self.calls))
        self.calls.append(call)
        await asyncio.sleep(0.005)
        if seed in self.fail:
            raise RuntimeError(f"engine exploded on seed {seed}")
        rng = np.random.default_rng(derived_seed(seed, tuple(prompt_ids)) % (2**32))
        n = sampling_params["max_tokens"]
        if seed in self.short:
            n = min(n, 4)
        tokens = [int(x) for x in rng.integers(200, self.vocab, size=n)]  # never a marker, never special
        if seed in self.correct:
            tokens[-len(MARKER_IDS):] = list(MARKER_IDS)
        # unique per call and position: alignment of inherited log-probs is checkable at any depth
        logprobs = [-(call["index"] + 1) - t / 1000.0 for t in range(n)]
        call["returned"], call["logprobs"] = tokens, logprobs
        extra = {"min_global_steps": 5, "max_global_steps": 5, "num_cached_tokens": 0}
        if num_topk_logprobs:
            extra[TOPK_LOGPROBS_FIELD] = _topk_rows(n, self.vocab)[:, :num_topk_logprobs]
        return TokenOutput(token_ids=tokens, log_probs=logprobs, stop_reason="completed", extra_fields=extra)


class FakeSampler:
    """embedding[n, k] = alpha * (10 * (n + 1) + k) in every coordinate; records calls."""

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


class CountingReward:
    """The in-loop reward: 1 iff the response holds the marker text; counts calls per response."""

    def __init__(self, tokenizer):
        self.marker = tokenizer.decode(list(MARKER_IDS), skip_special_tokens=True)
        assert self.marker.strip()
        self.calls = []

    def __call__(self, data_source, solution_str, ground_truth, extra_info=None, **kw):
        self.calls.append(dict(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth,
                               extra_info=extra_info))
        return {"score": 1.0 if self.marker in solution_str else 0.0, "acc": self.marker in solution_str}

    def score(self, text):
        return 1.0 if self.marker in text else 0.0


def _config(model_dir, *, M=1, K=3, R=2, mode="cvae", estimator="ngram", top_n=None, timeout=30.0, n=None):
    from verl_patches.verl_cpu_testing import compose_cpu_trainer_config

    iib = {
        "num_initial_rollouts": M,
        "num_branches": K,
        "branching": {"rho": 0.05, "t_min": 1, "t_margin": 8, "strategy": "argmax"},
        "entropy": {"source": "topk", "top_k": TOPK},
        "latent": {
            "mode": mode,
            "placeholder_token_id": PLACEHOLDER,
            "schedule": {"kind": "constant", "p_init": 1.0, "p_min": 0.0, "scale": 0.5},
            "service": {"backend": "in_process", "max_batch_size": 64, "max_wait_ms": 30},
        },
        "agent_loop": {"parent_wait_timeout_s": timeout, "sampling_seed": SAMPLING_SEED},
        "ib": {"rounds": R, "estimator": estimator, "top_n": top_n},
    }
    return compose_cpu_trainer_config(model_dir, rollout_n=n if n is not None else M * (1 + K * R),
                                      response_length=RESPONSE_LENGTH, extra={"iib_lpo": iib})


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))


def _row(uid="u1"):
    return dict(raw_prompt=[{"role": "user", "content": QUESTION}], extra_info={"question": QUESTION, "index": 7},
                uid=uid, global_steps=5, index=7, data_source="demo_arith",
                reward_model={"ground_truth": "7", "style": "rule"})


def _seed(session, M, K, R, row=None):
    role = session_role(session, M, K, R)
    return session_seeds(prompt_seed_key(row or _row()), 5, role, ROLLOUT_SEED, SAMPLING_SEED).sampling


def _run(config, tokenizer, server, reward, monkeypatch, sessions=None, row=None):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    sampler = FakeSampler()
    BranchingAgentLoop.sampler_factory = staticmethod(lambda: sampler)
    monkeypatch.setattr(in_loop_reward, "load_reward_function", lambda config: reward)
    row = row or _row()

    async def one(session_id):
        loop = BranchingAgentLoop(
            trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tokenizer, processor=None,
            dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data), hf_model_type="qwen2",
        )
        return await loop.run({"temperature": 1.0, "top_p": 1.0, "logprobs": True}, session_id=session_id, **row)

    async def group():
        n = config.actor_rollout_ref.rollout.n
        return await asyncio.wait_for(
            asyncio.gather(*[one(s) for s in (range(n) if sessions is None else sessions)], return_exceptions=True), 60)

    return asyncio.run(group()), sampler


def _expected_fork(num_generated: int, vocab: int) -> int:
    """The fork point inside a continuation of ``num_generated`` tokens, from the fake top-k rows."""
    from recipe.iib_lpo.algorithm.entropy import estimate_entropy_from_topk

    rows = torch.as_tensor(_topk_rows(num_generated, vocab)[:, :TOPK])
    decision = choose_fork_position(estimate_entropy_from_topk(rows, vocab).estimate,
                                    BranchingConfig(rho=0.05, t_min=1, t_margin=8, strategy="argmax"))
    return decision.position


# ----------------------------------------------------------------------------------------------
# Layout: a pure function with its inverse
# ----------------------------------------------------------------------------------------------


def test_session_roles_for_two_rounds():
    roles = [session_role(s, 2, 2, 2) for s in range(10)]
    assert [(r.role, r.parent_index, r.round_index, r.branch_index) for r in roles] == [
        ("initial", 0, 0, -1), ("initial", 1, 0, -1),
        ("branch", 0, 1, 0), ("branch", 0, 1, 1), ("branch", 0, 2, 0), ("branch", 0, 2, 1),
        ("branch", 1, 1, 0), ("branch", 1, 1, 1), ("branch", 1, 2, 0), ("branch", 1, 2, 1),
    ]


@pytest.mark.parametrize("M, K, R", [(1, 1, 1), (2, 3, 1), (1, 2, 2), (2, 3, 2), (3, 2, 3), (2, 0, 1), (1, 4, 5)])
def test_session_role_is_a_bijection_and_r1_is_the_single_round_layout(M, K, R):
    n = group_size(M, K, R)
    assert n == M * (1 + K * R)
    check_group_layout(n, M, K, R)
    roles = [session_role(s, M, K, R) for s in range(n)]
    assert [session_id_of(r, M, K, R) for r in roles] == list(range(n))
    assert len({(r.parent_index, r.round_index, r.branch_index) for r in roles}) == n
    for i in range(M):
        for r in range(1, R + 1):
            assert sorted(x.branch_index for x in roles if x.parent_index == i and x.round_index == r) == list(range(K))
    if R == 1:
        assert [(r.role, r.parent_index, r.branch_index) for r in roles] == [
            (r.role, r.parent_index, r.branch_index) for r in (session_role(s, M, K) for s in range(n))]


def test_layout_errors_name_the_rounds():
    with pytest.raises(ValueError, match=r"rollout.n=8 .* M=2 .* K=3 branches x R=2 rounds\) = 14 .*1 \+ K x R = 7"):
        check_group_layout(8, 2, 3, 2)
    with pytest.raises(ValueError, match="ib.rounds must be an int >= 1"):
        check_group_layout(2, 2, 3, 0)
    with pytest.raises(ValueError, match=r"session_id=5 outside \[0, 5\) for M=1, K=2, R=2"):
        session_role(5, 1, 2, 2)


def test_round_one_seeds_are_the_single_round_seeds_and_later_rounds_differ():
    key = prompt_seed_key(_row())
    for s in range(1 + 3):
        one = session_seeds(key, 5, session_role(s, 1, 3), 42, 1)
        two = session_seeds(key, 5, session_role(s, 1, 3, 2), 42, 1)
        assert one == two
    r1 = session_seeds(key, 5, session_role(1, 1, 3, 2), 42, 1)
    r2 = session_seeds(key, 5, session_role(4, 1, 3, 2), 42, 1)  # branch 0 of round 2
    assert session_role(4, 1, 3, 2).round_index == 2
    assert len({r1.fork, r2.fork}) == len({r1.latent, r2.latent}) == len({r1.inject, r2.inject}) == 2
    assert r1.sampling != r2.sampling
    assert (r2.fork, r2.latent) == fork_seeds(key, 5, 0, 2, 42)


def test_survivor_fork_decision_stays_inside_the_continuation():
    ent = torch.zeros(40)
    ent[5] = 9.0  # a high entropy inside the inherited prefix must not be chosen
    ent[20 + 6] = 3.0  # the continuation is 20 tokens: window [1, 12) after the prefix
    ent[20 + 15] = 5.0  # inside the last t_margin tokens: not a candidate
    cfg = BranchingConfig(rho=0.05, t_min=1, t_margin=8, strategy="argmax")
    d = survivor_fork_decision(ent, 20, cfg, seed=None)
    assert d.position == 26 and d.entropy == 3.0 and d.candidates == (26,) and d.num_tokens == 40
    uniform = survivor_fork_decision(ent, 20, BranchingConfig(rho=1.0, strategy="uniform"), seed=7)
    assert 21 <= uniform.position < 32
    short = survivor_fork_decision(ent, 35, cfg, seed=None)
    assert not short.should_fork and short.reason == "too_short"


def test_round_keep_and_survivor_known_answer():
    keep, best = round_keep_and_survivor(torch.tensor([0.1, 0.7, 0.7, -0.2]), None, 1)
    assert keep == [False, True, True, False] and best == 1  # top ceil(4/2) = 2, tie -> lower index
    keep, best = round_keep_and_survivor(torch.tensor([0.5, 0.2, 0.9]), 1, 2)
    assert keep == [False, False, True] and best == 2


def test_rounds_config_refusals():
    from verl_patches.verl_cpu_testing import compose_cpu_trainer_config  # noqa: F401 (config composition below)

    def parse(**ib):
        base = OmegaConf.create({"iib_lpo": {"num_initial_rollouts": 1, "num_branches": 2,
                                             "latent": {"mode": "none"}, "ib": ib}})
        return BranchingRolloutConfig.from_trainer_config(base)

    assert parse(rounds=2).rounds == 2 and parse(rounds=2).group_size == 5
    with pytest.raises(ValueError, match=r"rounds=2 with iib_lpo.ib.estimator='ibro'.*z\(r_v\) over the whole"):
        parse(rounds=2, estimator="ibro")
    with pytest.raises(ValueError, match="top_n=0: no branch survives"):
        parse(rounds=3, top_n=0)
    assert parse(rounds=1, estimator="ibro").rounds == 1  # single round: the trainer scores ibro as before
    assert parse(rounds=2, estimator="entropy").ib.estimator == "entropy"


# ----------------------------------------------------------------------------------------------
# The loop: survivors, masks and log-probs at depth 2 and 3, rewards once per trajectory
# ----------------------------------------------------------------------------------------------


def _by_session(outputs):
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    return {i: o for i, o in enumerate(outputs)}


@pytest.mark.parametrize("mode", ["cvae", "none"])
def test_three_rounds_fork_the_chosen_survivor_with_aligned_masks_and_logprobs(tiny_qwen2_dir, tokenizer,
                                                                                monkeypatch, mode):
    M, K, R = 1, 3, 3
    config = _config(tiny_qwen2_dir, M=M, K=K, R=R, mode=mode)
    # round 1: branch 1 is correct; round 2: branch 2; round 3: branch 0 (unranked: the trainer's job)
    sid = {(r, k): session_id_of(SessionRole("branch", 0, k, r), M, K, R) for r in (1, 2, 3) for k in range(K)}
    winners = {1: 1, 2: 2}
    server = FakeServer(len(tokenizer), correct=[_seed(sid[(r, k)], M, K, R) for r, k in winners.items()]
                        + [_seed(sid[(3, 0)], M, K, R)])
    reward = CountingReward(tokenizer)
    outputs, sampler = _run(config, tokenizer, server, reward, monkeypatch)
    out = _by_session(outputs)
    assert len(out) == 1 + K * R == 10
    initial = out[0]
    prompt_ids = initial.prompt_ids
    init_call = next(c for c in server.calls if c["prompt_ids"] == prompt_ids)
    assert initial.response_ids == init_call["returned"] and len(initial.response_ids) == RESPONSE_LENGTH

    # fork points, computed independently: SPIKE inside each continuation
    vocab = len(tokenizer)
    t1 = _expected_fork(RESPONSE_LENGTH, vocab)
    t2 = t1 + _expected_fork(RESPONSE_LENGTH - t1, vocab)
    t3 = t2 + _expected_fork(RESPONSE_LENGTH - t2, vocab)
    assert (t1, t2, t3) == (SPIKE, 2 * SPIKE, 3 * SPIKE)
    fork_at = {1: t1, 2: t2, 3: t3}
    source_of = {1: initial, 2: out[sid[(1, winners[1])]], 3: out[sid[(2, winners[2])]]}
    source_sid = {1: 0, 2: sid[(1, winners[1])], 3: sid[(2, winners[2])]}

    calls_by_seed = {c["seed"]: c for c in server.calls}
    for r in (1, 2, 3):
        t = fork_at[r]
        for k in range(K):
            b = out[sid[(r, k)]]
            ef = b.extra_fields
            assert (ef["iib_round"], ef["iib_parent_index"], ef["iib_branch_index"]) == (r, 0, k)
            assert ef["iib_fork_source"] == source_sid[r] and ef["iib_fork_position"] == t
            assert ef["iib_fork_source_length"] == RESPONSE_LENGTH and not ef["iib_is_resample"]
            assert ef["iib_prefix_length"] == t and ef["iib_generated_length"] == RESPONSE_LENGTH - t
            # inherited prefix: the source's tokens, mask 0 on ALL of it, the ancestors' log-probs
            assert b.response_ids[:t] == source_of[r].response_ids[:t]
            assert b.response_mask == [0] * t + [1] * (RESPONSE_LENGTH - t)
            assert b.response_logprobs[:t] == source_of[r].response_logprobs[:t]
            call = calls_by_seed[_seed(sid[(r, k)], M, K, R)]
            assert b.response_ids[t:] == call["returned"] and b.response_logprobs[t:] == call["logprobs"]
            # request: exactly prompt + prefix (an additive latent rides on its last token), the
            # lineage's sticky id, top-k iff ranked
            assert call["prompt_ids"] == prompt_ids + source_of[r].response_ids[:t]
            assert call["request_id"] == init_call["request_id"]
            assert call["sampling_params"]["max_tokens"] == RESPONSE_LENGTH - t
            assert (call["num_topk_logprobs"] == TOPK) == (r < R)
            if mode == "cvae":
                assert call["image_data"] is not None and ef["iib_latent_status"] == "injected"
            else:
                assert call["image_data"] is None and ef["iib_latent_status"] == "disabled"
    # depth 3: every position's log-prob comes from the call that generated it (initial, survivor 1,
    # survivor 2, own continuation)
    deep = out[sid[(3, 1)]]
    generators = [init_call] + [calls_by_seed[_seed(sid[(r, k)], M, K, R)] for r, k in ((1, 1), (2, 2), (3, 1))]
    starts = [0, t1, t2, t3]  # where each generator's own tokens start in the response
    ends = [t1, t2, t3, RESPONSE_LENGTH]  # and where the next fork cut them
    for g, a, b in zip(generators, starts, ends):
        assert deep.response_logprobs[a:b] == g["logprobs"][: b - a]
        assert deep.response_ids[a:b] == g["returned"][: b - a]

    # the rollout's decisions: ranked rounds 1..R-1 carry keep + reward + score; round R none
    top_n = math.ceil(K / 2)
    for r in (1, 2):
        branches = [out[sid[(r, k)]] for k in range(K)]
        texts = [tokenizer.decode(b.response_ids, skip_special_tokens=True) for b in branches]
        expected_scores = [ngram_ib_score(QUESTION, t, reward.score(t), RESPONSE_LENGTH, RESPONSE_LENGTH)
                           for t in texts]
        keep, best = round_keep_and_survivor(torch.tensor(expected_scores), None, r)
        assert best == winners[r] and sum(keep) == top_n
        for k, b in enumerate(branches):
            ef = b.extra_fields
            assert ef["iib_loop_keep"] == int(keep[k])
            assert ef["iib_loop_reward"] == reward.score(texts[k])
            assert ef["iib_loop_ib_score"] == pytest.approx(expected_scores[k], abs=1e-6)
    for k in range(K):
        ef = out[sid[(3, k)]].extra_fields
        assert ef["iib_loop_keep"] == -1 and math.isnan(ef["iib_loop_reward"])
    assert initial.extra_fields["iib_round"] == 0 and initial.extra_fields["iib_fork_source"] == -1

    # rewards: exactly once per ranked trajectory, with the row's ground truth, never for others
    ranked_texts = sorted(tokenizer.decode(out[sid[(r, k)]].response_ids, skip_special_tokens=True)
                          for r in (1, 2) for k in range(K))
    assert sorted(c["solution_str"] for c in reward.calls) == ranked_texts
    assert all(c["ground_truth"] == "7" and c["data_source"] == "demo_arith" for c in reward.calls)
    # latents: one request per fork point, conditioned on question + that round's prefix
    if mode == "cvae":
        from recipe.iib_lpo.latent.sampler import build_condition_text

        conditions = [text for call in sampler.calls for text in call[0]]
        assert all(call[1] == K for call in sampler.calls)
        assert sorted(conditions) == sorted(
            build_condition_text(QUESTION, tokenizer.decode(source_of[r].response_ids[: fork_at[r]],
                                                            skip_special_tokens=True)) for r in (1, 2, 3))
    else:
        assert sampler.calls == []


def test_the_trainer_keeps_what_the_rollout_chose_and_its_recomputation_agrees(tiny_qwen2_dir, tokenizer,
                                                                               monkeypatch):
    M, K, R = 2, 3, 2
    config = _config(tiny_qwen2_dir, M=M, K=K, R=R)
    correct = [_seed(s, M, K, R) for s in (3, 4, 8, 12)]  # a mix: rounds and parents differ
    server = FakeServer(len(tokenizer), correct=correct)
    reward = CountingReward(tokenizer)
    outputs, _ = _run(config, tokenizer, server, reward, monkeypatch)
    out = _by_session(outputs)
    roles = [row_role("u1", s, out[s].extra_fields) for s in range(len(out))]
    texts = [tokenizer.decode(out[s].response_ids, skip_special_tokens=True) for s in range(len(out))]
    trajs = [IBInputs(QUESTION, t, reward.score(t), len(out[s].response_ids), RESPONSE_LENGTH)
             for s, t in enumerate(texts)]
    mask = torch.tensor([out[s].response_mask for s in range(len(out))], dtype=torch.float32)
    # the batch order of the trainer is not the session order: shuffle it
    perm = list(reversed(range(len(out))))
    result = iib_lpo_step([trajs[i] for i in perm], [roles[i] for i in perm], mask[perm], IBConfig(), 0.5)
    keep = {perm[j]: bool(result.keep[j]) for j in range(len(perm))}
    recomputed = {perm[j]: bool(result.recomputed_keep[j]) for j in range(len(perm))}
    ranked = [s for s in range(len(out)) if roles[s].round_index == 1]
    assert len(ranked) == M * K and all(roles[s].loop_keep is not None for s in ranked)
    for s in ranked:
        assert keep[s] == recomputed[s] == roles[s].loop_keep
    # every round-2 branch's fork source is kept, and so is its source's source (the initial rollout)
    for s, o in out.items():
        if roles[s].round_index == 2 and roles[s].kind == ROW_BRANCH:
            src = o.extra_fields["iib_fork_source"]
            assert keep[src] and roles[src].round_index == 1
            assert keep[out[src].extra_fields["iib_fork_source"]]
    # the final round was ranked by the trainer: ceil(K/2) per parent
    for i in range(M):
        assert sum(keep[s] for s in range(len(out)) if roles[s].round_index == 2 and roles[s].parent_index == i) == 2


def test_entropy_estimator_ranks_rounds_with_engine_entropies(tiny_qwen2_dir, tokenizer, monkeypatch):
    config = _config(tiny_qwen2_dir, M=1, K=2, R=2, estimator="entropy")
    server = FakeServer(len(tokenizer), correct=[_seed(2, 1, 2, 2)])
    outputs, _ = _run(config, tokenizer, server, CountingReward(tokenizer), monkeypatch)
    out = _by_session(outputs)
    assert [out[s].extra_fields["iib_loop_keep"] for s in (1, 2)] == [0, 1]  # ceil(2/2) = 1 kept: the correct one
    assert out[3].extra_fields["iib_fork_source"] == 2 and out[4].extra_fields["iib_fork_source"] == 2
    # S_IB in closed form, over each round-1 branch's OWN tokens: its continuation after the inherited
    # prefix r_0[:t*] (t* = SPIKE). The fake engine's entropies are position functions of each call's
    # generated tokens, so the prefix's are the initial's first t* rows, the continuation's its own.
    vocab, cfg = len(tokenizer), IBConfig(estimator="entropy")
    fork = SPIKE
    cont = estimate_entropy_from_topk(torch.as_tensor(_topk_rows(RESPONSE_LENGTH - fork, vocab)), vocab).estimate
    prefix = estimate_entropy_from_topk(torch.as_tensor(_topk_rows(fork, vocab)), vocab).estimate
    reward = CountingReward(tokenizer)
    for s in (1, 2):
        ef = out[s].extra_fields
        assert ef["iib_prefix_length"] == fork and len(out[s].response_ids) == RESPONSE_LENGTH
        r_v = reward.score(tokenizer.decode(out[s].response_ids, skip_special_tokens=True))
        length_term = cfg.w_len * min(1.0, RESPONSE_LENGTH / RESPONSE_LENGTH)
        own = cfg.beta * r_v - (cfg.w_ent * min(1.0, float(cont.mean()) / cfg.entropy_ref) + length_term)
        with_prefix = cfg.beta * r_v - (cfg.w_ent * min(1.0, float(torch.cat([prefix, cont]).mean()) / cfg.entropy_ref)
                                        + length_term)
        assert abs(own - with_prefix) > 1e-3  # the two averages are told apart by this check
        assert ef["iib_loop_ib_score"] == pytest.approx(own, abs=1e-5)
        # the trainer scores the same row the same way: its whole-response entropy row, cut by the row's role
        row = row_role("u", s, ef)
        trainer_side = trajectory_ib_inputs(question=QUESTION, reward=r_v, num_tokens=RESPONSE_LENGTH,
                                            max_tokens=RESPONSE_LENGTH, prefix_length=row.prefix_length,
                                            text_stats=TextStats.from_extra_fields(ef),
                                            entropies=torch.cat([prefix, cont]))
        assert float(score_trajectories([trainer_side], cfg)[0]) == pytest.approx(ef["iib_loop_ib_score"], abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Rules: too short, failure, timeout -- nothing hangs
# ----------------------------------------------------------------------------------------------


def test_survivor_too_short_makes_the_next_round_flagged_resamples(tiny_qwen2_dir, tokenizer, monkeypatch):
    M, K, R = 1, 2, 3
    config = _config(tiny_qwen2_dir, M=M, K=K, R=R)
    # round 1: both branches stop after 4 tokens; branch 1 is "correct" (survivor) but cannot be forked
    server = FakeServer(len(tokenizer), short=[_seed(1, M, K, R), _seed(2, M, K, R)], correct=[_seed(2, M, K, R)])
    reward = CountingReward(tokenizer)
    outputs, _ = _run(config, tokenizer, server, reward, monkeypatch)
    out = _by_session(outputs)
    prompt_ids = out[0].prompt_ids
    assert [out[s].extra_fields["iib_loop_keep"] for s in (1, 2)] == [0, 1]
    assert len(reward.calls) == 2  # round 1 only: rounds 2 and 3 are resamples, not ranked
    for s in (3, 4, 5, 6):  # rounds 2 and 3
        ef = out[s].extra_fields
        assert ef["iib_is_resample"] and ef["iib_fork_reason"] == "too_short" and ef["iib_fork_source"] == -1
        assert ef["iib_round"] == (2 if s < 5 else 3) and ef["iib_loop_keep"] == -1
        assert out[s].response_mask == [1] * len(out[s].response_ids) == [1] * RESPONSE_LENGTH
        assert row_role("u", s, ef).kind == ROW_RESAMPLE
    for c in server.calls:
        if c["seed"] in {_seed(s, M, K, R) for s in (3, 4, 5, 6)}:
            assert c["prompt_ids"] == prompt_ids and c["image_data"] is None and c["num_topk_logprobs"] == 0


def test_parent_too_short_resamples_every_round_without_rewards(tiny_qwen2_dir, tokenizer, monkeypatch):
    config = _config(tiny_qwen2_dir, M=1, K=2, R=2)
    server = FakeServer(len(tokenizer), short=[_seed(0, 1, 2, 2)])
    reward = CountingReward(tokenizer)
    outputs, sampler = _run(config, tokenizer, server, reward, monkeypatch)
    out = _by_session(outputs)
    assert len(out[0].response_ids) == 4
    assert all(out[s].extra_fields["iib_is_resample"] and out[s].extra_fields["iib_fork_reason"] == "too_short"
               for s in range(1, 5))
    assert [out[s].extra_fields["iib_round"] for s in range(1, 5)] == [1, 1, 2, 2]
    assert reward.calls == [] and sampler.calls == []


def test_a_failed_branch_fails_its_round_and_the_later_rounds_of_its_lineage_only(tiny_qwen2_dir, tokenizer,
                                                                                   monkeypatch):
    M, K, R = 2, 2, 3
    config = _config(tiny_qwen2_dir, M=M, K=K, R=R)
    bad = session_id_of(SessionRole("branch", 1, 0, 2), M, K, R)  # parent 1, round 2, branch 0
    server = FakeServer(len(tokenizer), fail=[_seed(bad, M, K, R)])
    outputs, _ = _run(config, tokenizer, server, CountingReward(tokenizer), monkeypatch)
    roles = [session_role(s, M, K, R) for s in range(len(outputs))]
    for s, (o, r) in enumerate(zip(outputs, roles)):
        if s == bad:
            assert isinstance(o, RuntimeError) and "engine exploded" in str(o)
        elif r.parent_index == 1 and r.round_index >= 2:
            assert isinstance(o, ParentRolloutError), (s, o)
            assert f"branch 0 (session {bad})" in str(o) and "engine exploded" in str(o)
        else:  # parent 0's lineage, parent 1 and its round 1 are unaffected
            assert not isinstance(o, BaseException), (s, o)


def test_waits_are_bounded(tiny_qwen2_dir, tokenizer, monkeypatch):
    M, K, R = 1, 2, 2
    config = _config(tiny_qwen2_dir, M=M, K=K, R=R, timeout=0.3)
    server = FakeServer(len(tokenizer))
    # a round-2 branch alone: its survivor is never chosen
    outputs, _ = _run(config, tokenizer, server, CountingReward(tokenizer), monkeypatch, sessions=[3],
                      row=_row("orphan-2"))
    assert isinstance(outputs[0], ParentRolloutError) and "was not chosen within 0.6s" in str(outputs[0])
    # the initial and one of round 1's two branches: the other branch never reports
    outputs, _ = _run(config, tokenizer, server, CountingReward(tokenizer), monkeypatch, sessions=[0, 1],
                      row=_row("orphan-1"))
    assert not isinstance(outputs[0], BaseException)
    assert isinstance(outputs[1], ParentRolloutError) and "did not finish within" in str(outputs[1])


def test_layout_mismatch_fails_every_session(tiny_qwen2_dir, tokenizer, monkeypatch):
    config = _config(tiny_qwen2_dir, M=1, K=2, R=2, n=3)
    outputs, _ = _run(config, tokenizer, FakeServer(len(tokenizer)), CountingReward(tokenizer), monkeypatch)
    assert all(isinstance(o, ValueError) and "R=2 rounds) = 5" in str(o) for o in outputs)


def test_a_row_without_ground_truth_is_a_clear_error_for_ranked_rounds(tiny_qwen2_dir, tokenizer, monkeypatch):
    config = _config(tiny_qwen2_dir, M=1, K=1, R=2)
    row = _row("no-gt")
    row.pop("reward_model")
    outputs, _ = _run(config, tokenizer, FakeServer(len(tokenizer)), CountingReward(tokenizer), monkeypatch, row=row)
    assert isinstance(outputs[1], ValueError) and "reward_model.ground_truth" in str(outputs[1])
    assert isinstance(outputs[2], ParentRolloutError)
