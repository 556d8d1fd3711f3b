"""Idle-window profiler: where the forward and backward passes leave time to copy.

Windows are observed per *parameter-owning module* (a module with parameters of
its own). A forward window opens at the module's forward pre-hook and lasts
until the next one. The end of the model's forward opens the first backward
window; each later backward window opens when a module's gradients are all
accumulated (the first grad hook of the next module), so it spans the backward
computation of the module after it. Parameter owners are the unit because
backward progress is only observable through gradients, and they give both
passes the same names; modules without parameters fall into their neighbour's
window, and windows too small to matter are merged by the planner's minimum
partition size. Durations are medians over warm-up iterations, the first
(cold) iteration dropped, which keeps them stable to a few percent.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

FORWARD = "forward"
BACKWARD = "backward"
FORWARD_END = "<forward-end>"  # the backward window that opens when the forward pass returns


@dataclass(frozen=True)
class Window:
    kind: str  # FORWARD | BACKWARD
    name: str  # the module whose pass opens the window
    duration_s: float


@dataclass(frozen=True)
class Profile:
    windows: tuple[Window, ...]
    iterations: int

    @property
    def signature(self) -> tuple[tuple[str, str], ...]:
        return tuple((w.kind, w.name) for w in self.windows)

    @property
    def total_s(self) -> float:
        return sum(w.duration_s for w in self.windows)

    def to_dict(self) -> dict[str, Any]:
        return {"iterations": self.iterations,
                "windows": [[w.kind, w.name, w.duration_s] for w in self.windows]}


WindowListener = Callable[[int], None]
StepListener = Callable[[], None]


class WindowTracker:
    """Hooks on a model and its optimizers that number the windows of each iteration.

    ``on_window(k)`` fires when window ``k`` (0-based, counted since the last
    optimizer step) opens; ``on_step()`` fires before any optimizer steps.
    """

    def __init__(self, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]
                 ) -> None:
        self._handles: list[Any] = []
        self._window_listeners: list[WindowListener] = []
        self._step_listeners: list[StepListener] = []
        self.events: list[tuple[str, str, float]] = []  # this iteration's (kind, name, t)
        self._last_backward: str | None = None
        seen: set[int] = set()  # a tied parameter reports to its first owner only
        for name, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            if not params:
                continue
            seen.update(id(p) for p in params)
            unit = name or "<root>"
            self._handles.append(module.register_forward_pre_hook(self._forward_hook(unit)))
            for p in params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(
                        self._grad_hook(unit)))
        self._handles.append(model.register_forward_hook(self._forward_end_hook))
        for opt in optimizers:
            self._handles.append(opt.register_step_pre_hook(self._step_hook))

    def add_listeners(self, on_window: WindowListener, on_step: StepListener) -> None:
        self._window_listeners.append(on_window)
        self._step_listeners.append(on_step)

    def _open(self, kind: str, unit: str) -> None:
        self.events.append((kind, unit, time.perf_counter()))
        k = len(self.events) - 1
        for listener in self._window_listeners:
            listener(k)

    def _forward_hook(self, unit: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self._last_backward = None
            self._open(FORWARD, unit)
        return hook

    def _forward_end_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.is_grad_enabled():
            self._last_backward = None
            self._open(BACKWARD, FORWARD_END)

    def _grad_hook(self, unit: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if unit != self._last_backward:
                self._last_backward = unit
                self._open(BACKWARD, unit)
        return hook

    def _step_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for listener in self._step_listeners:
            listener()

    def end_iteration(self) -> list[tuple[str, str, float]]:
        """This iteration's events (closing at now), and start counting the next one."""
        events, self.events = self.events, []
        self._last_backward = None
        return events

    def remove(self) -> None:
        """Remove the hooks and forget the listeners: a listener holds its owner (the stager,
        and through it the model and optimizers), which would otherwise outlive a closed
        checkpointer until the next garbage collection."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._window_listeners.clear()
        self._step_listeners.clear()


class Profiler:
    """Collects warm-up iterations from a WindowTracker and yields a stable Profile."""

    def __init__(self, tracker: WindowTracker, warmup_iterations: int = 10) -> None:
        if warmup_iterations < 2:
            raise ValueError(f"warmup_iterations must be >= 2, got {warmup_iterations}")
        self.warmup_iterations = warmup_iterations
        self.profile: Profile | None = None
        self._tracker = tracker
        self._samples: list[list[tuple[str, str, float]]] = []
        self._skipped_first = False
        tracker.add_listeners(lambda k: None, self._on_step)

    def reprofile(self) -> None:
        """Forget the profile and measure again over the next warm-up iterations."""
        self.profile = None
        self._samples.clear()
        self._skipped_first = False

    def _on_step(self) -> None:
        end = time.perf_counter()
        events = self._tracker.end_iteration()
        if not events:  # a second optimizer's step in the same iteration
            return
        windows = [(k, n, (events[i + 1][2] if i + 1 < len(events) else end) - t)
                   for i, (k, n, t) in enumerate(events)]
        if self.profile is not None:
            if tuple((k, n) for k, n, _ in windows) != self.profile.signature:
                log.info("the model's hook sequence changed: profiling again")
                self.reprofile()
            else:
                return
        if not self._skipped_first:
            self._skipped_first = True
            return
        if self._samples and [(k, n) for k, n, _ in self._samples[0]] != [
                (k, n) for k, n, _ in windows]:
            self._samples.clear()  # not yet stable: start over
        self._samples.append(windows)
        if len(self._samples) >= self.warmup_iterations - 1:
            self.profile = _median_profile(self._samples)
            self._samples.clear()
            log.info("profiled %d windows over %d iterations (%.1f ms per iteration)",
                     len(self.profile.windows), self.profile.iterations,
                     self.profile.total_s * 1e3)


def _median_profile(samples: Iterable[list[tuple[str, str, float]]]) -> Profile:
    rows = list(samples)
    windows = tuple(Window(kind, name, statistics.median(r[i][2] for r in rows))
                    for i, (kind, name, _) in enumerate(rows[0]))
    return Profile(windows=windows, iterations=len(rows))
