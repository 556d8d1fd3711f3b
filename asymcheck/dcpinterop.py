"""Interop with torch Distributed Checkpoint (DCP, ``torch.distributed.checkpoint``).

A DCP checkpoint directory as this module writes and reads it holds the layout of DCP's own
documentation: ``{"model": model_sd, "optim": optim_sd}``, keyed by fully qualified parameter
names (``torch.distributed.checkpoint.state_dict.get_model_state_dict`` /
``get_optimizer_state_dict``). Of several optimizers, the first one's state is ``"optim"`` and
optimizer ``i`` (i >= 1) is ``"optim_<i>"``; an optimizer that has not stepped has no key. The
step is written as ``"step"`` (a plain int), which DCP stores as a pickled object.

``save_dcp`` writes such a checkpoint from the state a checkpoint loads as (the CLI's
``restore --format dcp``). ``restore_dcp`` fills a model and its optimizers from one, in one
process or on every rank of a torch.distributed job (DCP reshards the saved tensors into the
model's placement, e.g. FSDP2's DTensor shards).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import RestoreError
from .statedict import torch_optimizer

log = logging.getLogger(__name__)

MODEL_KEY = "model"
OPTIM_KEY = "optim"
STEP_KEY = "step"
METADATA_FILE = ".metadata"
_OPTIM_RE = re.compile(r"optim(?:_([1-9][0-9]*))?")
_SHOWN = 5  # names listed in an error before "..."


def optim_key(index: int) -> str:
    """The top-level key of optimizer ``index``: ``optim``, ``optim_1``, ``optim_2``, ..."""
    return OPTIM_KEY if index == 0 else f"{OPTIM_KEY}_{index}"


def optim_index(key: str) -> int | None:
    """The optimizer index of a top-level key (``optim_key``'s inverse); None for other keys."""
    m = _OPTIM_RE.fullmatch(key)
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) else 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save or load; the single process is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled",
                                category=UserWarning)
        yield


def _failure(e: CheckpointException) -> str:
    """DCP's per-rank failures, one line each (without the tracebacks)."""
    parts = []
    for rank, (exc, _) in sorted(e.failures.items()):
        text = " ".join(str(exc).split()) or type(exc).__name__
        parts.append(f"rank {rank}: {text}")
    return "; ".join(parts) or "unknown failure"


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


# ---------------------------------------------------------------- AsymCheck -> DCP
def dcp_state(state: Mapping[str, Any], extra: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
    """The DCP layout of a checkpoint's state (``{"model": ..., "optimizers": [...], "step":
    N}``): ``model``, ``optim`` / ``optim_<i>`` for each optimizer that has state, ``step``,
    and the entries of ``extra``."""
    doc: dict[str, Any] = {MODEL_KEY: state[MODEL_KEY]}
    for i, opt in enumerate(state.get("optimizers") or []):
        if opt is not None:
            doc[optim_key(i)] = opt
    if state.get(STEP_KEY) is not None:
        doc[STEP_KEY] = int(state[STEP_KEY])
    doc.update(extra or {})
    return doc


def save_dcp(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``doc`` (see ``dcp_state``) as a DCP checkpoint in directory ``path`` from this
    process alone (``no_dist``), whatever torch.distributed runs. Raises OSError when it
    cannot be written."""
    with _single_process_quiet():
        try:
            dcp.save(doc, storage_writer=FileSystemWriter(os.fspath(path)), no_dist=True)
        except CheckpointException as e:
            raise OSError(_failure(e)) from None


# ---------------------------------------------------------------- DCP -> AsymCheck
def checkpoint_keys(path: str | os.PathLike[str]) -> list[str]:
    """The flattened keys a DCP checkpoint holds (``model.layers.0.weight``, ``step``, ...),
    from its ``.metadata``; RestoreError when ``path`` is not a DCP checkpoint."""
    root = Path(path)
    if not root.is_dir():
        raise RestoreError(f"{root} is not a DCP checkpoint: "
                           f"{'no such directory' if not root.exists() else 'not a directory'}")
    if not (root / METADATA_FILE).is_file():
        raise RestoreError(f"{root} is not a DCP checkpoint: it has no {METADATA_FILE} file")
    try:
        metadata = FileSystemReader(os.fspath(root)).read_metadata()
    except Exception as e:  # a damaged or foreign file fails to unpickle in many ways
        raise RestoreError(f"{root} is not a DCP checkpoint: its {METADATA_FILE} cannot be "
                           f"read ({type(e).__name__}: {e})") from None
    keys = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(keys, Mapping):
        raise RestoreError(f"{root} is not a DCP checkpoint: its {METADATA_FILE} holds a "
                           f"{type(metadata).__name__}")
    return [str(k) for k in keys]


def _check_model(root: Path, model_sd: Mapping[str, Any], saved: Sequence[str]) -> None:
    """The model's entries and the checkpoint's ``model.*`` entries must be the same (a
    non-tensor entry, which DCP may store as several nested keys, by prefix)."""
    prefix = f"{MODEL_KEY}."
    stored = {k[len(prefix):] for k in saved if k.startswith(prefix)}
    nested = tuple(f"{k}." for k, v in model_sd.items() if not isinstance(v, torch.Tensor))
    missing = [k for k in model_sd
               if k not in stored and not any(s.startswith(f"{k}.") for s in stored)]
    extra = sorted(s for s in stored if s not in model_sd and not s.startswith(nested))
    if missing:
        raise RestoreError(f"DCP checkpoint {root} lacks model state for {len(missing)} "
                           f"entr{'y' if len(missing) == 1 else 'ies'} of the model: "
                           f"{_names(missing)}")
    if extra:
        raise RestoreError(f"DCP checkpoint {root} holds model state for {len(extra)} "
                           f"entr{'y' if len(extra) == 1 else 'ies'} the model does not have: "
                           f"{_names(extra)}")


def restore_dcp(path: str | os.PathLike[str], model: torch.nn.Module,
                optimizers: Sequence[Any]) -> None:
    """Fill ``model`` and ``optimizers`` from the DCP checkpoint directory ``path`` (keys
    ``model`` and ``optim`` / ``optim_<i>``, see the module's doc).

    Under torch.distributed every rank calls it; DCP reads each rank's part of every tensor
    (e.g. FSDP2 shards) whatever world size saved it. An optimizer whose key the checkpoint
    lacks stays as constructed (a checkpoint of model weights alone starts a fresh
    optimizer). A path that is not a DCP checkpoint, one without model state, model entries
    that do not match, or optimizer state for more optimizers than given raise RestoreError.
    """
    root = Path(path)
    saved = checkpoint_keys(root)
    top = sorted({k.split(".", 1)[0] for k in saved})
    if MODEL_KEY not in top:
        raise RestoreError(f"DCP checkpoint {root} holds no model state (key {MODEL_KEY!r}); "
                           f"it holds {', '.join(map(repr, top)) or 'nothing'}")
    indices = {i: k for k in top if (i := optim_index(k)) is not None}
    beyond = sorted(k for i, k in indices.items() if i >= len(optimizers))
    if beyond:
        raise RestoreError(f"DCP checkpoint {root} holds optimizer state {', '.join(beyond)}: "
                           f"more optimizers than the {len(optimizers)} given")
    model_sd = get_model_state_dict(model)
    _check_model(root, model_sd, saved)
    sd: dict[str, Any] = {MODEL_KEY: model_sd}
    torch_opts = [torch_optimizer(o) for o in optimizers]
    for i, opt in enumerate(torch_opts):
        key = optim_key(i)
        if i in indices:
            sd[key] = get_optimizer_state_dict(model, opt)
        else:
            log.warning("DCP checkpoint %s holds no state for optimizer %d (key %r): it stays "
                        "as constructed", root, i, key)
    distributed = _distributed()
    with _single_process_quiet():
        try:
            dcp.load(sd, storage_reader=FileSystemReader(os.fspath(root)),
                     no_dist=not distributed)
        except CheckpointException as e:
            raise RestoreError(f"cannot load DCP checkpoint {root}: {_failure(e)}") from None
    set_model_state_dict(model, sd[MODEL_KEY])
    for i, opt in enumerate(torch_opts):
        if i in indices:
            set_optimizer_state_dict(model, opt, sd[optim_key(i)])
    log.info("restored model%s from DCP checkpoint %s",
             f" and {len(indices)} optimizer(s)" if indices else "", root)
