"""The optimizers a recipe names in `stages[].optimizer`, as the trainer gets them (imported by the stages only:
it loads bitsandbytes).

`adamw` is torch's AdamW with float32 moments (8 bytes per trainable weight: 1.8 GiB for the 240M LoRA weights
of 8x7B at r 16). `adamw_8bit` is bitsandbytes' blockwise 8-bit AdamW (about 2 bytes per weight, 0.45 GiB;
tensors under 4096 elements keep float32 moments), through `AdamW8bit` below.
"""
from __future__ import annotations

from typing import Any

import torch
from bitsandbytes.optim import AdamW as BnbAdamW

class AdamW8bit(BnbAdamW):
    """bitsandbytes' 8-bit AdamW with the same updates, minus its device synchronization after every tensor.

    bitsandbytes' `step` calls `torch.cuda.synchronize()` after each tensor's update. Its update kernels run on
    the default CUDA stream, so when the step runs there too (as in the trainer) they are ordered like any other
    kernel and the synchronization is needed only for paged (unified-memory) states. For a LoRA model it is one
    host stall per adapter tensor per step (448 for 8x7B with attention and experts targeted), each draining the
    GPU's queue. Paged states, and a step on another stream, keep bitsandbytes' own step.

    (transformers keeps embeddings' moments in 32 bits when the optimizer's class name holds "bitsandbytes";
    not this one's, which is moot while LoRA trains no embedding.)
    """

    @torch.no_grad()
    def step(self, closure=None):
        if self.is_paged or not _on_default_streams(self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.update_step(group, p, gindex, pindex)
        return loss


def _on_default_streams(param_groups) -> bool:
    devices = {p.device for group in param_groups for p in group["params"] if p.is_cuda}
    return all(torch.cuda.current_stream(d) == torch.cuda.default_stream(d) for d in devices)


def trainer_optimizer(name: str, args) -> tuple[type, dict[str, Any]] | None:
    """What to hand the trainer as `optimizer_cls_and_kwargs` for the recipe's `optimizer`, given the trainer's
    arguments (learning rate, betas and epsilon come from them, as the trainer would take them); None leaves the
    choice to the trainer (`args.optim`)."""
    if name != "adamw_8bit":
        return None
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if cls is not BnbAdamW or kwargs.get("optim_bits") != 8 or kwargs.get("is_paged"):
        raise RuntimeError(f"transformers maps optim {args.optim!r} to {cls.__name__}({kwargs}), not bitsandbytes' "
                           f"8-bit AdamW: the installed transformers differs from the tested one")
    return AdamW8bit, kwargs
