"""The benchmark harness measures each run on its own: a method runs once per round, and what it
kept of one run (its workload, its last save) would be freed only in its next run, after that
run's memory baseline was taken, hiding as much of that run's own memory."""

from __future__ import annotations

import gc
import importlib
import threading
import weakref
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("harness")


def _method(harness: ModuleType, name: str) -> Any:
    if name == "DCP-best thread":
        return importlib.import_module("peers").DcpBest("thread")
    return {"no checkpoint": harness.NoCheckpoint(), "DCP async_save": harness.DcpAsync(),
            "asym": harness.AsymCheckMethod("asym", "asym", warmup_iterations=2)}[name]


@pytest.mark.parametrize("name", ["no checkpoint", "DCP async_save", "DCP-best thread", "asym"])
def test_a_run_leaves_nothing_of_its_state_held_by_its_method(
        harness: ModuleType, name: str, tmp_path: Path) -> None:
    made: list[weakref.ref[torch.nn.Module]] = []

    def make() -> Any:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
        opt = torch.optim.AdamW(model.parameters())
        data = torch.randn(8, 32)
        made.append(weakref.ref(model))
        return harness.Workload("tiny", model, opt, lambda step: model(data + step).square().sum())

    method = _method(harness, name)
    for k in range(2):  # two rounds: the second run's baseline must not hold the first's state
        r = harness.run(method, make, warmup=4, iterations=3, every=1,
                        workdir=tmp_path / f"round{k}")
        assert r.verified or name == "no checkpoint"
        gc.collect()
        # the training workload and the restore targets: none is held after the run
        assert [ref() for ref in made] == [None] * len(made)


def test_the_gc_meter_counts_passes_from_start_to_stop_and_full_ones_by_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    cpumeter = importlib.import_module("cpumeter")
    meter = cpumeter.GcMeter()
    was_enabled = gc.isenabled()
    gc.disable()  # only the passes below
    try:
        gc.collect()  # before start: not counted
        meter.start()
        gc.collect()
        worker = threading.Thread(target=gc.collect, name="collector-3")
        worker.start()
        worker.join()
        gc.collect(0)
        meter.stop()
        gc.collect()  # after stop: not counted
    finally:
        if was_enabled:
            gc.enable()
    got = meter.to_dict()
    assert got["passes"] == {"0": 1, "2": 2} and got["full_passes"] == 2
    assert set(got["full_s_by_thread"]) == {"MainThread", "collector"}
    assert got["full_s"] == pytest.approx(sum(got["full_s_by_thread"].values()), abs=1e-3)
