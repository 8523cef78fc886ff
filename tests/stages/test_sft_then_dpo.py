"""SFT then DPO on the tiny model: DPO's reference policy is the SFT policy, and the router's auxiliary loss
enters both stages with the recipe's coefficient."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import model as models
from finetune.pipeline import load_tokenizer
from finetune.recipe import load_recipe
from finetune.stages.common import StopSignal, read_metrics
from finetune.stages.dpo import build_dpo_trainer

REPO = Path(__file__).resolve().parents[2]


def finetune_run(recipe: Path, out: Path, *overrides: str) -> None:
    done = subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(recipe), f"output_dir={out}", *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory, tiny_recipe) -> Path:
    return tiny_recipe(tmp_path_factory.mktemp("recipe") / "recipe.yaml", seed=11, sft={"max_steps": 6},
                       dpo={"max_steps": 2})


@pytest.fixture(scope="module")
def run_dir(recipe_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    finetune_run(recipe_path, out)
    return out


def test_dpo_starts_with_zero_rewards_because_the_reference_is_the_sft_policy(run_dir):
    first = read_metrics(run_dir / "dpo")[0]
    assert first["step"] == 1
    # before the first update the policy is the SFT adapter; a reference equal to it gives rewards of exactly 0
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0, first
    assert json.loads((run_dir / "dpo" / "manifest.json").read_text())["reference_policy"] == str(
        run_dir / "sft" / "adapter")


def test_reference_adapter_is_the_sft_adapter_and_stays_frozen(recipe_path, run_dir, tmp_path):
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path}"])
    base_path, sft_adapter = run_dir / "base-model", run_dir / "sft" / "adapter"
    trainer, _ = build_dpo_trainer(recipe, recipe.stages[1], base_path, load_tokenizer("mixtral-v1"),
                                   tmp_path / "dpo", sft_adapter, StopSignal())
    policy = trainer.model
    sft_only = models.load_adapter(models.load_base(recipe.model, base_path, "cpu")[0], sft_adapter,
                                   recipe.lora, trainable=False)
    ids = torch.tensor([[1, 733, 16289, 28793, 15359, 733, 28748, 16289, 28793, 22557, 2]])

    def logits(model, adapter=None):
        if adapter:
            model.set_adapter(adapter)
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    expected = logits(sft_only)
    assert torch.equal(logits(policy, "ref"), expected)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if ".ref." in n}
    assert before, "no reference adapter"

    policy.set_adapter("default")
    trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters() if ".ref." in n)
    assert torch.equal(logits(policy, "ref"), expected)
    assert not torch.equal(logits(policy, "default"), expected), "DPO did not move the policy"


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_router_aux_loss_enters_each_stage_with_the_recipe_coefficient(recipe_path, run_dir, tmp_path, stage):
    index = 0 if stage == "sft" else 1
    # only this stage's coefficient changes, so step 1 sees the same weights and batch as the reference run
    finetune_run(recipe_path, tmp_path, f"stages.{index}.router_aux_loss_coef=0.0", "stages.1.max_steps=1")
    with_aux, without = read_metrics(run_dir / stage)[0], read_metrics(tmp_path / stage)[0]
    assert with_aux["step"] == without["step"] == 1
    assert with_aux["loss"] - without["loss"] == pytest.approx(0.02 * with_aux["aux_loss"], abs=1e-4)


def test_offloaded_activations_train_the_same_adapters(recipe_path, run_dir, tmp_path):
    """`offload_activations` (with the checkpointing it needs) in both stages: the layer inputs wait in host
    buffers (NumPy on CPU: the same hooks as the GPU's pinned copies), and the adapters come out bit for bit as
    in the run without either."""
    from safetensors.torch import load_file

    done = subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(recipe_path), f"output_dir={tmp_path}",
                           *(f"stages.{i}.{key}=true" for i in (0, 1)
                             for key in ("gradient_checkpointing", "offload_activations"))],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sent = re.findall(r"\[memory\] the first training forward kept ([\d.]+) MiB of saved activations", done.stdout)
    assert len(sent) == 2 and all(float(mib) > 0 for mib in sent), done.stdout[-2000:]  # one line per stage
    for stage in ("sft", "dpo"):
        offloaded = load_file(tmp_path / stage / "adapter" / "adapter_model.safetensors")
        kept = load_file(run_dir / stage / "adapter" / "adapter_model.safetensors")
        assert offloaded.keys() == kept.keys()
        assert all(torch.equal(offloaded[k], kept[k]) for k in kept), stage
