"""Request-side API of verl_patches.vllm_latent and its vLLM plugin registration (no engine)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

from verl_patches.vllm_latent import (
    LATENT_MODALITY,
    build_latent_prompt,
    latent_architecture_for,
    latent_engine_kwargs,
    topk_entropy_from_vllm_logprobs,
    topk_logprobs_and_ids,
    topk_logprobs_tensor,
)

HIDDEN = 64
PLACEHOLDER = 3


def test_build_latent_prompt_keeps_the_ids_and_carries_hidden_floats():
    e = torch.randn(HIDDEN)
    # the ids are unchanged, the latent rides on the last one
    prompt = build_latent_prompt([5, 6, 7], e, PLACEHOLDER)
    assert prompt["prompt_token_ids"] == [5, 6, 7]
    with pytest.raises(ValueError, match="last prompt token, which is the placeholder"):
        build_latent_prompt([5, 6, PLACEHOLDER], e, PLACEHOLDER)
    payload = prompt["multi_modal_data"][LATENT_MODALITY]
    assert payload.shape == (1, 1, HIDDEN)
    assert payload.numel() == HIDDEN  # O(hidden), whatever the prompt length
    assert torch.equal(payload.reshape(-1), e)
    assert set(prompt) == {"prompt_token_ids", "multi_modal_data"}  # never multi_modal_uuids
    long_prompt = build_latent_prompt(list(range(4, 2004)), e, PLACEHOLDER)
    assert long_prompt["multi_modal_data"][LATENT_MODALITY].numel() == HIDDEN


def test_build_latent_prompt_accepts_leading_unit_dims_and_keeps_dtype():
    e = torch.randn(1, 1, HIDDEN, dtype=torch.bfloat16)
    payload = build_latent_prompt([5], e, PLACEHOLDER)["multi_modal_data"][LATENT_MODALITY]
    assert payload.dtype == torch.bfloat16 and payload.shape == (1, 1, HIDDEN)
    assert not payload.requires_grad
    grad_e = torch.randn(HIDDEN, requires_grad=True)
    assert not build_latent_prompt([5], grad_e, PLACEHOLDER)["multi_modal_data"][LATENT_MODALITY].requires_grad


def test_no_latent_is_the_plain_prompt():
    assert build_latent_prompt((5, 6, PLACEHOLDER, 7), None, PLACEHOLDER) == {"prompt_token_ids": [5, 6, PLACEHOLDER, 7]}


@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.randn(2, HIDDEN), ValueError),  # two latents
        (torch.randn(0), ValueError),
        (torch.tensor([1.0, float("nan")]), ValueError),
        (torch.tensor([1.0, float("inf")]), ValueError),
        (torch.ones(HIDDEN, dtype=torch.long), TypeError),
        ([0.0] * HIDDEN, TypeError),
    ],
)
def test_build_latent_prompt_rejects_bad_latents(bad, error):
    with pytest.raises(error):
        build_latent_prompt([5, 6], bad, PLACEHOLDER)


def test_build_latent_prompt_rejects_empty_prompt_and_bad_placeholder():
    with pytest.raises(ValueError, match="empty"):
        build_latent_prompt([], torch.randn(HIDDEN), PLACEHOLDER)
    for bad in (-1, None, 3.0):
        with pytest.raises(ValueError, match="placeholder_token_id"):
            build_latent_prompt([5], torch.randn(HIDDEN), bad)


def test_architecture_names_and_engine_kwargs():
    assert latent_architecture_for("Qwen2ForCausalLM") == "Qwen2LatentForCausalLM"
    assert latent_architecture_for("Qwen3ForCausalLM") == "Qwen3LatentForCausalLM"
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        latent_architecture_for("LlamaForCausalLM")
    kwargs = latent_engine_kwargs("Qwen2ForCausalLM", placeholder_token_id=151665)
    assert kwargs == {
        "hf_overrides": {"architectures": ["Qwen2LatentForCausalLM"], "latent_placeholder_token_id": 151665},
        "enable_mm_embeds": True,
        "limit_mm_per_prompt": {"image": 0},
        "enable_prefix_caching": True,
        "logprobs_mode": "processed_logprobs",
    }
    for bad in (-1, "3", 3.0, True, None):
        with pytest.raises(ValueError):
            latent_engine_kwargs("Qwen2ForCausalLM", placeholder_token_id=bad)


def test_engine_kwargs_are_vllm_engine_args_of_the_right_type():
    import dataclasses
    import typing

    from vllm.engine.arg_utils import EngineArgs

    fields = {f.name: f for f in dataclasses.fields(EngineArgs)}
    kwargs = latent_engine_kwargs("Qwen3ForCausalLM", placeholder_token_id=3)
    assert set(kwargs) <= set(fields), set(kwargs) - set(fields)
    from vllm.config.model import LogprobsMode

    assert kwargs["logprobs_mode"] in typing.get_args(LogprobsMode)


def test_vllm_plugin_entry_point_registers_the_architectures_in_a_fresh_process():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("iib_lpo_latent") == "verl_patches.vllm_latent:register"
    code = (
        "import json\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm import ModelRegistry\n"
        "archs = set(ModelRegistry.get_supported_archs())\n"
        "print(json.dumps(sorted(a for a in archs if 'Latent' in a)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["Qwen2LatentForCausalLM", "Qwen3LatentForCausalLM"]


def test_model_classes_are_multimodal_subclasses_with_stock_weight_loading():
    from vllm.model_executor.models.interfaces import supports_multimodal
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    from verl_patches.vllm_latent.model import Qwen2LatentForCausalLM, Qwen3LatentForCausalLM

    for latent_cls, stock_cls in ((Qwen2LatentForCausalLM, Qwen2ForCausalLM), (Qwen3LatentForCausalLM, Qwen3ForCausalLM)):
        assert issubclass(latent_cls, stock_cls) and supports_multimodal(latent_cls)
        assert hasattr(latent_cls, "_processor_factory")
        # verl's weight sync goes through load_weights: it must be the stock one, untouched.
        assert latent_cls.load_weights is stock_cls.load_weights
        assert latent_cls.forward is stock_cls.forward


def _logprob_dict(values: dict[int, float]):
    return {token: SimpleNamespace(logprob=lp) for token, lp in values.items()}


def test_topk_logprobs_tensor_drops_the_extra_sampled_token():
    logp = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.5, -1.0]), dim=-1)
    step_in_topk = _logprob_dict({0: float(logp[0]), 1: float(logp[1])})
    # vLLM appends the sampled token when it is outside the top-k: k + 1 entries.
    step_outside = _logprob_dict({4: float(logp[4]), 0: float(logp[0]), 1: float(logp[1])})
    out = topk_logprobs_tensor([step_in_topk, step_outside], k=2)
    assert torch.allclose(out, logp[:2].expand(2, 2))
    with pytest.raises(ValueError, match="fewer than k"):
        topk_logprobs_tensor([step_in_topk], k=3)
    with pytest.raises(ValueError, match="no log-probs"):
        topk_logprobs_tensor([None], k=2)
    assert topk_logprobs_tensor([], k=2).shape == (0, 2)


def test_topk_ids_are_aligned_with_their_logprobs_in_decreasing_order():
    # dict order is not the probability order: the ids must follow their values when sorted
    step = _logprob_dict({7: -2.0, 3: -0.5, 9: -1.0, 4: -3.0})
    logprobs, ids = topk_logprobs_and_ids([step, step], k=3)
    assert ids.tolist() == [[3, 9, 7]] * 2 and ids.dtype == torch.int64
    assert logprobs.tolist() == [[-0.5, -1.0, -2.0]] * 2
    empty_lp, empty_ids = topk_logprobs_and_ids([], k=2)
    assert empty_lp.shape == (0, 2) and empty_ids.shape == (0, 2)


def test_topk_entropy_is_exact_when_topk_covers_the_vocabulary():
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(logits, dim=-1)
    steps = [_logprob_dict({t: float(logp[i, t]) for t in range(6)}) for i in range(3)]
    exact = -(logp.exp() * logp).sum(-1)
    estimate = topk_entropy_from_vllm_logprobs(steps, k=6, vocab_size=6)
    assert torch.allclose(estimate.estimate, exact, atol=1e-5)
    partial = topk_entropy_from_vllm_logprobs(steps, k=3, vocab_size=6)
    assert bool(((partial.lower <= exact + 1e-5) & (exact <= partial.upper + 1e-5)).all())
