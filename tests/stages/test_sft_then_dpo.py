"""SFT then DPO on the tiny model: DPO's reference policy is the SFT policy, and the router's auxiliary loss
enters both stages with the recipe's coefficient."""

import json
import math
from pathlib import Path

import pytest
import torch

from finetune import model as models
from finetune.cli import main
from finetune.data.prepare import prepare_dpo
from finetune.pipeline import load_tokenizer
from finetune.recipe import load_recipe
from finetune.stages.common import StopSignal, read_metrics
from finetune.stages.dpo import build_dpo_trainer

QUICKSTART_SFT = Path(__file__).resolve().parents[2] / "data" / "quickstart" / "sft.jsonl"



def finetune_run(recipe: Path, out: Path, *overrides: str) -> None:
    """`finetune run` in this process (a child process costs seconds of imports)."""
    assert main(["run", str(recipe), f"output_dir={out}", *overrides]) == 0


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
    tokenizer = load_tokenizer("mixtral-v1")
    trainer, _ = build_dpo_trainer(recipe, recipe.stages[1], base_path, tokenizer, prepare_dpo(recipe, tokenizer),
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


def test_router_aux_loss_enters_sft_with_the_recipe_coefficient(recipe_path, run_dir, tmp_path):
    # only SFT's coefficient changes, so its step 1 sees the same weights and batch as the reference run
    finetune_run(recipe_path, tmp_path, "stages.0.router_aux_loss_coef=0.0", "stages.0.max_steps=1",
                 "stages.1.max_steps=1", "stages.0.warmup_ratio=0", "stages.1.warmup_ratio=0")
    with_aux, without = read_metrics(run_dir / "sft")[0], read_metrics(tmp_path / "sft")[0]
    assert with_aux["step"] == without["step"] == 1
    assert with_aux["loss"] - without["loss"] == pytest.approx(0.02 * with_aux["aux_loss"], abs=1e-4)


def test_router_aux_loss_enters_dpo_with_the_recipe_coefficient(run_dir):
    # at DPO's step 1 the policy is its reference (rewards exactly 0, see above), so the sigmoid DPO loss is
    # exactly ln 2: what the step logs on top of it is the coefficient times the logged router loss
    first = read_metrics(run_dir / "dpo")[0]
    assert first["step"] == 1 and first["rewards/margins"] == 0.0
    assert first["loss"] - math.log(2) == pytest.approx(0.02 * first["aux_loss"], abs=1e-6)
    assert first["aux_loss"] > 0


def test_a_stage_whose_epochs_come_to_one_step_with_warmup_is_refused_before_anything_is_written(tiny_recipe,
                                                                                                 tmp_path, capsys):
    # two rows at batch size 2: one optimizer step, which warmup (from learning rate 0) would waste
    rows = tmp_path / "two.jsonl"
    rows.write_text("".join(QUICKSTART_SFT.read_text().splitlines(keepends=True)[:2]))
    recipe = tiny_recipe(tmp_path / "recipe.yaml", sft={"warmup_ratio": 0.1},
                         data={"sft": {"sources": [{"path": str(rows)}]}})
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'run'}"]) == 2
    assert ("error: stages.0 (sft): 2 training rows in global batches of 2 x 1 for 1.0 epochs come to 1 optimizer "
            "step, and with warmup_ratio 0.1 that one step trains at learning rate 0") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # the step count is the trainer's: without warmup the stage trains its one step
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'run'}", "stages.0.warmup_ratio=0"]) == 0
    state = json.loads((tmp_path / "run" / "sft" / "trainer_state.json").read_text())
    assert state["max_steps"] == state["global_step"] == 1
