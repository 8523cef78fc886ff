"""`finetune report RUN`: every figure the issue asks for, drawn from the files a run writes, in one HTML page.

The run folder is written here by hand, in the formats the stages write (metrics.jsonl, routing.jsonl,
routing_drift.json, manifest.json), so the report is checked without training anything.
"""

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.plots import new_figure
from finetune.report import StageLogs, write_report
from finetune.report import _plot_series as plot_series

LAYERS, EXPERTS = 3, 8
FIGURES = {"loss.png", "learning_rate.png", "grad_norm.png", "dpo_rewards.png", "eval.png", "router.png",
           "expert_load_sft.png", "routing_load_sft.png", "routing_drift_sft.png",
           "expert_load_dpo.png", "routing_load_dpo.png", "routing_drift_dpo.png"}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_stage(stage_dir: Path, steps: int, dpo: bool, rng) -> None:
    stage_dir.mkdir(parents=True)
    metrics = []
    for step in range(1, steps + 1):
        record = {"step": step, "epoch": step / steps, "loss": 2.0 / step, "learning_rate": 1e-4, "grad_norm": 1.5}
        if dpo:
            record.update({"rewards/chosen": 0.1 * step, "rewards/rejected": -0.1 * step,
                           "rewards/margins": 0.2 * step, "rewards/accuracies": 0.5})
        metrics.append(record)
        if step % 2 == 0:
            metrics.append({"step": step, "eval_loss": 2.5 / step, **({"eval_rewards/margins": 0.1} if dpo else {})})
    metrics.append({"step": 1, "loss": 9.0})  # a resumed run logs step 1 again: the last value counts
    write_jsonl(stage_dir / "metrics.jsonl", metrics)
    routing = []
    for step in range(1, steps + 1):
        load = rng.dirichlet(np.ones(EXPERTS), size=LAYERS)
        routing.append({"step": step, "tokens": 100, "top_k": 2, "load": load.tolist(),
                        "entropy": [1.9] * LAYERS, "aux_loss": [2.1] * LAYERS, "aux_loss_all_layers": 2.1,
                        "dropped_fraction": 0.0})
    write_jsonl(stage_dir / "routing.jsonl", routing)
    base, tuned = rng.dirichlet(np.ones(EXPERTS), size=LAYERS), rng.dirichlet(np.ones(EXPERTS), size=LAYERS)
    drift = {"examples": 4, "tokens": 120, "topk_agreement": [0.9] * LAYERS, "load_tv": [0.1] * LAYERS,
             "load_finetuned": tuned.tolist(), "load_base": base.tolist()}
    (stage_dir / "routing_drift.json").write_text(json.dumps(drift))
    (stage_dir / "manifest.json").write_text(json.dumps({"final_eval": {"eval_loss": 0.42}}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    write_stage(run_dir / "sft", 6, dpo=False, rng=rng)
    write_stage(run_dir / "dpo", 4, dpo=True, rng=rng)
    return run_dir


def test_every_figure_is_a_png_embedded_in_the_page(run_dir):
    page = write_report(run_dir)
    assert page == run_dir / "report" / "index.html"
    written = {p.name for p in page.parent.glob("*.png")}
    assert written == FIGURES
    html = page.read_text()
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    assert len(embedded) == len(FIGURES) and all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in embedded)
    assert sorted(embedded) == sorted((page.parent / name).read_bytes() for name in FIGURES)
    assert "<td>sft</td><td>eval_loss</td><td>0.42</td>" in html and "top-k choices unchanged" in html


def test_stage_logs_keep_the_last_value_of_a_step_logged_twice(run_dir):
    sft = StageLogs.read(run_dir / "sft")
    steps, losses = sft.train["loss"]
    assert steps == [1, 2, 3, 4, 5, 6] and losses[0] == 9.0
    assert sft.eval["loss"] == ([2, 4, 6], [2.5 / 2, 2.5 / 4, 2.5 / 6])
    dpo = StageLogs.read(run_dir / "dpo")
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= dpo.train.keys()
    assert len(dpo.routing) == 4 and dpo.drift["tokens"] == 120


def test_a_lone_step_is_labelled_as_a_whole_step():
    figure, axes = new_figure(3, 2)
    plot_series(axes[0, 0], ([3], [0.69]), "eval", eval_points=True)
    figure.canvas.draw()
    ticks = [t for t in axes[0, 0].get_xticks() if axes[0, 0].get_xlim()[0] <= t <= axes[0, 0].get_xlim()[1]]
    assert ticks == [3]


def test_the_command_line_lists_the_figures_and_refuses_a_folder_without_logs(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r")]) == 0  # in this process: imports cost seconds
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'r' / 'index.html'}" in out
    assert {Path(line.strip()).name for line in out.splitlines()[1:]} == FIGURES
    with pytest.raises(FinetuneError, match="no stage logs"):
        write_report(tmp_path / "empty")
