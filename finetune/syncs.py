"""Operations that make the host wait for a GPU, found on any device (a CPU too), with the code that asked.

A host sync in the training step stalls the CPU until the GPU has drained its queue, so the next kernels are
launched late and the GPU idles meanwhile. On a CPU nothing waits, but the same operations run, so a dispatch
mode can list them there: a test on the tiny model keeps the hot loop free of them without a GPU.

Seen: a Python scalar read from a tensor (`.item()`, `bool(t)`, `if t:`, `int(t)`), ops whose output size
depends on the values (`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `bincount`,
`repeat_interleave` without `output_size`), `equal`, and copies from a GPU to the host. Not seen:
`torch.cuda.synchronize()`, what happens inside a library's own kernels (bitsandbytes' 8-bit optimizer update
synchronizes that way), and `.tolist()` of a CPU tensor (it reads memory without an op; on a GPU it is seen as
the copy to the host).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass

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


@dataclass(frozen=True)
class HostSync:
    op: str
    where: str  # the innermost frames outside torch: the code that asked


def _makes_host_wait(func, args, kwargs) -> bool:
    if func in _ALWAYS:
        return func is not _aten.repeat_interleave.Tensor or kwargs.get("output_size") is None
    if func in _BOOLEAN_INDEXING:
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1]))
    if func is _aten._to_copy.default:
        source, target, non_blocking = args[0], kwargs.get("device"), kwargs.get("non_blocking", False)
    elif func is _aten.copy_.default:
        source, target, non_blocking = args[1], args[0].device, kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
    else:
        return False
    return source.device.type == "cuda" and target is not None and torch.device(target).type == "cpu" and not non_blocking


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs("cuda") as syncs: ...`; then `syncs.found` lists each one, in order.

    Only ops on tensors of `device_type` count, so that on a CPU ("cpu") the model's tensors stand for a GPU's
    while the host-side ones of a GPU run (an optimizer's step counters) would count too: there, look at the
    forward and backward only.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.found: list[HostSync] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = any(isinstance(t, torch.Tensor) and t.device.type == self.device_type for t in tree_leaves(args))
        if on_device and _makes_host_wait(func, args, kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            where = " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                for f in reversed(frames[-3:]))
            self.found.append(HostSync(str(func.overloadpacket.__name__), where))
        return func(*args, **kwargs)

    def summary(self) -> str:
        if not self.found:
            return "none"
        counts: dict[HostSync, int] = {}
        for sync in self.found:
            counts[sync] = counts.get(sync, 0) + 1
        return "; ".join(f"{n} x {s.op} at {s.where}" for s, n in counts.items())
