"""Where a training step's memory goes: live tensor bytes on one device, by category, on any device (CPU too).

`LiveTensors` is a dispatch mode: it sees every tensor an op returns and puts a weak reference on the tensor's
storage, so it knows when the storage is freed. Storages count once (views share them) at their full size,
which is what an allocator hands out, less its rounding; memory an op uses only inside itself (a kernel's
workspace) is not seen, nor a tensor made outside the dispatcher (`torch.from_numpy`). So the peak here is a
floor for `torch.cuda.max_memory_allocated`. On a CPU, with the same shapes and dtypes, it gives the GPU's
breakdown where both run the same ops: the expert kernel's SwiGLU backward is a fused kernel on the GPU and
row blocks on the CPU, and attention runs another kernel, with the same saved outputs.

`account_step` runs one training step (loss, backward, optimizer step) under it and splits the peak into what
was there before the step (frozen weights, trainable weights, optimizer state), what the forward left for the
backward (checkpoints and the loss's graph), the gradients, and the rest (transient: one layer's recomputation
and backward, the loss's chunks).
"""
from __future__ import annotations

import traceback
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30
_NAMED_BYTES = 16 * 2**20  # tensors at least this big are named by where they were made (the code's frames)
_TOP = 8


@dataclass(frozen=True)
class Allocation:
    nbytes: int
    what: str  # op, shape, dtype, phase and, for big tensors, the code lines that made it


class LiveTensors(TorchDispatchMode):
    """Live bytes of the storages on `device` that ops made while active, plus those handed to `add`."""

    def __init__(self, device: torch.device, code_marker: str = "/finetune/") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.code_marker = code_marker
        self.phase = ""
        self.live = 0
        self.peak = 0
        self.peak_phase = ""
        self.peak_allocations: list[Allocation] = []
        self.largest: Allocation | None = None  # the biggest single storage an op made
        self._storages: dict[int, Allocation] = {}
        self._existing: set[int] = set()
        self._finalizers: list[weakref.finalize] = []

    def add(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors that exist already (weights, optimizer state): the baseline of the step."""
        for t in tensors:
            self._track(t, "existing", existing=True)

    def _track(self, t, op: str, existing: bool = False) -> None:
        if not isinstance(t, torch.Tensor) or t.device != self.device or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._storages:
            return
        nbytes = storage.nbytes()
        self._storages[key] = allocation = Allocation(nbytes, op if existing else self._describe(t, op, nbytes))
        if existing:
            self._existing.add(key)
        elif self.largest is None or nbytes > self.largest.nbytes:
            self.largest = allocation
        self._finalizers.append(weakref.finalize(storage, self._free, key))
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase
            new = [a for k, a in self._storages.items() if k not in self._existing]
            self.peak_allocations = sorted(new, key=lambda a: -a.nbytes)[:_TOP]

    def _describe(self, t: torch.Tensor, op: str, nbytes: int) -> str:
        what = f"{op} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} [{self.phase}]"
        if nbytes >= _NAMED_BYTES:
            frames = [f for f in traceback.extract_stack() if self.code_marker in f.filename and f.filename != __file__]
            if frames:
                what += " <- " + " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames[-3:]))
        return what

    def close(self) -> None:
        """Stop following the storages (the finalizers would otherwise keep this tracker alive with the weights)."""
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()

    def _free(self, key: int) -> None:
        self.live -= self._storages.pop(key).nbytes
        self._existing.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # a view or an in-place result shares an input's storage: nothing new (even if that storage predates us)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and id(t.untyped_storage()) not in inputs:
                self._track(t, str(func.overloadpacket.__name__))
        return out


@dataclass
class StepMemory:
    """Bytes of one training step on one device (see the module docstring)."""

    frozen: int  # weights that do not train (4-bit packed stacks, scales, embeddings, norms), and buffers
    trainable: int  # the adapter weights
    optimizer: int  # optimizer state as the step found it
    after_forward: int  # what the forward left for the backward (checkpointed inputs, the loss's graph)
    gradients: int  # every trainable weight's gradient at the end of the backward
    peak: int  # the most that was live at once (everything above included)
    peak_phase: str
    peak_allocations: list[Allocation] = field(default_factory=list)
    device_peak: int | None = None  # on a GPU: torch.cuda.max_memory_allocated over the step, on the same baseline

    @property
    def before(self) -> int:
        return self.frozen + self.trainable + self.optimizer

    def format(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:.3f} GiB"

        lines = [f"  before the step: {gib(self.before)} = frozen weights {gib(self.frozen)} + adapter "
                 f"{gib(self.trainable)} + optimizer state {gib(self.optimizer)}",
                 f"  left by the forward for the backward: {gib(self.after_forward)}; gradients at the end: "
                 f"{gib(self.gradients)}",
                 f"  peak: {gib(self.peak)} in the {self.peak_phase}, {gib(self.peak - self.before)} over the start"]
        if self.device_peak is not None:
            lines.append(f"  torch.cuda.max_memory_allocated over the step, counted from the same start: "
                         f"{gib(self.device_peak)}")
        lines.append("  largest tensors made during the step and live at the peak:")
        lines += [f"    {a.nbytes / 2**20:8.1f} MiB  {a.what}" for a in self.peak_allocations]
        return "\n".join(lines)


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _quant_state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """bitsandbytes keeps a 4-bit weight's block scales and codebooks beside it, in neither parameters nor buffers."""
    out = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            out += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return out


def _storage_bytes(tensors: Iterable[torch.Tensor], device: torch.device) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device == device:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(seen.values())


def account_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
                 marks: Sequence[tuple[str, torch.nn.Module]] = ()) -> StepMemory:
    """Run one step (loss_fn(), backward, optimizer step, zero_grad) and say where its memory went.

    Gradients must be None when called (as after `zero_grad(set_to_none=True)`). `marks`: (name, module) pairs;
    the phase is suffixed with the name of the last one that ran, so the peak can be placed (e.g. one per
    decoder layer: a module that runs whenever the layer does, recomputation included; a checkpointed layer's
    own hooks do not fire then, its first norm's do).
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    device = trainable[0].device
    if any(p.grad is not None for p in trainable):
        raise ValueError("account_step needs the gradients cleared (zero_grad(set_to_none=True)) first")
    frozen = [p for p in params if not p.requires_grad] + list(model.buffers()) + _quant_state_tensors(model)
    tracker = LiveTensors(device)
    tracker.add([*frozen, *trainable, *_state_tensors(optimizer)])
    before = tracker.live
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)

    def mark(name: str):
        return lambda module, args: setattr(tracker, "phase", f"{tracker.phase.split(' (')[0]} ({name})")

    hooks = [module.register_forward_pre_hook(mark(name)) for name, module in marks]
    try:
        with tracker:
            tracker.phase = "forward"
            loss = loss_fn()
            after_forward = tracker.live - before
            tracker.phase = "backward"
            loss.backward()
            gradients = _storage_bytes((p.grad for p in trainable if p.grad is not None), device)
            tracker.phase = "optimizer step"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for hook in hooks:
            hook.remove()
        tracker.close()
    device_peak = None
    if gpu:
        torch.cuda.synchronize(device)
        device_peak = torch.cuda.max_memory_allocated(device) - allocated_before + before
    return StepMemory(
        frozen=_storage_bytes(frozen, device), trainable=_storage_bytes(trainable, device),
        optimizer=before - _storage_bytes([*frozen, *trainable], device), after_forward=after_forward,
        gradients=gradients, peak=tracker.peak, peak_phase=tracker.peak_phase,
        peak_allocations=tracker.peak_allocations, device_peak=device_peak,
    )
