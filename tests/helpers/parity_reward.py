"""A test-only verifiable reward that varies on a random model's output (tests/test_trainer_*.py).

A random tiny model never answers correctly, so the recipe's math reward is 0 for every sample and
every group's advantage (and gradient) is exactly 0: "the weights changed" would then prove
nothing. This reward is 1 when the response has an even number of characters, else 0: about half
of any group, deterministic, and in [0, 1] as the IB scores require.
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return 1.0 if len(solution_str) % 2 == 0 else 0.0
