"""Dashboards: each stage's trainer logs and router telemetry, sent to W&B and/or TensorBoard.

One run folder is one dashboard run per stage: SFT and DPO are two W&B runs in one group, with ids kept in
<output_dir>/tracking.json so that `--resume` continues the same W&B runs and appends to the same TensorBoard
folders. Without W&B credentials, W&B runs offline into <output_dir>/wandb and prints the command that uploads
it later. The config sent to a dashboard is the resolved recipe, with secrets masked (there should be none: a
recipe that holds one is refused before the run starts, see finetune.secrets).
"""

from __future__ import annotations

import json
import netrc
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from uuid import uuid4

from transformers import TrainerCallback

from finetune.recipe import Recipe
from finetune.secrets import redact

STATE_FILE = "tracking.json"
WANDB_HOST = "https://api.wandb.ai"


def wandb_mode(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The W&B mode for this run and why: WANDB_MODE when set, online with credentials, offline without."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"], "WANDB_MODE is set"
    if environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED is set"
    if has_wandb_credentials(environ):
        return "online", "W&B credentials found"
    return "offline", "no W&B credentials: set WANDB_API_KEY or run `wandb login`"


def has_wandb_credentials(environ: Mapping[str, str]) -> bool:
    """An API key in the environment or an entry for the W&B host in the netrc file that `wandb login` writes."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", WANDB_HOST)).hostname
    path = Path(environ.get("NETRC", Path(environ.get("HOME", Path.home())) / ".netrc")).expanduser()
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def dashboard_ids(run_dir: Path) -> dict:
    """The run's dashboard identity, made once and kept in the run folder so a resumed run continues it."""
    path = run_dir / STATE_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    state = {"id": uuid4().hex[:8], "wandb": {}}
    _write_state(run_dir, state)
    return state


def _write_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    tmp.replace(run_dir / STATE_FILE)


def run_name(recipe: Recipe) -> str:
    return recipe.tracking.run_name or recipe.run_dir.resolve().name


class StageDashboards:
    """The dashboards of one stage, open for its whole life: training, the final eval and the routing drift."""

    def __init__(self, recipe: Recipe, stage: str, stage_dir: Path):
        self.recipe, self.stage, self.stage_dir = recipe, stage, stage_dir
        self.backends = [r for r in recipe.tracking.report_to if r != "none"]
        self.config = redact({"stage": stage, **recipe.model_dump(mode="json")})
        self.wandb_run = None
        self._tensorboard = None
        self.resumed_at = 0  # the global step a resumed stage continues from; TensorBoard drops later events

    @classmethod
    @contextmanager
    def open(cls, recipe: Recipe, stage: str, stage_dir: Path):
        dashboards = cls(recipe, stage, stage_dir)
        if "wandb" in dashboards.backends:
            dashboards._start_wandb()
        failed = True
        try:
            yield dashboards
            failed = False
        finally:
            dashboards.close(failed)

    def _start_wandb(self) -> None:
        import wandb

        run_dir = self.recipe.run_dir
        ids = dashboard_ids(run_dir)
        name = run_name(self.recipe)
        mode, why = wandb_mode()
        init = dict(project=self.recipe.tracking.project, name=f"{name}-{self.stage}", group=f"{name}-{ids['id']}",
                    job_type=self.stage, id=f"{ids['id']}-{self.stage}", resume="allow",
                    tags=[*self.recipe.tracking.tags, self.stage], notes=self.recipe.tracking.notes,
                    config=self.config, dir=str(run_dir.resolve()),
                    # wandb-core writes the run file every 15 s by default, and a killed process loses what it had
                    # not written; once a second keeps that to about a second of logs
                    settings=wandb.Settings(x_transaction_log_flush_interval=1.0))
        print(f"[tracking] wandb {mode} ({why}); run {init['id']}, group {init['group']}")
        try:
            self.wandb_run = wandb.init(mode=mode, **init)
        except Exception as e:  # credentials but no network, or a rejected key: keep the run, log offline
            if mode != "online" or os.environ.get("WANDB_MODE"):
                raise
            print(f"[tracking] wandb could not start online ({e}); logging offline instead")
            mode, self.wandb_run = "offline", wandb.init(mode="offline", **init)
        self.wandb_run.define_metric("train/global_step")
        self.wandb_run.define_metric("*", step_metric="train/global_step", step_sync=True)
        ids["wandb"][self.stage] = {"id": init["id"], "mode": mode, "dir": str(Path(self.wandb_run.dir).parent)}
        _write_state(run_dir, ids)

    def tensorboard(self):
        if "tensorboard" not in self.backends:
            return None
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, events after the checkpoint's step (logged before the crash) are superseded
            self._tensorboard = SummaryWriter(log_dir=str(self.recipe.run_dir / "tensorboard" / self.stage),
                                              purge_step=self.resumed_at + 1 if self.resumed_at else None)
            self._tensorboard.add_text("recipe", _indented(dump_recipe_redacted(self.recipe)), self.resumed_at)
        return self._tensorboard

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log({"train/global_step": step, **scalars})
        if (writer := self.tensorboard()) is not None:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)

    def log_image(self, step: int, tag: str, png: Path, caption: str = "") -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({"train/global_step": step, tag: wandb.Image(str(png), caption=caption)})
        if (writer := self.tensorboard()) is not None:
            from finetune.plots import png_rgb

            writer.add_image(tag, png_rgb(png), step, dataformats="HWC")

    def summarize(self, values: dict[str, Any]) -> None:
        """Final values of the stage (routing drift), shown in the W&B run's summary table."""
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def flush(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self, failed: bool) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)

    def callback(self) -> TrainerCallback:
        return DashboardLog(self)


class DashboardLog(TrainerCallback):
    """Sends every value the trainer logs to the stage's dashboards, named as W&B's transformers integration
    names them (train/loss, eval/loss, train/rewards/margins...), against the global step."""

    def __init__(self, dashboards: StageDashboards):
        self.dashboards = dashboards

    def on_train_begin(self, args, state, control, **kwargs):
        self.dashboards.resumed_at = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.dashboards.log(state.global_step, dashboard_scalars(logs))

    def on_save(self, args, state, control, **kwargs):
        # what a resume will not log again must be on disk before a kill: everything up to the checkpoint
        self.dashboards.flush()


def dashboard_scalars(logs: dict[str, Any]) -> dict[str, float]:
    scalars = {}
    for key, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        scalars[f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"] = value
    return scalars


def dump_recipe_redacted(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(redact(recipe.model_dump(mode="json")), sort_keys=False, allow_unicode=True)


def _indented(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # a Markdown code block for TensorBoard's text tab


def dashboard_lines(recipe: Recipe) -> list[str]:
    """How to open this run's dashboards, for the summary printed at the end of a run."""
    run_dir = recipe.run_dir
    lines = []
    state = json.loads((run_dir / STATE_FILE).read_text()) if (run_dir / STATE_FILE).is_file() else {"wandb": {}}
    modes = {info["mode"] for info in state["wandb"].values()}
    if "offline" in modes:
        lines.append(f"wandb (offline)  : upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
    if "online" in modes:
        lines.append(f"wandb (online)   : project '{recipe.tracking.project}', group "
                     f"'{run_name(recipe)}-{state['id']}'")
    if "tensorboard" in recipe.tracking.report_to:
        lines.append(f"tensorboard      : `tensorboard --logdir {run_dir / 'tensorboard'}`")
    lines.append(f"plots            : `finetune report {run_dir}`")
    return lines
