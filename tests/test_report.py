"""`finetune report RUN`: every figure the issue asks for, drawn from the files a run writes, in one HTML page.

The run folder is written here by hand, in the formats the stages write (metrics.jsonl, routing.jsonl,
routing_drift.json, manifest.json), so the report is checked without training anything.
"""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.plots import new_figure
from finetune.report import StageLogs, report_figures, write_report
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
    # report_figures() is what a later report replaces (or refuses as foreign): every figure drawn
    assert written == FIGURES == report_figures()
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


@pytest.fixture
def own_run(run_dir, tmp_path) -> Path:
    """A copy of the run to spoil."""
    return Path(shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("report")))


def test_a_last_line_cut_short_by_a_killed_run_is_skipped_and_said(own_run, tmp_path, capsys):
    for log in (own_run / "sft" / "metrics.jsonl", own_run / "dpo" / "routing.jsonl"):
        with log.open("a") as f:
            f.write('{"step": 7, "lo')  # SIGKILL in the middle of a write: no newline
    assert main(["report", str(own_run), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert f"{own_run / 'sft' / 'metrics.jsonl'}:11: skipped the last line, cut short" in out
    assert f"{own_run / 'dpo' / 'routing.jsonl'}:5: skipped the last line, cut short" in out
    assert {p.name for p in (tmp_path / "r").glob("*.png")} == FIGURES


@pytest.mark.parametrize("stage, name, text, where", [
    ("sft", "metrics.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n',
     "metrics.jsonl:2: not valid JSON"),
    ("dpo", "routing.jsonl", '{"step": 1, "lo\n', "routing.jsonl:1: not valid JSON"),  # it has its newline
    ("sft", "metrics.jsonl", '{"step": 1, "loss": 2.0}\n[1, 2]\n', 'metrics.jsonl:2: not a logged record'),
    ("dpo", "routing_drift.json", '{"tokens": 1,\n "load_base": [}', "routing_drift.json:2: not valid JSON"),
    ("sft", "manifest.json", "", "manifest.json:1: not valid JSON"),
    ("dpo", "routing.jsonl", '{"step": 1, "tokens": 5}\n', "routing.jsonl: record 1 (step 1) lacks top_k, load"),
    ("sft", "manifest.json", '{"final_eval": 0.42}', "manifest.json: final_eval: expected an object of metrics"),
])
def test_a_bad_line_elsewhere_is_an_error_naming_file_and_line(own_run, tmp_path, capsys, stage, name, text, where):
    (own_run / stage / name).write_text(text)
    assert main(["report", str(own_run), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {own_run / stage}/{where}") and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # the logs are read before anything is written


def test_an_existing_file_as_the_out_folder_is_refused_and_kept(run_dir, tmp_path, capsys):
    out = tmp_path / "file.txt"
    out.write_text("keep me")
    assert main(["report", str(run_dir), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out}: exists and is not a folder; the report is a folder " \
                                      "(index.html and its figures)\n"
    assert out.read_text() == "keep me"


def test_a_report_killed_midway_leaves_the_previous_one_whole(own_run, tmp_path):
    out = tmp_path / "r"
    write_report(own_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_jsonl(own_run / "sft" / "metrics.jsonl", [{"step": s, "loss": 1.0 + s} for s in range(1, 9)])
    started = time.time_ns()
    child = subprocess.Popen([sys.executable, "-m", "finetune", "report", str(own_run), "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # killed as soon as the first new figure is being written, long before the page
        deadline = time.monotonic() + 120
        while not any(p.stat().st_mtime_ns >= started for p in out.rglob("*.png")):
            assert child.poll() is None and time.monotonic() < deadline, "the report never started a figure"
            time.sleep(0.005)
    finally:
        child.kill()
        child.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".report-")} == before
    abandoned = [p for p in out.iterdir() if p.name.startswith(f".report-{child.pid}@{socket.gethostname()}-")]
    assert abandoned, "the killed report left no staging folder: the kill came too late to test anything"
    # reports drawing now: in a process of this machine that is alive, and on another machine sharing the folder
    others = {f".report-{os.getpid()}@{socket.gethostname()}-drawing", f".report-{child.pid}@elsewhere-drawing"}
    for name in others:
        (out / name).mkdir()
    write_report(own_run, out)  # the next report removes what the killed one left, not what the others draw
    assert {p.name for p in out.iterdir() if p.name.startswith(".report-")} == others
    assert {p.name for p in out.iterdir()} - others == set(before)
    assert (out / "index.html").read_bytes() != before["index.html"]


def test_a_log_that_is_not_utf8_is_an_error_naming_file_and_line(own_run, tmp_path, capsys):
    with (own_run / "sft" / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 9, "loss": "\xff"}\n')
    assert main(["report", str(own_run), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == f"error: {own_run / 'sft' / 'metrics.jsonl'}:11: not UTF-8 text, so not a " \
                                      "file a run writes\n"
    assert not (tmp_path / "r").exists()


def test_a_run_with_nothing_logged_yet_is_refused_not_an_empty_page(tmp_path, capsys):
    (tmp_path / "run" / "sft").mkdir(parents=True)
    (tmp_path / "run" / "sft" / "metrics.jsonl").write_text("")  # killed before its first log
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "no stage has logged yet" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["metrics.jsonl", "sft"]


@pytest.mark.parametrize("files", [{"index.html": "<html>my own page</html>"},
                                   {"config.json": "{}", "model.safetensors": "weights"}])  # an export, say
def test_an_out_folder_holding_other_files_is_refused_and_kept(run_dir, tmp_path, capsys, files):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    assert main(["report", str(run_dir), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {out}: holds files a report does not write (")
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_a_new_report_in_an_earlier_ones_folder_leaves_no_figure_of_the_earlier(run_dir, own_run, tmp_path, capsys):
    out = tmp_path / "r"
    write_report(run_dir, out)
    shutil.rmtree(own_run / "dpo")  # the new report has no DPO figures: the earlier ones must not stay beside it
    assert main(["report", str(own_run), "--out", str(out)]) == 0
    listed = {Path(line.strip()).name for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed == {p.name for p in out.glob("*.png")} == {n for n in FIGURES if "dpo" not in n}
