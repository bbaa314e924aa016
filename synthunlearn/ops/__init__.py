"""Fused ops. ``linear_logprob_kl`` is the only public entry point; backends live beside it."""

from synthunlearn.ops.linear_logprob_kl import LogProbKL, linear_logprob_kl

__all__ = ["LogProbKL", "linear_logprob_kl"]
