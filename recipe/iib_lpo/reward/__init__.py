"""The verifiable reward r_v (METHOD.md step 5): ``score.compute_score`` is verl's custom reward
function; ``extraction``, ``normalization``, ``answer_checking`` and ``verifier_pool`` extract
and compare answers.

``reward.custom_reward_function.path=pkg://recipe.iib_lpo.reward`` (name ``compute_score``) is
the documented config path, so the package exports that one function.
"""

from recipe.iib_lpo.reward.score import compute_score

__all__ = ["compute_score"]
