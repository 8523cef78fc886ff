"""Runs that survive crashes: real `finetune run` child processes, killed with real signals.

A short SFT -> DPO recipe (gradient accumulation 2, a checkpoint every 2 steps) runs once uninterrupted;
every interrupted-then-resumed run must end with the same adapters, to 1e-6 (in practice bit for bit).
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
CHECKPOINTING = {"max_steps": 8, "grad_accum": 2, "save_steps": 2, "save_total_limit": 2}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_recipe) -> Path:
    # layer inputs offloaded to host memory in both stages, and DPO with 8-bit AdamW: what either keeps must come
    # back exactly too
    offload = {"gradient_checkpointing": True, "offload_activations": True}
    return tiny_recipe(tmp_path_factory.mktemp("recipe") / "crash.yaml", lora={"dropout": 0.1},
                       sft={**CHECKPOINTING, **offload},
                       dpo={**CHECKPOINTING, **offload, "max_steps": 6, "optimizer": "adamw_8bit"})


def command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", "run", str(recipe), f"output_dir={out}", *extra]


def run(recipe: Path, out: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command(recipe, out, *extra), capture_output=True, text=True, cwd=REPO, timeout=600,
                          **kwargs)


def run_until(recipe: Path, out: Path, marker: str, sig: int, *extra: str) -> tuple[int, list[str]]:
    """Start a run that prints its micro-steps, send `sig` when a line contains `marker`, wait for the exit."""
    env = {**os.environ, "FINETUNE_TRACE_STEPS": "1", "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(command(recipe, out, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=REPO, env=env)
    seen = []
    for line in child.stdout:
        seen.append(line.rstrip())
        if marker in line:
            child.send_signal(sig)
            break
    seen += child.stdout.read().splitlines()
    return child.wait(timeout=600), seen


def adapters(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {s: load_file(out / s / "adapter" / "adapter_model.safetensors") for s in ("sft", "dpo")}


def assert_same_adapters(out: Path, reference: Path) -> None:
    for stage, tensors in adapters(reference).items():
        resumed = adapters(out)[stage]
        assert resumed.keys() == tensors.keys()
        worst = max((resumed[k] - tensors[k]).abs().max().item() for k in tensors)
        assert worst <= 1e-6, f"{stage}: resumed adapter differs by {worst}"


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run(recipe, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.fixture(scope="module")
def reference(uninterrupted) -> Path:
    return uninterrupted[0]


def test_both_stages_kept_their_layer_inputs_in_host_memory(uninterrupted):
    """The recipe key reaches the trainer's model; that offloading changes no number is tests/test_offload.py's
    (bit for bit, through the same decoder hooks)."""
    sent = re.findall(r"\[memory\] the first training forward kept ([\d.]+) MiB of saved activations", uninterrupted[1])
    assert len(sent) == 2 and all(float(mib) > 0 for mib in sent), uninterrupted[1][-2000:]  # one line per stage


def test_each_stage_trains_with_the_optimizer_it_names(uninterrupted):
    made = re.findall(r"\[train\] optimizer (\S+): (\S+)", uninterrupted[1])
    assert made == [("adamw", "torch.optim.adamw.AdamW"), ("adamw_8bit", "finetune.optimizers.AdamW8bit")]


def test_each_stage_checkpoints_the_optimizer_it_was_given(reference):
    def moments(stage: str) -> set[torch.dtype]:
        checkpoint = sorted((reference / stage / "checkpoints").glob("checkpoint-*"))[-1]
        state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
        # torch's AdamW: exp_avg; bitsandbytes' keeps its moments (state1) in a dict of its own
        return {t.dtype for s in state.values() for key, t in {**s, **s.get("__bnb_optimizer_quant_state__", {})}.items()
                if key in ("exp_avg", "state1")}

    assert moments("sft") == {torch.float32}  # adamw
    assert torch.uint8 in moments("dpo")  # adamw_8bit (float32 only for tensors under 4096 elements)


def test_sigkill_in_dpo_keeps_sft_and_ignores_a_torn_checkpoint(recipe, reference, tmp_path):
    code, _ = run_until(recipe, tmp_path, "[trace] dpo micro-step inside step 5", signal.SIGKILL)
    assert code == -signal.SIGKILL
    checkpoints = tmp_path / "dpo" / "checkpoints"
    # a checkpoint torn by a kill during its write: weights written, trainer state cut short
    torn = checkpoints / "checkpoint-6"
    shutil.copytree(checkpoints / "checkpoint-4", torn)
    state = (torn / "trainer_state.json").read_text()
    (torn / "trainer_state.json").write_text(state[: len(state) // 2])

    done = run(recipe, tmp_path, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage sft: already finished" in done.stdout
    assert f"ignoring the incomplete checkpoint {torn}" in done.stdout
    assert f"continuing from {checkpoints}/checkpoint-4" in done.stdout
    assert_same_adapters(tmp_path, reference)


def test_sigterm_then_sigkill_mid_accumulation_in_sft_then_resume_is_exact(recipe, reference, tmp_path):
    """Preempted twice: SIGTERM saves a checkpoint off the save schedule and stops; the resumed run is killed
    between the halves of a step; the second resume still ends with the uninterrupted run's adapters."""
    code, lines = run_until(recipe, tmp_path, "[trace] sft micro-step inside step 3", signal.SIGTERM)
    assert code == 143, "\n".join(lines[-20:])
    assert any("stopped by SIGTERM at step 3" in line for line in lines), lines[-5:]
    state = json.loads((tmp_path / "sft" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert not (tmp_path / "sft" / "adapter").exists() and not (tmp_path / "dpo").exists()
    assert not (tmp_path / "export").exists() and not (tmp_path / "run.json").exists()

    code, lines = run_until(recipe, tmp_path, "[trace] sft micro-step inside step 5", signal.SIGKILL, "--resume")
    assert code == -signal.SIGKILL
    assert any(f"continuing from {tmp_path}/sft/checkpoints/checkpoint-3" in line for line in lines), lines[-20:]
    assert lines[-1].endswith("[trace] sft micro-step inside step 5")  # killed between the halves of step 5
    assert not (tmp_path / "sft" / "adapter").exists()
    # as a kill in the middle of appending a record leaves the logs
    logs = [tmp_path / "sft" / "metrics.jsonl", tmp_path / "sft" / "routing.jsonl"]
    for log in logs:
        with log.open("a", encoding="utf-8") as f:
            f.write('{"step": 5, "lo')

    done = run(recipe, tmp_path, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"continuing from {tmp_path}/sft/checkpoints/checkpoint-4" in done.stdout
    assert_same_adapters(tmp_path, reference)
    for log in logs:  # the resumed run's records start on lines of their own
        steps = [json.loads(line)["step"] for line in log.read_text(encoding="utf-8").splitlines()]
        assert steps and steps[-1] == 8, (log, steps)


def test_nan_stops_before_the_optimizer_step_and_keeps_the_last_checkpoint(recipe, tmp_path, capsys):
    from finetune.cli import main

    # in this process (a child process costs seconds of imports)
    code = main(command(recipe, tmp_path, "stages.0.learning_rate=1.0e30", "stages.0.save_steps=1")[3:])
    stderr = capsys.readouterr().err
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    message = stderr.split("error: ", 1)[1].splitlines()[0]  # the progress bar may precede it on its line
    assert "the loss or gradients are NaN/inf" in message and "stopped before the optimizer step" in message
    step = int(message.split("step ")[1].split(":")[0])
    last = tmp_path / "sft" / "checkpoints" / f"checkpoint-{step - 1}"
    assert f"Last checkpoint: {last}" in message
    weights = load_file(last / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_unwritable_output_dir_is_named(recipe, tmp_path, capsys):
    from finetune.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(command(recipe, blocker / "run")[3:]) == 2  # in this process: it stops before anything loads
    stderr = capsys.readouterr().err
    assert f"error: cannot write {blocker / 'run'}: Not a directory" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr


def test_full_disk_is_named_and_not_a_traceback(recipe, tmp_path):
    def small_disk():  # the kernel refuses writes past 1 MiB, as a full disk would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    done = run(recipe, tmp_path / "run", preexec_fn=small_disk)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = done.stderr.split("error: ", 1)[1]
    assert message.startswith(f"cannot write under {tmp_path / 'run'}: ") and "File too large" in message, message


def test_a_base_or_tokenizer_that_cannot_load_is_refused_before_overwrite_deletes_anything(tiny_recipe, tmp_path,
                                                                                            capsys):
    """A base checkpoint that is not a Mixtral, and a tokenizer folder without a tokenizer, are one-line errors
    naming their key, given before --overwrite empties the folder of the earlier run."""
    from finetune.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("the earlier run's\n")  # a folder holding a run, all --overwrite asks
    llama, no_tokenizer = tmp_path / "llama", tmp_path / "no-tokenizer"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    no_tokenizer.mkdir()
    path = tiny_recipe(tmp_path / "recipe.yaml", sft={"max_steps": 2})
    for key, value, expected in [("model.name_or_path", llama, f"error: model.name_or_path '{llama}': "),
                                 ("model.tokenizer", no_tokenizer, f"error: model.tokenizer '{no_tokenizer}': cannot "
                                                                   "be loaded (")]:
        assert main(["run", str(path), f"output_dir={out}", f"{key}={value}", "--overwrite"]) == 2
        err = capsys.readouterr().err  # after the data's progress bars
        assert "Traceback" not in err and re.split(r"[\r\n]", err.strip())[-1].startswith(expected), err
        assert sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]
        assert (out / "recipe.yaml").read_text() == "the earlier run's\n"


def test_an_existing_run_needs_resume_or_overwrite_and_the_same_recipe(recipe, reference, capsys):
    from finetune.cli import main

    # both refusals come before anything loads: in this process (a child process costs seconds of imports)
    assert main(command(recipe, reference)[3:]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    changed = command(recipe, reference, "--resume", "stages.1.beta=0.5", "seed=8")  # overrides after an option
    assert main(changed[3:]) == 2
    assert "the recipe differs from the one this run started with (seed, stages.1.beta)" in capsys.readouterr().err
    finished = run(recipe, reference, "--resume")
    assert finished.returncode == 0
    assert "stage sft: already finished" in finished.stdout and "stage dpo: already finished" in finished.stdout


def test_overwrite_deletes_only_a_run_folder(recipe, reference, tmp_path, capsys):
    from finetune.cli import main

    # in this process: the refusals come before anything loads
    notes = tmp_path / "thesis"
    notes.mkdir()
    (notes / "thesis.tex").write_text("months of work")
    assert main(command(recipe, notes, "--overwrite")[3:]) == 2
    assert "does not hold a run (no recipe.yaml), so it is not deleted" in capsys.readouterr().err
    assert (notes / "thesis.tex").read_text() == "months of work"

    run_copy = tmp_path / "run"
    shutil.copytree(reference, run_copy)
    (run_copy / "notes.txt").write_text("mine")
    assert main(command(recipe, run_copy, "--overwrite")[3:]) == 2
    assert "holds what a run does not write (notes.txt), so it is not deleted" in capsys.readouterr().err
    assert (run_copy / "sft" / "adapter").is_dir() and (run_copy / "notes.txt").is_file()


def test_every_stage_data_is_checked_before_the_folder_changes(recipe, reference, tmp_path, capsys):
    """A bad preference row stops the run before SFT trains, and before --overwrite deletes the previous run."""
    from finetune.cli import main

    bad = tmp_path / "pairs.jsonl"
    pairs = (REPO / "data" / "quickstart" / "preference.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    torn = json.loads(pairs[0])
    del torn["rejected"]
    bad.write_text("\n".join([*pairs, json.dumps(torn)]) + "\n", encoding="utf-8")
    run_copy = tmp_path / "run"
    shutil.copytree(reference, run_copy)
    before = sorted(p.relative_to(run_copy) for p in run_copy.rglob("*"))
    assert main(command(recipe, run_copy, "--overwrite", f"data.dpo.sources.0.path={bad}")[3:]) == 2
    captured = capsys.readouterr()
    assert "data.dpo" in captured.err and f"{bad}:4" in captured.err and "rejected" in captured.err, captured.err
    assert "=== stage sft" not in captured.out
    assert sorted(p.relative_to(run_copy) for p in run_copy.rglob("*")) == before


def test_resume_refuses_a_stage_whose_data_changed(tiny_recipe, tmp_path, capsys):
    """A checkpoint continues only on the data it was trained on; the same data again resumes."""
    from finetune.cli import main

    data = tmp_path / "sft.jsonl"
    original = (REPO / "data" / "quickstart" / "sft.jsonl").read_text(encoding="utf-8")
    data.write_text(original, encoding="utf-8")
    path = tiny_recipe(tmp_path / "recipe.yaml", sft={"max_steps": 2, "save_steps": 1},
                       data={"sft": {"sources": [{"path": str(data)}]}})
    out = tmp_path / "run"
    assert main(["run", str(path), f"output_dir={out}", "--resume"]) == 0  # as a restarted job's first start
    assert f"[resume] no run in {out} yet: starting one" in capsys.readouterr().out
    (out / "sft" / "manifest.json").unlink()  # as a run killed after its last checkpoint leaves it
    data.write_text("\n".join(original.splitlines()[:40]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["run", str(path), f"output_dir={out}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"data.sft: {data} changed since {out / 'sft' / 'checkpoints' / 'checkpoint-2'} was trained on it" in err, err
    data.write_text(original, encoding="utf-8")
    assert main(["run", str(path), f"output_dir={out}", "--resume"]) == 0
    assert "continuing from" in capsys.readouterr().out
