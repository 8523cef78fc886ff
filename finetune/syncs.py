"""Operations that make the host wait for a GPU, found on any device (a CPU too), with the code that asked.

A host sync in the training step stalls the CPU until the GPU has drained its queue, so the next kernels are
launched late and the GPU idles meanwhile. On a CPU nothing waits, but the same operations run, so a dispatch
mode can list them there: a test on the tiny model keeps the hot loop free of them without a GPU.

Seen: a Python scalar read from a tensor (`.item()`, `bool(t)`, `if t:`, `int(t)`), `.tolist()`, `.numpy()`
and NumPy conversions, ops whose output size depends on the values (`nonzero`, boolean-mask indexing,
`masked_select`, `unique`, `bincount`, `repeat_interleave` without `output_size`), `equal`, and blocking
copies between a GPU and the host, either way. Not seen: `torch.cuda.synchronize()` and what happens inside a
library's own kernels or its C++ code (bitsandbytes' optimizer step synchronizes that way).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_aten = torch.ops.aten
_ALWAYS = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.equal.default,
    _aten.is_nonzero.default,
    _aten.repeat_interleave.Tensor,
    _aten.bincount.default,  # its length comes from the largest value
}
_BOOLEAN_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
# reads of a tensor's memory from Python that no op of the dispatcher sees when the tensor is on the CPU (on a GPU
# they copy to the host first, which the dispatcher does see)
_HOST_READS = ("tolist", "numpy", "__array__")


@dataclass(frozen=True)
class HostSync:
    op: str
    where: str  # the innermost frames outside torch: the code that asked


def _blocking_copy_across(source, target, non_blocking: bool) -> bool:
    """A copy between a GPU and the host that the host waits for (non-blocking copies from/to pinned memory
    do not make it wait)."""
    if not isinstance(source, torch.Tensor) or target is None or non_blocking:
        return False
    return {source.device.type, torch.device(target).type} == {"cuda", "cpu"}


def _makes_host_wait(func, args, kwargs) -> bool:
    if func in _ALWAYS:
        return func is not _aten.repeat_interleave.Tensor or kwargs.get("output_size") is None
    if func in _BOOLEAN_INDEXING:
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1]))
    if func is _aten._to_copy.default:
        return _blocking_copy_across(args[0], kwargs.get("device"), kwargs.get("non_blocking", False))
    if func is _aten.copy_.default:
        return _blocking_copy_across(args[1], args[0].device,
                                     kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
    return False


def _caller() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename and "/syncs.py" not in f.filename]
    return " <- ".join(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno}" for f in reversed(frames[-3:]))


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs("cuda") as syncs: ...`; then `syncs.found` lists each one, in order, and `syncs.ops` counts
    the device's ops (each one host work, a kernel launch unless it is a view: what a launch-bound step is made of).

    Only ops on tensors of `device_type` count (or copying to it), so that on a CPU ("cpu") the model's tensors
    stand for a GPU's. The host-side tensors of a GPU run (an optimizer's step counters) would count there too:
    on a CPU, look at the forward and backward only.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.found: list[HostSync] = []
        self.ops = 0
        self._host_reads: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        watched = any(isinstance(t, torch.Tensor) and t.device.type == self.device_type for t in tree_leaves(args))
        target = kwargs.get("device")
        watched = watched or (target is not None and torch.device(target).type == self.device_type)
        self.ops += watched
        if watched and _makes_host_wait(func, args, kwargs):
            self.found.append(HostSync(str(func.overloadpacket.__name__), _caller()))
        return func(*args, **kwargs)

    def __enter__(self):
        if self.device_type == "cpu":
            for name in _HOST_READS:
                self._host_reads[name] = original = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, self._reading(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._host_reads.items():
            setattr(torch.Tensor, name, original)
        self._host_reads.clear()
        return super().__exit__(*exc)

    def _reading(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if tensor.device.type == "cpu":
                self.found.append(HostSync(name, _caller()))
            return original(tensor, *args, **kwargs)

        return read

    def summary(self) -> str:
        if not self.found:
            return "none"
        counts: dict[HostSync, int] = {}
        for sync in self.found:
            counts[sync] = counts.get(sync, 0) + 1
        return "; ".join(f"{n} x {s.op} at {s.where}" for s, n in counts.items())
