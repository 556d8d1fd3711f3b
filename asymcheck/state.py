"""Flatten training state into tensor leaves plus a msgpack skeleton, and back.

The skeleton keeps every non-tensor value (ints, floats, strings, tuples,
numpy arrays, nested dicts and lists) and a placeholder for each tensor.
Nothing is ever pickled: an unknown type is an error that names its path.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from . import sharding
from .sharding import ShardRef

_EXT_TENSOR = 1
_EXT_TUPLE = 2
_EXT_NDARRAY = 3
_EXT_SHARD = 4

#: dtypes a checkpoint may hold; the manifest stores the name on the left.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
    "complex64": torch.complex64, "complex128": torch.complex128,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        DTYPES[_name] = getattr(torch, _name)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


_PLAIN = frozenset({int, float, str, bool, type(None), bytes})


@dataclass(frozen=True)
class TensorRef:
    """Placeholder for the ``index``-th tensor leaf inside a skeleton."""

    index: int


#: TensorRef(i) for every index made so far: a save's skeleton holds one per tensor, and
#: shared ones are no new objects for the garbage collector to follow from save to save
_REFS: list[TensorRef] = []
_REFS_GROW = threading.Lock()  # saves on several threads (several Checkpointers) may grow it


def tensor_ref(index: int) -> TensorRef:
    try:
        return _REFS[index]
    except IndexError:
        with _REFS_GROW:
            while len(_REFS) <= index:
                _REFS.append(TensorRef(len(_REFS)))
        return _REFS[index]


@dataclass(frozen=True)
class FlatState:
    skeleton: Any
    paths: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"tensor dtype {dtype} cannot be checkpointed") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {name!r} in checkpoint") from None


def flatten(state: Any) -> FlatState:
    """Split ``state`` into a skeleton and its tensor leaves (depth first, stable order).

    A tensor reached under several paths (tied weights) is one leaf, stored under its first
    path. A sharded tensor (DTensor) is its local chunk and a ``ShardRef`` (see ``sharding``).
    The skeleton shares nothing mutable with ``state`` (numpy arrays and lists are copied), so
    it may be packed later, on another thread.

    Runs on the training thread at every save, once per value of the state: a tensor met in a
    container is placed without a call of its own.
    """
    paths: list[str] = []
    tensors: list[torch.Tensor] = []
    starts: dict[int, int] = {}  # data_ptr -> the first leaf (with elements) that starts there
    shared: dict[int, list[int]] = {}  # data_ptr -> every such leaf, where there are several
    strided, tensor_type, names = torch.strided, torch.Tensor, DTYPE_NAMES

    def place(t: torch.Tensor, path: str) -> TensorRef | ShardRef:
        if t.dtype not in names:
            dtype_name(t.dtype)  # raises
        if sharding.is_sharded(t):
            local = sharding.local_tensor(t)
            offsets, sizes = sharding.local_box(t)
            index = leaf(local, path) if sharding.writes_chunk(t) else -1
            return ShardRef(index, names[t.dtype], tuple(t.shape), offsets, sizes)
        return tensor_ref(leaf(t, path))

    def leaf(t: torch.Tensor, path: str) -> int:
        if t.layout != strided:
            raise TypeError(f"{path}: only dense (strided) tensors can be checkpointed")
        if t.requires_grad:
            t = t.detach()
        index = len(tensors)
        if t.numel():
            ptr = t.data_ptr()
            first = starts.setdefault(ptr, index)
            if first != index:  # the same view of the same memory is one leaf (tied weights)
                same = shared.setdefault(ptr, [first])
                for i in same:
                    if _same_view(tensors[i], t):
                        return i
                same.append(index)
        paths.append(path)
        tensors.append(t)
        return index

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, tensor_type):
            return place(obj, path)
        if type(obj) in _PLAIN or isinstance(obj, (bool, int, float, str, bytes)):
            return obj
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise TypeError(f"{path}: numpy arrays of Python objects cannot be "
                                "checkpointed")
            return obj.copy()
        if isinstance(obj, np.generic):
            return obj.item()
        if type(obj) is dict or isinstance(obj, Mapping):
            out = {}
            prefix = f"{path}/" if path else ""
            for k, v in obj.items():
                if type(k) is str:
                    p = prefix + k
                elif isinstance(k, (str, int)) and not isinstance(k, bool):
                    p = f"{prefix}{k}"
                else:
                    raise TypeError(f"{path}: dict key {k!r} must be str or int")
                out[k] = place(v, p) if isinstance(v, tensor_type) else walk(v, p)
            return out
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            if all(type(v) in _PLAIN for v in obj):  # e.g. an RNG state: no walk per element
                return obj if type(obj) is tuple else tuple(obj) if isinstance(obj, tuple) \
                    else list(obj)
            items = [place(v, f"{path}/{i}") if isinstance(v, tensor_type)
                     else walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
            return tuple(items) if isinstance(obj, tuple) else items
        raise TypeError(f"{path or '<root>'}: a value of type {type(obj).__name__} cannot be "
                        "checkpointed (use tensors, numbers, strings, lists, tuples, dicts)")

    skeleton = walk(state, "")
    return FlatState(skeleton, tuple(paths), tuple(tensors))


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors that start at the same address are the same view of it."""
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def map_leaves(obj: Any, leaf: Callable[[Any, str], Any], path: str = "") -> Any:
    """``obj`` rebuilt with every value that is not a dict, list or tuple replaced by
    ``leaf(value, path)``; paths are those ``flatten`` gives."""
    if isinstance(obj, dict):
        return {k: map_leaves(v, leaf, f"{path}/{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_leaves(v, leaf, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(map_leaves(v, leaf, f"{path}/{i}") for i, v in enumerate(obj))
    return leaf(obj, path)


def unflatten(skeleton: Any, tensors: Sequence[torch.Tensor],
              shard: Callable[[str, ShardRef], Any] | None = None,
              plain: Callable[[str, torch.Tensor], Any] | None = None) -> Any:
    """Put the tensor leaves back into ``skeleton``. ``shard(path, ref)`` gives the value of a
    sharded leaf (default: the stored local chunk), ``plain(path, tensor)`` may replace a plain
    one; paths are those ``flatten`` gave."""
    def tensor(index: int) -> torch.Tensor:
        if not 0 <= index < len(tensors):
            raise ValueError(f"checkpoint skeleton refers to missing tensor {index}")
        return tensors[index]

    def leaf(obj: Any, path: str) -> Any:
        if isinstance(obj, TensorRef):
            return tensor(obj.index) if plain is None else plain(path, tensor(obj.index))
        if isinstance(obj, ShardRef):
            return tensor(obj.index) if shard is None else shard(path, obj)
        return obj

    return map_leaves(skeleton, leaf)


def leaves(skeleton: Any) -> list[tuple[str, TensorRef | ShardRef]]:
    """Every tensor placeholder of ``skeleton`` with its path (as ``flatten`` names it)."""
    out: list[tuple[str, TensorRef | ShardRef]] = []

    def leaf(obj: Any, path: str) -> Any:
        if isinstance(obj, (TensorRef, ShardRef)):
            out.append((path, obj))
        return obj

    map_leaves(skeleton, leaf)
    return out


def _default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, TensorRef):
        return msgpack.ExtType(_EXT_TENSOR, obj.index.to_bytes(4, "big"))
    if isinstance(obj, ShardRef):
        return msgpack.ExtType(_EXT_SHARD, msgpack.packb(
            [obj.index, obj.dtype, list(obj.global_shape), list(obj.offsets), list(obj.sizes)]))
    if isinstance(obj, tuple):
        return msgpack.ExtType(_EXT_TUPLE, pack_skeleton(list(obj)))
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("numpy arrays of Python objects cannot be checkpointed")
        arr = np.ascontiguousarray(obj)
        return msgpack.ExtType(_EXT_NDARRAY, msgpack.packb(
            [arr.dtype.str, list(arr.shape), arr.tobytes()]))
    raise TypeError(f"cannot encode {type(obj).__name__} in a checkpoint skeleton")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_TENSOR:
        if len(data) != 4:
            raise ValueError("bad tensor reference in checkpoint skeleton")
        return TensorRef(int.from_bytes(data, "big"))
    if code == _EXT_TUPLE:
        return tuple(unpack_skeleton(data))
    if code == _EXT_SHARD:
        return _shard_ref(msgpack.unpackb(data))
    if code == _EXT_NDARRAY:
        dtype_str, shape, raw = msgpack.unpackb(data)
        dtype = np.dtype(dtype_str)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed in a checkpoint")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    raise ValueError(f"unknown extension type {code} in checkpoint skeleton")


def _shard_ref(fields: Any) -> ShardRef:
    """A ShardRef read back, checked: a chunk inside its global shape, of a known dtype."""
    index, dtype, shape, offsets, sizes = fields
    dims = [*shape, *offsets, *sizes]
    if (not isinstance(index, int) or index < -1 or not isinstance(dtype, str)
            or not all(isinstance(d, int) and d >= 0 for d in dims)
            or not len(shape) == len(offsets) == len(sizes)
            or any(o + n > g for o, n, g in zip(offsets, sizes, shape, strict=True))):
        raise ValueError(f"bad sharded tensor reference in checkpoint skeleton: {fields!r}")
    dtype_from_name(dtype)
    return ShardRef(index, dtype, tuple(shape), tuple(offsets), tuple(sizes))


def pack_skeleton(skeleton: Any) -> bytes:
    return msgpack.packb(skeleton, default=_default, strict_types=True, use_bin_type=True)


def unpack_skeleton(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, strict_map_key=False, raw=False)


def capture_rng() -> dict[str, Any]:
    """RNG states of Python, numpy's global generator, torch CPU and every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def apply_rng(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(f"checkpoint holds RNG state for {len(cuda_states)} CUDA devices, "
                             f"this process sees {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(cuda_states)
