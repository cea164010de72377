"""The verifiable reward r_v of a ranked round's branch, computed inside the rollout (rounds r < R).

The next round needs r_v before verl's reward step runs, and verl's reward path is not reachable
from inside an agent loop's ``run()``; so ``compute_in_loop_reward`` calls the function verl's reward
manager uses (``load_reward_function``: ``reward.custom_reward_function`` with its reward_kwargs
through verl's ``get_custom_reward_fn``, else verl's ``default_compute_score``; cached per
process) with the same inputs: the response decoded with ``skip_special_tokens=True``, the row's
``data_source``, ``reward_model.ground_truth`` and ``extra_info``. verl computes the reward again
for the whole batch after the rollout, with the same function, kwargs and decoding.
``reward_value`` reads r_v from the result (a float, or a dict with "score") and refuses values
outside [0, 1]. verl is imported only when the function is first loaded.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from collections.abc import Mapping
from functools import partial
from typing import Any

_REWARD_FUNCTIONS: dict[str, Any] = {}


def load_reward_function(config: Any):
    """The verifiable-reward function verl's reward manager uses for this config: the
    ``reward.custom_reward_function`` (path, name, reward_kwargs merged in, through verl's own
    ``get_custom_reward_fn``), else verl's ``default_compute_score``. Cached per process."""
    from omegaconf import OmegaConf

    custom = config.get("reward", {}).get("custom_reward_function") or {}
    custom = OmegaConf.to_container(custom, resolve=True) if OmegaConf.is_config(custom) else dict(custom)
    key = json.dumps(custom, sort_keys=True, default=str)
    fn = _REWARD_FUNCTIONS.get(key)
    if fn is None:
        from verl.trainer.ppo.reward import get_custom_reward_fn
        from verl.utils.reward_score import default_compute_score

        fn = get_custom_reward_fn(config) or default_compute_score
        _REWARD_FUNCTIONS[key] = fn
    return fn


def reward_value(result: Any) -> float:
    """r_v from a reward function's result (a float, or a dict with "score", as verl reads it)."""
    score = result["score"] if isinstance(result, Mapping) else result
    value = float(score)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"the verifiable reward gave {value!r}; ranking a round by S_IB needs r_v in [0, 1] "
                         "(binary reward style)")
    return value


async def compute_in_loop_reward(
    config: Any, tokenizer: Any, rounds: int, response_ids: list[int], kwargs: dict
) -> float:
    """r_v of a ranked round's branch (``response_ids``) for the row ``kwargs``; ``rounds`` is R, for
    the error when the row has no ``reward_model.ground_truth``."""
    reward_model = kwargs.get("reward_model")
    if not isinstance(reward_model, Mapping) or "ground_truth" not in reward_model:
        raise ValueError(
            f"prompt uid={kwargs.get('uid')}: iib_lpo.ib.rounds={rounds} ranks each round's branches in "
            "the rollout with the verifiable reward and needs the row's reward_model.ground_truth"
        )
    fn = load_reward_function(config)
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    extra_info = dict(kwargs.get("extra_info") or {})
    call = partial(fn, data_source=kwargs.get("data_source"), solution_str=text,
                   ground_truth=reward_model["ground_truth"], extra_info=extra_info)
    result = await asyncio.get_running_loop().run_in_executor(None, call)
    if inspect.isawaitable(result):
        result = await result
    return reward_value(result)
