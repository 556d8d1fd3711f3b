"""Model and optimizer state keyed by fully qualified parameter names.

Capture and apply go through ``torch.distributed.checkpoint.state_dict``: parameter names lose
the wrappers' prefixes (DistributedDataParallel's ``module.``) and optimizer state is keyed by
parameter name instead of position, so a checkpoint outlives a change in how the model is
wrapped or sharded (DDP, FSDP2, tensor parallel, a plain module). FSDP2 and tensor-parallel
state comes out as DTensors, saved shard by shard (``sharding``).

An optimizer that has not stepped yet is saved as ``None``: torch's getter would initialise its
state with a step at learning rate 0, which changes the step count the next real step sees.
Restoring ``None`` leaves the optimizer as constructed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .sharding import local_tensor

MODEL = "model"
OPTIMIZERS = "optimizers"
#: what ``replicated`` may name besides the extras
REPLICABLE = (MODEL, OPTIMIZERS)


def torch_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a framework's wrapper (one with an ``optimizer`` attribute)."""
    inner = opt
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"{type(opt).__name__} is not a torch optimizer (nor wraps one)")
    return inner


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    return get_model_state_dict(model)


def optimizer_state(model: torch.nn.Module, opt: Any) -> dict[str, Any] | None:
    optim = torch_optimizer(opt)
    if not optim.state:
        return None
    return get_optimizer_state_dict(model, optim)


class Capture:
    """``model_state`` / ``optimizer_state`` at the cost of the modules' own ``state_dict()``.

    torch's getters work out every parameter's name on each call (about 20 ms a save for a
    GPT-2 of 150 tensors, on the training thread). The names do not change between saves, so
    the first capture asks torch's getters and learns the renaming; later captures take the
    plain ``state_dict()`` and rename its keys. The learned renaming is checked against
    torch's result once, and whenever the keys change; a model or optimizer it does not
    reproduce exactly is captured by torch's getters every time."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._model_keys: list[str] | None = None
        self._model_names: dict[str, str] | None = None  # plain key -> name; None: torch's
        self._opt_names: dict[int, tuple[list[int], dict[int, str] | None]] = {}

    def model_state(self) -> dict[str, Any]:
        plain = self.model.state_dict()
        keys = list(plain)
        if keys != self._model_keys:
            self._model_keys = keys
            named = model_state(self.model)
            self._model_names = dict(zip(keys, named, strict=True)) \
                if len(named) == len(keys) and all(
                    _same(plain[k], named[n]) for k, n in zip(keys, named, strict=True)) \
                else None
            return named
        if self._model_names is None:
            return model_state(self.model)
        return {self._model_names[k]: v for k, v in plain.items()}

    def optimizer_state(self, opt: Any) -> dict[str, Any] | None:
        optim = torch_optimizer(opt)
        if not optim.state:
            return None
        params = [id(p) for g in optim.param_groups for p in g["params"]]
        known = self._opt_names.get(id(optim))
        if known is None or known[0] != params:
            named = get_optimizer_state_dict(self.model, optim)
            names = _learn(optim.state_dict(), named)
            self._opt_names[id(optim)] = (params, names)
            return named
        names = known[1]
        if names is None:
            return get_optimizer_state_dict(self.model, optim)
        plain = optim.state_dict()
        return {"state": {names[i]: v for i, v in plain["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                 for g in plain["param_groups"]]}


def _same(a: Any, b: Any) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return a is b or a == b
    return type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype and \
        local_tensor(a).data_ptr() == local_tensor(b).data_ptr()


def _learn(plain: dict[str, Any], named: dict[str, Any]) -> dict[int, str] | None:
    """Parameter index -> name, as torch's getter renamed ``plain`` into ``named``; None when
    the renaming does not reproduce ``named``."""
    groups, named_groups = plain["param_groups"], named["param_groups"]
    if len(groups) != len(named_groups):
        return None
    names: dict[int, str] = {}
    for g, ng in zip(groups, named_groups, strict=True):
        if len(g["params"]) != len(ng["params"]):
            return None
        names.update(zip(g["params"], ng["params"], strict=True))
    state = {names.get(i): v for i, v in plain["state"].items()}
    if set(state) != set(named["state"]) or any(
            set(v) != set(named["state"][n]) or not all(
                _same(v[k], named["state"][n][k]) for k in v) for n, v in state.items()):
        return None
    return names


def apply_model(model: torch.nn.Module, sd: dict[str, Any]) -> None:
    """Load model state captured by ``model_state`` (placed like the model's, see ``reshard``)."""
    set_model_state_dict(model, sd)


def apply_optimizer(model: torch.nn.Module, opt: Any, sd: dict[str, Any] | None) -> None:
    """Load optimizer state captured by ``optimizer_state``."""
    optim = torch_optimizer(opt)
    if sd is None:
        optim.state.clear()
    else:
        set_optimizer_state_dict(model, optim, sd)


def apply(model: torch.nn.Module, optimizers: Sequence[Any], model_sd: dict[str, Any],
          optimizer_sds: Sequence[dict[str, Any] | None]) -> None:
    """Load model and optimizer state captured by ``model_state`` / ``optimizer_state``."""
    apply_model(model, model_sd)
    for opt, sd in zip(optimizers, optimizer_sds, strict=True):
        apply_optimizer(model, opt, sd)


def param_path(path: str) -> str | None:
    """For an optimizer state path ``optimizers/<i>/state/<name>/<key>``, the path of the
    parameter it belongs to (``model/<name>``); None for other paths."""
    parts = path.split("/")
    if len(parts) == 5 and parts[0] == OPTIMIZERS and parts[2] == "state":
        return f"{MODEL}/{parts[3]}"
    return None
