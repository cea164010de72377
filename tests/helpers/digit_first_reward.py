"""A test-only reward that a correct policy gradient learns in a few dozen steps (tests/test_trainer_learns.py).

1 when the response's first character is an ASCII digit, else 0. The tiny random Qwen2 of the tests
starts with a digit in a fifth to a third of its samples (measured at temperature 1: 22 % of 200
transformers samples of one prompt; 31-34 % of the 32 samples of the trainer's first step),
so groups of 8 have varying rewards from the first step; the reward depends on the first token only,
so GRPO can raise it quickly by moving probability onto digit tokens.
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    text = solution_str.lstrip()
    return 1.0 if text[:1].isascii() and text[:1].isdigit() else 0.0
