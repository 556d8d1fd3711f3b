"""The stager: what a save captures, what it copies now, and what it defers to the next
iteration behind the step gate.

``prepare`` captures the state (non-tensor parts, RNG, buffers and extras as they are now) and
lays its tensors out in one host block. ``stage`` copies into the block whatever may change
before the next ``optimizer.step()`` (buffers, RNG, extras) and, in ``asym`` mode, hands the
parameters and optimizer state to an ``AsymSnapshot`` that copies them in the next iteration's
forward and backward windows, partitioned by a plan cached per profile and state shape. The
step gate (``finish_pending``, a pre-hook of every optimizer step) copies whatever is left:
that residual is the only stall.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tiers.host import HostBlock

from .copier import Copier, CudaCopier
from .handle import SaveHandle
from .layout import data_name, new_save_id, step_dir, step_key
from .partition import BackwardPolicy, ForwardPolicy, PartitionPlan, make_plan
from .profile import Profiler, WindowTracker
from .sharding import local_tensor
from .snapshot import (
    AsymSnapshot,
    ChunkDigests,
    Layout,
    block_tensor,
    copy_into,
    copy_slot,
)
from .state import capture_rng, flatten, pack_skeleton
from .statedict import MODEL, OPTIMIZERS, Capture

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One save between capture and commit."""

    step: int
    save_id: str
    tensors: tuple[torch.Tensor, ...]
    layout: Layout
    skeleton: Any  # everything but the tensors (``state.flatten``), packed by ``objects``
    handle: SaveHandle
    started_s: float
    on_device: bool
    scheduled: tuple[str, ...]  # every tier the save is scheduled on (``handle.tiers``: those
    # it goes to; the host tier is left out when the state streams past it)
    hashed: ChunkDigests | None = None  # checksums the copier computed (asym mode)

    @functools.cached_property
    def objects(self) -> bytes:
        """The packed skeleton: packed on first use, by the commit on its worker thread (the
        skeleton shares nothing mutable with the state, so later changes do not reach it)."""
        return pack_skeleton(self.skeleton)

    @property
    def data_name(self) -> str:
        return data_name(self.save_id)

    @property
    def data_key(self) -> str:
        return step_key(self.step, self.data_name)


@dataclass
class _Pending:
    snapshot: AsymSnapshot
    prep: Prepared


class Stager:
    def __init__(self, model: torch.nn.Module | None, optimizers: Sequence[Any],
                 extras: Mapping[str, Any], *, mode: str, warmup_iterations: int,
                 forward: ForwardPolicy, backward: BackwardPolicy, min_partition_bytes: int,
                 max_partition_bytes: int | None, chunk_bytes: int,
                 snapshot_hooks: tuple[torch.nn.Module, Sequence[Any]] | None = None) -> None:
        self.model, self.optimizers, self.extras = model, list(optimizers), dict(extras)
        # the module whose passes open the copy windows, and the optimizers whose step alone
        # changes the deferred tensors (their parameters and state)
        self._windows, self._gates = (model, self.optimizers) if snapshot_hooks is None else \
            (snapshot_hooks[0], [*self.optimizers, *snapshot_hooks[1]])
        self._capture = Capture(model) if model is not None else None
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        self._plan_options: dict[str, Any] = {
            "forward": forward, "backward": backward,
            "min_partition_bytes": min_partition_bytes,
            "max_partition_bytes": max_partition_bytes}
        self._plans: dict[tuple[Any, ...], PartitionPlan] = {}
        #: the last save's: its paths, dtypes and shapes, and the layout
        self._layout: tuple[tuple[str, ...], list[tuple[torch.dtype, torch.Size]], Layout] \
            | None = None
        #: the last save's deferrable tensors: (layout, their addresses, the gated
        #: optimizers' sizes), indices
        self._deferred: tuple[tuple[Layout, list[int], list[int]], tuple[int, ...]] | None = None
        self._pending: _Pending | None = None
        self._pending_lock = threading.Lock()
        self._gate_lock = threading.RLock()
        self._tracker: WindowTracker | None = None
        self.profiler: Profiler | None = None
        self._copier: Copier | None = None
        if mode == "asym" and self._windows is not None:
            self._tracker = WindowTracker(self._windows, self._gates)
            self.profiler = Profiler(self._tracker, warmup_iterations)
            self._tracker.add_listeners(self._on_window, lambda: self.finish_pending())

    # ---------------------------------------------------------------- capture
    def prepare(self, step: int, skipped: frozenset[str],
                tiers_for: Callable[[int], tuple[tuple[str, ...], tuple[str, ...]]]
                ) -> Prepared:
        """Capture the state of ``step`` (``skipped`` parts are written by another rank);
        ``tiers_for(nbytes)`` names the tiers a save of that size is scheduled on, and those
        it goes to."""
        started = time.perf_counter()
        step_dir(step)  # validates
        state = {
            MODEL: None if MODEL in skipped else
            self._capture.model_state() if self._capture is not None else {},
            OPTIMIZERS: None if OPTIMIZERS in skipped else
            [self._capture.optimizer_state(o) for o in self.optimizers]
            if self._capture is not None else [],
            "extras": {name: None if name in skipped else obj.state_dict()
                       for name, obj in self.extras.items()},
            "rng": capture_rng(),
            "step": step,
        }
        flat = flatten(state)
        layout = self._layout_of(flat.paths, flat.tensors)
        scheduled, tiers = tiers_for(layout.total_bytes)
        handle = SaveHandle.create(step, tiers, kick=self.finish_pending)
        # part of the stall: the state dicts, their flattening and the layout
        handle.metrics["capture_s"] = time.perf_counter() - started
        return Prepared(step, new_save_id(), flat.tensors, layout, flat.skeleton, handle, started,
                        any(t.is_cuda for t in flat.tensors), scheduled)

    def _layout_of(self, paths: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> Layout:
        """The block layout of these tensors: the last save's when paths, dtypes and shapes are
        the same (they are from one save to the next, and planning walks every tensor). Compared
        tensor by tensor, without a key of them all alive at once for the garbage collector."""
        last = self._layout
        if last is not None and last[0] == paths and len(last[1]) == len(tensors) and all(
                t.dtype == dtype and t.shape == shape
                for t, (dtype, shape) in zip(tensors, last[1], strict=True)):
            return last[2]
        layout = Layout.plan(paths, tensors, self.chunk_bytes)
        self._layout = paths, [(t.dtype, t.shape) for t in tensors], layout
        return layout

    def _deferrable(self, tensors: tuple[torch.Tensor, ...], layout: Layout) -> tuple[int, ...]:
        """Indices of tensors that only an optimizer step changes (parameters and optimizer
        state): those may be copied during the next forward and backward passes. Buffers,
        RNG and extras change elsewhere and are copied at save time, except an extra's
        tensors that are the gated optimizers' parameters or state (``snapshot_hooks``).

        Found again only when the layout, the addresses of the tensors found last time, or
        the number of parameters a gated optimizer steps or holds state for change (a walk over
        every parameter and state tensor is most of a save's work on the training thread when
        they are many): the same tensors at the same addresses are the same parameters and
        state. A tensor found not deferrable stays so until then, which is always safe: it is
        copied at save time."""
        states = [n for o in self._gates  # a gate may be a wrapper without param_groups
                  for n in (len(o.state),
                            *(len(g["params"]) for g in getattr(o, "param_groups", ())))]
        if self._deferred is not None:
            (last_layout, addresses, last_states), last = self._deferred
            if (last_layout is layout and last_states == states
                    and addresses == [tensors[i].data_ptr() for i in last]):
                return last
        owned: set[tuple[int, int]] = set()
        if self._windows is not None:
            owned.update((p.data_ptr(), p.nbytes)
                         for p in map(local_tensor, self._windows.parameters()))
        for opt in self._gates:
            for param, st in opt.state.items():
                owned.update((v.data_ptr(), v.nbytes)
                             for v in map(local_tensor, (param, *st.values()))
                             if isinstance(v, torch.Tensor))
        found = tuple(i for i, t in enumerate(tensors)
                      if t.nbytes and t.is_contiguous() and (t.data_ptr(), t.nbytes) in owned)
        self._deferred = (layout, [tensors[i].data_ptr() for i in found], states), found
        return found

    def _plan(self, sizes: tuple[int, ...]) -> PartitionPlan | None:
        profile = self.profiler.profile if self.profiler is not None else None
        if profile is None or not sizes:
            return None
        key = (profile.signature, profile.iterations, id(profile), sizes)
        plan = self._plans.get(key)
        if plan is None:
            self._plans.clear()
            plan = self._plans[key] = make_plan(profile, sizes, **self._plan_options)
            log.info("%s", plan)
        return plan

    # ------------------------------------------------------------------ stage
    def stage(self, prep: Prepared, block: HostBlock,
              on_staged: Callable[[], None]) -> SaveHandle:
        """Copy what must be copied now; ``on_staged`` runs once every byte is in the block
        (now in naive mode, after the deferred copies in asym mode)."""
        handle = prep.handle
        target = block_tensor(block.view)
        deferred = self._deferrable(prep.tensors, prep.layout) if self.mode == "asym" else ()
        plan = self._plan(tuple(prep.tensors[i].nbytes for i in deferred))
        if plan is None:
            copy_into(prep.tensors, prep.layout, target)
        else:
            later = set(deferred)
            for i, (t, slot) in enumerate(zip(prep.tensors, prep.layout.slots, strict=True)):
                if i not in later:
                    copy_slot(t, slot, target)
            slots = prep.layout.slots
            copier = self._copier_for(prep.tensors[deferred[0]].device)
            prep.hashed = ChunkDigests(deferred, [slots[i].nbytes for i in deferred],
                                       prep.layout.chunk_bytes, pool=copier.hash_pool)
            snapshot = AsymSnapshot(
                plan, [prep.tensors[i] for i in deferred], [slots[i].offset for i in deferred],
                target.numpy(), copier, on_done=on_staged, digests=prep.hashed)
            handle.metrics["plan"] = plan.summary()
            with self._pending_lock:
                self._pending = _Pending(snapshot, prep)
        handle.stall_s = time.perf_counter() - prep.started_s
        handle.metrics.update(mode="naive" if plan is None else "asym",
                              save_stall_s=handle.stall_s, stall_s=handle.stall_s,
                              state_bytes=prep.layout.total_bytes, tensors=len(prep.tensors))
        if plan is None:
            on_staged()
        return handle

    def _copier_for(self, device: torch.device) -> Copier:
        if self._copier is None:
            self._copier = CudaCopier(device) if device.type == "cuda" else Copier()
        if isinstance(self._copier, CudaCopier):
            self._copier.start()
        return self._copier

    # -------------------------------------------------------------- step gate
    def _on_window(self, k: int) -> None:
        pending = self._pending
        if pending is not None:
            pending.snapshot.on_window(k)

    def finish_pending(self) -> None:
        """The step gate: complete the pending snapshot; the wait is added to its stall.

        Held under a lock for the whole copy, so an optimizer step never passes while another
        thread (one waiting on ``handle.staged``) is still finishing the snapshot."""
        with self._gate_lock:
            with self._pending_lock:
                pending, self._pending = self._pending, None
            if pending is None:
                return
            t0 = time.perf_counter()
            pending.snapshot.finish()
            gate_s = time.perf_counter() - t0
            handle = pending.prep.handle
            handle.stall_s += gate_s
            handle.metrics.update(gate_stall_s=gate_s, stall_s=handle.stall_s,
                                  residual_bytes=pending.snapshot.residual_bytes,
                                  overlapped_bytes=pending.snapshot.launched_bytes)

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.remove()
        if self._copier is not None:
            self._copier.close()
