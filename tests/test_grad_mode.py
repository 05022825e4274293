"""Generators must not leak no-grad mode to the caller between chunks (a notebook user may train afterwards)."""

import torch
from test_sampler import make_sampler


def test_stream_does_not_disable_grad_in_the_caller():
    s = make_sampler()
    it = s.stream("a red circle moving left quickly on black", num_chunks=2, seed=0)
    next(it)
    assert torch.is_grad_enabled()  # suspended between chunks: the caller's mode is untouched
    it.close()
    assert torch.is_grad_enabled()
    it = s.stream_overlap("a red circle moving left quickly on black", num_rollouts=2, seed=0)
    next(it)
    assert torch.is_grad_enabled()
