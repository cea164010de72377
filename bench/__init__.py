"""Benchmarks of the I2B-LPO recipe against GRPO (issue 11): see bench/README.md and BENCHMARKS.md."""
