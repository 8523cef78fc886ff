"""Router telemetry: what a Mixture-of-Experts fine-tune does to its routing.

While a stage trains, forward hooks on every layer's router (`mlp.gate`) count, on the device, which experts
each training token is sent to. Every `tracking.router_stats_steps` steps the counts are read (one host sync)
and logged, per layer: the share of routed tokens each expert received, the mean entropy of the router's
distribution (nats; ln(experts) is uniform), and the load-balancing loss by Mixtral's own formula over the
window's tokens. Mixtral has no expert capacity: every token reaches its top-k experts, so no token is ever
dropped or overflows; `dropped_fraction` is 0 by construction, not by measurement.

At the end of a stage: a layers x experts heatmap of the stage's expert load, and the routing drift from the
base model on held-out examples (adapters disabled vs enabled): per layer, the share of top-k choices that
agree and the total-variation distance between the two expert loads.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from finetune import distributed
from finetune.plots import drift_heatmap, load_heatmap

ROUTER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.gate$")
NO_CAPACITY = "none: Mixtral routes every token to its top-k experts, with no capacity limit"


def router_modules(model) -> list[torch.nn.Module]:
    """Each layer's router, in layer order (under peft the router may be wrapped; the wrapper is what runs)."""
    found = {int(m[1]): module for name, module in model.named_modules() if (m := ROUTER_NAME.search(name))}
    return [found[i] for i in sorted(found)]


def causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class RouterCounts:
    """Per-layer routing counts of the training forward passes, accumulated on the model's device.

    A forward pass counts once per layer: under gradient checkpointing the backward pass runs each layer's
    forward again (the router hook fires twice), so a layer already counted in the current pass is skipped.
    Passes without gradients (evaluation, DPO's reference policy) are not training tokens and are not counted.
    Padding (attention_mask == 0) is not counted.
    """

    def __init__(self, model):
        self.routers = router_modules(model)
        self.layers = len(self.routers)
        self._pass = 0
        self._counted = [-1] * self.layers
        self._mask = None
        self.sums = None  # device tensors, made on the first routed batch
        self._handles = [causal_lm(model).register_forward_pre_hook(self._new_pass, with_kwargs=True)]
        self._handles += [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _new_pass(self, module, args, kwargs):
        self._pass += 1
        mask = kwargs.get("attention_mask")
        self._mask = mask.reshape(-1).bool() if torch.is_tensor(mask) and mask.dim() == 2 else None

    def _hook(self, layer: int):
        def count(module, inputs, output):
            if not torch.is_grad_enabled() or self._counted[layer] == self._pass:
                return
            self._counted[layer] = self._pass
            logits, _, indices = output
            with torch.no_grad():
                self._add(layer, logits.detach().float(), indices.detach())

        return count

    def _add(self, layer: int, logits: torch.Tensor, indices: torch.Tensor) -> None:
        tokens, experts = logits.shape
        if self.sums is None:
            zeros = lambda *shape: torch.zeros(*shape, device=logits.device, dtype=torch.float32)  # noqa: E731
            self.sums = {"routed": zeros(self.layers, experts), "prob": zeros(self.layers, experts),
                         "entropy": zeros(self.layers), "tokens": zeros(self.layers)}
            self.top_k = indices.shape[-1]
        probs = logits.softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        routed = torch.zeros_like(probs).scatter_(1, indices, 1.0)
        if self._mask is not None and self._mask.numel() == tokens:
            keep = self._mask.to(probs.dtype)
            probs, routed, entropy = probs * keep[:, None], routed * keep[:, None], entropy * keep
            count = keep.sum()
        else:
            count = tokens
        self.sums["routed"][layer] += routed.sum(0)
        self.sums["prob"][layer] += probs.sum(0)
        self.sums["entropy"][layer] += entropy.sum()
        self.sums["tokens"][layer] += count

    def read(self) -> dict | None:
        """The window's statistics over every process (one host sync), then start a new window; None when nothing
        was routed."""
        if self.sums is None:
            return None
        distributed.sum_across_processes(list(self.sums.values()))
        s = {k: v.cpu().double().numpy() for k, v in self.sums.items()}
        for v in self.sums.values():
            v.zero_()
        if s["tokens"].min() == 0:
            return None
        experts = s["routed"].shape[1]
        tokens = s["tokens"][:, None]
        # Mixtral's load-balancing loss: experts * sum_e (share of tokens sent to e) * (mean probability of e)
        aux = experts * ((s["routed"] / tokens) * (s["prob"] / tokens)).sum(-1)
        total = s["tokens"].sum()
        aux_all = experts * ((s["routed"].sum(0) / total) * (s["prob"].sum(0) / total)).sum()
        return {"tokens": int(s["tokens"][0]), "top_k": self.top_k,
                "load": (s["routed"] / s["routed"].sum(-1, keepdims=True)).round(6).tolist(),
                "entropy": (s["entropy"] / s["tokens"]).round(6).tolist(), "aux_loss": aux.round(6).tolist(),
                "aux_loss_all_layers": round(float(aux_all), 6), "dropped_fraction": 0.0}


def window_scalars(record: dict) -> dict[str, float]:
    """Dashboard names for one window: a few headline values, then every layer's."""
    load = np.array(record["load"])
    width = len(str(len(load) - 1))
    scalars = {"router/aux_loss": record["aux_loss_all_layers"], "router/entropy": float(np.mean(record["entropy"])),
               "router/max_expert_load": float(load.max())}
    for i, (row, entropy, aux) in enumerate(zip(load, record["entropy"], record["aux_loss"])):
        layer = f"router/layer_{i:0{width}d}"
        scalars[f"{layer}/entropy"], scalars[f"{layer}/aux_loss"] = entropy, aux
        scalars.update({f"{layer}/expert_{e}": float(v) for e, v in enumerate(row)})
    return scalars


class RouterTelemetry(TrainerCallback):
    """Reads the router counts every `every` steps into <stage>/routing.jsonl and the dashboards."""

    def __init__(self, every: int, stage_dir: Path, dashboards):
        self.every = every
        self.path = stage_dir / "routing.jsonl"
        self.dashboards = dashboards
        self.counts: RouterCounts | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.counts = RouterCounts(model)
        if not self.counts.routers:
            print("[telemetry] no Mixtral router (layers.N.mlp.gate) found: no router statistics")
        if distributed.is_main():
            keep_records_up_to(self.path, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._write(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(state.global_step)
        self.counts.remove()

    def _write(self, step: int) -> None:
        record = self.counts.read() if self.counts.routers else None
        if record is None or not distributed.is_main():
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        self.dashboards.log(step, window_scalars(record))


def keep_records_up_to(path: Path, step: int) -> None:
    """On resume: the log's records up to the checkpoint's step (the stage logs again what followed it), less the
    last line if a kill left it half-written (without its newline)."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    whole = text[: text.rfind("\n") + 1]
    kept = [line for line in whole.splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_routing(stage_dir: Path) -> list[dict]:
    path = stage_dir / "routing.jsonl"
    return [json.loads(line) for line in read_lines(path)] if path.is_file() else []


def stage_load(records: list[dict]) -> np.ndarray | None:
    """The expert load over every window of the stage, weighted by each window's tokens."""
    if not records:
        return None
    routed = sum(np.array(r["load"]) * r["tokens"] for r in records)
    return routed / routed.sum(-1, keepdims=True)


def finish_stage(trainer, stage: str, stage_dir: Path, dashboards, examples: int, max_len: int,
                 write: bool = True) -> dict:
    """Heatmaps and drift of a trained stage, logged and saved beside its adapter; returns a summary.
    A sharded model runs the drift's forwards in every process at once: each calls this, the one given `write`
    saves and logs."""
    step = trainer.state.global_step
    summary: dict = {"dropped_tokens": NO_CAPACITY}
    sequences = probe_sequences(trainer.eval_dataset or trainer.train_dataset, examples, max_len)
    # the base model is the model without adapters
    drift = routing_drift(trainer, sequences) if sequences and hasattr(trainer.model, "disable_adapter") else None
    if not write:
        return summary
    load = stage_load(read_routing(stage_dir))
    if load is not None:
        png = load_heatmap(load, f"{stage}: expert load over the stage (steps to {step})",
                           stage_dir / "routing_load.png")
        dashboards.log_image(step, "router/expert_load", png, caption=f"{stage}: layers x experts")
        summary["load_heatmap"] = str(png)
    if drift is not None:
        (stage_dir / "routing_drift.json").write_text(json.dumps(drift, indent=2) + "\n", encoding="utf-8")
        png = drift_heatmap(np.array(drift["load_finetuned"]) - np.array(drift["load_base"]),
                            np.array(drift["topk_agreement"]),
                            f"{stage}: routing drift from the base model ({drift['tokens']} held-out tokens)",
                            stage_dir / "routing_drift.png")
        scalars = drift_scalars(drift)
        dashboards.log(step, scalars)
        dashboards.log_image(step, "router/drift", png, caption=f"{stage}: fine-tuned minus base expert load")
        dashboards.summarize(scalars)
        summary.update(drift_heatmap=str(png), topk_agreement=scalars["router/drift/topk_agreement"],
                       load_tv=scalars["router/drift/load_tv"])
        print(f"[telemetry] {stage}: routing drift from the base model on {drift['tokens']} held-out tokens: "
              f"{scalars['router/drift/topk_agreement']:.1%} of top-k choices unchanged, expert load moved by "
              f"{scalars['router/drift/load_tv']:.3f} (total variation, mean over layers)")
    return summary


def probe_sequences(dataset, examples: int, max_len: int) -> list[list[int]]:
    """Token ids of the first `examples` rows: SFT rows hold input_ids, DPO rows a prompt and its chosen reply."""
    if dataset is None or examples == 0:
        return []
    sequences = []
    for row in dataset.select(range(min(examples, len(dataset)))):
        if "input_ids" in row:
            ids = row["input_ids"]
        elif "prompt_ids" in row and "chosen_ids" in row:
            ids = row["prompt_ids"] + row["chosen_ids"]
        else:
            return []
        sequences.append(list(ids)[:max_len])
    return sequences


@contextmanager
def record_routing(model):
    """Every forward's top-k expert choices per layer, on the host."""
    routers = router_modules(model)
    chosen: list[list[torch.Tensor]] = [[] for _ in routers]

    def hook(layer):
        return lambda module, inputs, output: chosen[layer].append(output[2].detach().cpu())

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    try:
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


def routing_drift(trainer, sequences: list[list[int]]) -> dict:
    """Top-k choices and expert loads of the fine-tuned model and of the base (adapters disabled), same tokens."""
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        finetuned = _route(trainer, sequences)
        with model.disable_adapter():
            base = _route(trainer, sequences)
    finally:
        model.train(was_training)
    experts = int(trainer.model.config.num_local_experts)
    agreement, load_ft, load_base = [], [], []
    for ft, bs in zip(finetuned, base):
        k = ft.shape[-1]
        one_hot_ft, one_hot_base = _one_hot(ft, experts), _one_hot(bs, experts)
        agreement.append(float((one_hot_ft * one_hot_base).sum(-1).mean() / k))
        load_ft.append((one_hot_ft.sum(0) / one_hot_ft.sum()).tolist())
        load_base.append((one_hot_base.sum(0) / one_hot_base.sum()).tolist())
    tv = [0.5 * float(np.abs(np.array(a) - np.array(b)).sum()) for a, b in zip(load_ft, load_base)]
    return {"examples": len(sequences), "tokens": int(finetuned[0].shape[0]) if finetuned else 0,
            "topk_agreement": agreement, "load_tv": tv, "load_finetuned": load_ft, "load_base": load_base}


def _route(trainer, sequences: list[list[int]]) -> list[torch.Tensor]:
    device = next(p for p in trainer.model.parameters()).device
    with record_routing(trainer.model) as chosen, torch.no_grad(), trainer.accelerator.autocast():
        for ids in sequences:
            trainer.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return [torch.cat(layer) for layer in chosen]


def _one_hot(indices: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.zeros(indices.shape[0], experts).scatter_(1, indices.long(), 1.0)


def drift_scalars(drift: dict) -> dict[str, float]:
    width = len(str(len(drift["load_tv"]) - 1))
    scalars = {"router/drift/topk_agreement": float(np.mean(drift["topk_agreement"])),
               "router/drift/load_tv": float(np.mean(drift["load_tv"]))}
    for i, (agree, tv) in enumerate(zip(drift["topk_agreement"], drift["load_tv"])):
        scalars[f"router/drift/layer_{i:0{width}d}/topk_agreement"] = agree
        scalars[f"router/drift/layer_{i:0{width}d}/load_tv"] = tv
    return scalars
