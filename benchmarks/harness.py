"""Shared benchmark harness: models, checkpoint methods (AsymCheck and its peers), timing.

Every method trains the same model from the same seed, checkpoints at the same
frequency, and is timed in the same process run, so figures are comparable as
ratios. After each run the last checkpoint is restored into a fresh model and
compared byte for byte with a copy taken right after its step: a benchmark of
a broken save is worthless. Where a method keeps copies on several tiers, the
restore is timed and verified from each of them.

Besides iteration times and the training-thread stall of each checkpoint, a run
records the time from each save call until that checkpoint is durable on disk,
the bytes each checkpoint stored, the peak host memory of the run (a sampler
thread reads ``/proc/self/status`` and adds the machine's shared memory in use beyond the
start, which holds AsymCheck's host blocks and the peers' shared-memory staging alike),
and the restore time per tier.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import ctypes
import gc
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpumeter

import asymcheck
from tests._util import assert_same

Batch = Callable[[int], torch.Tensor]  # iteration -> loss


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Batch
    device: str = "cpu"

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def state_bytes(self) -> int:
        n = sum(p.nbytes for p in self.model.parameters())
        buffers = sum(b.nbytes for b in self.model.buffers())
        return n * 3 + buffers  # weights + AdamW exp_avg + exp_avg_sq, and the buffers

    @property
    def checkpoint_bytes(self) -> int:
        """Tensor bytes of a checkpoint that stores each state-dict entry on its own (tied
        weights twice): the model's state dict plus AdamW's two moments."""
        n = sum(p.nbytes for p in self.model.parameters())
        return sum(t.nbytes for t in self.model.state_dict().values()) + 2 * n


# --------------------------------------------------------------------------- models

#: Model families and their sizes at ``scale = 1``: a few tens of MB of state each, a few
#: tenths of a second per iteration on 2 CPU cores. ``width`` (``widths`` for ResNet) is
#: multiplied by the scale, so parameters grow about as its square.
MODELS: dict[str, dict[str, Any]] = {
    "gpt2": {"layers": 4, "width": 256, "vocab": 8192, "seq": 128, "batch": 4},
    "bert": {"layers": 4, "width": 256, "vocab": 8192, "seq": 128, "batch": 4},
    "roberta": {"layers": 4, "width": 256, "vocab": 8192, "seq": 128, "batch": 4},
    "bloom": {"layers": 4, "width": 256, "vocab": 8192, "seq": 128, "batch": 4},
    "vit": {"layers": 6, "width": 256, "image": 64, "patch": 8, "batch": 8, "classes": 100},
    "resnet": {"widths": (64, 128, 256, 512), "depths": (1, 1, 1, 1), "image": 64,
               "batch": 8, "classes": 100, "layer_type": "basic"},
}

#: About a billion parameters per model (16-18 GB of training state with AdamW): for a GPU.
GPU_1B: dict[str, dict[str, Any]] = {
    "gpt2": {"layers": 24, "width": 2048, "vocab": 50304, "seq": 1024, "batch": 4},
    "bert": {"layers": 24, "width": 2048, "vocab": 30528, "seq": 512, "batch": 8},
    "roberta": {"layers": 24, "width": 2048, "vocab": 50304, "seq": 512, "batch": 8},
    "bloom": {"layers": 24, "width": 2048, "vocab": 50304, "seq": 1024, "batch": 4},
    "vit": {"layers": 24, "width": 2048, "image": 224, "patch": 16, "batch": 32,
            "classes": 1000},
    "resnet": {"widths": (640, 1280, 2560, 5120), "depths": (2, 2, 2, 2), "image": 224,
               "batch": 32, "classes": 1000, "layer_type": "basic"},
}


def model_config(name: str, scale: float = 1.0, preset: str = "cpu",
                 **overrides: Any) -> dict[str, Any]:
    """The size of model ``name``: the preset's, widths times ``scale``, then ``overrides``."""
    base = dict((GPU_1B if preset == "gpu-1b" else MODELS)[name])
    if scale != 1.0:
        if "width" in base:
            base["width"] = max(64, round(base["width"] * scale / 64) * 64)
        if "widths" in base:
            base["widths"] = tuple(max(16, round(w * scale / 16) * 16)
                                   for w in base["widths"])
    base.update(overrides)
    return base


def _gen(i: int) -> torch.Generator:
    return torch.Generator().manual_seed(i)


def make_workload(name: str, *, device: str = "cpu", seed: int = 0,
                  **cfg: Any) -> Workload:
    """A model of family ``name`` (gpt2, bert, roberta, bloom, vit, resnet) with AdamW and
    seeded random data: token ids for the language models, images for the vision models."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model: torch.nn.Module
    if name in ("gpt2", "bert", "roberta", "bloom"):
        layers, width, vocab = cfg["layers"], cfg["width"], cfg["vocab"]
        seq, batch = cfg["seq"], cfg["batch"]
        heads = max(1, width // 64)
        if name == "gpt2":
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=seq,
                bos_token_id=0, eos_token_id=0))
        elif name == "bloom":
            model = transformers.BloomForCausalLM(transformers.BloomConfig(
                n_layer=layers, hidden_size=width, n_head=heads, vocab_size=vocab))
        else:
            cls, conf = ((transformers.BertForMaskedLM, transformers.BertConfig)
                         if name == "bert" else
                         (transformers.RobertaForMaskedLM, transformers.RobertaConfig))
            model = cls(conf(num_hidden_layers=layers, hidden_size=width,
                             num_attention_heads=heads, intermediate_size=4 * width,
                             vocab_size=vocab, max_position_embeddings=seq + 2))
        masked = name in ("bert", "roberta")
        model.to(device)

        def loss(i: int) -> torch.Tensor:
            g = _gen(i)
            ids = torch.randint(4, vocab, (batch, seq), generator=g)
            labels = ids.clone()
            if masked:  # masked LM: predict 15% of the tokens, replaced by a mask id
                mask = torch.rand((batch, seq), generator=g) < 0.15
                labels[~mask] = -100
                ids[mask] = 3
            return model(ids.to(device), labels=labels.to(device)).loss
    elif name in ("vit", "resnet"):
        image, batch, classes = cfg["image"], cfg["batch"], cfg["classes"]
        if name == "vit":
            width = cfg["width"]
            model = transformers.ViTForImageClassification(transformers.ViTConfig(
                num_hidden_layers=cfg["layers"], hidden_size=width,
                num_attention_heads=max(1, width // 64), intermediate_size=4 * width,
                image_size=image, patch_size=cfg["patch"], num_labels=classes))
        else:
            widths = list(cfg["widths"])
            model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
                embedding_size=widths[0], hidden_sizes=widths, depths=list(cfg["depths"]),
                layer_type=cfg.get("layer_type", "basic"), num_labels=classes))
        model.to(device)

        def loss(i: int) -> torch.Tensor:
            g = _gen(i)
            x = torch.randn(batch, 3, image, image, generator=g)
            y = torch.randint(0, classes, (batch,), generator=g)
            return model(pixel_values=x.to(device), labels=y.to(device)).loss
    else:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Workload(name, model, opt, loss, device)


def gpt2_workload(layers: int = 6, width: int = 512, vocab: int = 8192, seq: int = 128,
                  batch: int = 8, seed: int = 0, device: str = "cpu") -> Workload:
    return make_workload("gpt2", device=device, seed=seed, layers=layers, width=width,
                         vocab=vocab, seq=seq, batch=batch)


def train_state(w: Workload) -> dict[str, Any]:
    return {"model": w.model.state_dict(), "optim": w.optimizer.state_dict()}


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# --------------------------------------------------------------------------- files

def write_report_section(path: Path, heading: str, section: str) -> None:
    """Replace the section of REPORT.md at ``path`` that starts with the line ``heading`` (up
    to the next ``## `` heading) by ``section``, or append it."""
    text = path.read_text() if path.exists() else ""
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    path.write_text(text if text.endswith("\n") else text + "\n")


@contextlib.contextmanager
def work_dir(prefix: str, given: str | os.PathLike[str] | None = None,
             parent: str | None = None) -> Iterator[Path]:
    """The directory a benchmark writes into: ``given`` (made if missing, left in place
    afterwards), else a new temporary one (under ``parent``, default the system's) that is
    removed at exit, whatever happened."""
    if given is not None:
        path = Path(given).absolute()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent)).absolute()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tree_bytes(path: Path) -> int:
    """Sum of the sizes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for root, _dirs, files in os.walk(path):
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(root, f)).st_size
    return total


def drop_page_cache(path: Path) -> None:
    """Evict the (clean, fsynced) pages of every file under ``path`` from the page cache, so a
    restore reads the disk rather than memory (posix_fadvise DONTNEED; no privileges needed)."""
    if not hasattr(os, "posix_fadvise"):
        return
    paths = [path] if path.is_file() else [
        Path(root) / f for root, _dirs, files in os.walk(path) for f in files]
    for p in paths:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def shm_root() -> Path:
    return Path(os.environ.get("ASYMCHECK_SHM_ROOT", "/dev/shm"))


# --------------------------------------------------------------------------- memory

def trim_heap() -> None:
    """Give freed heap pages back to the OS, so the next run's baseline is not inflated."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_bytes(pid: int | str = "self") -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:  # a child that has just exited
        pass
    return out


def _children(pid: int | str = "self") -> list[str]:
    """Every live descendant process of ``pid`` (from each thread's ``children`` list)."""
    found: list[str] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                found += [child, *_children(child)]
    return found


def _resident_bytes(children: bool = True) -> int:
    """Anonymous + file-backed resident memory of this process and (``children``) of its
    children, a process checkpointer's worker say; shared memory is counted apart."""
    pids = ("self", *_children()) if children else ("self",)
    return sum(v for pid in pids for v in _status_bytes(pid).values())


def _system_shmem_bytes() -> int:
    """Shared memory (tmpfs and shm pages) in use on the machine (``Shmem`` of meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


class MemorySampler:
    """Peak host memory of a run, sampled every ``interval`` seconds in a thread.

    A sample is anonymous + file-backed resident memory of this process (and with
    ``children`` of its child processes) plus the shared memory in use on the machine beyond
    what it was at the start: every shared-memory page a method holds (AsymCheck's host
    blocks, a peer's shared-memory staging, in this process or a child) counts once, mapped
    or not, whichever process maps it. The baseline leaves children out, so a child that
    outlives one run (DCP's process checkpointer keeps its worker for the life of the
    process) counts in every run of the method it serves, not only in the one that started
    it, and in no other method's. The resident part's own peak is kept too
    (``peak_resident_bytes``).
    """

    def __init__(self, interval: float = 0.01, *, children: bool = False) -> None:
        self.interval = interval
        self.children = children
        self.offset = 0  # subtracted from samples: memory the harness itself holds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = Path("/proc/self/status").exists() and Path("/proc/meminfo").exists()
        self.baseline = self.peak = 0
        self.shm_baseline = self.peak_shm = 0
        self.resident_baseline = self.peak_resident = 0
        #: the method's own shared memory in use (its host tier), sampled beside the machine's
        self.own_shm: Callable[[], int] | None = None
        self.peak_own_shm = 0

    def sample(self, children: bool | None = None) -> int:
        if not self.available:
            return 0
        resident = _resident_bytes(self.children if children is None else children) - self.offset
        shm = max(_system_shmem_bytes() - self.shm_baseline, 0)
        self.peak_shm = max(self.peak_shm, shm)
        self.peak_resident = max(self.peak_resident, resident)
        if self.own_shm is not None:
            self.peak_own_shm = max(self.peak_own_shm, self.own_shm())
        return resident + shm

    def start(self) -> None:
        self.shm_baseline = _system_shmem_bytes() if self.available else 0
        self.peak_resident = 0
        self.baseline = self.peak = self.sample(children=False)
        self.resident_baseline = self.peak_resident
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.sample())

    def stop(self) -> dict[str, Any]:
        if not self._stop.is_set():
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, self.sample())
        if not self.available:
            return {}
        own = {} if self.own_shm is None else {"peak_own_shm_bytes": self.peak_own_shm}
        return {"peak_host_bytes": self.peak - self.baseline, "peak_shm_bytes": self.peak_shm,
                "peak_resident_bytes": self.peak_resident - self.resident_baseline, **own}


def _when_done(completion: Any, callback: Callable[[], None]) -> None:
    """Call ``callback`` (in any thread) once ``completion`` is done, without waiting on it:
    ``Completion.wait`` would complete a pending snapshot from this thread."""
    fut = getattr(completion, "_fut", None)
    if fut is not None and hasattr(fut, "add_done_callback"):
        fut.add_done_callback(lambda _f: callback())
        return

    def poll() -> None:
        while not completion.done():
            time.sleep(0.002)
        callback()
    threading.Thread(target=poll, daemon=True).start()


# --------------------------------------------------------------------------- methods

class Method:
    """One way to checkpoint. ``checkpoint`` runs on the training thread after the step."""

    name = "none"
    child_processes = False  # whether its work runs in child processes (counted in memory)
    #: what one run holds (set up by ``setup``), dropped by ``release``
    run_state: tuple[str, ...] = ("w",)

    def setup(self, w: Workload, workdir: Path) -> None:
        self.w, self.workdir = w, workdir
        self.saved_at: dict[int, float] = {}    # step -> perf_counter() of the save call
        self.durable_at: dict[int, float] = {}  # step -> perf_counter() when durable on disk
        self.stored: dict[int, int] = {}        # step -> bytes stored on disk

    def checkpoint(self, step: int) -> float:
        """Do the save; return the seconds of training-thread stall it caused so far."""
        return 0.0

    def own_shm_bytes(self) -> Callable[[], int] | None:
        """How many bytes of shared memory the method itself holds now (any thread), where it
        can tell: the machine's figure also counts what other methods left behind."""
        return None

    def stall_after_step(self) -> float:
        """Stall the method added inside the next optimizer step (asym gate)."""
        return 0.0

    def finish(self) -> dict[str, Any]:
        return {}

    def restore_tiers(self) -> list[str]:
        """Where the last checkpoint can be restored from, fastest first."""
        return []

    def restore_into(self, w: Workload, step: int, tier: str | None = None) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Release what outlives the run's work directory (shared memory)."""

    def release(self) -> None:
        """Drop what the run held (its workload, its last save): a method runs once per
        round, and what it kept from one run would be freed only in its next, after that
        run's memory baseline was taken, hiding as much of that run's own memory."""
        for name in self.run_state:
            self.__dict__.pop(name, None)


def method_names(p: argparse.ArgumentParser, spec: str, known: Sequence[str]) -> list[str]:
    """The methods a ``--methods`` list names (comma-separated), checked against ``known``
    (``p.error`` on an unknown one); the no-checkpoint row, which every ratio needs, first."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = set(names) - set(known)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: {', '.join(known)}")
    return names if NoCheckpoint.name in names else [NoCheckpoint.name, *names]


class NoCheckpoint(Method):
    name = "no checkpoint"


class TorchSave(Method):
    name = "torch.save+fsync"

    def checkpoint(self, step: int) -> float:
        t0 = time.perf_counter()
        self.saved_at[step] = t0
        path = self.workdir / f"step-{step}.pt"
        with open(path, "wb") as f:
            torch.save(train_state(self.w), f)
            f.flush()
            os.fsync(f.fileno())
        self.last = path
        t1 = self.durable_at[step] = time.perf_counter()
        self.stored[step] = path.stat().st_size
        return t1 - t0

    def restore_tiers(self) -> list[str]:
        return ["local"]

    def restore_into(self, w: Workload, step: int, tier: str | None = None) -> None:
        drop_page_cache(self.last)
        state = torch.load(self.last, weights_only=True)
        w.model.load_state_dict(state["model"])
        w.optimizer.load_state_dict(state["optim"])


class DcpAsync(Method):
    """torch.distributed.checkpoint.async_save, one save in flight (the documented pattern)."""

    name = "DCP async_save"
    run_state = (*Method.run_state, "future")

    def setup(self, w: Workload, workdir: Path) -> None:
        super().setup(w, workdir)
        import torch.distributed.checkpoint as dcp
        self.dcp = dcp
        self.future: Any = None

    def _state(self, w: Workload) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(w.model, w.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def checkpoint(self, step: int) -> float:
        t0 = time.perf_counter()
        self.saved_at[step] = t0
        if self.future is not None:
            self.future.result()
        got = self.dcp.async_save(self._state(self.w), no_dist=True,
                                  checkpoint_id=str(self.workdir / f"step-{step}"))
        self.future = getattr(got, "upload_completion", got)  # Future or AsyncSaveResponse

        def done(_f: Any, step: int = step) -> None:
            self.durable_at[step] = time.perf_counter()
        self.future.add_done_callback(done)
        self.last = self.workdir / f"step-{step}"
        return time.perf_counter() - t0

    def finish(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.future is not None:
            self.future.result()
        drain = time.perf_counter() - t0
        for step in self.saved_at:
            self.stored[step] = tree_bytes(self.workdir / f"step-{step}")
        return {"drain_s": drain}

    def restore_tiers(self) -> list[str]:
        return ["local"]

    def restore_into(self, w: Workload, step: int, tier: str | None = None) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        drop_page_cache(self.last)
        state = self._state(w)
        self.dcp.load(state, checkpoint_id=str(self.last), no_dist=True)
        set_state_dict(w.model, w.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class AsymCheckMethod(Method):
    """AsymCheck with a host (shared memory) tier and a local tier in the run's directory.

    ``local`` holds extra keys of the local tier (e.g. ``{"batch": "off"}``), ``compression``
    the ``[compression]`` table (e.g. ``{"mode": "auto"}``); ``policy_extra`` is TOML text
    appended as it is, inside the local tier's table unless it opens a new one."""

    run_state = (*Method.run_state, "ckpt", "handles")

    def __init__(self, name: str, mode: str, policy_extra: str = "",
                 host_capacity_states: float = 4, warmup_iterations: int = 5, *,
                 host_keep: int = 1, local: dict[str, Any] | None = None,
                 compression: dict[str, Any] | None = None) -> None:
        self.name, self.mode, self.policy_extra = name, mode, policy_extra
        self.host_capacity_states = host_capacity_states
        self.host_keep = host_keep
        self.warmup_iterations = warmup_iterations
        self.local = dict(local or {})
        self.compression = dict(compression or {})
        self.handles: list[asymcheck.SaveHandle] = []

    def _policy(self, w: Workload) -> Path:
        path = self.workdir / "tiers.toml"
        cap = max(int(self.host_capacity_states * w.checkpoint_bytes), 64 << 20)
        local = "".join(f"{k} = {_toml_value(v)}\n" for k, v in self.local.items())
        comp = ""
        if self.compression:
            comp = "[compression]\n" + "".join(f"{k} = {_toml_value(v)}\n"
                                               for k, v in self.compression.items())
        path.write_text(f"""
[[tier]]
name = "host"
url = "shm://asymcheck-bench-{uuid.uuid4().hex[:8]}"
capacity = {cap}
keep = {self.host_keep}
[[tier]]
name = "local"
url = "file://{self.workdir / 'local'}"
keep = 2
{local}{self.policy_extra}
{comp}""")
        return path

    def setup(self, w: Workload, workdir: Path) -> None:
        super().setup(w, workdir)
        self.policy = self._policy(w)
        self.ckpt = asymcheck.Checkpointer(w.model, w.optimizer, policy=self.policy,
                                           mode=self.mode,
                                           warmup_iterations=self.warmup_iterations)
        self.handles = []
        self.restore_sources: dict[str, dict[str, int]] = {}

    def own_shm_bytes(self) -> Callable[[], int] | None:
        ckpt = self.ckpt

        def used() -> int:  # its host blocks: committed, being saved, spare and pooled
            try:
                return ckpt.host.used_bytes
            except KeyError:  # the host tier opens with the first save
                return 0
        return used

    def checkpoint(self, step: int) -> float:
        self.saved_at[step] = time.perf_counter()
        h = self.ckpt.save_sync(step)
        self.handles.append(h)

        def done(step: int = step) -> None:
            self.durable_at[step] = time.perf_counter()
        if "local" in h.tiers:  # a policy may flush only every Nth save to disk
            _when_done(h.durable("local"), done)
        return float(h.metrics["save_stall_s"])

    def stall_after_step(self) -> float:
        if not self.handles:
            return 0.0
        return float(self.handles[-1].metrics.get("gate_stall_s", 0.0))

    def finish(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        for h in self.handles:
            h.wait_all_sync(600)
        drain = time.perf_counter() - t0
        self.ckpt.close_sync()
        modes = [h.metrics["mode"] for h in self.handles]
        # the last save's copies are completed by the drain, not in training windows
        asym = [h for h in self.handles[:-1] if h.metrics["mode"] == "asym"]
        raw = stored = 0
        for h in self.handles:
            if "local.stored_bytes" in h.metrics:
                self.stored[h.step] = int(h.metrics["local.stored_bytes"])
                raw += int(h.metrics.get("state_bytes", 0))
                stored += self.stored[h.step]
        batches = [h.metrics["local.batch_bytes"] for h in self.handles
                   if h.metrics.get("local.batch_bytes") is not None]
        measured = asym or self.handles
        return {"drain_s": drain, "modes": {m: modes.count(m) for m in set(modes)},
                "residual_bytes_median": statistics.median(
                    [h.metrics.get("residual_bytes", h.metrics["state_bytes"])
                     for h in measured]) if measured else None,
                "overlapped_bytes_median": statistics.median(
                    [h.metrics.get("overlapped_bytes", 0) for h in measured])
                if measured else None,
                "local_ratio": raw / stored if stored else None,
                "local_batch_bytes_median": statistics.median(batches) if batches else None,
                # each save's own figures (stall parts, backpressure, page-locking, mode), so
                # that one run shows where a stall came from
                "save_metrics": [{"step": h.step, **{k: v for k, v in h.metrics.items()
                                                      if isinstance(v, (int, float, str, bool))}}
                                 for h in self.handles]}

    def shm_dirs(self) -> list[Path]:
        return [shm_root() / self._host_name()]

    def restore_tiers(self) -> list[str]:
        """The tiers that hold the last checkpoint (a policy may skip the local tier)."""
        last = self.handles[-1].tiers if self.handles else ("host", "local")
        return [t for t in ("host", "local") if t in last]

    def restore_into(self, w: Workload, step: int, tier: str | None = None) -> None:
        """Restore from the fastest tier; with ``tier="local"`` the host copy is removed
        first, so the local tier is read (from disk: its page cache is dropped)."""
        if tier == "local":
            shutil.rmtree(self.shm_dirs()[0], ignore_errors=True)
            drop_page_cache(self.workdir / "local")
        with asymcheck.Checkpointer(w.model, w.optimizer, policy=self.policy,
                                    mode="naive") as ckpt:
            loaded = ckpt.load_sync()
            if loaded is None or loaded.step != step:
                raise AssertionError(f"{self.name}: restored step "
                                     f"{None if loaded is None else loaded.step}, "
                                     f"expected {step}")
            w.model.load_state_dict(loaded.state["model"])
            w.optimizer.load_state_dict(loaded.state["optimizers"][0])
        self.restore_sources[tier or "host"] = dict(loaded.sources)
        if tier is not None and set(loaded.sources) != {tier}:
            raise AssertionError(f"{self.name}: restore from {tier} read {loaded.sources}")
        if tier is None:
            self.cleanup()

    def cleanup(self) -> None:
        if hasattr(self, "policy"):
            for d in self.shm_dirs():
                shutil.rmtree(d, ignore_errors=True)

    def _host_name(self) -> str:
        return asymcheck.load_policy(self.policy).staging.url.removeprefix("shm://")


# --------------------------------------------------------------------------- runs

def _pick(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


@dataclass
class RunResult:
    method: str
    iteration_s: list[float]
    stall_s: list[float]
    extra: dict[str, Any] = field(default_factory=dict)
    verified: bool = False
    durable_s: list[float] = field(default_factory=list)
    stored_bytes: list[int] = field(default_factory=list)
    restore_s: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    every: int = 1

    def period_s(self) -> list[float]:
        """Seconds of each checkpoint period (``every`` iterations ending with a save)."""
        n, e = len(self.iteration_s), max(1, self.every)
        return [sum(self.iteration_s[i:i + e]) for i in range(0, n - n % e or n, e)]

    @classmethod
    def pooled(cls, runs: Sequence[RunResult]) -> RunResult:
        """One row from several rounds of the same method (run interleaved with the other
        methods, so that the machine's own drift weighs on every method alike): iterations,
        saves and CPU pooled, peak memory the highest, restore times the mean, bit-exact
        only when every round was; the method's own figures are its last round's."""
        if len(runs) == 1:
            return runs[0]
        last = runs[-1]
        extra = {**last.extra,
                 "cpu": _pooled_usage([r.extra["cpu"] for r in runs]),
                 "cpu_training": _pooled_usage([r.extra["cpu_training"] for r in runs]),
                 "gc": _pooled_gc([r.extra["gc"] for r in runs]),
                 **{k: sum(r.extra[k] for r in runs)
                    for k in ("timed_checkpoints", "finish_s", "wall_s")},
                 "rounds": len(runs),
                 "iteration_s_mean_by_round": [statistics.fmean(r.iteration_s) for r in runs],
                 "peak_host_bytes_by_round": [r.memory.get("peak_host_bytes") for r in runs]}
        memory = {k: max(r.memory[k] or 0 for r in runs) for k in last.memory}
        restore = {t: statistics.fmean(r.restore_s[t] for r in runs if t in r.restore_s)
                   for t in last.restore_s}
        return cls(last.method, [x for r in runs for x in r.iteration_s],
                   [x for r in runs for x in r.stall_s], extra, all(r.verified for r in runs),
                   [x for r in runs for x in r.durable_s],
                   [x for r in runs for x in r.stored_bytes], restore, memory, last.every)

    def summary(self) -> dict[str, Any]:
        stalls = sorted(self.stall_s) or [0.0]
        durable = sorted(self.durable_s)
        total = sum(self.iteration_s)
        periods = self.period_s()
        per_iteration = statistics.median(periods) / max(1, self.every)
        return {"method": self.method,
                "iteration_s_median": statistics.median(self.iteration_s),
                "iteration_s_mean": statistics.fmean(self.iteration_s),
                "iteration_s_all": self.iteration_s,
                # the median period, so that a burst of load from elsewhere in one period
                # does not decide the figure; the plain mean is kept alongside
                "throughput_it_s": 1 / per_iteration if per_iteration else math.nan,
                "throughput_mean_it_s": len(self.iteration_s) / total if total else math.nan,
                "stall_s_median": statistics.median(stalls),
                "stall_s_p90": _pick(stalls, 0.9),
                "stall_s_all": self.stall_s,
                "durable_s_median": statistics.median(durable) if durable else None,
                "durable_s_p90": _pick(durable, 0.9) if durable else None,
                "stored_bytes_median": (statistics.median(self.stored_bytes)
                                        if self.stored_bytes else None),
                "restore_s": self.restore_s,
                "checkpoints": len(self.stall_s), "verified_bit_exact": self.verified,
                **self.memory, **self.extra}


def _pooled_usage(usages: Sequence[dict[str, Any]]) -> dict[str, object]:
    """``cpumeter.Usage.to_dict()`` figures of several runs, added up."""
    cpu: collections.Counter[str] = collections.Counter()
    faults: collections.Counter[str] = collections.Counter()
    for u in usages:
        cpu.update(u["cpu_s"])
        faults.update(u["minflt"])
    return cpumeter.Usage(dict(cpu), dict(faults)).to_dict()


def _pooled_gc(meters: Sequence[dict[str, Any]]) -> dict[str, object]:
    """``cpumeter.GcMeter.to_dict()`` figures of several runs, added up."""
    passes: collections.Counter[str] = collections.Counter()
    seconds: collections.Counter[str] = collections.Counter()
    full: collections.Counter[str] = collections.Counter()
    for m in meters:
        passes.update(m["passes"])
        seconds.update(m["seconds"])
        full.update(m["full_s_by_thread"])
    return cpumeter.gc_dict(passes, seconds, full)


MethodT = TypeVar("MethodT")


def interleaved(methods: Sequence[MethodT], rounds: int) -> Iterator[tuple[int, MethodT]]:
    """(round, method) for ``rounds`` runs of every method, interleaved, the order reversed
    every other round, so that the machine's drift over a run weighs on every method alike
    (``RunResult.pooled`` then makes one row of each method's rounds)."""
    for k in range(rounds):
        for m in methods if k % 2 == 0 else methods[::-1]:
            yield k, m


def run(method: Method, make: Callable[[], Workload], *, warmup: int, iterations: int,
        every: int, workdir: Path, restore_all: bool = True) -> RunResult:
    """Train ``warmup`` + ``iterations`` steps, checkpointing every ``every``; time the last
    ``iterations``; then verify the last checkpoint restores bit-exactly (from every tier
    of the method when ``restore_all``, timing each restore)."""
    t_run = time.perf_counter()
    w = make()
    sync = torch.cuda.synchronize if w.device.startswith("cuda") else (lambda: None)
    workdir.mkdir(parents=True, exist_ok=True)
    trim_heap()
    memory = MemorySampler(children=method.child_processes)
    memory.start()
    gc_passes = cpumeter.GcMeter()  # over the timed iterations
    try:
        method.setup(w, workdir)
        memory.own_shm = method.own_shm_bytes()
        iteration_s: list[float] = []
        stall_s: list[float] = []
        timed_steps: list[int] = []
        last_step, expected = -1, None
        total = warmup + iterations
        gate_owner = -1  # index in stall_s of the save whose copies the next step may wait for
        cpu_start = cpumeter.read()
        for step in range(total):
            if step == warmup:
                cpu_start = cpumeter.read()
                gc_passes.start()
            t0 = time.perf_counter()
            w.loss(step).backward()
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=True)
            if gate_owner >= 0:
                stall_s[gate_owner] += method.stall_after_step()
                gate_owner = -1
            is_last = step == total - 1
            if step % every == 0 or is_last:
                if is_last and not isinstance(method, NoCheckpoint):
                    sync()
                    t_copy = time.perf_counter()
                    if not w.device.startswith("cuda"):  # the harness's memory, not the method's
                        memory.offset = tensor_bytes(train_state(w))
                    expected = copy.deepcopy(train_state(w))
                    t0 += time.perf_counter() - t_copy  # the reference copy is not the method's
                stall = method.checkpoint(step)
                last_step = step
                if step >= warmup:
                    stall_s.append(stall)
                    timed_steps.append(step)
                    gate_owner = len(stall_s) - 1
            sync()
            if step >= warmup:
                iteration_s.append(time.perf_counter() - t0)
        cpu_trained = cpumeter.read()  # threads a method ends in finish() are named here
        gc_passes.stop()
        t_drain = time.perf_counter()
        extra = method.finish()
        extra["finish_s"] = time.perf_counter() - t_drain
        # every thread's CPU and minor faults: over the timed iterations (by thread), and
        # with the drain that finishes the last saves (the totals)
        extra["cpu_training"] = cpumeter.between(cpu_start, cpu_trained).to_dict()
        extra["cpu"] = cpumeter.between(cpu_start, cpumeter.read()).to_dict()
        extra["timed_checkpoints"] = len(timed_steps)
        extra["gc"] = gc_passes.to_dict()
        mem = memory.stop()
        durable = [method.durable_at[s] - method.saved_at[s] for s in timed_steps
                   if s in method.durable_at and s in method.saved_at]
        stored = [method.stored[s] for s in timed_steps if s in method.stored]
        verified, restore_s = False, {}
        if expected is not None:
            tiers = method.restore_tiers() if restore_all else [None]
            for tier in tiers:
                fresh = make()
                sync()
                t0 = time.perf_counter()
                method.restore_into(fresh, last_step, tier)
                sync()
                if tier is not None:
                    restore_s[tier] = time.perf_counter() - t0
                assert_same(expected, train_state(fresh), f"{method.name} from {tier}")
                del fresh
            verified = True
        if isinstance(method, AsymCheckMethod) and method.restore_sources:
            extra["restore_sources"] = method.restore_sources
    finally:
        memory.stop()
        gc_passes.stop()
        method.cleanup()
        method.release()
        shutil.rmtree(workdir, ignore_errors=True)
    del w, expected
    trim_heap()
    extra["wall_s"] = time.perf_counter() - t_run
    return RunResult(method.name, iteration_s, stall_s, extra, verified, durable, stored,
                     restore_s, mem, every)


def machine_info(probe_dir: Path, probe_bytes: int = 256 << 20) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "torch": torch.__version__, "python": platform.python_version(),
            "disk_write_gbps": disk_write_gbps(probe_dir, probe_bytes),
            "memcpy_gbps": memcpy_gbps(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def memcpy_gbps(nbytes: int = 128 << 20) -> float:
    """Copy bandwidth of host memory into an already faulted-in buffer (GB/s), best of 3."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def disk_write_gbps(directory: Path, nbytes: int = 256 << 20, block: int = 8 << 20) -> float:
    """Sequential write + fsync bandwidth of the disk under ``directory`` (GB/s)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".probe-{uuid.uuid4().hex}"
    buf = os.urandom(block)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(nbytes // block):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return nbytes / (time.perf_counter() - t0) / 1e9
