"""The Hugging Face Trainer integration: saves through the asymmetric snapshot inside
Trainer's loop (gradient accumulation included), resumes bit-exact after SIGKILL (one process,
two DDP ranks and two FSDP2 ranks under torchrun), exports a ``from_pretrained`` folder, and is
optional."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import asymcheck
from asymcheck.cli import main as cli_main
from tests._util import assert_same, opt_state

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from asymcheck.integrations.transformers import (
    HF_CONFIG,
    AsymCheckCallback,
    asymcheck_trainer,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
from hf_common import RandomTokens  # noqa: E402


def _run(argv: list[str], timeout: float = 300,
         tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``argv`` from the repository; ``tmp``: its temporary directory (torchrun makes its
    log directories there)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                               **({"TMPDIR": str(tmp)} if tmp is not None else {})})


class _Snapshots(TrainerCallback):
    """Deep copies of the live state at each save step (runs after AsymCheckCallback)."""

    def __init__(self, every: int) -> None:
        self.every, self.states, self.mid_step_states = every, {}, {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step % self.every == 0:
            self.states[state.global_step] = copy.deepcopy(
                {"model": kw["model"].state_dict(),
                 "optimizer": opt_state(kw["model"], kw["optimizer"]),
                 "scheduler": kw["lr_scheduler"].state_dict()})


def test_trainer_saves_through_the_asym_snapshot_and_exports_for_from_pretrained(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """In-process: a fresh start is logged once; after the warm-up the saves use the asym
    snapshot (with gradient accumulation 2) and each committed checkpoint equals a deep copy
    of the state at its step; ``restore --format hf`` loads with identical logits."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128,
                                       n_positions=16, bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=10,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no",
                             report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0)
    policy = asymcheck.default_policy(tmp_path / "checkpoints")
    ckpt = AsymCheckCallback(policy, every=2, warmup_iterations=3)
    snaps = _Snapshots(every=2)
    trainer = asymcheck_trainer(Trainer)(model=model, args=args,
                                         train_dataset=RandomTokens(48, 16, 128, seed=0),
                                         callbacks=[ckpt, snaps])
    with caplog.at_level(logging.INFO, logger="asymcheck"):
        trainer.train()
    fresh = [r.getMessage() for r in caplog.records if "starting from step 0" in r.getMessage()]
    assert fresh == ["no committed checkpoint on tier(s) host, local: starting from step 0"]
    assert ckpt.restored_step is None and ckpt.checkpointer is None  # closed at the end
    modes = [h.metrics["mode"] for h in ckpt.handles]
    assert modes[0] == "naive" and modes[-2:] == ["asym", "asym"], modes
    assert all(h.metrics.get("overlapped_bytes", 0) + h.metrics.get("residual_bytes", 0) > 0
               for h in ckpt.handles if h.metrics["mode"] == "asym")

    reader = asymcheck.Checkpointer(None, policy=policy)
    try:
        for step in (8, 10):
            loaded = reader.load_sync(step)
            assert loaded is not None
            got = {"model": loaded.state["model"], "optimizer": loaded.state["optimizers"][0],
                   "scheduler": loaded.state["extras"]["scheduler"]}
            assert_same(snaps.states[step], got)
            assert f'"global_step": {step}' in loaded.state["extras"]["trainer_state"]["json"]
            assert loaded.state["extras"][HF_CONFIG]["json"].startswith("{")
    finally:
        reader.close_sync()

    out = tmp_path / "hf-model"
    local = policy.tier("local").url
    assert cli_main(["restore", "latest", "--to", str(out), "--format", "hf",
                     "--tier", local]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert type(exported) is GPT2LMHeadModel
    assert exported.lm_head.weight.data_ptr() == exported.transformer.wte.weight.data_ptr()
    model.eval()
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(exported(x).logits, model(x).logits)
    assert cli_main(["restore", "latest", "--to", str(tmp_path / "m.safetensors"),
                     "--tier", local]) == 0  # the suffix still picks the format


def test_gpt2_example_killed_and_resumed_matches_an_uninterrupted_run() -> None:
    """One process, gradient accumulation 2: SIGKILL after step 8, the same command again
    resumes from step 6 (the newest committed) and every loss matches bit for bit."""
    out = _run([sys.executable, str(EXAMPLES / "hf_gpt2.py"), "--demo", "--steps", "12",
                "--every", "3", "--crash-at", "8", "--grad-accum", "2"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "simulating a crash: SIGKILL" in out.stdout
    assert "restored step 6" in out.stdout
    assert "12 steps compared: losses of the resumed run EQUAL" in out.stdout


@pytest.mark.slow
def test_two_ddp_ranks_under_torchrun_killed_and_resumed_match(tmp_path: Path) -> None:
    """torchrun, 2 CPU ranks (gloo), DistributedDataParallel: rank 0 writes the model once;
    after SIGKILL the same command resumes and rank 0's losses match bit for bit."""
    out = _run([sys.executable, str(EXAMPLES / "hf_gpt2.py"), "--demo", "--nproc", "2",
                "--steps", "8", "--every", "2", "--crash-at", "5", "--grad-accum", "2"],
               tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "restored step 4" in out.stdout
    written = re.search(r"model bytes per rank in the newest checkpoint: (\d+), (\d+)",
                        out.stdout)
    assert written and int(written[1]) > 0 and int(written[2]) == 0, out.stdout
    assert "8 steps compared: losses of the resumed run EQUAL" in out.stdout


#: A Trainer script with FSDP2 (``fsdp_config={"version": 2}``, each GPT2Block and the root
#: sharded) on CPU ranks. accelerate turns FSDP on only for accelerator devices (CUDA, NPU, XPU,
#: ...): on CPU ranks (``DistributedType.MULTI_CPU``) it drops the FSDP plugin without a word and
#: the Trainer wraps the model in DistributedDataParallel. The script tells accelerate's shared
#: ``PartialState`` that the ranks are ``MULTI_GPU`` before the Trainer starts (the device stays
#: the CPU, the backend gloo; after ``TrainingArguments``, which sets the state up), so the
#: Trainer takes its FSDP2 path: ``fully_shard`` on a CPU
#: mesh, DTensor parameters, the optimizer switched to them.
_FSDP2_TRAINER = textwrap.dedent("""
    import argparse, os, sys
    sys.path.insert(0, os.environ["ASYMCHECK_EXAMPLES"])
    import torch, transformers
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from hf_common import CrashAt, LossLog, RandomTokens
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    import asymcheck
    from asymcheck.integrations.transformers import AsymCheckCallback, asymcheck_trainer

    p = argparse.ArgumentParser()
    for flag, kind, default in [("--steps", int, 8), ("--every", int, 2), ("--crash-at", int, -1),
                                ("--dir", str, None), ("--loss-log", str, None)]:
        p.add_argument(flag, type=kind, default=default)
    args = p.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128,
                                       n_positions=16, bos_token_id=0, eos_token_id=0))
    targs = TrainingArguments(
        output_dir=os.path.join(args.dir, "trainer"), max_steps=args.steps,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        ddp_backend="gloo", fsdp=True,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]})
    PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU  # set up by targs
    ckpt = AsymCheckCallback(asymcheck.default_policy(args.dir), every=args.every,
                             warmup_iterations=2)
    callbacks = [ckpt, LossLog(args.loss_log)]
    if args.crash_at >= 0:
        callbacks.append(CrashAt(args.crash_at, ckpt))
    trainer = asymcheck_trainer(Trainer)(model=model, args=targs, callbacks=callbacks,
                                         train_dataset=RandomTokens(64, 16, 128, seed=0))
    trainer.train()
    if trainer.is_world_process_zero():
        modes = sorted({str(h.metrics.get("mode")) for h in ckpt.handles})
        print(f"fsdp2 {trainer._asymcheck_fsdp2()}, parameters "
              f"{type(next(trainer.model.parameters())).__name__}, restored step "
              f"{ckpt.restored_step}, modes {'/'.join(modes)}", flush=True)
""")


@pytest.mark.slow
def test_two_fsdp2_ranks_under_torchrun_killed_and_resumed_match(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """torchrun, 2 CPU ranks (gloo), Trainer with FSDP2: every rank writes its own shards;
    after SIGKILL the same command resumes and rank 0's losses match bit for bit."""
    script = tmp_path / "fsdp2_trainer.py"
    script.write_text(_FSDP2_TRAINER)
    import kill_resume  # examples/, on sys.path above

    shown: list[str] = []

    def model_bytes(directory: Path) -> None:
        out = _run([sys.executable, "-m", "asymcheck.cli", "inspect", "latest", "--tier",
                    directory.as_uri(), "--json"], timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        shown.append(out.stdout)

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", str(script), "--steps", "8", "--every", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "ASYMCHECK_EXAMPLES": str(EXAMPLES), "TMPDIR": str(tmp_path)}
    code = kill_resume.demo(command, steps=8, crash_at=5, log_flag="--loss-log", env=env,
                            inspect=model_bytes)
    out = capfd.readouterr().out
    assert code == 0, out
    assert "fsdp2 True, parameters DTensor, restored step None" in out, out
    assert "fsdp2 True, parameters DTensor, restored step 4, modes asym" in out, out
    assert "8 steps compared: losses of the resumed run EQUAL" in out, out
    (listing,) = shown
    sections = [r["sections"] for r in json.loads(listing)["info"]["ranks"]]
    assert len(sections) == 2 and all(s.get("model", 0) > 0 for s in sections), sections


@pytest.mark.parametrize("name", ["bert", "roberta", "bloom"])
def test_examples_train_through_the_trainer(name: str, tmp_path: Path) -> None:
    out = _run([sys.executable, str(EXAMPLES / f"hf_{name}.py"), "--steps", "4", "--every", "2",
                "--dir", str(tmp_path / "checkpoints")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "trained to step 4" in out.stdout and "2 checkpoint(s)" in out.stdout


def test_import_without_transformers_names_the_extra() -> None:
    code = textwrap.dedent("""
        import importlib.abc, sys

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, Hide())
        import asymcheck.integrations  # no framework needed
        try:
            import asymcheck.integrations.transformers
        except ImportError as e:
            print("ERROR:" + str(e))
    """)
    out = _run([sys.executable, "-c", code], timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line == ("ERROR:asymcheck.integrations.transformers needs transformers and "
                    "accelerate: pip install 'asymcheck[hf]'"), out.stdout + out.stderr


def test_restore_format_hf_needs_the_config_the_integration_saves(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = asymcheck.default_policy(tmp_path / "checkpoints")
    model = torch.nn.Linear(4, 4)
    with asymcheck.Checkpointer(model, policy=policy, mode="naive") as ckpt:
        ckpt.save_sync(1).wait_all_sync(60)
    out = tmp_path / "hf"
    code = cli_main(["restore", "1", "--to", str(out), "--format", "hf",
                     "--tier", policy.tier("local").url])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "step 1 holds no model config (extra 'hf_config'" in err and not out.exists()
