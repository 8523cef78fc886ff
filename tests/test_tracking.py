"""Dashboards end to end: real `finetune run` child processes with real wandb (offline), TensorBoard, and mlflow
and trackio when installed (the dev extra installs them), each in its local store.

One short SFT -> DPO -> export run is killed with SIGKILL in SFT and resumed, with sentinel secrets in the
environment. The checks read back wandb's own run files, TensorBoard's event files, mlflow's store through its
client and trackio's through its own storage API, follow the resume, and search every file the run wrote (binary
ones too) for the sentinels.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.recipe import load_recipe
from finetune.recipe.schema import dashboard_installed
from finetune.secrets import find_secrets, redact
from finetune.tracking import has_wandb_credentials, mlflow_tracking_uri, wandb_mode, without_credentials

REPO = Path(__file__).resolve().parents[1]
HAS_MLFLOW = dashboard_installed("mlflow")
HAS_TRACKIO = dashboard_installed("trackio")
DASHBOARDS = ["wandb", "tensorboard"] + (["mlflow"] if HAS_MLFLOW else []) + (["trackio"] if HAS_TRACKIO else [])
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install -e '.[mlflow]')")
needs_trackio = pytest.mark.skipif(not HAS_TRACKIO, reason="trackio is not installed (pip install -e '.[trackio]')")
TRACKED = dict(  # tiny_recipe settings: a short SFT -> DPO run with held-out data, an export, every dashboard
    seed=5, data={"sft": {"eval_fraction": 0.05}, "dpo": {"eval_fraction": 0.05}},
    sft={"max_steps": 6, "batch_size": 2, "grad_accum": 2, "save_steps": 2, "eval_steps": 3,
         "gradient_checkpointing": True},
    dpo={"max_steps": 3, "batch_size": 4, "eval_steps": 3},
    export={"merge": True, "dtype": "float32"},
    tracking={"report_to": DASHBOARDS, "project": "finetune-tests", "run_name": "sentinel-run", "tags": ["tiny", "ci"],
              "notes": "a short run that is killed and resumed", "router_stats_steps": 1, "drift_examples": 4},
)
# values no file may ever contain; named like the variables the libraries read
SENTINELS = {
    "HF_TOKEN": "hf_SENTINELhfTOKEN0123456789abcdefXYZ",
    "HUGGING_FACE_HUB_TOKEN": "hf_SENTINELhubTOKEN0123456789abcdefXYZ",
    "OPENAI_API_KEY": "sk-SENTINELopenaiKEY0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "SENTINELawsSECRET/0123456789+abcdefXYZ",
    "MY_SERVICE_PASSWORD": "SENTINEL-service-password-4242",
}
WANDB_SENTINEL = "cafe" * 10  # shaped like a real W&B key: 40 hex digits


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """Each dashboard in its local default store under the run folder or HOME; no network (trackio would ask the
    hub whose HF_TOKEN this is)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_", "HF_"))}
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **SENTINELS, **extra}


def command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", "run", str(recipe), f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_recipe) -> dict:
    """The run folder and the console output of both processes: killed in SFT, then resumed to the end."""
    tmp = tmp_path_factory.mktemp("tracking")
    recipe, out, home = tiny_recipe(tmp / "recipe.yaml", **TRACKED), tmp / "run", tmp / "home"
    home.mkdir()
    # first process: no W&B credentials at all, so wandb must choose offline by itself
    child = subprocess.Popen(command(recipe, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=REPO, env=clean_env(home, FINETUNE_TRACE_STEPS="1"))
    first = []
    for line in child.stdout:
        first.append(line)
        if "[trace] sft micro-step inside step 4" in line:  # steps 1-3 logged, checkpoint-2 saved
            child.send_signal(signal.SIGKILL)
            break
    first += child.stdout.readlines()
    assert child.wait(timeout=600) == -signal.SIGKILL
    # second process: a W&B key in the environment, offline by WANDB_MODE (no network here)
    resumed = subprocess.run(command(recipe, out, "--resume"), capture_output=True, text=True, cwd=REPO,
                             timeout=600, env=clean_env(home, WANDB_API_KEY=WANDB_SENTINEL, WANDB_MODE="offline"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"dir": out, "home": home, "first": "".join(first), "resumed": resumed.stdout + resumed.stderr}


def test_overwrite_would_delete_a_run_with_every_dashboard(run):
    """What the dashboards leave in the run folder (wandb/, tensorboard/, mlflow.db and its artifacts, trackio's
    ids) is all known to --overwrite, which refuses a folder holding anything else."""
    from finetune.pipeline import refuse_to_delete

    expected = {"wandb", "tensorboard", "tracking.json", "export"} | ({"mlflow.db"} if HAS_MLFLOW else set())
    assert expected <= {p.name for p in run["dir"].iterdir()}
    refuse_to_delete(run["dir"])


def wandb_records(path: Path):
    """The records of a .wandb file (a LevelDB-style log of protobuf records), read with wandb's own schema."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb_run(run_dir: Path) -> dict:
    """Everything wandb recorded for a run folder, per run id: run settings, config, history rows."""
    runs = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):  # the run record comes first in each file
            kind = record.WhichOneof("record_type")
            if kind == "run":
                current = runs.setdefault(record.run.run_id, {"files": [], "config": {}, "history": [], "dirs": set()})
                current.update(group=record.run.run_group, job_type=record.run.job_type, project=record.run.project,
                               tags=list(record.run.tags), notes=record.run.notes, name=record.run.display_name)
                current["dirs"].add(path.parent)
                current["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                current["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                current["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                           for i in record.history.item})
            elif kind == "files":
                current["files"] += [path.parent / "files" / f.path for f in record.files.files]
    return runs


def test_wandb_recorded_metrics_config_and_heatmaps_offline(run):
    assert "wandb offline (no W&B credentials" in run["first"]
    assert "wandb offline (WANDB_MODE is set)" in run["resumed"]
    assert f"wandb sync {run['dir'] / 'wandb'}/offline-run-*" in run["resumed"]
    ids = json.loads((run["dir"] / "tracking.json").read_text())
    runs = read_wandb_run(run["dir"])
    assert set(runs) == {f"{ids['id']}-sft", f"{ids['id']}-dpo"}
    for stage in ("sft", "dpo"):
        recorded = runs[f"{ids['id']}-{stage}"]
        # SFT and DPO are one group; project, name, tags, notes from the recipe; the resolved recipe as config
        assert recorded["group"] == f"sentinel-run-{ids['id']}" and recorded["job_type"] == stage
        assert recorded["project"] == "finetune-tests" and recorded["name"] == f"sentinel-run-{stage}"
        assert recorded["tags"] == ["tiny", "ci", stage] and recorded["notes"] == "a short run that is killed and resumed"
        config = recorded["config"]
        assert config["stage"] == stage and config["lora"]["r"] == 8 and config["seed"] == 5
        assert [s["type"] for s in config["stages"]] == ["sft", "dpo"]
        assert config["tracking"]["report_to"] == DASHBOARDS

        rows = recorded["history"]
        logged = {key for row in rows for key in row}
        for key in ("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "router/aux_loss",
                    "router/entropy", "router/layer_0/expert_7", "router/layer_1/aux_loss",
                    "router/drift/topk_agreement", "router/drift/layer_1/load_tv"):
            assert key in logged, (stage, key)
        steps = sorted({row["train/global_step"] for row in rows if "train/loss" in row})
        # SFT: the resumed process logs steps 3-6; what the killed one logged before is there up to the last
        # second before SIGKILL (wandb-core's write interval), so steps 1-2 are usually there too
        expected = {3, 4, 5, 6} if stage == "sft" else {1, 2, 3}
        assert expected <= set(steps) <= set(range(1, 7)), steps
        for image in ("router/expert_load", "router/drift"):
            row = next(r for r in rows if f"{image}/path" in r)
            png = next(f for f in recorded["files"] if f.as_posix().endswith(row[f"{image}/path"]))
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert any("train/rewards/margins" in row for row in runs[f"{ids['id']}-dpo"]["history"])


def test_resume_continues_the_same_dashboard_runs(run):
    assert "continuing from" in run["resumed"] and "checkpoint-2" in run["resumed"]
    ids = json.loads((run["dir"] / "tracking.json").read_text())
    sft = read_wandb_run(run["dir"])[f"{ids['id']}-sft"]
    assert len(sft["dirs"]) == 2, "the killed process and the resumed one both log to W&B run <id>-sft"
    # TensorBoard: the events logged after the checkpoint by the killed process are superseded, not doubled
    scalars = tensorboard_scalars(run["dir"] / "tensorboard" / "sft")
    assert [e.step for e in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    metrics = [json.loads(line) for line in (run["dir"] / "sft" / "metrics.jsonl").read_text().splitlines()]
    last_loss = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert [e.value for e in scalars["train/loss"]] == pytest.approx([last_loss[s] for s in range(1, 7)])
    routing = [json.loads(line)["step"] for line in (run["dir"] / "sft" / "routing.jsonl").read_text().splitlines()]
    assert routing == [1, 2, 3, 4, 5, 6]


def tensorboard_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_scalars_and_images(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage, steps in (("sft", 6), ("dpo", 3)):
        folder = run["dir"] / "tensorboard" / stage
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        events.Reload()
        tags = events.Tags()
        for tag in ("train/loss", "train/learning_rate", "eval/loss", "router/aux_loss", "router/layer_0/expert_0",
                    "router/drift/topk_agreement"):
            assert tag in tags["scalars"], (stage, tag)
        assert [e.step for e in events.Scalars("router/aux_loss")] == list(range(1, steps + 1))
        assert {"router/expert_load", "router/drift"} <= set(tags["images"])
        assert events.Images("router/drift")[0].encoded_image_string[:4] == b"\x89PNG"
        assert any("recipe" in t for t in tags["tensors"])
    dpo = tensorboard_scalars(run["dir"] / "tensorboard" / "dpo")
    assert "train/rewards/margins" in dpo and "eval/rewards/accuracies" in dpo


def mlflow_runs(run_dir: Path) -> tuple[object, dict]:
    """mlflow's client on the run's store, and the runs of the experiment by name."""
    from mlflow import MlflowClient

    state = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    assert state["tracking_uri"] == f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"  # the local store, by default
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    experiment = client.get_experiment_by_name("finetune-tests")
    found = client.search_runs([experiment.experiment_id])
    assert sorted((r.info.run_name, r.info.run_id) for r in found) == [
        ("sentinel-run", state["parent"]), ("sentinel-run-dpo", state["runs"]["dpo"]),
        ("sentinel-run-sft", state["runs"]["sft"])], "one parent and one run per stage, the resume included"
    return client, {r.info.run_name: r for r in found}


@needs_mlflow
def test_mlflow_recorded_metrics_params_and_heatmaps_under_one_parent(run):
    client, runs = mlflow_runs(run["dir"])
    assert f"`mlflow ui --backend-store-uri sqlite:///{(run['dir'] / 'mlflow.db').resolve()}`" in run["resumed"]
    parent = runs["sentinel-run"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.note.content"] == "a short run that is killed and resumed"
    for stage, steps in (("sft", range(3, 7)), ("dpo", range(1, 4))):
        recorded = runs[f"sentinel-run-{stage}"]
        assert recorded.info.status == "FINISHED"
        tags = recorded.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["stage"] == stage
        assert {"tiny", "ci"} <= tags.keys() and tags["group"] == parent.data.tags["group"]
        params = recorded.data.params  # the resolved recipe, flattened
        assert params["stage"] == stage and params["lora.r"] == "8" and params["seed"] == "5"
        assert params["stages.1.type"] == "dpo" and json.loads(params["tracking.report_to"]) == DASHBOARDS
        for key in ("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "router/aux_loss",
                    "router/entropy", "router/layer_0/expert_7", "router/layer_1/aux_loss",
                    "router/drift/topk_agreement", "router/drift/layer_1/load_tv"):
            assert key in recorded.data.metrics, (stage, key)
        logged = {m.step for m in client.get_metric_history(recorded.info.run_id, "train/loss")}
        assert set(steps) <= logged <= set(range(1, 7)), logged
        artifacts = Path(client.download_artifacts(recorded.info.run_id, ""))
        for image in ("router/expert_load.png", "router/drift.png"):
            assert (artifacts / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
        assert "lora:\n  r: 8" in (artifacts / "recipe.yaml").read_text()
    assert "train/rewards/margins" in runs["sentinel-run-dpo"].data.metrics


@needs_mlflow
def test_resume_continues_the_same_mlflow_run(run):
    client, runs = mlflow_runs(run["dir"])
    # mlflow writes each log call before returning: the killed process's steps 1 and 2 and the resumed
    # process's 3 to 6 are in the one SFT run (step 3, logged by both, appears twice)
    steps = [m.step for m in client.get_metric_history(runs["sentinel-run-sft"].info.run_id, "train/loss")]
    assert {1, 2, 3, 4, 5, 6} == set(steps), steps


def read_trackio(home: Path, project: str) -> dict:
    """Every run of a trackio project, read with trackio's own storage API in the HOME the run used."""
    script = textwrap.dedent(f"""\
        import json
        from trackio import Api
        from trackio.sqlite_storage import SQLiteStorage
        runs = {{r.name: {{"id": r.id, "config": r.config, "logs": SQLiteStorage.get_logs({project!r}, r.name)}}
                for r in Api().runs({project!r})}}
        print(json.dumps(runs, default=str))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=clean_env(home))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@needs_trackio
def test_trackio_recorded_metrics_config_and_heatmaps_in_one_group(run):
    ids = json.loads((run["dir"] / "tracking.json").read_text())
    runs = read_trackio(run["home"], "finetune-tests")
    assert '`trackio show --project "finetune-tests"`' in run["resumed"]
    group = f"sentinel-run-{ids['id']}"
    assert set(runs) == {f"{group}-sft", f"{group}-dpo"}, "one run per stage, the resume included"
    for stage, steps in (("sft", range(3, 7)), ("dpo", range(1, 4))):
        recorded = runs[f"{group}-{stage}"]
        assert recorded["id"] == ids["trackio"][stage]["id"]
        config = recorded["config"]
        assert config["_Group"] == group and config["stage"] == stage and config["lora"]["r"] == 8
        assert config["tracking"]["report_to"] == DASHBOARDS
        logs = recorded["logs"]
        logged = {key for row in logs for key in row}
        for key in ("train/loss", "eval/loss", "router/aux_loss", "router/layer_0/expert_7", "router/drift/load_tv"):
            assert key in logged, (stage, key)
        assert set(steps) <= {row["step"] for row in logs if "train/loss" in row} <= set(range(1, 7))
        store = Path(ids["trackio"][stage]["dir"])
        assert store == run["home"] / ".cache" / "huggingface" / "trackio"  # trackio's default store
        for image in ("router/expert_load", "router/drift"):
            media = next(row[image] for row in logs if image in row)
            assert media["_type"] == "trackio.image"
            assert (store / "media" / media["file_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_secret_leaves_the_environment(run):
    """Logs, saved recipe, training arguments, checkpoints, model card, wandb and TensorBoard files, the report,
    the caches under HOME: no file the run wrote holds a sentinel (binary files included), nor the console."""
    from finetune.report import write_report

    write_report(run["dir"])
    files = [p for folder in (run["dir"], run["home"]) for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and (run["dir"] / "export" / "README.md").is_file()
    assert any(p.suffix == ".wandb" for p in files) and any("tfevents" in p.name for p in files)
    if HAS_MLFLOW:  # mlflow's SQLite store and its artifacts
        assert run["dir"] / "mlflow.db" in files and any("mlartifacts" in p.parts for p in files)
    if HAS_TRACKIO:  # trackio's project database and media, under HOME
        assert any(p.name == "finetune-tests.db" for p in files) and any("media" in p.parts for p in files)
    for value in [*SENTINELS.values(), WANDB_SENTINEL]:
        needle = value.encode()
        leaked = [str(p) for p in files if needle in p.read_bytes()]
        assert not leaked, f"{value[:12]}... written to {leaked}"
        assert value not in run["first"] and value not in run["resumed"]


def test_a_recipe_holding_a_secret_is_refused_before_anything_is_written(tmp_path, tiny_recipe, monkeypatch, capsys):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", **TRACKED)
    # the environment `clean_env` gives the child processes above, in this process
    for name in [n for n in os.environ if n.startswith(("WANDB_", "MLFLOW_", "TRACKIO_", "HF_"))]:
        monkeypatch.delenv(name)
    for name, value in {"HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", **SENTINELS}.items():
        monkeypatch.setenv(name, value)
    token = "hf_" + "SENTINELrecipe" * 3  # shaped like a hub token, in no environment variable
    for cmd, override, why in (("run", f"tracking.notes=token {token}", "tracking.notes: looks like a Hugging Face"),
                               ("validate", f"tracking.tags=[{SENTINELS['MY_SERVICE_PASSWORD']}]",
                                "tracking.tags.0: holds the value of $MY_SERVICE_PASSWORD")):
        # in this process (the refusal comes before anything loads; a child process costs seconds of imports)
        code = main([cmd, str(recipe), f"output_dir={tmp_path / 'out'}", override])
        out, err = capsys.readouterr()
        assert code == 2, out + err
        assert "look like secrets" in err and why in err, err
        assert not any(v in out + err for v in [token, *SENTINELS.values()])
    assert not (tmp_path / "out").exists()


def test_secret_detection_and_redaction():
    env = {"MY_API_KEY": "abcdefgh12345678", "TOKENIZERS_PARALLELISM": "false", "HF_TOKEN_PATH": "/a/b/token/path"}
    recipe = {"model": {"name_or_path": "/hub/models--x/snapshots/" + "0123abcd" * 5},
              "tracking": {"notes": "key abcdefgh12345678", "tags": ["hf_" + "x" * 30, "ok"]}}
    assert find_secrets(recipe, env) == ["tracking.notes: holds the value of $MY_API_KEY",
                                         "tracking.tags.0: looks like a Hugging Face token"]
    assert redact(recipe, env)["tracking"] == {"notes": "key <$MY_API_KEY>", "tags": ["<redacted>", "ok"]}
    assert find_secrets({"notes": "wandb key " + "ab12" * 10}, {}) == ["notes: looks like a W&B API key"]


def test_wandb_mode_follows_the_environment_and_the_credentials(tmp_path):
    assert wandb_mode({"HOME": str(tmp_path)})[0] == "offline"
    assert wandb_mode({"HOME": str(tmp_path), "WANDB_API_KEY": "k" * 40})[0] == "online"
    assert wandb_mode({"HOME": str(tmp_path), "WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"})[0] == "offline"
    assert wandb_mode({"HOME": str(tmp_path), "WANDB_MODE": "disabled"})[0] == "disabled"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert has_wandb_credentials({"HOME": str(tmp_path)})
    assert not has_wandb_credentials({"HOME": str(tmp_path), "WANDB_BASE_URL": "https://wandb.example.org"})


def test_mlflow_logs_into_the_run_folder_unless_told_where(tmp_path):
    assert mlflow_tracking_uri(tmp_path, {}) == (f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}", True)
    assert mlflow_tracking_uri(tmp_path, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == ("http://mlflow:5000", False)
    # what is printed and kept in tracking.json never holds a password written into the URI
    assert without_credentials("https://bob:s3cret@mlflow.example.org:5000/x") == "https://mlflow.example.org:5000/x"
    assert without_credentials("databricks") == "databricks"


def test_tracking_keys_are_validated(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", **TRACKED)
    untracked = tiny_recipe(tmp_path / "untracked.yaml", **{**TRACKED, "tracking": None})
    assert load_recipe(untracked).tracking.report_to == ["wandb"]  # the default, as wandb is installed
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        load_recipe(recipe, ["tracking.report_to=[none, wandb]"])
    with pytest.raises(ValueError, match="tracking.report_to.0"):
        load_recipe(recipe, ["tracking.report_to=[comet]"])


def test_a_dashboard_that_is_not_installed_fails_validation(tmp_path, monkeypatch, tiny_recipe):
    """Before anything runs, naming the key and the install command; simulated by hiding the package."""
    import importlib.util

    recipe = tiny_recipe(tmp_path / "recipe.yaml", **TRACKED)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("trackio", "sqlalchemy") else real_find_spec(name, *a))
    with pytest.raises(ValueError) as refused:
        load_recipe(recipe, ["tracking.report_to=[wandb, mlflow, trackio]"])
    message = str(refused.value)
    assert "override 'tracking.report_to=[wandb, mlflow, trackio]': tracking.report_to: 'mlflow' is not installed: " \
           "pip install mlflow-skinny sqlalchemy alembic" in message
    assert "'trackio' is not installed: pip install trackio (the extra finetune[trackio]" in message
