"""Flattening training state into tensor leaves and a skeleton."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

from asymcheck import state as state_module
from asymcheck.manifest import checksum
from asymcheck.snapshot import Layout
from asymcheck.state import (
    TensorRef,
    flatten,
    pack_skeleton,
    tensor_ref,
    unflatten,
    unpack_skeleton,
)


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


def test_the_skeleton_shares_nothing_mutable_with_the_state() -> None:
    """A save packs its skeleton later, on the commit's thread: what the state holds may change
    by then (a live numpy array, a list the program appends to)."""
    arr, history, nested = np.arange(6, dtype=np.int32), [1, 2, 3], {"seen": [4.0, 5.0]}
    state = {"arr": arr, "history": history, "nested": nested, "rng": (3, (1, 2), None),
             "t": torch.ones(2)}
    flat = flatten(state)
    packed_now = pack_skeleton(flat.skeleton)
    arr[:] = -1
    history.append(4)
    nested["seen"][0] = 9.0
    nested["new"] = 1
    assert pack_skeleton(flat.skeleton) == packed_now
    back = unpack_skeleton(packed_now)
    assert back["arr"].tolist() == [0, 1, 2, 3, 4, 5]
    assert back["history"] == [1, 2, 3] and back["nested"] == {"seen": [4.0, 5.0]}
    assert back["rng"] == (3, (1, 2), None)


def test_a_numpy_array_of_objects_is_rejected_at_flatten_with_its_path() -> None:
    with pytest.raises(TypeError, match=r"extras/ids: numpy arrays of Python objects"):
        flatten({"extras": {"ids": np.array(["a", None], dtype=object)}})


def test_placeholders_are_shared_and_the_chunk_table_covers_every_byte_once() -> None:
    """A save of thousands of tensors makes no new placeholder objects (each is one more object
    kept for the garbage collector until the commit), and its chunk table, built from the
    layout's cached chunk geometry, covers each tensor's bytes in order with their checksums."""
    state = {f"p{i}": torch.arange(i, dtype=torch.float32) for i in range(12)}
    first, second = flatten(state), flatten(dict(state))
    assert all(first.skeleton[k] is second.skeleton[k] for k in state)
    layout = Layout.plan(first.paths, first.tensors, chunk_bytes=16)
    block = memoryview(bytearray(layout.total_bytes))
    for t, slot in zip(first.tensors, layout.slots, strict=True):
        block[slot.offset:slot.offset + slot.nbytes] = t.numpy().tobytes()
    for _ in range(2):  # the second table reuses the geometry the first one cached
        metas = layout.tensor_metas(block, "data-0.bin")
        for t, slot, meta in zip(first.tensors, layout.slots, metas, strict=True):
            raw = t.numpy().tobytes()
            assert (meta.path, meta.nbytes, meta.shape) == (slot.path, len(raw), tuple(t.shape))
            assert [c.raw_offset for c in meta.chunks] == list(range(0, max(len(raw), 1), 16))
            assert b"".join(block[c.offset:c.offset + c.stored_len] for c in meta.chunks) == raw
            assert all(c.raw_len == c.stored_len and c.codec == "raw" and c.file == "data-0.bin"
                       and c.xxh64 == checksum(raw[c.raw_offset:c.raw_offset + c.raw_len])
                       for c in meta.chunks)


def test_placeholders_made_on_several_threads_at_once_each_hold_their_own_index() -> None:
    base = len(state_module._REFS)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        workers = [threading.Thread(target=lambda: [tensor_ref(base + i) for i in range(20000)])
                   for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)
    assert [r.index for r in state_module._REFS] == list(range(len(state_module._REFS)))
    assert len(state_module._REFS) == base + 20000
