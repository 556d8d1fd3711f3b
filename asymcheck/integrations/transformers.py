"""AsymCheck as a drop-in for Hugging Face ``transformers.Trainer``.

::

    from asymcheck.integrations.transformers import AsymCheckCallback, asymcheck_trainer

    trainer = asymcheck_trainer(Trainer)(model=model, args=args, train_dataset=data,
                                         callbacks=[AsymCheckCallback(every=10)])
    trainer.train()   # resumes from the newest committed checkpoint when there is one

``AsymCheckCallback`` saves after every ``every``-th optimizer step (``on_step_end``, once the
optimizer and the LR scheduler have stepped): the model, the optimizer, the LR scheduler, the
grad scaler (if any), the RNG states, the Trainer's own state (global step, epoch, log
history, stateful callbacks) and the model's config (extra ``hf_config``, which
``asymcheck restore STEP --to DIR --format hf`` writes as ``config.json``).

``asymcheck_trainer(cls)`` returns a subclass of a Trainer class that resumes: before its
training loop starts it loads the newest committed checkpoint (nearest tier), takes the
Trainer's state and data position from it, and applies the model, optimizer, scheduler,
scaler and RNG states where the Trainer applies those of its own checkpoints, so the run
goes on as if it had never stopped. With no committed checkpoint it starts fresh and logs
one line. The callback alone (a plain ``Trainer``) saves, but cannot resume.

The asymmetric snapshot hooks the torch optimizer inside accelerate's ``AcceleratedOptimizer``:
its step pre-hook (the step gate) fires on every real optimizer step, once per gradient
accumulation cycle. Under DistributedDataParallel (world size > 1) the model is saved by rank
0 alone (``replicated=("model",)``). Under FSDP2 (``fsdp_config={"version": 2}``) every rank
saves its own shards: the checkpoint is read as whole tensors before accelerate shards the
model, the model state is applied then, the optimizer state
is distributed to the shards after accelerate has prepared the optimizer, and the saving
Checkpointer is opened again on the sharded model when training begins. DeepSpeed, FSDP1 and
XLA FSDP are not supported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

try:
    import accelerate  # noqa: F401  (Trainer needs it)
    from transformers import Trainer, TrainerCallback, TrainerState
    from transformers.trainer_callback import ExportableState
except ImportError:
    raise ImportError("asymcheck.integrations.transformers needs transformers and accelerate: "
                      "pip install 'asymcheck[hf]'") from None

import torch

from ..checkpointer import Checkpointer
from ..handle import SaveHandle
from ..partition import BackwardPolicy, ForwardPolicy
from ..policy import Policy
from ..restore import LoadedCheckpoint
from ..state import apply_rng
from ..statedict import MODEL, OPTIMIZERS, apply_model, apply_optimizer

__all__ = ["HF_CONFIG", "AsymCheckCallback", "AsymCheckTrainer", "asymcheck_trainer"]

log = logging.getLogger(__name__)

#: the extra holding the model's config (``{"json": config.to_json_string()}``)
HF_CONFIG = "hf_config"
#: the extra holding the Trainer's state (``{"json": TrainerState as JSON}``)
TRAINER_STATE = "trainer_state"
#: what ``resume_from_checkpoint`` carries through the Trainer's loop while AsymCheck resumes
_RESUME = "asymcheck:resume"

T = TypeVar("T", bound=type)


class _Lookup:
    """An extra whose object is looked up on every save and load: the Trainer creates its LR
    scheduler after the optimizer, and again on every ``train()``."""

    def __init__(self, get: Callable[[], Any]) -> None:
        self._get = get

    def state_dict(self) -> Any:
        return self._get().state_dict()

    def load_state_dict(self, state: Any) -> None:
        self._get().load_state_dict(state)


class _JsonExtra:
    """Non-tensor state kept as one JSON string (JSON-safe by construction); the Trainer class
    applies what it holds itself, at the right point of its loop."""

    def __init__(self, dump: Callable[[], str]) -> None:
        self._dump = dump

    def state_dict(self) -> dict[str, str]:
        return {"json": self._dump()}

    def load_state_dict(self, state: Any) -> None:
        pass


def _config_json(model: torch.nn.Module) -> str | None:
    """The model's config as ``save_pretrained`` writes it (``architectures`` included)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    data = json.loads(config.to_json_string(use_diff=False))
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    return json.dumps(data, sort_keys=True)


def _trainer_state_json(state: TrainerState, callbacks: Iterable[Any]) -> str:
    """The Trainer's state as its ``trainer_state.json`` would hold it (callback states
    refreshed the way ``Trainer._save_checkpoint`` does)."""
    stored: Any = state.stateful_callbacks
    stateful: dict[str, Any] = dict(stored or {})
    for cb in callbacks:
        if isinstance(cb, ExportableState):
            name = cb.__class__.__name__
            if isinstance(stateful.get(name), list):
                stateful[name] = [*stateful[name], cb.state()]
            else:
                stateful[name] = cb.state()
    data = dataclasses.asdict(state)
    data["stateful_callbacks"] = stateful
    return json.dumps(data, sort_keys=True)


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (its ``step`` is the
    one the step gate hooks)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class AsymCheckCallback(TrainerCallback):
    """Checkpoint through AsymCheck every ``every`` optimizer steps (and after the last step).

    ``policy``: a tier policy file, a ``Policy``, or None for the embedded default (host
    shared memory + ``./checkpoints``). ``mode``: ``"asym"`` (parameters and optimizer state
    copied during the next iteration's forward and backward passes) or ``"naive"``.
    ``resume``: whether ``asymcheck_trainer`` classes resume from the newest committed
    checkpoint. Other keyword arguments go to ``Checkpointer``. ``handles`` keeps the
    handles of the latest saves (``handle.stall_s``, ``handle.metrics``, ``handle.durable``).
    """

    def __init__(self, policy: str | os.PathLike[str] | Policy | None = None, *, every: int = 100,
                 mode: str = "asym", resume: bool = True, save_last: bool = True,
                 warmup_iterations: int = 10,
                 forward_policy: ForwardPolicy = ForwardPolicy(),
                 backward_policy: BackwardPolicy = BackwardPolicy(),
                 **checkpointer_options: Any) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if mode not in ("asym", "naive"):
            raise ValueError(f"mode must be 'asym' or 'naive', got {mode!r}")
        self.policy, self.every, self.mode = policy, every, mode
        self.resume, self.save_last = resume, save_last
        self.replicated: tuple[str, ...] | None = (
            None if "replicated" not in checkpointer_options
            else tuple(checkpointer_options.pop("replicated")))
        self.options = dict(checkpointer_options, warmup_iterations=warmup_iterations,
                            forward_policy=forward_policy, backward_policy=backward_policy)
        self.checkpointer: Checkpointer | None = None
        self.handles: deque[SaveHandle] = deque(maxlen=64)
        self.restored_step: int | None = None
        self._state: TrainerState | None = None
        #: opens the Checkpointer again once the model is sharded (set by the Trainer class)
        self._reopen: Callable[[], Checkpointer] | None = None

    # ------------------------------------------------------------------ setup
    def open(self, model: torch.nn.Module, optimizer: Any, *,
             scheduler: Callable[[], Any] | None, scaler: Any = None,
             trainer_state: Callable[[], str] | None = None,
             sharded: bool = False) -> Checkpointer:
        """Create the Checkpointer for one ``train()`` (done by the Trainer class or, with a
        plain Trainer, at ``on_train_begin``). ``sharded``: the model is (or will be) sharded
        over the ranks (FSDP2), so no rank's copy of it stands for the others'."""
        self.close()
        extras: dict[str, Any] = {}
        if scheduler is not None:
            extras["scheduler"] = _Lookup(scheduler)
        if scaler is not None:
            extras["scaler"] = scaler
        if trainer_state is not None:
            extras[TRAINER_STATE] = _JsonExtra(trainer_state)
        config = _config_json(model)
        if config is not None:
            extras[HF_CONFIG] = _JsonExtra(lambda: config)
        distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()
                       and torch.distributed.get_world_size() > 1)
        replicated = (self.replicated if self.replicated is not None
                      else ("model",) if distributed and not sharded else ())
        self.checkpointer = Checkpointer(model, _inner_optimizer(optimizer), policy=self.policy,
                                         extras=extras, mode=self.mode, replicated=replicated,
                                         **self.options)
        return self.checkpointer

    def close(self) -> None:
        """Flush every save and release the tiers (at the end of ``train()``)."""
        self._reopen = None
        ckpt, self.checkpointer = self.checkpointer, None
        if ckpt is not None:
            ckpt.close_sync()

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any
                       ) -> None:
        self._state = state
        if self._reopen is not None:  # the model is sharded now: hook its sharded parameters
            reopen, self._reopen = self._reopen, None
            reopen()
        if self.checkpointer is None:  # a plain Trainer: save only
            log.warning("AsymCheckCallback in a plain Trainer saves but does not resume: "
                        "use asymcheck.integrations.transformers.asymcheck_trainer(Trainer)")
            self.open(kwargs["model"], kwargs["optimizer"],
                      scheduler=lambda: kwargs["lr_scheduler"],
                      trainer_state=lambda: _trainer_state_json(self._current(), ()))

    def _current(self) -> TrainerState:
        assert self._state is not None
        return self._state

    def on_step_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        self._state = state
        step = state.global_step
        last = self.save_last and state.max_steps > 0 and step >= state.max_steps
        if self.checkpointer is not None and (step % self.every == 0 or last):
            self.handles.append(self.checkpointer.save_sync(step))

    def on_train_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        self.close()


def _distribute_optimizer(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]
                          ) -> None:
    """Load optimizer state read as whole tensors into the optimizer of a sharded (FSDP2)
    model: each rank keeps its shard of every tensor."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, _inner_optimizer(optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


def _find_callback(trainer: Any) -> AsymCheckCallback | None:
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, AsymCheckCallback):
            return cb
    return None


def asymcheck_trainer(base: T) -> T:
    """A subclass of the Trainer class ``base`` that resumes from AsymCheck checkpoints.

    Pass an ``AsymCheckCallback`` in ``callbacks``; without one the class behaves as ``base``.
    ``train(resume_from_checkpoint=DIR)`` still resumes from a Trainer checkpoint folder.
    """
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise TypeError(f"asymcheck_trainer needs a transformers.Trainer class, got {base!r}")

    class _AsymCheck(base):  # type: ignore[misc,valid-type]
        _asymcheck_loaded: LoadedCheckpoint | None = None

        def _inner_training_loop(self, batch_size: Any = None, args: Any = None,
                                 resume_from_checkpoint: Any = None, trial: Any = None,
                                 ignore_keys_for_eval: Any = None) -> Any:
            cb = _find_callback(self)
            if cb is not None and resume_from_checkpoint is None:
                resume_from_checkpoint = _RESUME  # lets the loop skip to the restored position
            try:
                return super()._inner_training_loop(
                    batch_size=batch_size, args=args, resume_from_checkpoint=resume_from_checkpoint,
                    trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)
            finally:
                self._asymcheck_loaded = None
                if cb is not None:
                    cb.close()

        def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int,
                                 num_train_epochs: int, resume_from_checkpoint: Any,
                                 trial: Any) -> tuple[int, int]:
            cb = _find_callback(self)
            ours = resume_from_checkpoint == _RESUME
            done = super()._init_training_state(
                max_steps, num_update_steps_per_epoch, num_train_epochs,
                None if ours else resume_from_checkpoint, trial)
            if cb is None:
                return done
            ckpt = self._asymcheck_open(cb)
            if not ours or not cb.resume:
                return done
            loaded = ckpt.load_sync()
            self._asymcheck_loaded = loaded
            cb.restored_step = None if loaded is None else loaded.step
            if loaded is None:
                log.warning("no committed checkpoint on tier(s) %s: starting from step 0",
                            ", ".join(ckpt.tier_names))
                return 0, 0
            extras = loaded.state["extras"]
            if TRAINER_STATE not in extras:
                raise ValueError(f"checkpoint step {loaded.step} holds no Trainer state "
                                 f"(extra {TRAINER_STATE!r}): it was not saved by "
                                 "AsymCheckCallback")
            self.state = TrainerState(**json.loads(extras[TRAINER_STATE]["json"]))
            self._load_callback_state()
            self.state.init_training_references(self, max_steps, num_train_epochs, trial)
            apply_model(self.model, loaded.state[MODEL])
            epochs = self.state.global_step // num_update_steps_per_epoch
            steps = 0
            if not self.args.ignore_data_skip:
                steps = (self.state.global_step % num_update_steps_per_epoch
                         * self.args.gradient_accumulation_steps)
            log.warning("restored step %d from AsymCheck (tensors read per tier: %s): "
                        "epoch %d, %d batches into it", loaded.step, loaded.sources,
                        epochs, steps)
            return epochs, steps

        def _asymcheck_fsdp2(self) -> bool:
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            return bool(self.is_fsdp_enabled and plugin is not None
                        and getattr(plugin, "fsdp_version", 1) == 2)

        def _asymcheck_open(self, cb: AsymCheckCallback) -> Checkpointer:
            fsdp2 = self._asymcheck_fsdp2()
            if (self.is_deepspeed_enabled or (self.is_fsdp_enabled and not fsdp2)
                    or getattr(self, "is_fsdp_xla_enabled", False)):
                raise NotImplementedError("AsymCheck's Trainer integration supports plain, "
                                          "DistributedDataParallel and FSDP2 training (no "
                                          "DeepSpeed, FSDP1 or XLA FSDP)")
            self.create_optimizer()  # what the loop does next; created now to be hooked
            callbacks = self.callback_handler.callbacks

            def open_checkpointer() -> Checkpointer:
                return cb.open(
                    self.model, self.optimizer, scheduler=lambda: self.lr_scheduler,
                    scaler=getattr(self.accelerator, "scaler", None),
                    trainer_state=lambda: _trainer_state_json(self.state, [*callbacks,
                                                                           self.control]),
                    sharded=fsdp2)

            ckpt = open_checkpointer()
            if fsdp2:  # accelerate shards the model later: its parameters are replaced then
                cb._reopen = open_checkpointer
            return ckpt

        def _loaded_for(self, checkpoint: Any) -> LoadedCheckpoint | None:
            return self._asymcheck_loaded if checkpoint == _RESUME else None

        def _load_from_checkpoint(self, resume_from_checkpoint: Any, model: Any = None
                                  ) -> None:
            if resume_from_checkpoint != _RESUME:
                super()._load_from_checkpoint(resume_from_checkpoint, model)

        def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
            if checkpoint != _RESUME:
                super()._load_optimizer_and_scheduler(checkpoint)
                return
            loaded = self._asymcheck_loaded
            if loaded is not None:
                (opt_state,) = loaded.state[OPTIMIZERS]
                if self._asymcheck_fsdp2() and opt_state is not None:
                    _distribute_optimizer(self.model, self.optimizer, opt_state)
                else:
                    apply_optimizer(self.model, self.optimizer, opt_state)
                self.lr_scheduler.load_state_dict(loaded.state["extras"]["scheduler"])

        def _load_scaler(self, checkpoint: Any) -> None:
            if checkpoint != _RESUME:
                super()._load_scaler(checkpoint)
                return
            loaded = self._asymcheck_loaded
            scaler = getattr(self.accelerator, "scaler", None)
            if loaded is not None and scaler is not None and "scaler" in loaded.state["extras"]:
                scaler.load_state_dict(loaded.state["extras"]["scaler"])

        def _load_rng_state(self, checkpoint: Any) -> None:
            if checkpoint != _RESUME:
                super()._load_rng_state(checkpoint)
                return
            loaded = self._asymcheck_loaded
            if loaded is not None:  # where the Trainer restores its own RNG files
                apply_rng(loaded.state["rng"])

    _AsymCheck.__name__ = _AsymCheck.__qualname__ = f"AsymCheck{base.__name__}"
    _AsymCheck.__module__ = __name__
    return _AsymCheck  # type: ignore[return-value]


#: ``transformers.Trainer`` with AsymCheck resume (``asymcheck_trainer(Trainer)``)
AsymCheckTrainer = asymcheck_trainer(Trainer)
