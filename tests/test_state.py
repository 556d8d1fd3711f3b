"""Flattening training state into tensor leaves and a skeleton."""

from __future__ import annotations

import torch

from asymcheck.state import TensorRef, flatten, unflatten


def test_views_of_one_memory_are_one_leaf_only_when_they_are_the_same_view() -> None:
    t = torch.arange(64.0)
    grid = t.view(8, 8)
    state = {"a": t, "b": t, "c": grid, "d": t[8:], "e": grid.t(), "f": t.view(torch.int32),
             "g": torch.zeros(0), "h": torch.zeros(0), "i": [grid, t.view(8, 8)]}
    flat = flatten(state)
    assert flat.paths == ("a", "c", "d", "e", "f", "g", "h"), flat.paths
    assert flat.skeleton["b"] == TensorRef(0)
    assert flat.skeleton["i"] == [TensorRef(1), TensorRef(1)]
    back = unflatten(flat.skeleton, flat.tensors)
    for key in "abcdefgh":
        value = back[key]
        assert value.dtype == state[key].dtype and value.stride() == state[key].stride()
        assert torch.equal(value, state[key]), key
    assert back["b"] is back["a"]
