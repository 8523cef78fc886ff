"""The quickstart recipe end to end, as a user runs it: a real `finetune run` child process on CPU.

One run of the recipe as shipped is shared by the checks below: the SFT loss falls, DPO learns to
prefer the chosen answers, the merged export loads with stock transformers and matches base+adapter,
and `finetune generate` (called in this process) answers in the Mixtral-Instruct format.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.cli import main
from finetune.stages.common import read_metrics

REPO = Path(__file__).resolve().parents[1]


def finetune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quickstart")
    done = finetune("run", "recipes/quickstart.yaml", f"output_dir={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"merged export   : {out / 'export'}" in done.stdout
    summary = done.stdout.split("=== done in")[1].splitlines()[1:]
    assert [line.index(":") for line in summary] == [18] * len(summary), summary  # one column, dashboards too
    return out


def test_run_folder_layout(run_dir):
    for stage in ("sft", "dpo"):
        assert (run_dir / stage / "adapter" / "adapter_model.safetensors").is_file()
        assert (run_dir / stage / "adapter" / "adapter_config.json").is_file()
        assert (run_dir / stage / "manifest.json").is_file()
        assert (run_dir / stage / "trainer_state.json").is_file()
    resolved = (run_dir / "recipe.yaml").read_text()
    assert f"output_dir: {run_dir}" in resolved and "learning_rate: 0.01" in resolved
    assert json.loads((run_dir / "dpo" / "manifest.json").read_text())["reference_policy"].endswith("sft/adapter")


def test_sft_loss_falls(run_dir):
    losses = [m["loss"] for m in read_metrics(run_dir / "sft") if "loss" in m]
    assert len(losses) >= 5
    assert losses[-1] < 0.5 * losses[0], losses
    evals = [m["eval_loss"] for m in read_metrics(run_dir / "sft") if "eval_loss" in m]
    assert evals[-1] < evals[0], evals


def test_dpo_learns_the_preferences(run_dir):
    logs = [m for m in read_metrics(run_dir / "dpo") if "rewards/margins" in m and "loss" in m]
    assert len(logs) >= 3
    first, last = logs[0], logs[-1]
    assert last["rewards/margins"] > first["rewards/margins"] + 0.5, logs
    assert last["rewards/accuracies"] > first["rewards/accuracies"], logs
    final = json.loads((run_dir / "dpo" / "manifest.json").read_text())["final_eval"]
    # 16 held-out pairs; expert kernels that agree to 3e-7 in float32 (grouped before and after its LoRA was put
    # into the base matmuls, the reference loop) ended at 0.6875, 0.875 and 0.8125 (margins 0.72, 1.28, 1.18):
    # this short run at a high rate amplifies rounding. Untrained: 0, and a coin would score 0.5 with margins ~0.
    assert final["eval_rewards/accuracies"] >= 0.625 and final["eval_rewards/margins"] > 0.5, final


def test_export_loads_with_stock_transformers_and_matches_base_plus_adapter(run_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = run_dir / "export"
    assert sorted(p.suffix for p in export.glob("model*")) == [".safetensors"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (export / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(export)
    merged = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base-model", dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, run_dir / "dpo" / "adapter").eval()

    messages = [{"role": "user", "content": "Name the capital of Kenya."},
                {"role": "assistant", "content": "The capital of Kenya is Nairobi."}]
    ids = torch.tensor([tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, unmerged(input_ids=ids).logits
    # float32 merge: only summation order differs, so the logits (up to ~10 in size) agree to ~1e-4
    assert (a - b).abs().max().item() < 1e-3
    with unmerged.disable_adapter(), torch.no_grad():
        plain = unmerged(input_ids=ids).logits
    assert (a - plain).abs().max().item() > 1e-2, "the adapter changed nothing"
    assert json.loads((export / "verification.json").read_text())["max_abs_logit_difference"] < 1e-3


@pytest.mark.parametrize("target", ["export", "run folder"])
def test_generate_answers_in_the_instruct_format(run_dir, target, capsys):
    path = run_dir / "export" if target == "export" else run_dir
    # in this process (a child process costs seconds of imports)
    assert main(["generate", str(path), "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.strip().startswith("The capital of"), out
