"""`finetune bench` on CPU with the tiny model: the same table as on a GPU, the reference check gating it."""
import re

import pytest
import torch

from finetune import bench
from finetune.cli import main as cli_main


def test_tiny_bench_prints_fast_and_naive_rows_and_the_ratio(capsys):
    assert bench.main(["--tiny", "--cpu", "--quick", "--steps", "1", "--warmup", "0", "--check-seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "-> PASS" in out
    # every LoRA gradient is compared, the experts' and attention's each on their own: 2 layers x (3 expert and 4
    # attention projections) x (A, B)
    assert re.search(r"LoRA grads rel experts \S+ \(12 tensors\), attention \S+ \(16 tensors\)", out), out
    table = out[out.index("| path |"):]
    header = table.splitlines()[0].split("|")
    losses = {}
    for path in ("fast", "naive"):
        for seq in (64, 128):
            row = next(line for line in table.splitlines() if line.startswith(f"| {path} | {seq} |")).split("|")
            cell = {name.strip(): value.strip() for name, value in zip(header, row)}
            assert cell["tokens/s"] != "-" and float(cell["tokens/s"].replace(",", "")) > 0, row
            losses[path, seq] = float(cell["loss"])
    assert "seq 128: fast / naive = " in table
    # both paths see the same tokens and, one step each, the same model (the adapters start at zero, one update
    # each before 128): the same loss, where different random tokens differ in the second decimal
    for seq in (64, 128):
        assert abs(losses["fast", seq] - losses["naive", seq]) <= 2e-4, losses


def test_no_speed_without_a_passing_check(monkeypatch, capsys):
    def failing(peft_model, seq, loss_fn, tol):
        model = bench.ModelComparison(loss=1.0, grads={"experts": 1.0}, worst=("x", 1.0), floor_loss=0.0,
                                      floor_grads={"experts": 0.0}, tensors={"experts": 1})
        return bench.CheckResult(layer={"output": 1.0}, model=model, passed=False)

    monkeypatch.setattr(bench, "check_fast_path", failing)
    assert cli_main(["bench", "--tiny", "--cpu", "--quick", "--steps", "1", "--warmup", "0", "--no-naive"]) == 1
    out = capsys.readouterr().out
    assert "| fast | 64 | - |" in out and "NOT REPORTED" in out


def test_chunked_loss_equals_transformers_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    from finetune.moe.loss import chunked_causal_lm_loss

    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(1, 50, 16, generator=g), torch.randn(100, 16, generator=g)
    labels = torch.randint(0, 100, (1, 50), generator=g)
    labels[0, :7] = -100
    expected = ForCausalLMLoss(hidden @ head.T, labels, vocab_size=100)
    assert torch.allclose(chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=8), expected, atol=1e-6)


def test_stepping_in_the_backward_is_the_same_update_without_the_gradients():
    """Per-weight optimizers stepped from gradient hooks equal one step after the backward, bit for bit, and no
    gradient is left at the end of the backward (live-tensor accounting of the same step)."""
    from finetune.memory import account_step

    def trained(in_backward: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        optimizer, _ = bench.make_optimizer(list(model.parameters()), low_memory=False, in_backward=in_backward)
        x = torch.randn(5, 8)
        for _ in range(3):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step = account_step(model, lambda: model(x).square().sum(), optimizer)
        return [p.detach().clone() for p in model.parameters()], step

    after, step = trained(in_backward=False)
    after_in_backward, step_in_backward = trained(in_backward=True)
    assert all(torch.equal(a, b) for a, b in zip(after, after_in_backward))
    weights = sum(p.numel() * 4 for p in after)
    assert step.gradients == weights and step_in_backward.gradients == 0
    assert step.optimizer == step_in_backward.optimizer == 2 * weights + 4 * 4  # exp_avg, exp_avg_sq, 4 steps


def _gib(out: str, label: str) -> float:
    """The first figure after `label` in the bench's memory report."""
    return float(out[out.index(label) + len(label):].split()[0])


def test_the_memory_levers_shed_the_gradients_and_the_layer_inputs(capsys):
    """--optimizer-in-backward and --offload-activations on the tiny model: the accounting shows what they shed."""
    base = ["--tiny", "--cpu", "--seqs", "256", "--steps", "1", "--warmup", "0", "--check-seq", "64", "--no-naive",
            "--memory"]
    assert bench.main(base) == 0
    plain = capsys.readouterr().out
    assert bench.main([*base, "--optimizer-in-backward", "--offload-activations"]) == 0
    lean = capsys.readouterr().out
    assert "AdamW fp32 stepped in the backward, layer inputs in host memory" in lean
    for out in (plain, lean):  # --memory: where one step's memory went
        assert "memory of one fast step at seq 256 (live tensors on cpu):" in out
        assert "  peak: " in out and "largest tensors made during the step" in out
    assert _gib(plain, "gradients at the end: ") > 0 and _gib(lean, "gradients at the end: ") == 0
    # the first forward (the host-sync report's, at --check-seq 64 tokens): layer 1's input and the final norm's
    # (64 x 128 float32: 32 KiB each) waited in host memory; that the device then holds exactly that much less is
    # tests/test_offload.py's
    assert "kept 0.06 MiB of saved activations" in lean and "saved activations" not in plain


def test_contradicting_shapes_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--full-shape"])
    assert "--tiny and --full-shape contradict each other" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--seqs", "0"], "argument --seqs: must be 2 or more (a step predicts each next token), got 0"),
    (["--seqs", "64,1"], "argument --seqs: must be 2 or more"),
    (["--seqs", "64,"], "argument --seqs: not a whole number: ''"),
    (["--check-seq", "-5"], "argument --check-seq: must be 2 or more"),
    (["--layers", "0"], "argument --layers: must be 1 or more, got 0"),
    (["--naive-steps", "0"], "argument --naive-steps: must be 1 or more, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be 0 or more, got -1"),
    (["--steps", "x"], "argument --steps: not a whole number: 'x'"),
    (["--chunks", "0"], "argument --chunks: must be 1 or more, got 0"),
])
def test_numbers_that_make_no_sense_are_refused_before_any_model_is_built(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", "--tiny", "--cpu", *argv])  # as typed: no model is built, the parser stops first
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_stepping_in_the_backward_through_the_checkpointed_grouped_model_is_the_same_update():
    def stepped(in_backward: bool):
        model = bench.build_model(tiny=True, device="cpu")
        torch.manual_seed(0)  # the same adapter initialisation
        peft_model = bench.with_lora(model, naive=False)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer, _ = bench.make_optimizer(params, low_memory=False, in_backward=in_backward)
        ids = torch.randint(0, peft_model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            bench.fast_loss(peft_model, ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in params]

    assert all(torch.equal(a, b) for a, b in zip(stepped(False), stepped(True)))


def test_traffic_prints_each_chunking_and_puts_the_kernel_back(capsys):
    """`--traffic` only counts (no model is built): one row per chunking at the 8x7B widths, the matmul FLOPs the
    same for every chunking; afterwards the grouped kernel has its own launchers again."""
    from finetune.moe import grouped

    launchers = grouped._strided_dequantizer, grouped._swiglu_kernels
    assert cli_main(["bench", "--traffic", "--seqs", "2048"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 2048 |")]
    assert [row[2].strip() for row in rows] == ["1", "2", "4"]
    assert len({row[3] for row in rows}) == 1 and float(rows[0][3]) > 4  # about 4.4 TFLOP a layer and step
    assert (grouped._strided_dequantizer, grouped._swiglu_kernels) == launchers


def test_rows_reach_a_pipe_as_they_are_measured(tmp_path):
    """Without PYTHONUNBUFFERED (stdout a pipe, as under `timeout ... | tee`): the first row arrives while the next
    length is still being measured, so a run stopped by a time limit keeps it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    child = subprocess.Popen([sys.executable, "-m", "finetune.bench", "--tiny", "--cpu", "--seqs", "64,96", "--steps", "1",
                              "--warmup", "0", "--check-seq", "64", "--layers", "1", "--no-naive"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        seen = []
        for line in child.stdout:
            seen.append(line)
            if line.startswith("| fast | 64 |"):
                break
        child.kill()  # as a time limit would, before the next length's step is done
        rest = child.stdout.read()
    finally:
        child.kill()
        child.wait()
    assert seen and seen[-1].startswith("| fast | 64 |"), seen
    assert "| fast | 96 |" not in rest, rest


def test_the_timed_fast_path_is_the_checked_grouped_kernel(monkeypatch, capsys):
    """FINETUNE_EXPERT_KERNEL=reference (a training switch) must not turn the bench's fast rows into the reference
    loop: the ops one fast step dispatches are the grouped kernel's either way."""
    def ops(out: str) -> str:
        return out[out.index("host syncs in one fast"):].split(" ops dispatched")[0].rsplit(" ", 1)[1]

    argv = ["--tiny", "--cpu", "--seqs", "64", "--steps", "0", "--check-seq", "64", "--no-naive"]
    assert bench.main(argv) == 0
    grouped = ops(capsys.readouterr().out)
    monkeypatch.setenv("FINETUNE_EXPERT_KERNEL", "reference")
    assert bench.main(argv) == 0
    assert ops(capsys.readouterr().out) == grouped


def _out_of_memory_at(seq: int):
    """The loss of the real fast path, but a step at `seq` tokens runs its backward and then fails as a GPU out of
    memory would (which a CPU cannot produce): gradients of the failed step are left on the adapter."""
    def loss_fn(model, ids):
        loss = bench.fast_loss(model, ids)
        if ids.shape[1] == seq:
            loss.backward()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss

    return loss_fn


def test_a_length_that_does_not_fit_is_a_row_and_the_others_still_run():
    model = bench.build_model(tiny=True, device="cpu")
    peft_model = bench.with_lora(model, naive=False)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, _ = bench.make_optimizer(params, low_memory=False)
    loss_fn, logged = _out_of_memory_at(96), []
    rows = bench.measure(peft_model, loss_fn, optimizer, "fast", [96], 1, 0, "", logged.append)
    assert rows[0].tokens_per_s is None and rows[0].note.startswith("out of memory: CUDA out of memory")
    assert all(p.grad is None for p in params)  # the failed step's gradients do not swell the next one's peak
    # --memory: the step that makes the optimizer state comes first and may not fit either
    bench.account_memory(peft_model, loss_fn, optimizer, "fast", [96, 64], logged.append)
    assert logged[1].startswith("memory of one fast step at seq 96: out of memory (CUDA out of memory")
    assert logged[2].startswith("memory of one fast step at seq 64 (live tensors on cpu):")
    # --profile: a diagnostic that does not fit is said, and the run goes on
    bench._unless_out_of_memory("profile", logged.append, loss_fn, peft_model, torch.zeros(1, 96, dtype=torch.long))
    assert logged[3] == "profile: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)"
