"""`finetune report RUN`: a run's curves as PNG files and one HTML page that holds them all.

Reads only what the run wrote: each stage's metrics.jsonl (the trainer's logs), routing.jsonl (router
telemetry), routing_drift.json and manifest.json. Nothing is recomputed and no model is loaded.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.errors import FinetuneError
from finetune.plots import STAGE_COLORS, drift_heatmap, load_heatmap, new_figure, save
from finetune.telemetry import stage_load

STAGES = ("sft", "dpo")
# then `pid@host`, the drawing process: a killed report's folder is known, and removed by the next on that machine
STAGING = ".report-"
FIGURES = ("loss.png", "learning_rate.png", "grad_norm.png", "dpo_rewards.png", "eval.png", "router.png")
STAGE_FIGURES = ("expert_load", "routing_load", "routing_drift")  # each drawn as KIND_STAGE.png
PAGE_MARK = b"<title>finetune report: "  # in the head of every page written here
ROUTING_KEYS = ("top_k", "load", "entropy", "aux_loss")
NOT_PLOTTED = {"epoch", "step", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "train_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "num_tokens",
               "eval_num_tokens"}


@dataclass
class Figure:
    path: Path
    title: str
    caption: str


@dataclass
class StageLogs:
    """One stage's logged values as series: {name: (steps, values)}; a step logged twice (a resumed run logs
    again what followed its checkpoint) keeps its last value."""

    name: str
    train: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    eval: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    routing: list[dict] = field(default_factory=list)
    drift: dict | None = None
    final_eval: dict = field(default_factory=dict)

    @classmethod
    def read(cls, stage_dir: Path, log: Callable[[str], None] = print) -> StageLogs:
        logs = cls(stage_dir.name)
        train: dict[str, dict[int, float]] = {}
        evals: dict[str, dict[int, float]] = {}
        for record in _jsonl(stage_dir / "metrics.jsonl", log):
            for key, value in record.items():
                if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                target = evals if key.startswith("eval_") else train
                target.setdefault(key.removeprefix("eval_"), {})[record["step"]] = value
        logs.train = {k: _series(v) for k, v in train.items()}
        logs.eval = {k: _series(v) for k, v in evals.items()}
        logs.routing = _jsonl(stage_dir / "routing.jsonl", log)
        for number, record in enumerate(logs.routing, 1):  # drawn later: a bad record would fail mid-report
            lacking = [key for key in ROUTING_KEYS if key not in record]
            if lacking:
                raise FinetuneError(f"{stage_dir / 'routing.jsonl'}: record {number} (step {record['step']}) lacks "
                                    f"{', '.join(lacking)}; not a router telemetry record")
        if (stage_dir / "routing_drift.json").is_file():
            logs.drift = _json(stage_dir / "routing_drift.json")
        if (stage_dir / "manifest.json").is_file():
            logs.final_eval = _json(stage_dir / "manifest.json").get("final_eval", {})
            if not isinstance(logs.final_eval, dict):
                raise FinetuneError(f"{stage_dir / 'manifest.json'}: final_eval: expected an object of metrics")
        return logs

    def has_values(self) -> bool:
        return bool(self.train or self.eval or self.routing or self.drift)


def _jsonl(path: Path, log: Callable[[str], None]) -> list[dict]:
    """The records of a JSON-lines log. A last line cut short, what a run killed mid-write leaves, is skipped
    with a note: a killed run is worth a report. A bad line anywhere else is an error."""
    if not path.is_file():
        return []
    text = _read_text(path)
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):  # each record is written with its newline
                log(f"{path}:{number}: skipped the last line, cut short (the run was stopped while writing it)")
                continue
            raise FinetuneError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise FinetuneError(f"{path}:{number}: not a logged record (a JSON object with an integer \"step\")")
        records.append(record)
    return records


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise FinetuneError(f"{path}:{line}: not UTF-8 text, so not a file a run writes") from None


def _json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise FinetuneError(f"{path}: not a JSON object")
    return data


def _series(points: dict[int, float]) -> tuple[list[int], list[float]]:
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def write_report(run_dir: Path, out_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Draw every figure the run's logs allow into out_dir (default RUN/report); returns the HTML page."""
    run_dir = Path(run_dir)
    stages = [StageLogs.read(run_dir / s, log) for s in STAGES if (run_dir / s / "metrics.jsonl").is_file()]
    stages = [s for s in stages if s.has_values()]  # a stage killed before its first log has nothing to draw
    if not stages:
        raise FinetuneError(f"{run_dir}: no stage logs (sft/metrics.jsonl, dpo/metrics.jsonl): not a run folder, "
                            "or no stage has logged yet")
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    if out_dir.exists() and not out_dir.is_dir():
        raise FinetuneError(f"{out_dir}: exists and is not a folder; the report is a folder "
                            "(index.html and its figures)")
    refuse_foreign_files(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FinetuneError(f"{out_dir}: cannot make the report folder ({e.strerror})") from None
    # drawn aside and moved in only when whole: a report that fails midway leaves the previous one as it was
    remove_abandoned_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}@{socket.gethostname()}-", dir=out_dir))
    try:
        figures = draw_figures(stages, staging)
        (staging / "index.html").write_text(render_html(run_dir, stages, figures), encoding="utf-8")
        for figure in figures:
            os.replace(figure.path, out_dir / figure.path.name)
        os.replace(staging / "index.html", out_dir / "index.html")  # last: the page appears once it is whole
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    drawn = {figure.path.name for figure in figures}
    for stale in report_figures() - drawn:  # an earlier report's figure this page does not show
        (out_dir / stale).unlink(missing_ok=True)
    return out_dir / "index.html"


def report_figures() -> set[str]:
    """Every figure name a report may write."""
    return {*FIGURES, *(f"{kind}_{stage}.png" for kind in STAGE_FIGURES for stage in STAGES)}


def refuse_foreign_files(out_dir: Path) -> None:
    """A report replaces only an earlier report (or what a killed one left): a folder holding anything else (the
    run folder, an export, someone's web page) would have its index.html and figures overwritten."""
    if not out_dir.is_dir():
        return
    ours = {"index.html", *report_figures()}
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours and not p.name.startswith(STAGING))
    page = out_dir / "index.html"
    if page.exists() and not (page.is_file() and PAGE_MARK in page.read_bytes()[:512]):
        foreign.insert(0, "index.html (not a finetune report)")
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise FinetuneError(f"{out_dir}: holds files a report does not write ({', '.join(foreign[:3])}{more}); "
                            "the report replaces only an earlier report: choose a new or empty folder")


def remove_abandoned_staging(out_dir: Path) -> None:
    """Staging folders of reports killed on this machine (their process is gone) are removed; a live one, or one
    from another machine sharing the folder, is left."""
    for folder in out_dir.glob(f"{STAGING}*@*"):
        pid, _, host = folder.name.removeprefix(STAGING).rpartition("-")[0].partition("@")
        if folder.is_dir() and host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def draw_figures(stages: list[StageLogs], out_dir: Path) -> list[Figure]:
    figures = [f for f in (
        per_stage_figure(stages, "loss", "Loss", out_dir / "loss.png", "training loss (lines) and evaluation loss "
                         "(dots) of each stage; DPO's loss is the preference loss, log 2 = 0.69 at the start"),
        per_stage_figure(stages, "learning_rate", "Learning rate", out_dir / "learning_rate.png",
                         "the scheduled learning rate"),
        per_stage_figure(stages, "grad_norm", "Gradient norm", out_dir / "grad_norm.png",
                         "norm of the gradient before clipping"),
        dpo_rewards_figure(stages, out_dir / "dpo_rewards.png"),
        eval_figure(stages, out_dir / "eval.png"),
        router_figure(stages, out_dir / "router.png"),
    ) if f is not None]
    for stage in stages:
        figures += expert_load_figures(stage, out_dir)
    return figures


def _plot_series(ax, series: tuple[list[int], list[float]], label: str, color=None, eval_points=False) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps: a lone point is not at 2.84
    steps, values = series
    if eval_points:
        ax.plot(steps, values, "o--", color=color, label=label, markersize=4)
    else:
        ax.plot(steps, values, "-", color=color, label=label, linewidth=1.4)


def per_stage_figure(stages: list[StageLogs], key: str, title: str, path: Path, caption: str) -> Figure | None:
    """One panel per stage: the training series, and the evaluation series when there is one."""
    shown = [s for s in stages if key in s.train or key in s.eval]
    if not shown:
        return None
    figure, axes = new_figure(4.6 * len(shown), 3.2, 1, len(shown))
    for ax, stage in zip(axes[0], shown):
        color = STAGE_COLORS.get(stage.name)
        if key in stage.train:
            _plot_series(ax, stage.train[key], "train", color)
        if key in stage.eval:
            _plot_series(ax, stage.eval[key], "eval", "black", eval_points=True)
        ax.set_title(f"{stage.name}: {title.lower()}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return Figure(save(figure, path), title, caption)


def dpo_rewards_figure(stages: list[StageLogs], path: Path) -> Figure | None:
    dpo = next((s for s in stages if "rewards/margins" in s.train), None)
    if dpo is None:
        return None
    figure, axes = new_figure(9.2, 3.4, 1, 2)
    rewards, accuracy = axes[0]
    for key, color in (("rewards/chosen", "tab:green"), ("rewards/rejected", "tab:red"),
                       ("rewards/margins", "tab:purple")):
        if key in dpo.train:
            _plot_series(rewards, dpo.train[key], key.split("/")[1], color)
        if key in dpo.eval:
            _plot_series(rewards, dpo.eval[key], f"eval {key.split('/')[1]}", color, eval_points=True)
    rewards.axhline(0, color="grey", linewidth=0.8)
    rewards.set_title("dpo: implicit rewards (beta x log-ratio to the reference)", fontsize=10)
    for source, style in ((dpo.train, False), (dpo.eval, True)):
        if "rewards/accuracies" in source:
            _plot_series(accuracy, source["rewards/accuracies"], "eval" if style else "train",
                         "black" if style else "tab:purple", eval_points=style)
    accuracy.set_ylim(-0.02, 1.02)
    accuracy.set_title("dpo: share of pairs where chosen out-rewards rejected", fontsize=10)
    for ax in (rewards, accuracy):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return Figure(save(figure, path), "DPO rewards and margins",
                  "rewards of the chosen and rejected replies, their margin, and the reward accuracy")


def eval_figure(stages: list[StageLogs], path: Path) -> Figure | None:
    panels = [(s, key) for s in stages for key in s.eval if not key.startswith(("logits/", "logps/"))]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    figure, axes = new_figure(3.4 * cols, 2.6 * rows, rows, cols)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (stage, key) in zip(axes.flat, panels):
        _plot_series(ax, stage.eval[key], key, STAGE_COLORS.get(stage.name), eval_points=True)
        ax.set_title(f"{stage.name}: eval {key}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return Figure(save(figure, path), "Evaluation metrics", "every metric the held-out evaluation logged, by stage")


def router_figure(stages: list[StageLogs], path: Path) -> Figure | None:
    shown = [s for s in stages if s.routing]
    if not shown:
        return None
    figure, axes = new_figure(4.6 * len(shown), 6.0, 2, len(shown))
    for col, stage in enumerate(shown):
        steps = [r["step"] for r in stage.routing]
        entropy, aux = np.array([r["entropy"] for r in stage.routing]), np.array([r["aux_loss"] for r in stage.routing])
        colors = _layer_colors(entropy.shape[1])
        for layer in range(entropy.shape[1]):
            _plot_series(axes[0, col], (steps, entropy[:, layer]), f"layer {layer}", colors[layer])
            _plot_series(axes[1, col], (steps, aux[:, layer]), f"layer {layer}", colors[layer])
        experts = len(stage.routing[0]["load"][0])
        axes[0, col].axhline(np.log(experts), color="grey", linestyle=":", linewidth=1)
        axes[0, col].set_title(f"{stage.name}: router entropy per layer (dotted: uniform, ln {experts})", fontsize=9)
        axes[1, col].axhline(stage.routing[0]["top_k"], color="grey", linestyle=":", linewidth=1)
        axes[1, col].set_title(f"{stage.name}: load-balancing loss per layer (dotted: balanced)", fontsize=9)
        for ax in axes[:, col]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if entropy.shape[1] <= 8:
                ax.legend(fontsize=7)
    return Figure(save(figure, path), "Router entropy and load-balancing loss",
                  "per layer, over each stage's training tokens, every router_stats_steps steps; no token is ever "
                  "dropped (Mixtral has no expert capacity limit)")


def _layer_colors(layers: int):
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0, 0.9, layers))


def expert_load_figures(stage: StageLogs, out_dir: Path) -> list[Figure]:
    figures = []
    if stage.routing:
        figures.append(expert_load_over_time(stage, out_dir / f"expert_load_{stage.name}.png"))
        load = stage_load(stage.routing)
        png = load_heatmap(load, f"{stage.name}: expert load over the stage", out_dir / f"routing_load_{stage.name}.png")
        figures.append(Figure(png, f"{stage.name}: expert load heatmap",
                              "layers x experts, share of each layer's routed training tokens"))
    if stage.drift:
        delta = np.array(stage.drift["load_finetuned"]) - np.array(stage.drift["load_base"])
        png = drift_heatmap(delta, np.array(stage.drift["topk_agreement"]),
                            f"{stage.name}: routing drift from the base model ({stage.drift['tokens']} held-out tokens)",
                            out_dir / f"routing_drift_{stage.name}.png")
        figures.append(Figure(png, f"{stage.name}: routing drift from the base model",
                              "how the fine-tune changed which experts fire on held-out text, adapters on vs off"))
    return figures


def expert_load_over_time(stage: StageLogs, path: Path) -> Figure:
    steps = [r["step"] for r in stage.routing]
    load = np.array([r["load"] for r in stage.routing])  # windows x layers x experts
    layers, experts = load.shape[1], load.shape[2]
    cols = min(4, layers)
    rows = -(-layers // cols)
    figure, axes = new_figure(max(8.0, 3.3 * cols), 2.4 * rows + 0.8, rows, cols, sharex=True, sharey=True)
    from matplotlib import colormaps

    colors = colormaps["tab10" if experts <= 10 else "tab20"](np.arange(experts))
    for ax in axes.flat[layers:]:
        ax.set_visible(False)
    for layer, ax in enumerate(axes.flat[:layers]):
        for expert in range(experts):
            _plot_series(ax, (steps, load[:, layer, expert] * 100), f"expert {expert}", colors[expert])
        ax.axhline(100 / experts, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if layer >= layers - cols:  # the lowest panel of each column
            ax.set_xlabel("step", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(experts, 8), fontsize=7)
    figure.suptitle(f"{stage.name}: % of routed tokens per expert over training (dotted: uniform)", fontsize=10)
    return Figure(save(figure, path), f"{stage.name}: expert load over time",
                  "each layer's share of routed training tokens per expert, every router_stats_steps steps")


def render_html(run_dir: Path, stages: list[StageLogs], figures: list[Figure]) -> str:
    """One self-contained page: the images are embedded, so the file can be sent or opened anywhere."""
    rows = []
    for stage in stages:
        for key, value in sorted(stage.final_eval.items()):
            if isinstance(value, int | float) and key not in NOT_PLOTTED:
                rows.append(f"<tr><td>{stage.name}</td><td>{html.escape(key)}</td><td>{value:.4g}</td></tr>")
        if stage.drift:
            agree, tv = np.mean(stage.drift["topk_agreement"]), np.mean(stage.drift["load_tv"])
            rows.append(f"<tr><td>{stage.name}</td><td>routing: top-k choices unchanged from the base</td>"
                        f"<td>{agree:.1%}</td></tr><tr><td>{stage.name}</td><td>routing: expert load moved "
                        f"(total variation)</td><td>{tv:.3f}</td></tr>")
    table = ("<table><tr><th>stage</th><th>final value</th><th></th></tr>" + "".join(rows) + "</table>") if rows else ""
    sections = []
    for figure in figures:
        data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
        sections.append(f'<section><h2>{html.escape(figure.title)}</h2><p>{html.escape(figure.caption)} '
                        f'(<a href="{figure.path.name}">{figure.path.name}</a>)</p>'
                        f'<img src="data:image/png;base64,{data}" alt="{html.escape(figure.title)}"></section>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>finetune report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
img{{max-width:100%;border:1px solid #ddd}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}</style></head>
<body><h1>finetune report: {html.escape(str(run_dir))}</h1>
{table}
{''.join(sections)}
</body></html>
"""
