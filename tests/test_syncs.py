"""Host syncs found on a CPU: the patterns, and a training step's hot loop free of them but for one."""
import pytest
import torch

from finetune import bench
from finetune.moe.quantized_experts import QuantizedExperts, expert_forward
from finetune.syncs import HostSyncs


def _ops(fn) -> list[str]:
    with HostSyncs("cpu") as syncs:
        fn()
    return [s.op for s in syncs.found]


def test_what_makes_the_host_wait_is_found_and_where():
    x = torch.randn(16)
    idx = torch.tensor([3, 1])
    assert _ops(lambda: x.sum().item()) == ["_local_scalar_dense"]
    assert _ops(lambda: bool(x[0] > 0)) == ["_local_scalar_dense"]
    assert _ops(lambda: x[x > 0]) == ["index"]
    assert _ops(lambda: x.nonzero()) == ["nonzero"]
    assert _ops(lambda: torch.bincount(idx, minlength=4)) == ["bincount"]
    assert _ops(lambda: torch.repeat_interleave(idx)) == ["repeat_interleave"]
    assert _ops(lambda: torch.equal(x, x)) == ["equal"]
    # the usual MoE way to split tokens by expert: the counts read on the host
    assert _ops(lambda: torch.split(x, torch.tensor([6, 10]).tolist())) == ["tolist"]
    assert _ops(lambda: x.numpy()) == ["numpy"]
    with HostSyncs("cpu") as syncs:
        x.max().item()
    assert syncs.found[0].where.startswith("tests/test_syncs.py:")


def test_their_device_side_equivalents_are_not():
    x = torch.randn(16)
    idx = torch.tensor([3, 1])
    assert _ops(lambda: x[idx]) == []
    assert _ops(lambda: torch.where(x > 0, x, 0)) == []
    assert _ops(lambda: torch.repeat_interleave(idx, output_size=4)) == []
    assert _ops(lambda: torch.searchsorted(torch.arange(4), idx)) == []
    assert _ops(lambda: x.to(torch.bfloat16)) == []


def test_only_tensors_of_the_watched_device_count():
    with HostSyncs("cuda") as syncs:
        torch.randn(4).sum().item()
        torch.randn(4).tolist()
    assert syncs.found == []
    assert torch.Tensor.tolist is not None and "read" not in torch.Tensor.tolist.__qualname__  # put back


def test_where_is_named_from_any_frame():
    """Frames without a folder (code run by `python -c`, FX's generated code) still give a place."""
    with HostSyncs("cpu") as syncs:
        exec(compile("import torch; torch.ones(2).sum().item()", "<string>", "exec"))
    assert syncs.found[0].where.startswith("<string>:1")


@pytest.fixture(scope="module")
def model():
    return bench.with_lora(bench.build_model(tiny=True, device="cpu"), naive=False)


def _expert_layer(model):
    return next(m for m in model.modules() if hasattr(m, "deltas") and isinstance(m.get_base_layer(), QuantizedExperts))


@pytest.mark.parametrize("kernel, expected", [("grouped", []), ("reference", ["bincount", "tolist"])])
def test_the_grouped_expert_kernel_never_waits_for_the_device(model, kernel, expected):
    layer = _expert_layer(model)
    experts = layer.get_base_layer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, experts.hidden_dim, generator=g, dtype=experts.compute_dtype).requires_grad_()
    weights, index = torch.randn(96, experts.num_experts, generator=g).softmax(-1).topk(2, dim=-1)

    def step():
        y = expert_forward(x, index, weights, experts, layer.deltas(), kernel=kernel)
        y.backward(torch.ones_like(y))

    # the reference loop counts the routing (bincount) and reads the counts on the host (tolist): the finder is
    # not blind to our own code
    assert _ops(step) == expected


def test_the_grouped_expert_kernel_does_the_same_host_work_at_any_length(model):
    """Ops one layer's experts dispatch, forward and backward, do not grow with the tokens: no loop over tokens or
    over routed rows (where a GPU step is launch-bound, each op is host time)."""
    layer = _expert_layer(model)
    experts = layer.get_base_layer()
    dispatched = {}
    for tokens in (64, 1024):
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, experts.hidden_dim, generator=g, dtype=experts.compute_dtype).requires_grad_()
        weights, index = torch.randn(tokens, experts.num_experts, generator=g).softmax(-1).topk(2, dim=-1)
        with HostSyncs("cpu") as syncs:
            y = expert_forward(x, index, weights, experts, layer.deltas(), kernel="grouped")
            y.backward(torch.ones_like(y))
        dispatched[tokens] = syncs.ops
    assert dispatched[64] == dispatched[1024] > 0, dispatched


@pytest.mark.parametrize("offload", [False, True])
def test_a_training_forward_and_backward_waits_once_in_transformers_mask_code(model, offload):
    """With the layer inputs offloaded too: on a GPU those copies are non-blocking, and on a CPU they stand in."""
    from finetune.offload import offload_during_forward

    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    hooks = offload_during_forward(model.get_base_model().model, "cpu", log=None) if offload else None
    with HostSyncs("cpu") as syncs:
        torch.autograd.grad(bench.as_trained(bench.fast_loss)(model, ids), trainable)
    if hooks is not None:
        hooks.remove()
        assert hooks.offloaded_bytes > 0
    # transformers 5 reads whether position ids hold packed sequences (masking_utils.find_packed_sequence_indices):
    # one read per forward, before the first layer; the layers, their recomputation, the loss and the backward
    # add none
    assert [(s.op, s.where.split(" <- ")[0].rsplit(":", 1)[0]) for s in syncs.found] == [
        ("_local_scalar_dense", "transformers/masking_utils.py")]
