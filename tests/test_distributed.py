"""Several processes, one recipe: real `accelerate launch` runs of two CPU processes over gloo.

The same recipe (global batch 2 x 2) runs once in one process (accumulating 2 micro-batches) and once in two
processes (each taking 1 micro-batch of every step). Both must log the same loss curve: the processes see
between them exactly the examples the single process sees, and the trainer averages the loss over the global
batch's tokens. A two-process run killed with SIGKILL mid-DPO and resumed under two processes must end with the
adapters of the uninterrupted two-process run.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from finetune.data.cache import CACHE_ENV
from finetune.distributed import accumulation_per_process, refuse_sharded_launch
from finetune.errors import FinetuneError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "accelerate_configs" / "cpu_ddp.yaml"
# Loss and grad norm may differ by float summation order only (one process sums two micro-batches' gradients,
# two processes all-reduce them).
RELATIVE_TOLERANCE = 1e-4
SFT = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "save_steps": 2}
DPO = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "save_steps": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
            "--main_process_port", str(free_port()), "-m", "finetune", "run", str(recipe), f"output_dir={out}", *extra]


def child_env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, CACHE_ENV: str(cache), "PYTHONUNBUFFERED": "1", **extra}


def launch(recipe: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(launch_command(recipe, out, *extra), capture_output=True, text=True, cwd=REPO,
                          env=child_env(cache), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def launch_until(runs: dict, out: Path, marker: str, act) -> tuple[int, list[str]]:
    """Launch the recipe in two processes printing their steps, `act` on the launcher once a line holds `marker`,
    and wait for the end; returns the launcher's exit code and the output lines."""
    child = subprocess.Popen(launch_command(runs["recipe"], out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=REPO, env=child_env(runs["cache"], FINETUNE_TRACE_STEPS="1"))
    seen = []
    for line in child.stdout:
        seen.append(line.rstrip("\n"))
        if marker in line:
            act(child)
            break
    seen += child.stdout.read().splitlines()
    return child.wait(timeout=120), seen


def losses(out: Path, stage: str) -> dict[int, tuple[float, float]]:
    lines = (out / stage / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "loss" in r}


def adapter(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(out / stage / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_recipe):
    """The two-process run and the one-process run of the same recipe."""
    root = tmp_path_factory.mktemp("distributed")
    recipe = tiny_recipe(root / "recipe.yaml", sft=SFT, dpo=DPO, tracking={"report_to": ["tensorboard"]})
    cache = root / "cache"
    two = launch(recipe, root / "two", cache)
    one = subprocess.run([sys.executable, "-m", "finetune", "run", str(recipe), f"output_dir={root / 'one'}"],
                         capture_output=True, text=True, cwd=REPO, env=child_env(cache), timeout=900)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    return {"recipe": recipe, "cache": cache, "root": root, "two": root / "two", "one": root / "one",
            "two_output": two.stdout + two.stderr}


@pytest.mark.slow
def test_two_processes_really_ran(runs):
    assert "[distributed] 2 processes, MULTI_CPU over gloo" in runs["two_output"]
    for stage in ("sft", "dpo"):
        assert json.loads((runs["two"] / stage / "manifest.json").read_text())["processes"] == 2
        checkpoint = runs["two"] / stage / "checkpoints" / "checkpoint-2"
        assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
        assert json.loads((runs["one"] / stage / "manifest.json").read_text())["processes"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_give_the_loss_curve_of_one(runs, stage):
    one, two = losses(runs["one"], stage), losses(runs["two"], stage)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        for name, a, b in zip(("loss", "grad_norm"), one[step], two[step]):
            assert abs(a - b) <= RELATIVE_TOLERANCE * abs(a), f"{stage} step {step} {name}: {a} (1 process) vs {b}"
    # the curve moves, so agreeing on it means something
    assert len({round(loss, 4) for loss, _ in one.values()}) == 4


@pytest.mark.slow
def test_only_the_main_process_writes_the_run_folder(runs):
    """One metrics line per logged step, one routing record per window, one dashboard run: not one per process."""
    for stage in ("sft", "dpo"):
        assert len(list((runs["two"] / "tensorboard" / stage).glob("events.out.tfevents.*"))) == 1
        steps = [json.loads(line)["step"] for line in (runs["two"] / stage / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == len(set(steps)) + 1  # the trainer's end-of-training summary repeats the last step
        routing = (runs["two"] / stage / "routing.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in routing] == [1, 2, 3, 4]


@pytest.mark.slow
def test_router_statistics_count_every_process_tokens(runs):
    """Each process routes its own micro-batch; the logged window covers both, as the single process's does."""
    for stage in ("sft", "dpo"):
        one = [json.loads(r) for r in (runs["one"] / stage / "routing.jsonl").read_text().splitlines()]
        two = [json.loads(r) for r in (runs["two"] / stage / "routing.jsonl").read_text().splitlines()]
        assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
        for a, b in zip(one, two):
            assert torch.allclose(torch.tensor(a["load"]), torch.tensor(b["load"]), atol=1e-5)


@pytest.mark.slow
def test_resume_under_two_processes_after_a_kill(runs):
    """SIGKILL every process of a two-process run once SFT's step 3 is done (checkpoint-2 is complete, step 4 not
    saved), resume it with two processes (SFT from its checkpoint, then DPO from the start, under --resume): the final
    adapters equal those of the run that was never interrupted."""
    out = runs["root"] / "killed"

    def kill_every_process(launcher: subprocess.Popen) -> None:
        for process in [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]:
            process.send_signal(signal.SIGKILL)

    code, seen = launch_until(runs, out, "[trace] sft step 3 done", kill_every_process)
    assert code == -signal.SIGKILL, "\n".join(seen[-40:])
    assert not (out / "sft" / "manifest.json").exists() and not (out / "dpo").exists()
    assert (out / "sft" / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()

    resumed = launch(runs["recipe"], out, runs["cache"], "--resume")
    output = resumed.stdout + resumed.stderr
    assert output.count(f"[resume] continuing from {out / 'sft' / 'checkpoints' / 'checkpoint-2'}") == 2
    assert output.count("[resume] no complete checkpoint: starting the stage over") == 2  # DPO, in each process
    for stage in ("sft", "dpo"):
        expected, got = adapter(runs["two"], stage), adapter(out, stage)
        assert expected.keys() == got.keys()
        worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
        assert worst <= 1e-6, f"{stage}: resumed adapter differs by {worst}"


def test_the_global_batch_is_split_by_accumulation():
    assert accumulation_per_process(0, batch_size=4, grad_accum=8, processes=1) == 8
    assert accumulation_per_process(0, batch_size=4, grad_accum=8, processes=4) == 2
    with pytest.raises(FinetuneError, match=r"stages\.1\.grad_accum: a global batch of 4 x 3 cannot be split over 2"):
        accumulation_per_process(1, batch_size=4, grad_accum=3, processes=2)


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharded_launchers_are_refused_with_the_reason(variable, name):
    refuse_sharded_launch({variable: "false"})
    with pytest.raises(FinetuneError, match=rf"{name} launch \({variable}=true\) is not supported yet.*multi_gpu"):
        refuse_sharded_launch({variable: "true"})


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(runs):
    """SIGTERM reaching only the second process (a scheduler's signal lands in the processes at different times)
    still stops both at the end of the same step, with one complete checkpoint there and nothing after the stage."""
    out = runs["root"] / "terminated"

    def terminate_the_second_process(launcher: subprocess.Popen) -> None:
        (worker,) = [p for p in psutil.Process(launcher.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        worker.send_signal(signal.SIGTERM)

    code, seen = launch_until(runs, out, "[trace] sft step 1 done", terminate_the_second_process)
    assert code != 0
    # both processes, the same step (their two messages can share a line of the joint output)
    stopped = [step for line in seen for step in re.findall(r"error: stopped by SIGTERM at step (\d+) ", line)]
    assert len(stopped) == 2 and len(set(stopped)) == 1, "\n".join(seen[-40:])
    step = int(stopped[0])
    assert (out / "sft" / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (out / "sft" / "manifest.json").exists() and not (out / "dpo").exists()
