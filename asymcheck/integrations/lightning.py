"""AsymCheck for PyTorch Lightning (>= 2.6).

::

    from asymcheck.integrations.lightning import AsymCheckCallback

    trainer = L.Trainer(max_steps=1000, callbacks=[AsymCheckCallback("tiers.toml", every=10)])
    trainer.fit(model, train_loader)   # resumes from the newest committed checkpoint, if any

``AsymCheckCallback`` owns a ``Checkpointer`` over the LightningModule, the trainer's torch
optimizers and its LR schedulers (extras ``lr_scheduler.<i>``). It saves in
``on_train_batch_end`` after every ``every``-th optimizer step (``trainer.global_step``;
a batch that only accumulates gradients does not count), together with Lightning's own state
(extra ``lightning``): ``trainer.fit_loop.state_dict()`` (epoch, global step, position in the
epoch, the train loader's ``state_dict()`` when it has one), the callbacks' states and the
precision plugin's (grad scaler). The checkpoint's step is ``trainer.global_step``.

Resume: in ``on_fit_start`` (optimizers and schedulers exist, the loops have not started) the
callback restores the newest committed checkpoint from its nearest tier and loads the loop
state into ``trainer.fit_loop``, exactly where Lightning applies the loops of a ``ckpt_path``
checkpoint, so the same command continues after a crash. With no committed checkpoint it
starts fresh and logs one line; with ``trainer.fit(ckpt_path=...)`` Lightning's checkpoint
wins and the callback only saves.

The step gate: Lightning runs forward and backward inside ``optimizer.step(closure)``, so a
torch step pre-hook would fire before them and leave nothing to overlap. The Checkpointer
therefore sees each optimizer through a proxy whose step hooks the callback fires in
``on_before_optimizer_step`` (after backward, before the update): the asymmetric snapshot
copies parameters and optimizer state during the next forward and backward passes.

Bit-exact resume in the middle of an epoch needs a train loader Lightning can resume (one with
``state_dict``/``load_state_dict``, such as ``ResumableDataLoader`` below), and data loading
that does not draw from the global RNG (give a shuffling loader its own ``generator``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:
    raise ImportError("asymcheck.integrations.lightning needs PyTorch Lightning: "
                      "pip install 'asymcheck[lightning]'") from None

import torch
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from tiers.base import redact_url

from ..checkpointer import Checkpointer
from ..handle import SaveHandle
from ..policy import Policy, default_policy
from ..state import apply_rng, capture_rng, flatten

__all__ = ["AsymCheckCallback", "ResumableDataLoader"]

log = logging.getLogger(__name__)


class _GatedOptimizer:
    """A torch optimizer as the Checkpointer sees it: state, param groups and ``state_dict``
    are the optimizer's, step pre-hooks run when the callback calls ``fire`` (Lightning's
    ``on_before_optimizer_step``) instead of before the closure."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()  # weak-referenceable

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    def fire(self) -> None:
        for hook in list(self._hooks.values()):
            hook(self.optimizer, (), {})


class _LightningState:
    """Lightning's own state as a Checkpointer extra: loops, callbacks, precision plugin."""

    def __init__(self, trainer: pl.Trainer, owner: pl.Callback) -> None:
        self.trainer, self.owner = trainer, owner
        self._unsaved: set[str] = set()

    def _callbacks(self) -> list[pl.Callback]:
        return [cb for cb in self.trainer.callbacks if cb is not self.owner]  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        callbacks: dict[str, Any] = {}
        for cb in self._callbacks():
            state = cb.state_dict()
            if not state or cb.state_key in self._unsaved:
                continue
            try:
                flatten(state)
            except TypeError as e:
                self._unsaved.add(cb.state_key)
                log.warning("the state of callback %s is not saved: %s", cb.state_key, e)
                continue
            callbacks[cb.state_key] = state
        return {"fit_loop": t.fit_loop.state_dict(), "callbacks": callbacks,
                "precision": t.precision_plugin.state_dict(),
                "global_step": t.global_step, "epoch": t.current_epoch,
                "batch_idx": t.fit_loop.batch_idx, "lightning_version": pl.__version__}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = self.trainer
        t.fit_loop.load_state_dict(state["fit_loop"])
        for cb in self._callbacks():
            if cb.state_key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.state_key])
        if state["precision"]:
            t.precision_plugin.load_state_dict(state["precision"])


class AsymCheckCallback(pl.Callback):
    """Checkpoint with AsymCheck every ``every`` optimizer steps, and resume.

    ``policy`` is a tier policy file, a ``Policy``, or None for the default policy under
    ``<trainer.default_root_dir>/asymcheck`` (host shared memory + local files). ``resume``
    restores the newest committed checkpoint at the start of ``fit``. Other keyword
    arguments go to ``Checkpointer`` (``mode``, ``warmup_iterations``, ``replicated``, ...).

    ``checkpointer`` is the Checkpointer (from ``on_fit_start``), ``last_handle`` the handle of
    the latest save, ``restored_step`` the step restored (None: started fresh).
    """

    def __init__(self, policy: str | Path | Policy | None = None, every: int = 100, *,
                 resume: bool = True, **checkpointer_options: Any) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.policy = policy
        self.resume = resume
        self.options = checkpointer_options
        self.checkpointer: Checkpointer | None = None
        self.last_handle: SaveHandle | None = None
        self.restored_step: int | None = None
        self._gated: dict[int, _GatedOptimizer] = {}
        self._last_step = -1
        self._rng: dict[str, Any] | None = None  # applied again at the first batch after resume

    # ------------------------------------------------------------------ start
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        self._gated = {id(o): _GatedOptimizer(o) for o in trainer.optimizers}
        extras: dict[str, Any] = {f"lr_scheduler.{i}": cfg.scheduler
                                  for i, cfg in enumerate(trainer.lr_scheduler_configs)}
        extras["lightning"] = _LightningState(trainer, self)
        policy = self.policy
        if policy is None:
            policy = default_policy(Path(trainer.default_root_dir) / "asymcheck")
        self.checkpointer = Checkpointer(pl_module, list(self._gated.values()), policy=policy,
                                         extras=extras, **self.options)
        self.restored_step = None
        if self.resume and trainer.ckpt_path:
            self._say(trainer, f"AsymCheck: resuming from ckpt_path={trainer.ckpt_path!s} "
                      "instead of an AsymCheck checkpoint")
        elif self.resume:
            self.restored_step = self.checkpointer.restore_sync()
            if self.restored_step is None:
                tiers = ", ".join(f"{t.name} ({redact_url(t.url)})"
                                  for t in self.checkpointer.policy.tiers)
                self._say(trainer, f"AsymCheck: no committed checkpoint in {tiers}: "
                          "starting fresh")
            else:
                batch = trainer.fit_loop.epoch_loop.batch_progress
                # A new epoch's loader iterator (which may draw from the global RNG) follows a
                # save at an epoch's last batch in both runs; after a save mid-epoch it only
                # follows the resume: then the RNG is applied again at the next batch.
                self._rng = None if batch.is_last_batch else capture_rng()
                self._say(trainer, f"AsymCheck: restored step {self.restored_step} "
                          f"(epoch {trainer.current_epoch}, global step {trainer.global_step})")
        self._last_step = trainer.global_step

    @staticmethod
    def _say(trainer: pl.Trainer, message: str) -> None:
        if trainer.is_global_zero:
            log.info("%s", message)

    # ---------------------------------------------------------------- training
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._rng is not None:
            apply_rng(self._rng)
            self._rng = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        gated = self._gated.get(id(optimizer))
        for g in [gated] if gated is not None else self._gated.values():
            g.fire()  # the step gate: the pending snapshot completes before the update

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or self.checkpointer is None:
            return  # no optimizer step in this batch (gradient accumulation, skipped step)
        self._last_step = step
        if step % self.every == 0:
            self.last_handle = self.checkpointer.save_sync(step)

    # ------------------------------------------------------------------ end
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        try:
            self._close()
        except Exception:  # the training's exception is the one to raise
            log.exception("closing the checkpointer after a failed fit")

    def _close(self) -> None:
        """Drain every queued flush; raises ``CheckpointError`` once for background failures."""
        ckpt, self.checkpointer = self.checkpointer, None
        if ckpt is not None:
            ckpt.close_sync()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning resumes in the middle of an epoch.

    Its ``state_dict()`` (saved by Lightning with the loop state) holds the number of batches
    the current iterator yielded and the states of the loader's ``generator`` at the start of
    the epoch and now. After ``load_state_dict`` the next iterator replays the epoch's order
    (the generator restored) and drops the batches already trained on, loading them: cheap with
    ``num_workers=0`` and small items, proportional to the position otherwise. A saved epoch
    that was complete starts the next one. A shuffling loader needs its own ``generator``
    (``generator=torch.Generator().manual_seed(seed)``) for the order to be replayed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._start_rng: torch.Tensor | None = None
        self._resume: dict[str, Any] | None = None

    def _rng_state(self) -> torch.Tensor | None:
        return None if self.generator is None else self.generator.get_state()

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip = 0
        if self._resume is not None:
            state, self._resume = self._resume, None
            done = state["batches"] >= len(self)
            rng = state["rng_now" if done else "rng_start"]
            if rng is not None and self.generator is not None:
                self.generator.set_state(rng)
            skip = 0 if done else state["batches"]
        self._start_rng = self._rng_state()
        self._yielded = 0
        it = super().__iter__()
        for _ in range(skip):
            next(it)
            self._yielded += 1
        return self._count(it)

    def _count(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._yielded, "rng_start": self._start_rng,
                "rng_now": self._rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)
