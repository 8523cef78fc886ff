"""Dashboards: each stage's trainer logs and router telemetry, sent to W&B, TensorBoard, mlflow and/or trackio.

One run folder is one dashboard run per stage, the stages of a run grouped together: SFT and DPO are two W&B
runs in one group, two trackio runs in one group, two mlflow runs under one parent run. Their ids are kept in
<output_dir>/tracking.json so that `--resume` continues the same runs and appends to the same TensorBoard
folders. Without W&B credentials, W&B runs offline into <output_dir>/wandb and prints the command that uploads
it later; without MLFLOW_TRACKING_URI, mlflow logs to a local store in the run folder. The config sent to a
dashboard is the resolved recipe, with secrets masked (there should be none: a recipe that holds one is refused
before the run starts, see finetune.secrets).
"""

from __future__ import annotations

import json
import netrc
import os
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from uuid import uuid4

from transformers import TrainerCallback

from finetune import distributed
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
        # one dashboard run per stage, however many processes train it: the main process logs
        self.backends = [r for r in recipe.tracking.report_to if r != "none"] if distributed.is_main() else []
        self.config = redact({"stage": stage, **recipe.model_dump(mode="json")})
        self.wandb_run = None
        self.mlflow_run: MlflowRun | None = None
        self.trackio_run = None
        self._tensorboard = None
        self.resumed_at = 0  # the global step a resumed stage continues from; TensorBoard drops later events

    @classmethod
    @contextmanager
    def open(cls, recipe: Recipe, stage: str, stage_dir: Path):
        dashboards = cls(recipe, stage, stage_dir)
        failed = True
        try:
            if "wandb" in dashboards.backends:
                dashboards._start_wandb()
            if "mlflow" in dashboards.backends:
                dashboards.mlflow_run = MlflowRun.start(recipe, stage, dashboards.config)
            if "trackio" in dashboards.backends:
                dashboards._start_trackio()
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

    def _start_trackio(self) -> None:
        import trackio
        from trackio.utils import TRACKIO_DIR

        run_dir = self.recipe.run_dir
        ids = dashboard_ids(run_dir)
        group = f"{run_name(self.recipe)}-{ids['id']}"
        # trackio knows a run by its name, so the name carries the run folder's id: resume="allow" then continues
        # this run folder's stage, never another run's that happens to share the run_name
        name = f"{group}-{self.stage}"
        print(f"[tracking] trackio: project '{self.recipe.tracking.project}', run {name}, group {group}")
        self.trackio_run = trackio.init(project=self.recipe.tracking.project, name=name, group=group,
                                        config=self.config, resume="allow", embed=False)
        ids.setdefault("trackio", {})[self.stage] = {"name": name, "id": self.trackio_run.id, "dir": str(TRACKIO_DIR)}
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
        if self.mlflow_run is not None:
            self.mlflow_run.log(step, scalars)
        if self.trackio_run is not None:
            self.trackio_run.log(scalars, step=step)

    def log_image(self, step: int, tag: str, png: Path, caption: str = "") -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({"train/global_step": step, tag: wandb.Image(str(png), caption=caption)})
        if (writer := self.tensorboard()) is not None:
            from finetune.plots import png_rgb

            writer.add_image(tag, png_rgb(png), step, dataformats="HWC")
        if self.mlflow_run is not None:
            self.mlflow_run.log_image(tag, png)
        if self.trackio_run is not None:
            import trackio

            self.trackio_run.log({tag: trackio.Image(str(png), caption=caption)}, step=step)

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
        if self.mlflow_run is not None:
            self.mlflow_run.close(failed)
        if self.trackio_run is not None:
            import trackio

            trackio.finish()  # the module's finish also forgets the run, so trackio's exit hook leaves it alone

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


class MlflowRun:
    """A stage's mlflow run: a child of the run folder's parent run, in the experiment named tracking.project.

    Logged through an MlflowClient (no global active run): metrics against the global step, the resolved recipe
    as flattened params and as recipe.yaml, the heatmaps as PNG artifacts. Without MLFLOW_TRACKING_URI the store
    is an SQLite file in the run folder (mlflow's file store refuses to start unless told to), artifacts beside it.
    """

    def __init__(self, client, run_id: str, parent_id: str):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id

    @classmethod
    def start(cls, recipe: Recipe, stage: str, config: dict) -> MlflowRun:
        from mlflow import MlflowClient

        run_dir = recipe.run_dir
        uri, local = mlflow_tracking_uri(run_dir)
        ids = dashboard_ids(run_dir)
        state = ids.get("mlflow", {})
        if state.get("tracking_uri") != without_credentials(uri):  # a first run, or a resume that logs elsewhere
            state = {"tracking_uri": without_credentials(uri), "runs": {}}
        client = MlflowClient(tracking_uri=uri)
        tags = {"group": f"{run_name(recipe)}-{ids['id']}", **{tag: "" for tag in recipe.tracking.tags}}
        if recipe.tracking.notes:
            tags["mlflow.note.content"] = recipe.tracking.notes  # shown as the run's description
        if "parent" not in state:
            experiment = _mlflow_experiment(client, recipe.tracking.project, run_dir / "mlartifacts" if local else None)
            state["parent"] = client.create_run(experiment, run_name=run_name(recipe), tags=tags).info.run_id
        if stage not in state["runs"]:
            experiment = client.get_run(state["parent"]).info.experiment_id
            run = client.create_run(experiment, run_name=f"{run_name(recipe)}-{stage}",
                                    tags={**tags, "stage": stage, "mlflow.parentRunId": state["parent"]})
            state["runs"][stage] = run.info.run_id
        for run_id in (state["parent"], state["runs"][stage]):
            client.update_run(run_id, status="RUNNING")  # a resumed stage continues its run
        ids["mlflow"] = state
        _write_state(run_dir, ids)
        print(f"[tracking] mlflow {'local store' if local else 'MLFLOW_TRACKING_URI'} {state['tracking_uri']}: "
              f"experiment '{recipe.tracking.project}', run {state['runs'][stage]} (parent {state['parent']})")
        mlflow_run = cls(client, state["runs"][stage], state["parent"])
        mlflow_run.log_config(config, dump_recipe_redacted(recipe))
        return mlflow_run

    def log_config(self, config: dict, recipe_yaml: str) -> None:
        from mlflow.entities import Param

        # mlflow keeps at most 6000 characters of a value; recipe.yaml holds the whole recipe
        params = [Param(key, value[:6000]) for key, value in flat_params(config).items()]
        for start in range(0, len(params), 100):  # mlflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, recipe_yaml, "recipe.yaml")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars.items()]
        for start in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_image(self, tag: str, png: Path) -> None:
        from PIL import Image

        with Image.open(png) as image:
            self.client.log_image(self.run_id, image, artifact_file=f"{tag}.png")

    def close(self, failed: bool) -> None:
        for run_id in (self.run_id, self.parent_id):
            self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def mlflow_tracking_uri(run_dir: Path, environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """MLFLOW_TRACKING_URI when set, otherwise an SQLite store in the run folder; and whether it is that local one."""
    environ = os.environ if environ is None else environ
    if environ.get("MLFLOW_TRACKING_URI"):
        return environ["MLFLOW_TRACKING_URI"], False
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}", True


def without_credentials(uri: str) -> str:
    """A tracking URI as printed and kept in tracking.json: without a user:password@ part."""
    parts = urlparse(uri)
    if parts.username is None and parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _mlflow_experiment(client, name: str, artifacts: Path | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifacts.resolve().as_uri() if artifacts else None)


def flat_params(config: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as mlflow params: dotted keys (list items by index), values as text."""
    if isinstance(config, Mapping) and config:
        return {k: v for key, value in config.items() for k, v in flat_params(value, f"{prefix}{key}.").items()}
    if isinstance(config, list) and config and any(isinstance(item, Mapping) for item in config):
        return {k: v for i, value in enumerate(config) for k, v in flat_params(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): config if isinstance(config, str) else json.dumps(config)}


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
        lines.append(f"wandb (offline) : upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
    if "online" in modes:
        lines.append(f"wandb (online)  : project '{recipe.tracking.project}', group "
                     f"'{run_name(recipe)}-{state['id']}'")
    if "tensorboard" in recipe.tracking.report_to:
        lines.append(f"tensorboard     : `tensorboard --logdir {run_dir / 'tensorboard'}`")
    uri = state.get("mlflow", {}).get("tracking_uri")
    if uri and uri.startswith("sqlite:"):
        lines.append(f"mlflow (local)  : `mlflow ui --backend-store-uri {uri}` (the UI comes with `pip install "
                     f"mlflow`), experiment '{recipe.tracking.project}'")
    elif uri:
        lines.append(f"mlflow          : experiment '{recipe.tracking.project}' at {uri}")
    if state.get("trackio"):
        store = next(iter(state["trackio"].values()))["dir"]
        lines.append(f"trackio         : `trackio show --project \"{recipe.tracking.project}\"` (store: {store})")
    lines.append(f"plots           : `finetune report {run_dir}`")
    return lines
