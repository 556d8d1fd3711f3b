"""The public API: ``Checkpointer`` saves and restores training state through the tiers.

The facade validates, delegates and manages the lifecycle. One ``save(step)`` walks:
``Stager`` (capture; copy now or in the next iteration's windows, behind the step gate) ->
``HostStage`` (a shared-memory block within the budget) -> ``Committer`` (commit on the host
tier, hand-off to the flush queues, backpressure) -> ``FlushScheduler`` (compression,
batching, each downstream tier) -> ``Topology`` (when the checkpoint counts as committed).

Each operation is written once, as ``Steps`` (see ``_loop``): ``save_sync`` and ``save`` drive
the same generator, from a plain thread or from an event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from tiers.host import HostTier

from . import dcpinterop
from ._loop import LoopThread, Steps, drive, drive_async
from .commit import Committer
from .errors import CheckpointError
from .handle import SaveHandle
from .layout import new_job_id
from .partition import BackwardPolicy, ForwardPolicy
from .policy import Policy, default_policy, load_policy
from .reshard import model_targets
from .restore import LoadedCheckpoint
from .snapshot import DEFAULT_CHUNK_BYTES
from .stager import Stager
from .state import apply_rng
from .statedict import MODEL, OPTIMIZERS, REPLICABLE
from .statedict import apply as apply_state
from .stream import save_in_pieces
from .topology import make_topology

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


def _as_list(optimizer: Any) -> list[Any]:
    if optimizer is None:
        return []
    if isinstance(optimizer, (list, tuple)):
        return list(optimizer)
    return [optimizer]


class Checkpointer:
    """Checkpoint ``model``, ``optimizer`` (one, a list, or None) and ``extras``.

    ``policy`` is a path to a TOML policy file, a ``Policy``, or None for the
    embedded default (host shared memory + ``./checkpoints``).

    Model and optimizer state are saved by parameter name (``statedict``); DTensors (FSDP2,
    HSDP, tensor parallel) as each rank's local chunk and its place (``sharding``).

    When torch.distributed runs with more than one rank, every rank saves its own shard and a
    checkpoint commits on a tier once every rank's shard is durable there (see ``ranks``);
    construct the Checkpointer on every rank at the same point, and save the same steps.
    ``replicated`` names state that is identical on every rank (``"model"`` under
    DistributedDataParallel, ``"optimizers"``, or an extra's name): rank 0 alone writes it
    and every rank restores it from rank 0's shard.

    ``snapshot_hooks=(module, optimizers)`` is for training state that arrives as an extra
    (``model`` None; e.g. DeepSpeed's ZeRO-3 files): in asym mode the passes of ``module`` open
    the copy windows, and the extra's tensors that are parameters or state of ``optimizers``
    (changed by their ``step()`` alone) are copied in those windows, behind their step gate.
    """

    def __init__(self, model: torch.nn.Module | None, optimizer: Any = None, *,
                 policy: str | os.PathLike[str] | Policy | None = None,
                 extras: Mapping[str, Stateful] | None = None, mode: str = "asym",
                 warmup_iterations: int = 10, min_partition_bytes: int = 256 << 10,
                 max_partition_bytes: int | None = None,
                 forward_policy: ForwardPolicy = ForwardPolicy(),
                 backward_policy: BackwardPolicy = BackwardPolicy(),
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, job: str | None = None,
                 replicated: Iterable[str] = (), dist_timeout_s: float = 1800.0,
                 snapshot_hooks: tuple[torch.nn.Module, Sequence[Any]] | None = None) -> None:
        self.model = model
        self.optimizers = _as_list(optimizer)
        if model is None and self.optimizers:
            raise ValueError("optimizer state is saved by parameter name: pass the model too")
        self.extras = dict(extras or {})
        for name, obj in [("model", model), *[(f"optimizer[{i}]", o)
                                               for i, o in enumerate(self.optimizers)],
                          *self.extras.items()]:
            if obj is not None and not (hasattr(obj, "state_dict")
                                        and hasattr(obj, "load_state_dict")):
                raise TypeError(f"{name} ({type(obj).__name__}) has no "
                                "state_dict()/load_state_dict()")
        if isinstance(policy, Policy):
            self.policy = policy
        else:
            self.policy = default_policy() if policy is None else load_policy(policy)
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        if mode not in ("asym", "naive"):
            raise ValueError(f"mode must be 'asym' or 'naive', got {mode!r}")
        self.replicated = tuple(replicated)
        for name in self.replicated:
            if name not in REPLICABLE and name not in self.extras:
                raise ValueError(f"replicated: {name!r} is neither "
                                 f"{' nor '.join(map(repr, REPLICABLE))} nor an extra")
        if snapshot_hooks is not None and model is not None:
            raise ValueError("snapshot_hooks is for state saved as an extra: with a model, the "
                             "model and its optimizers open the windows and gate the step")
        self.mode = mode
        self.job = job or new_job_id()
        self._stager = Stager(model, self.optimizers, self.extras, mode=mode,
                              warmup_iterations=warmup_iterations, forward=forward_policy,
                              backward=backward_policy, min_partition_bytes=min_partition_bytes,
                              max_partition_bytes=max_partition_bytes, chunk_bytes=chunk_bytes,
                              snapshot_hooks=snapshot_hooks)
        self.profiler = self._stager.profiler
        self._loop = LoopThread(f"asymcheck-{self.job}")
        self._errors: list[BaseException] = []
        self._opened = False
        self._closed = False
        self._topology = make_topology(self.policy, replicated=self.replicated,
                                       timeout_s=dist_timeout_s, job=self.job, loop=self._loop,
                                       on_global=self._on_global, on_error=self._errors.append)
        self._commit = Committer(self.policy, self._topology, self._loop, self.job,
                                 self._errors)

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.policy.tiers)

    @property
    def host(self) -> HostTier:
        """The host staging tier (open once a save or restore ran)."""
        return self._commit.host

    def local_path(self) -> Path | None:
        """The directory of the first file:// tier, if any (for examples and tools)."""
        for tp in self.policy.tiers:
            if tp.scheme == "file":
                return Path(tp.url[len("file://"):])
        return None

    # ------------------------------------------------------------ public API
    async def save(self, step: int) -> SaveHandle:
        """Capture the state of ``step``. Naive mode returns once the state is copied; asym
        mode returns after copying buffers and extras, and copies parameters and optimizer
        state during the next forward/backward passes (the next optimizer step waits for it)."""
        return await drive_async(self._loop, self._save(step))

    def save_sync(self, step: int) -> SaveHandle:
        """``save`` for plain (non-async) training loops."""
        return drive(self._loop, self._save(step))

    async def restore(self, step: int | None = None) -> int | None:
        """Load the newest committed checkpoint (or ``step``); None when nothing is committed.
        With several ranks every rank calls it, and all restore the same step. Sharded state
        (FSDP2, tensor parallel: DTensors) restores at any world size and placement, each rank
        reading only the parts of the saved shards its own part overlaps (``reshard``)."""
        return self._apply(await drive_async(self._loop, self._load(step)))

    def restore_sync(self, step: int | None = None) -> int | None:
        return self._apply(drive(self._loop, self._load(step)))

    def restore_dcp(self, path: str | os.PathLike[str]) -> None:
        """Fill the model and optimizers from the torch Distributed Checkpoint (DCP) directory
        ``path``, laid out as ``{"model": ..., "optim": ...}`` (optimizer ``i`` >= 1 under
        ``"optim_<i>"``; one the checkpoint lacks stays as constructed), e.g. to start a run
        from a checkpoint written by ``torch.distributed.checkpoint.save``. With several ranks
        every rank calls it; DCP reshards (FSDP2 and tensor-parallel models included). Raises
        ``RestoreError`` when ``path`` is not a DCP checkpoint or does not match the model."""
        if self.model is None:
            raise ValueError("restore_dcp fills the model and optimizers: this Checkpointer "
                             "has no model")
        self._stager.finish_pending()
        dcpinterop.restore_dcp(path, self.model, self.optimizers)

    async def load(self, step: int | None = None) -> LoadedCheckpoint | None:
        """Read a checkpoint without applying it (inspection, export): model state keyed by
        parameter name and placed like this Checkpointer's model (whole tensors without one);
        with several ranks, every rank calls it."""
        return await drive_async(self._loop, self._load(step))

    def load_sync(self, step: int | None = None) -> LoadedCheckpoint | None:
        return drive(self._loop, self._load(step))

    async def wait_idle(self) -> None:
        """Wait until every save so far is staged and flushed to each of its tiers (or failed
        there), and the retention that follows each commit is done. Saves may go on
        afterwards; failures stay on the handles."""
        await drive_async(self._loop, self._settle())

    def wait_idle_sync(self) -> None:
        """``wait_idle`` for plain (non-async) training loops."""
        drive(self._loop, self._settle())

    async def close(self) -> None:
        """Finish every queued flush, release tiers; raise a background error exactly once."""
        await drive_async(self._loop, self._close())

    def close_sync(self) -> None:
        drive(self._loop, self._close())

    def finish_snapshot(self) -> None:
        """Complete a pending asymmetric snapshot now. Call this before changing parameters or
        optimizer state other than through ``optimizer.step()``."""
        self._stager.finish_pending()

    async def __aenter__(self) -> Checkpointer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_sync()

    # ------------------------------------------------------------ operations
    def _open(self) -> Steps[None]:
        if not self._opened:
            yield self._commit.open()
            self._opened = True

    def _save(self, step: int) -> Steps[SaveHandle]:
        self._stager.finish_pending()
        if self._closed:
            raise RuntimeError("save() on a closed Checkpointer")
        yield from self._open()
        prep = self._stager.prepare(step, self._topology.skipped(), self._commit.tiers_for)
        try:
            block = yield from self._commit.admit(prep)
            if block is None:  # larger than the host budget allows: streamed in pieces
                return (yield from save_in_pieces(self._commit, prep))
            try:
                return self._stager.stage(prep, block,
                                          on_staged=lambda: self._commit.submit(prep, block))
            except BaseException:
                yield block.abort()
                raise
        except BaseException as e:
            self._topology.abandon(prep.handle, e)  # the other ranks learn it at the commit
            raise

    def _load(self, step: int | None) -> Steps[LoadedCheckpoint | None]:
        self._stager.finish_pending()
        yield from self._open()
        tiers = [self._commit.tiers[t.name] for t in self.policy.tiers]
        return (yield from self._topology.restore(tiers, step, model_targets(self.model)))

    def _apply(self, loaded: LoadedCheckpoint | None) -> int | None:
        if loaded is None:
            return None
        state = loaded.state
        saved_opts = state[OPTIMIZERS]
        if len(saved_opts) != len(self.optimizers):
            raise ValueError(f"checkpoint step {loaded.step} holds {len(saved_opts)} optimizer "
                             f"states, this Checkpointer has {len(self.optimizers)}")
        if self.model is not None:
            apply_state(self.model, self.optimizers, state[MODEL], saved_opts)
        missing = set(self.extras) - set(state["extras"])
        if missing:
            raise ValueError(f"checkpoint step {loaded.step} has no state for extras "
                             f"{sorted(missing)}")
        for name, obj in self.extras.items():
            obj.load_state_dict(state["extras"][name])
        apply_rng(state["rng"])
        log.info("restored step %d (tensors read per tier: %s)", loaded.step, loaded.sources)
        step: int = state["step"]
        return step

    def _settle(self) -> Steps[None]:
        self._stager.finish_pending()
        if self._opened:
            yield self._commit.settle()

    def _close(self) -> Steps[None]:
        if self._closed:
            return
        self._stager.finish_pending()
        self._closed = True
        try:
            yield from self._settle()
            yield self._topology.stop()  # the last global commits (every rank drains alike)
            if self._opened:
                yield self._commit.close()
            yield self._topology.close()
        finally:
            self._loop.stop()
            self._stager.close()
            if self._errors:
                errors, self._errors[:] = list(self._errors), []
                raise CheckpointError(f"{len(errors)} checkpoint operation(s) failed in the "
                                      f"background; first: {errors[0]!r}") from errors[0]

    async def _on_global(self, tier: str) -> None:
        """A global commit on ``tier`` (several ranks): older checkpoints may go there."""
        await self._commit.retain(self._commit.tiers[tier])
