"""I2B-LPO: Latent Policy Optimization via Iterative Information Bottleneck, as a verl recipe.

The algorithm lives in small pure modules (tensors in, tensors out); verl glue imports them.
See ../shared/docs/METHOD.md (and README.md) for where each step of the method lives.
"""
