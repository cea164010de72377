"""Tier 0: the latent schedule's per-branch draw, resamples of too-short parents, and the per-prompt
seed key of the branching agent loop, against a fake token-in/token-out server (no vLLM, no Ray).

Expected values are computed independently from the pure functions (``prompt_seed_key``,
``session_seeds``, ``draw_latent_injection``) and compared with what the loop sent to the
server and recorded in ``extra_fields``.
"""

import asyncio
import json
import math

import numpy as np
import pytest
import torch

from recipe.iib_lpo.rollout.agent_loop import BranchingAgentLoop
from recipe.iib_lpo.rollout.config import BranchingRolloutConfig
from recipe.iib_lpo.rollout.layout import session_role
from recipe.iib_lpo.rollout.seeds import derived_seed, prompt_seed_key, session_seeds
from recipe.iib_lpo.rollout.server_output import TOPK_LOGPROBS_FIELD
from recipe.iib_lpo.algorithm.alpha_schedule import LatentSchedule, draw_latent_injection
from recipe.iib_lpo.latent.sampler import LatentSamples
from verl.workers.rollout.replica import TokenOutput

pytestmark = pytest.mark.timeout(120)

PLACEHOLDER = 3
HIDDEN = 8
TOPK = 20
SPIKE = 13  # response position with a near-flat sampling distribution: the only fork candidate
QUESTION = "Tom has 3 apples and buys 4 more. How many?"


def _topk_rows(num_tokens: int, vocab: int) -> np.ndarray:
    rows = []
    for t in range(num_tokens):
        # Peaked rows, and a high-entropy row at SPIKE. Both decay strictly beyond the top-k, so the
        # entropy estimate's tail bound (tail tokens no more likely than the k-th) holds with margin.
        logits = -8.0 - 0.01 * torch.arange(vocab, dtype=torch.float32)
        logits[:5] = torch.tensor([4.0, 1.0, 0.5, 0.0, -1.0])
        if t == SPIKE:
            logits = -0.01 * torch.arange(vocab, dtype=torch.float32)
        rows.append(torch.log_softmax(logits, -1).topk(TOPK).values.numpy())
    return np.stack(rows).astype(np.float32)


class FakeServer:
    """Deterministic stand-in for verl's LLMServerClient; records every call."""

    def __init__(self, vocab: int, response_tokens: int = 40, short: bool = False):
        self.vocab, self.response_tokens, self.short = vocab, response_tokens, short
        self.calls = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, num_topk_logprobs=0, **kw):
        self.calls.append(dict(request_id=request_id, prompt_ids=list(prompt_ids), image_data=image_data,
                               sampling_params=dict(sampling_params), num_topk_logprobs=num_topk_logprobs))
        await asyncio.sleep(0.005)
        seed = sampling_params.get("seed")
        rng = np.random.default_rng(derived_seed(seed, tuple(prompt_ids)) % (2**32))
        n = 3 if (self.short and num_topk_logprobs) else min(self.response_tokens, sampling_params["max_tokens"])
        tokens = [int(x) for x in rng.integers(4, self.vocab, size=n)]
        extra = {"min_global_steps": 5, "max_global_steps": 5, "num_cached_tokens": 0}
        if num_topk_logprobs:
            extra[TOPK_LOGPROBS_FIELD] = _topk_rows(n, self.vocab)[:, :num_topk_logprobs]
        return TokenOutput(token_ids=tokens, log_probs=[-1.0] * n, stop_reason="completed", extra_fields=extra)


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


def _config(model_dir, *, M=1, K=8, schedule=None, mode="cvae", sampling_seed=None):
    from verl_patches.verl_cpu_testing import compose_cpu_trainer_config

    iib = {
        "num_initial_rollouts": M,
        "num_branches": K,
        "branching": {"rho": 0.05, "t_min": 1, "t_margin": 8, "strategy": "argmax"},
        "entropy": {"source": "topk", "top_k": TOPK},
        "latent": {
            "mode": mode,
            "placeholder_token_id": PLACEHOLDER,
            "schedule": schedule or {"kind": "constant", "p_init": 0.5, "p_min": 0.0, "scale": 0.25},
            "service": {"backend": "in_process", "max_batch_size": 64, "max_wait_ms": 30},
        },
        "agent_loop": {"parent_wait_timeout_s": 30.0, "sampling_seed": sampling_seed},
    }
    return compose_cpu_trainer_config(model_dir, rollout_n=M * (1 + K), response_length=48, extra={"iib_lpo": iib})


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))


def _row(uid="u1", data_source="demo_arith", index=7, global_steps=5):
    extra_info = {"question": QUESTION}
    if index is not None:
        extra_info["index"] = index
    row = dict(raw_prompt=[{"role": "user", "content": QUESTION}], extra_info=extra_info, uid=uid,
               global_steps=global_steps, index=index if index is not None else 0)  # verl's default for `index`
    if data_source is not None:
        row["data_source"] = data_source
    return row


async def _run_group(config, tokenizer, server, sampler, row):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    BranchingAgentLoop.sampler_factory = staticmethod(lambda: sampler)

    async def one(session_id):
        loop = BranchingAgentLoop(
            trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tokenizer, processor=None,
            dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data), hf_model_type="qwen2",
        )
        return await loop.run({"temperature": 1.0, "top_p": 1.0, "logprobs": True}, session_id=session_id, **row)

    n = config.actor_rollout_ref.rollout.n
    return await asyncio.wait_for(asyncio.gather(*[one(s) for s in range(n)], return_exceptions=True), 60)


def _run(config, tokenizer, row, *, short=False):
    server, sampler = FakeServer(len(tokenizer), short=short), FakeSampler()
    outputs = asyncio.run(_run_group(config, tokenizer, server, sampler, row))
    return outputs, server, sampler


# ----------------------------------------------------------------------------------------------
# The seed key and the seeds (pure)
# ----------------------------------------------------------------------------------------------


def test_prompt_seed_key_is_data_source_and_extra_info_index():
    assert prompt_seed_key(_row(data_source="math_dapo", index=7)) == json.dumps(["math_dapo", 7])
    assert prompt_seed_key(_row(index=np.int64(7))) == prompt_seed_key(_row(index=7))  # parquet ints
    assert prompt_seed_key(_row(index="a1b2")) == json.dumps(["demo_arith", "a1b2"])
    # the top-level `index` kwarg is not used (verl sets it to 0 when extra_info.index is missing)
    assert prompt_seed_key({**_row(index=7), "index": 99}) == prompt_seed_key(_row(index=7))


def test_same_index_in_two_data_sources_gives_different_seeds():
    key_a = prompt_seed_key(_row(data_source="lighteval/MATH", index=0))
    key_b = prompt_seed_key(_row(data_source="math_dapo", index=0))
    assert key_a != key_b
    for session in range(1 + 3):
        role = session_role(session, 1, 3)
        a = session_seeds(key_a, 5, role, rollout_seed=42, sampling_seed=1)
        b = session_seeds(key_b, 5, role, rollout_seed=42, sampling_seed=1)
        assert a.fork != b.fork and a.latent != b.latent and a.sampling != b.sampling
        if role.role == "branch":
            assert a.inject != b.inject


def test_session_seeds_structure():
    key = prompt_seed_key(_row())
    roles = [session_role(s, 2, 2) for s in range(6)]
    seeds = [session_seeds(key, 5, r, rollout_seed=42, sampling_seed=None) for r in roles]
    # a parent's branches share its fork and latent seeds; parents differ
    assert seeds[2].fork == seeds[3].fork == seeds[0].fork != seeds[1].fork
    assert seeds[4].latent == seeds[5].latent == seeds[1].latent != seeds[0].latent
    # the schedule's draw is per branch; initial rollouts have none; no sampling seed when unset
    assert seeds[0].inject is None and len({s.inject for s in seeds[2:]}) == 4
    assert all(s.sampling is None for s in seeds)
    # the step is part of every seed
    later = session_seeds(key, 6, roles[2], rollout_seed=42, sampling_seed=None)
    assert later.fork != seeds[2].fork and later.inject != seeds[2].inject


@pytest.mark.parametrize(
    "row, field",
    [
        (_row(uid="u-no-source", data_source=None), "'data_source'"),
        (_row(uid="u-empty-source", data_source=""), "'data_source'"),
        (_row(uid="u-no-index", index=None), "'extra_info.index'"),
        ({**_row(uid="u-no-extra"), "extra_info": None}, "'extra_info.index'"),
        (_row(uid="u-bool-index", index=True), "'extra_info.index'"),
        (_row(uid="u-float-index", index=7.0), "'extra_info.index'"),
    ],
)
def test_rows_without_a_seed_key_are_refused_naming_uid_and_field(row, field):
    with pytest.raises(ValueError, match=rf"uid={row['uid']}\b.*{field}"):
        prompt_seed_key(row)


# ----------------------------------------------------------------------------------------------
# The loop: schedule draws, resamples, seeds on the wire
# ----------------------------------------------------------------------------------------------


def test_schedule_draw_decides_which_branches_get_the_latent(tiny_qwen2_dir, tokenizer):
    config = _config(tiny_qwen2_dir)  # constant p_inject 0.5, scale 0.25, M=1, K=8
    row = _row()
    outputs, server, sampler = _run(config, tokenizer, row)
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    prompt_len = len(outputs[0].prompt_ids)
    key = prompt_seed_key(row)
    rollout_seed = int(config.actor_rollout_ref.rollout.seed)
    expected = [draw_latent_injection(0.5, session_seeds(key, 5, session_role(1 + k, 1, 8), rollout_seed,
                                                                None).inject) for k in range(8)]
    assert any(expected) and not all(expected)  # both outcomes occur for this row (fixed seeds)
    branch_calls = [c for c in server.calls if not c["num_topk_logprobs"]]
    assert len(branch_calls) == 8
    for k, injected in enumerate(expected):
        ef = outputs[1 + k].extra_fields
        assert ef["iib_latent_prob"] == 0.5 and ef["iib_is_resample"] is False
        assert ef["iib_fork_position"] == SPIKE
        assert outputs[1 + k].response_ids[:SPIKE] == outputs[0].response_ids[:SPIKE]
        if injected:
            assert ef["iib_latent_status"] == "injected" and ef["iib_latent_scale"] == 0.25
            assert ef["iib_latent_norm"] == pytest.approx(0.25 * (10 + k) * math.sqrt(HIDDEN))
        else:
            assert ef["iib_latent_status"] == "skipped_by_schedule" and ef["iib_latent_scale"] == 0.0
            assert math.isnan(ef["iib_latent_norm"])
    # what reached the server: every branch sends prompt + prefix; injected ones carry draw k of
    # the parent at scale 0.25 (added to the prefix's last token), skipped ones nothing
    latent_values = sorted(float(c["image_data"][0, 0, 0]) for c in branch_calls if c["image_data"] is not None)
    assert latent_values == [0.25 * (10 + k) for k, injected in enumerate(expected) if injected]
    for c in branch_calls:
        assert len(c["prompt_ids"]) == prompt_len + SPIKE
        assert PLACEHOLDER not in c["prompt_ids"]
    # one sampler request for the parent, K draws at the constant scale
    assert [(len(t), n, a) for t, n, a in sampler.calls] == [(1, 8, 0.25)]
    initial = outputs[0].extra_fields
    assert (initial["iib_latent_prob"], initial["iib_latent_scale"], initial["iib_is_resample"]) == (0.0, 0.0, False)


@pytest.mark.parametrize("p, status", [(1.0, "injected"), (0.0, "skipped_by_schedule")])
def test_probability_one_always_injects_and_zero_never(tiny_qwen2_dir, tokenizer, p, status):
    config = _config(tiny_qwen2_dir, K=3, schedule={"kind": "constant", "p_init": p, "p_min": p})
    outputs, server, sampler = _run(config, tokenizer, _row())
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    assert [o.extra_fields["iib_latent_status"] for o in outputs[1:]] == [status] * 3
    assert [o.extra_fields["iib_latent_prob"] for o in outputs[1:]] == [p] * 3
    assert len(sampler.calls) == (1 if p == 1.0 else 0)


def test_latent_probability_follows_the_schedule_by_global_step(tiny_qwen2_dir):
    cfg = BranchingRolloutConfig(latent_mode="cvae", placeholder_token_id=3, total_steps=10,
                                    schedule=LatentSchedule(kind="linear", p_init=1.0, p_min=0.0, scale=2.0))
    # verl's global steps are 1-based: step g is schedule step g - 1
    assert cfg.latent_probability(1) == 1.0 and cfg.latent_probability(6) == pytest.approx(0.5)
    assert cfg.latent_probability(50) == 0.0 and cfg.schedule.scale == 2.0
    assert BranchingRolloutConfig(latent_mode="none").latent_probability(3) == 0.0
    with pytest.raises(ValueError, match="total_training_steps"):
        BranchingRolloutConfig(latent_mode="cvae", placeholder_token_id=3, schedule=LatentSchedule(kind="cosine")).latent_probability(2)
    # exponential needs no total
    expo = BranchingRolloutConfig(latent_mode="cvae", placeholder_token_id=3,
                                     schedule=LatentSchedule(kind="exponential", decay_rate=0.5))
    assert expo.latent_probability(3) == pytest.approx(0.25)


def test_latent_mode_none_is_disabled_with_probability_zero(tiny_qwen2_dir, tokenizer):
    outputs, _, sampler = _run(_config(tiny_qwen2_dir, K=2, mode="none"), tokenizer, _row())
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    assert [(o.extra_fields["iib_latent_status"], o.extra_fields["iib_latent_prob"]) for o in outputs[1:]] == [
        ("disabled", 0.0), ("disabled", 0.0)]
    assert sampler.calls == []


def test_too_short_parent_gives_resamples_flagged_for_the_filter(tiny_qwen2_dir, tokenizer):
    config = _config(tiny_qwen2_dir, M=2, K=2, schedule={"kind": "constant", "p_init": 1.0, "p_min": 1.0})
    outputs, server, sampler = _run(config, tokenizer, _row(), short=True)
    assert not [o for o in outputs if isinstance(o, BaseException)], outputs
    prompt_ids = outputs[0].prompt_ids
    assert [o.extra_fields["iib_is_resample"] for o in outputs] == [False, False, True, True, True, True]
    for branch in outputs[2:]:
        ef = branch.extra_fields
        assert (ef["iib_role"], ef["iib_fork_reason"], ef["iib_latent_status"]) == ("branch", "too_short", "no_fork")
        assert ef["iib_latent_prob"] == 0.0 and ef["iib_fork_position"] == -1 and ef["iib_prefix_length"] == 0
        assert branch.response_mask == [1] * len(branch.response_ids) == [1] * 40  # full responses
    assert all(c["prompt_ids"] == prompt_ids and c["image_data"] is None for c in server.calls)
    assert sampler.calls == []


def test_same_index_different_data_source_get_different_seeds_on_the_wire(tiny_qwen2_dir, tokenizer):
    config = _config(tiny_qwen2_dir, K=2, sampling_seed=123)
    sent = {}
    for source in ("lighteval/MATH", "math_dapo"):
        row = _row(uid=f"u-{source}", data_source=source, index=0)
        outputs, server, _ = _run(config, tokenizer, row)
        assert not [o for o in outputs if isinstance(o, BaseException)], outputs
        seeds = sorted(c["sampling_params"]["seed"] for c in server.calls)
        key = prompt_seed_key(row)
        rollout_seed = int(config.actor_rollout_ref.rollout.seed)
        expected = sorted(session_seeds(key, 5, session_role(s, 1, 2), rollout_seed, 123).sampling
                          for s in range(3))
        assert seeds == expected and len(set(seeds)) == 3
        sent[source] = (seeds, outputs[0].response_ids)
    assert not set(sent["lighteval/MATH"][0]) & set(sent["math_dapo"][0])
    assert sent["lighteval/MATH"][1] != sent["math_dapo"][1]  # different noise -> different initial rollout


@pytest.mark.parametrize("drop", ["data_source", "extra_info.index"])
def test_loop_refuses_a_row_without_seed_key(tiny_qwen2_dir, tokenizer, drop):
    row = _row(uid="row-42", data_source=None if drop == "data_source" else "demo_arith",
               index=None if drop == "extra_info.index" else 7)
    outputs, server, _ = _run(_config(tiny_qwen2_dir, K=1), tokenizer, row)
    assert all(isinstance(o, ValueError) and "uid=row-42" in str(o) and f"'{drop}'" in str(o) for o in outputs)
    assert server.calls == []
