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

MODEL = "model"
OPTIMIZERS = "optimizers"
#: what ``replicated`` may name besides the extras
REPLICABLE = (MODEL, OPTIMIZERS)


def _torch_optimizer(opt: Any) -> torch.optim.Optimizer:
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
    optim = _torch_optimizer(opt)
    if not optim.state:
        return None
    return get_optimizer_state_dict(model, optim)


def apply(model: torch.nn.Module, optimizers: Sequence[Any], model_sd: dict[str, Any],
          optimizer_sds: Sequence[dict[str, Any] | None]) -> None:
    """Load model and optimizer state captured by ``model_state`` / ``optimizer_state``."""
    set_model_state_dict(model, model_sd)
    for opt, sd in zip(optimizers, optimizer_sds, strict=True):
        optim = _torch_optimizer(opt)
        if sd is None:
            optim.state.clear()
        else:
            set_optimizer_state_dict(model, optim, sd)


def param_path(path: str) -> str | None:
    """For an optimizer state path ``optimizers/<i>/state/<name>/<key>``, the path of the
    parameter it belongs to (``model/<name>``); None for other paths."""
    parts = path.split("/")
    if len(parts) == 5 and parts[0] == OPTIMIZERS and parts[2] == "state":
        return f"{MODEL}/{parts[3]}"
    return None
