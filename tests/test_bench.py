"""`finetune bench` on CPU with the tiny model: the same table as on a GPU, the reference check gating it."""
import torch

from finetune import bench
from finetune.cli import main as cli_main


def test_tiny_bench_prints_fast_and_naive_rows_and_the_ratio(capsys):
    assert bench.main(["--tiny", "--cpu", "--quick", "--steps", "1", "--warmup", "0", "--check-seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "-> PASS" in out
    table = out[out.index("| path |"):]
    for path in ("fast", "naive"):
        for seq in (64, 128):
            row = next(line for line in table.splitlines() if line.startswith(f"| {path} | {seq} |"))
            tokens_per_s = row.split("|")[3].strip()
            assert tokens_per_s != "-" and float(tokens_per_s.replace(",", "")) > 0, row
    assert "seq 128: fast / naive = " in table


def test_no_speed_without_a_passing_check(monkeypatch, capsys):
    def failing(peft_model, seq, loss_fn, tol):
        model = bench.ModelComparison(loss=1.0, grads=1.0, worst=("x", 1.0), floor_loss=0.0, floor_grads=0.0)
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
