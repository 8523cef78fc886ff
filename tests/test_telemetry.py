"""Router telemetry on a small stock Mixtral: the counts, entropy and load-balancing loss are the model's own
numbers; gradient checkpointing and gradient-free passes do not inflate them; routing drift is zero for an
adapter that changes nothing and positive for one that does."""

from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from finetune.moe.tiny import TINY_MIXTRAL
from finetune.telemetry import RouterCounts, drift_scalars, router_modules, routing_drift, window_scalars


@pytest.fixture(scope="module")
def model() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(**{**TINY_MIXTRAL, "vocab_size": 512, "router_aux_loss_coef": 0.02})
    return MixtralForCausalLM(config).float()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # padding, as a collator leaves it
    mask[2, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_counts_match_the_routers_own_choices_and_mixtrals_aux_loss(model, batch):
    counts = RouterCounts(model)
    try:
        model.train()
        out = model(**batch, output_router_logits=True, use_cache=False)
    finally:
        counts.remove()
    record = counts.read()
    keep = batch["attention_mask"].reshape(-1).bool()
    assert record["tokens"] == int(keep.sum())
    for layer, logits in enumerate(out.router_logits):
        chosen = logits[keep].float().softmax(-1).topk(2, dim=-1).indices
        expected = torch.bincount(chosen.reshape(-1), minlength=8).double()
        np.testing.assert_allclose(record["load"][layer], (expected / expected.sum()).numpy(), atol=1e-6)
        probs = logits[keep].float().softmax(-1)
        entropy = -(probs * probs.log()).sum(-1).mean()
        assert record["entropy"][layer] == pytest.approx(entropy.item(), abs=1e-5)
    # Mixtral's own load-balancing loss over the same (unpadded) tokens and all layers
    assert record["aux_loss_all_layers"] == pytest.approx(out.aux_loss.item(), rel=1e-5)
    assert record["dropped_fraction"] == 0.0
    assert counts.read() is None, "reading starts a new window"


def test_gradient_checkpointing_counts_each_pass_once_and_no_grad_passes_not_at_all(model, batch):
    def window(checkpointing: bool) -> dict:
        counts = RouterCounts(model)
        try:
            model.train()
            if checkpointing:
                model.activation_checkpointing_enable({"use_reentrant": False})
            model(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
            with torch.no_grad():  # an evaluation or DPO reference pass
                model(**batch, use_cache=False)
        finally:
            counts.remove()
            model.activation_checkpointing_disable()
            model.zero_grad()
        return counts.read()

    plain, recomputed = window(False), window(True)
    assert plain["tokens"] == recomputed["tokens"] == int(batch["attention_mask"].sum())
    np.testing.assert_allclose(plain["load"], recomputed["load"], atol=1e-6)


def test_dashboard_names_cover_every_layer_and_expert(model, batch):
    counts = RouterCounts(model)
    model(**batch, use_cache=False)
    counts.remove()
    scalars = window_scalars(counts.read())
    layers = len(router_modules(model))
    assert {"router/aux_loss", "router/entropy", "router/max_expert_load"} <= scalars.keys()
    assert sum(k.endswith("/expert_7") for k in scalars) == layers
    assert sum(k.endswith("/entropy") for k in scalars) == layers + 1


def test_routing_drift_is_zero_for_an_unchanged_adapter_and_positive_after_a_change(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(MixtralForCausalLM(model.config).float(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    trainer = SimpleNamespace(model=peft_model, accelerator=SimpleNamespace(autocast=nullcontext))
    sequences = [list(range(5, 35)), list(range(100, 120))]

    drift = routing_drift(trainer, sequences)  # LoRA's B starts at zero: the adapter changes nothing yet
    assert drift["tokens"] == 50 and drift["examples"] == 2
    assert drift["topk_agreement"] == [1.0, 1.0] and drift["load_tv"] == [0.0, 0.0]

    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    drift = routing_drift(trainer, sequences)
    scalars = drift_scalars(drift)
    assert scalars["router/drift/topk_agreement"] < 1.0 and scalars["router/drift/load_tv"] > 0.0
    assert np.allclose(np.sum(drift["load_base"], axis=1), 1.0)
    assert peft_model.training, "the model's training mode is restored"
