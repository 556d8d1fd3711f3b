"""AsymCheck as the checkpoint engine of a DeepSpeed engine under ZeRO stage 3.

::

    import deepspeed
    from asymcheck.integrations.deepspeed import install

    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    ckpt = install(engine, policy="tiers.toml")   # on every rank, right after initialize
    engine.load_checkpoint("ckpt")                # the newest committed checkpoint, if any
    for step, batch in ...:
        ...
        if step % 100 == 0:
            engine.save_checkpoint("ckpt", client_state={"epoch": epoch})
    ckpt.close()                                  # finish the flushes to the slower tiers

``install`` replaces ``engine.checkpoint_engine`` with an ``AsymCheckEngine``, which owns a
``Checkpointer`` (no model, no optimizer; one extra, ``deepspeed``). DeepSpeed keeps deciding
what each rank saves: every ``checkpoint_engine.save(state_dict, path)`` of one
``engine.save_checkpoint`` (under ZeRO-3 each rank's model-states file and its optimizer-state
partition) is recorded under the file's name, and ``commit`` saves the recorded files of the
rank as that rank's shard of ONE AsymCheck checkpoint, at the engine's global step. The state
is in the host tier soon after ``save_checkpoint`` returns (below); the slower tiers are written
in the background, and with several ranks rank 0 writes the global manifest once every rank's
shard is durable on a tier (``rankcommit``). Retention follows the policy's ``keep``.

``engine.load_checkpoint(dir, tag=None)`` (wrapped by ``install``) loads the newest checkpoint
that is committed on some tier, from the nearest tier that holds it, instead of the one
DeepSpeed's ``latest`` file names (that file is written before a checkpoint is durable). A
``tag`` picks a checkpoint: the newest one's own tag, or ``global_step<N>`` (the checkpoint of
global step N). DeepSpeed then applies the files as it applies its own, so the module, the
ZeRO partitions, the optimizer state, the LR scheduler and the client state come back exactly,
and each rank's random generators (Python, numpy, torch, CUDA) are set as they were at the save;
a small marker file is written where DeepSpeed looks for each of this rank's files.

Values: tensors, numbers, strings, bytes, lists, tuples, dicts (``OrderedDict`` kept), sets,
enums, ``torch.Size``, ``torch.dtype`` and DeepSpeed's loss scalers. Any other object (in
``client_state``, say) is refused with its file and path. One checkpoint per global step.

``engine.save_16bit_model`` (an export of the consolidated weights, not a checkpoint) writes
its file and a DeepSpeed universal checkpoint (``"checkpoint": {"load_universal": true}`` in the
config) is read, through DeepSpeed's default engine: those are DeepSpeed's own files.

Another world size: ZeRO-3 partitions are laid out for the world size that saved them, so
``load_checkpoint`` refuses a checkpoint of another world size and names the way across:
``asymcheck restore STEP --format deepspeed-universal --to DIR`` (``write_files`` +
``to_universal``: every saved rank's files, from the nearest tier holding each, converted by
DeepSpeed's ``ds_to_universal``) writes a universal checkpoint, which DeepSpeed loads at any
world size with ``load_universal``; training then goes on saving through AsymCheck.

Only ZeRO stage 3 is supported: there every rank saves and loads its own files. Under stages
0-2 the model-states file is written by one rank and read by all, which ``install`` refuses.

Asymmetric snapshots (the Checkpointer's default ``mode="asym"``): the fp32 master partitions
and the optimizer state partitions change only inside ``engine.step()`` (the inner optimizer's
``step``). ``save_checkpoint`` copies the rest (counters, buffers, the scaler, client state)
and returns; those partitions are copied during the next iteration's forward and backward
passes, in windows that follow the module's forward order (ZeRO-3's fetch order), sized from
the profiled idle time of each, and the next ``engine.step()`` waits only for what is left.
Until the profile is taken (``warmup_iterations``, default 10) and with ``mode="naive"``,
everything is copied inside ``save_checkpoint``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import enum
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import deepspeed  # noqa: F401
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
        CheckpointCommitInfo,
        CheckpointEngine,
    )
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )
    from deepspeed.runtime.fp16.loss_scaler import LossScalerBase
except ImportError:
    raise ImportError("asymcheck.integrations.deepspeed needs DeepSpeed: "
                      "pip install 'asymcheck[deepspeed]'") from None

import numpy as np
import torch

from ..checkpointer import Checkpointer
from ..handle import SaveHandle
from ..policy import Policy
from ..restore import LoadedCheckpoint
from ..state import apply_rng

log = logging.getLogger(__name__)

EXTRA = "deepspeed"
#: the key that marks an encoded value (a dict of the checkpoint never holds it otherwise)
MARK = "__asymcheck_deepspeed__"
MARKER_TEXT = ("This DeepSpeed checkpoint file is stored by AsymCheck (step {step}); "
               "load it with engine.load_checkpoint after "
               "asymcheck.integrations.deepspeed.install(engine, ...).\n")
_GLOBAL_STEP = re.compile(r"global_step(\d+)")
_IMPORTABLE = ("deepspeed.", "torch.")


# ---------------------------------------------------------------- values
def encode(obj: Any, where: str = "") -> Any:
    """``obj`` as values a checkpoint holds; tensors stay the same objects (no copy)."""
    if isinstance(obj, torch.Tensor) or obj is None or type(obj) in (bool, int, float, str,
                                                                      bytes):
        return obj
    if isinstance(obj, enum.Enum):
        return {MARK: "enum", "class": _class_name(type(obj)), "value": encode(obj.value, where)}
    if isinstance(obj, torch.Size):
        return {MARK: "size", "value": list(obj)}
    if isinstance(obj, torch.dtype):
        return {MARK: "dtype", "value": str(obj).removeprefix("torch.")}
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj
    if isinstance(obj, Mapping):
        if MARK in obj:
            raise TypeError(f"{where or '<root>'}: a dict key {MARK!r} cannot be checkpointed")
        items = {}
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where or '<root>'}: dict key {k!r} must be str or int")
            items[k] = encode(v, f"{where}/{k}")
        return {MARK: "odict", "items": items} if isinstance(obj, collections.OrderedDict) \
            else items
    if type(obj) in (list, tuple):
        out = [encode(v, f"{where}/{i}") for i, v in enumerate(obj)]
        return tuple(out) if type(obj) is tuple else out
    if type(obj) in (set, frozenset):
        return {MARK: type(obj).__name__, "items": [encode(v, where) for v in obj]}
    if isinstance(obj, LossScalerBase):
        return {MARK: "object", "class": _class_name(type(obj)),
                "state": encode(vars(obj), where)}
    raise TypeError(f"{where or '<root>'}: a value of type {type(obj).__name__} cannot be "
                    "checkpointed by AsymCheck (use tensors, numbers, strings, lists, tuples, "
                    "dicts, sets, enums)")


def decode(obj: Any, map_location: torch.device | None = None) -> Any:
    """The value ``encode`` turned into ``obj``; tensors moved to ``map_location`` if given."""
    if isinstance(obj, torch.Tensor):
        return obj if map_location is None else obj.to(map_location)
    if isinstance(obj, list):
        return [decode(v, map_location) for v in obj]
    if isinstance(obj, tuple):
        return tuple(decode(v, map_location) for v in obj)
    if not isinstance(obj, dict):
        return obj
    kind = obj.get(MARK)
    if kind is None:
        return {k: decode(v, map_location) for k, v in obj.items()}
    if kind == "odict":
        return collections.OrderedDict((k, decode(v, map_location))
                                       for k, v in obj["items"].items())
    if kind == "size":
        return torch.Size(obj["value"])
    if kind == "dtype":
        dtype = getattr(torch, obj["value"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown torch dtype {obj['value']!r} in checkpoint")
        return dtype
    if kind in ("set", "frozenset"):
        items = [decode(v, map_location) for v in obj["items"]]
        return set(items) if kind == "set" else frozenset(items)
    if kind == "enum":
        cls = _import_class(obj["class"])
        if not issubclass(cls, enum.Enum):
            raise ValueError(f"{obj['class']} in checkpoint is not an enum")
        return cls(decode(obj["value"]))
    if kind == "object":
        cls = _import_class(obj["class"])
        if not issubclass(cls, LossScalerBase):
            raise ValueError(f"{obj['class']} in checkpoint is not a DeepSpeed loss scaler")
        out: Any = object.__new__(cls)
        out.__dict__.update(decode(obj["state"], map_location))
        return out
    raise ValueError(f"unknown encoded value {kind!r} in checkpoint")


def _class_name(cls: type) -> str:
    name = f"{cls.__module__}:{cls.__qualname__}"
    if not cls.__module__.startswith(_IMPORTABLE):
        raise TypeError(f"a value of type {name} cannot be checkpointed by AsymCheck (only "
                        "enums of DeepSpeed and torch are)")
    return name


def _import_class(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith(_IMPORTABLE):
        raise ValueError(f"checkpoint names class {name}, outside DeepSpeed and torch")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"{name} in checkpoint is not a class")
    return obj


def _location(map_location: Any) -> torch.device | None:
    """A torch.load ``map_location`` as a device; None (leave on the CPU) for callables,
    dicts and the CPU."""
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
        return None if device.type == "cpu" else device
    return None


# ---------------------------------------------------------------- the engine
class _Recorded:
    """The extra that carries a rank's DeepSpeed files into the Checkpointer."""

    def __init__(self) -> None:
        self.tag = ""
        self.files: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"tag": self.tag, "files": self.files}

    def load_state_dict(self, state: Any) -> None:
        raise RuntimeError("DeepSpeed state is applied by engine.load_checkpoint")


class AsymCheckEngine(CheckpointEngine):
    """A DeepSpeed ``CheckpointEngine`` whose files are one AsymCheck checkpoint per save."""

    def __init__(self, engine: Any, checkpointer: Checkpointer, recorded: _Recorded) -> None:
        super().__init__(None)
        self.name = "AsymCheckEngine"
        self.engine = engine
        self.checkpointer = checkpointer
        self._recorded = recorded
        self._dir = ""
        self._saved_steps: set[int] = set()
        self._loaded: dict[str, Any] = {}  # absolute file path -> encoded state dict
        self._loaded_step: int | None = None
        # DeepSpeed's own files (save_16bit_model, universal loads) go through its own engine
        self._plain = False
        self._own = TorchCheckpointEngine()
        #: the handle of each save, oldest first
        self.handles: list[SaveHandle] = []

    # ------------------------------------------------ DeepSpeed's interface
    def create(self, info: CheckpointCommitInfo) -> None:
        self._recorded.tag, self._recorded.files = str(info.tag), {}
        self._dir = os.path.join(os.path.abspath(info.save_dir), str(info.tag))

    def save(self, state_dict: Any, path: str) -> None:
        if self._plain:
            self._own.save(state_dict, path)
            return
        name = os.path.relpath(os.path.abspath(path), self._dir) if self._dir else ".."
        if name.startswith(".."):
            raise RuntimeError(f"save({path!r}) outside the checkpoint being created "
                               f"({self._dir or 'none'})")
        self._recorded.files[name] = encode(state_dict, name)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        if self._plain:
            return True
        step = int(self.engine.global_steps)
        if step in self._saved_steps:
            raise ValueError(f"AsymCheck keeps one checkpoint per global step; step {step} "
                             f"(tag {info.tag!r}) is saved already")
        try:
            self.handles.append(self.checkpointer.save_sync(step))
        finally:
            self._recorded.files = {}
        self._saved_steps.add(step)
        return True

    def load(self, path: str, map_location: Any = None) -> Any:
        if self._plain:
            return self._own.load(path, map_location=map_location)
        key = os.path.abspath(path)
        if key not in self._loaded:
            where = "no checkpoint is loaded" if self._loaded_step is None else \
                f"checkpoint step {self._loaded_step} holds {sorted(self._loaded)}"
            raise FileNotFoundError(f"{path} is not in the AsymCheck checkpoint ({where}); "
                                    "load through engine.load_checkpoint")
        return decode(self._loaded[key], _location(map_location))

    def preserves_storage_sharing(self) -> bool:
        return False  # commit copies the tensors itself: no clone is needed before save()

    # ------------------------------------------------ AsymCheck's side
    def load_checkpoint(self, original: Callable[..., Any], load_dir: str,
                        tag: str | None = None, *args: Any, **kwargs: Any) -> Any:
        """Resolve ``tag`` to a committed AsymCheck checkpoint, then run DeepSpeed's own
        ``load_checkpoint`` on it (every rank calls this, as DeepSpeed requires). A universal
        checkpoint (``load_universal`` in the config) is DeepSpeed's own: read as it is."""
        if self.engine.load_universal_checkpoint():
            self._plain = True
            try:
                return original(load_dir, tag, *args, **kwargs)
            finally:
                self._plain = False
        loaded = self._resolve(tag)
        if loaded is None:
            log.info("no committed AsymCheck checkpoint: starting fresh")
            return None, None
        saved_tag = _tag(loaded)
        world = self.engine.dp_world_size
        if loaded.manifest.world_size != world:
            raise ValueError(
                f"checkpoint step {loaded.step} was saved by {loaded.manifest.world_size} ranks, "
                f"this job has {world}: ZeRO-3 partitions are laid out per world size. Write a "
                f"DeepSpeed universal checkpoint (asymcheck restore {loaded.step} --format "
                "deepspeed-universal --to DIR) and load DIR with \"checkpoint\": "
                "{\"load_universal\": true} in the DeepSpeed config")
        state = loaded.state["extras"][EXTRA]
        base = os.path.join(os.path.abspath(load_dir), saved_tag)
        self._loaded = {os.path.join(base, name): sd for name, sd in state["files"].items()}
        self._loaded_step = loaded.step
        for path in self._loaded:  # DeepSpeed finds its files by listing the directory
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if not os.path.exists(path):
                Path(path).write_text(MARKER_TEXT.format(step=loaded.step))
        log.info("loading step %d (tag %s) from AsymCheck", loaded.step, saved_tag)
        try:
            out = original(load_dir, saved_tag, *args, **kwargs)
            apply_rng(loaded.state["rng"])  # this rank's generators as they were at the save
            self._saved_steps.add(loaded.step)  # on the tiers already
            return out
        finally:
            self._loaded = {}

    def _resolve(self, tag: str | None) -> LoadedCheckpoint | None:
        loaded = self.checkpointer.load_sync()
        if tag is None or loaded is None or _tag(loaded) == str(tag):
            return loaded
        m = _GLOBAL_STEP.fullmatch(str(tag))
        if m is None:
            raise ValueError(f"tag {tag!r}: AsymCheck finds the newest checkpoint (tag None or "
                             "its own tag) or one by global step (tag 'global_step<N>')")
        loaded = self.checkpointer.load_sync(int(m.group(1)))
        if loaded is None or _tag(loaded) != str(tag):
            raise ValueError(f"no committed AsymCheck checkpoint has tag {tag!r}")
        return loaded

    def wait(self) -> None:
        """Wait until every save so far is on each of its tiers (or failed there)."""
        self.checkpointer.wait_idle_sync()

    def close(self) -> None:
        """Finish the queued flushes and release the tiers (every rank, at the same point)."""
        self.checkpointer.close_sync()


def _tag(loaded: LoadedCheckpoint) -> str:
    state = loaded.state["extras"].get(EXTRA)
    if not isinstance(state, dict) or not isinstance(state.get("tag"), str):
        raise ValueError(f"checkpoint step {loaded.step} was not saved through a DeepSpeed "
                         "engine (asymcheck.integrations.deepspeed)")
    return str(state["tag"])


# ---------------------------------------------------------------- DeepSpeed's own files
def write_files(files_by_rank: Sequence[Mapping[str, Any]], tag: str,
                directory: str | os.PathLike[str]) -> list[Path]:
    """DeepSpeed's own checkpoint of one save: each saved rank's recorded files (the
    ``"files"`` of the extra, rank by rank) written with ``torch.save`` under
    ``directory/tag``, then the ``latest`` file naming ``tag``. Returns the files written."""
    base = Path(directory)
    written = []
    for files in files_by_rank:
        for name, state in sorted(files.items()):
            path = (base / tag / name).resolve()
            if not path.is_relative_to((base / tag).resolve()):
                raise ValueError(f"file name {name!r} in checkpoint leaves its directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(decode(state), path)
            written.append(path)
    (base / "latest").write_text(tag)
    return written


def to_universal(directory: str | os.PathLike[str], tag: str,
                 out: str | os.PathLike[str]) -> None:
    """Convert DeepSpeed's checkpoint ``directory/tag`` (``write_files``) into a universal
    checkpoint ``out/tag`` with ``out/latest_universal`` (DeepSpeed's ``ds_to_universal``),
    which DeepSpeed loads at any world size with ``"checkpoint": {"load_universal": true}``."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(Path(directory) / tag),
                              output_folder=str(Path(out) / tag), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    with contextlib.redirect_stdout(sys.stderr):  # its progress report
        ds_to_universal.main(args)
    (Path(out) / "latest_universal").write_text(tag)


def install(engine: Any, policy: str | os.PathLike[str] | Policy | None = None,
            **checkpointer_args: Any) -> AsymCheckEngine:
    """Make AsymCheck the checkpoint engine of the DeepSpeed ``engine``: call it on every rank
    right after ``deepspeed.initialize``. ``policy`` and ``checkpointer_args`` go to the
    ``Checkpointer``. Returns the installed engine (``close()`` it when training ends)."""
    stage = int(engine.zero_optimization_stage())
    if stage != 3:
        raise NotImplementedError(f"asymcheck.integrations.deepspeed supports ZeRO stage 3, "
                                  f"this engine runs stage {stage}")
    recorded = _Recorded()
    inner = getattr(engine.optimizer, "optimizer", None)
    hooks = None
    if checkpointer_args.get("mode", "asym") == "asym":
        if not hasattr(inner, "register_step_pre_hook"):
            raise TypeError(f"ZeRO-3's inner optimizer ({type(inner).__name__}) is not a torch "
                            "optimizer, so its step cannot be gated: pass mode='naive'")
        hooks = (engine.module, [inner])
    checkpointer = Checkpointer(None, policy=policy, extras={EXTRA: recorded},
                                snapshot_hooks=hooks, **checkpointer_args)
    ours = AsymCheckEngine(engine, checkpointer, recorded)
    previous = engine.checkpoint_engine
    if previous is not None and previous.is_decoupled():
        previous.cleanup()
    engine.checkpoint_engine = ours
    original = engine.load_checkpoint

    def load_checkpoint(load_dir: str, tag: str | None = None, *args: Any, **kwargs: Any) -> Any:
        return ours.load_checkpoint(original, load_dir, tag, *args, **kwargs)

    def save_16bit_model(*args: Any, **kwargs: Any) -> Any:
        ours._plain = True
        try:
            return export(*args, **kwargs)
        finally:
            ours._plain = False

    engine.load_checkpoint = load_checkpoint
    export, engine.save_16bit_model = engine.save_16bit_model, save_16bit_model
    return ours
