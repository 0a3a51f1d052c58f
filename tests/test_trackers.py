"""Experiment trackers (nemo_prorl/trainer/trackers.py), real: wandb in offline mode, its run files read
back record by record with wandb's own protobuf schema, and a real MLflow tracking server on 127.0.0.1 read
back through MlflowClient. Each gets every row of metrics.jsonl, a resume continues the same run, and a
server killed mid-run costs warnings, never a step or a row."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_prorl import doctor
from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.trainer.logger import MetricsLogger, read_jsonl, truncate_logs
from nemo_prorl.trainer.trackers import (MLFLOW_HTTP_ENV, Tracker, TrackerError, TrackerHub, mlflow_key,
                                         open_trackers, require_packages, tracker_ids_for, wandb_mode)

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")
pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _no_home(tmp_path, monkeypatch):
    """wandb offline, its folders in tmp_path; no ~/.netrc, no network, no real home. Temporary folders too:
    every process that imports wandb makes two (wandb-media, wandb-artifacts) and leaves them when it is
    killed, so the processes these tests start make them under tmp_path. (Safe here, unlike suite-wide (see
    conftest.py): no test of this file starts Ray or hands a temp folder to another uid.)"""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    for var in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no outbound traffic from the tests
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for var, value in MLFLOW_HTTP_ENV.items():  # restored after each test (MlflowTracker sets them if unset)
        monkeypatch.setenv(var, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class _Server:
    """A real MLflow tracking server (SQLite store, proxied artifacts) on 127.0.0.1, in its own process
    group (uvicorn and its workers end with it). Started again by `ensure` after a test killed it."""

    def __init__(self, root: Path) -> None:
        self.root, self.proc, self.uri = root, None, ""

    def ensure(self) -> tuple[str, subprocess.Popen]:
        if self.proc is None or self.proc.poll() is not None:
            port = _free_port()
            self.uri = f"http://127.0.0.1:{port}"
            env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey job workers
                   "MLFLOW_DISABLE_TELEMETRY": "true"}
            with open(self.root / "server.log", "a") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                     "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                     "--artifacts-destination", str(self.root / "artifacts")],
                    cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            deadline = time.monotonic() + 300
            while not _healthy(self.uri):
                assert self.proc.poll() is None and time.monotonic() < deadline, \
                    (self.root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        return self.uri, self.proc

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(self.proc.pid, sig)  # the group: the server's workers too
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # a child left in the group after the server died
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def _server(tmp_path_factory):
    server = _Server(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(_server):
    """(uri, process) of the module's server, started again if a test killed it."""
    return _server.ensure()


def _cfg(out: Path, *, wandb: bool = False, mlflow: str | None = None) -> ProRLConfig:
    cfg = ProRLConfig(experiment_name="trk")
    cfg.trainer.output_dir = str(out)
    cfg.logger.wandb.enabled = wandb
    cfg.logger.wandb.mode = "auto"  # no credentials here: offline
    cfg.logger.mlflow.enabled = mlflow is not None
    cfg.logger.mlflow.tracking_uri = mlflow or None
    return cfg


def _metrics(step: int) -> dict[str, float]:
    """Synthetic rows: a validation on even steps, a NaN that the trackers leave out."""
    m = {"reward/mean": 0.125 * step, "actor/entropy": 2.0 - 0.0625 * step, "actor/kl": float("nan")}
    if step % 2 == 0:
        m.update({"val/pass@1": 0.25 + step / 16, "val/pass@4": 0.5 + step / 32, "val/reward": 0.375})
    return m


def _run(cfg: ProRLConfig, ids: dict[str, str], steps: range) -> list[dict]:
    """A MetricsLogger with the config's trackers over `steps`, as a (resumed) run would; its events."""
    out = Path(cfg.trainer.output_dir)
    if steps.start > 0:
        truncate_logs(out, steps.start - 1)  # what a resume does: the steps after its checkpoint run again
    logger = MetricsLogger(out, total_steps=steps.stop, start_step=steps.start, tensorboard=False,
                           progress_bar=False, trackers=open_trackers(cfg, OmegaConf.structured(cfg), out, ids))
    for step in steps:
        logger.log(step, _metrics(step))
    logger.close()
    return read_jsonl(out / "events.jsonl")[0]


def _finite_rows_of(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if math.isfinite(v)}


def _finite_rows(out: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k != "step" and math.isfinite(v)}
            for r in read_jsonl(out / "metrics.jsonl")[0]}


# ---------------------------------------------------------------- wandb's run file, read back
def wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's LevelDB-log framing (a 7-byte file header ':W&B', magic 0xBEE1,
    version 0; 32 KiB blocks of chunks, each with a 7-byte header: CRC32, length, type full/first/middle/
    last), each record a `wandb_internal_pb2.Record`."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # the rest of a block too small for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records


def wandb_runs(out: Path) -> list[tuple[str, dict[int, dict], dict]]:
    """Each offline run folder's (run id, history by step, config), in the order they were written."""
    runs = []
    for f in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id, history, config = "", {}, {}
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
            elif kind == "history":
                row: dict = {}
                for i in rec.history.item:  # a media value (image, html) is a dict, one item per field
                    *parents, leaf = list(i.nested_key) or [i.key]
                    node = row
                    for p in parents:
                        node = node.setdefault(p, {})
                    node[leaf] = json.loads(i.value_json)
                step = int(row.pop("_step"))
                history[step] = {k: v for k, v in row.items() if not k.startswith("_")}
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        runs.append((run_id, history, config))
    return runs


def _wandb_metrics(history: dict[int, dict]) -> dict[int, dict[str, float]]:
    return {s: {k: v for k, v in row.items() if isinstance(v, (int, float))} for s, row in history.items()}


def test_wandb_offline_gets_every_row_and_a_resume_continues_the_run(tmp_path):
    out = tmp_path / "run"
    cfg, ids = _cfg(out, wandb=True), {}
    cfg.logger.mlflow.tracking_uri = "http://user:secret@127.0.0.1:1"  # off, but in the logged config
    events = _run(cfg, ids, range(0, 4))
    [(run_id, history, config)] = wandb_runs(out)
    assert ids == {"wandb": run_id} and len(run_id) == 8
    assert _wandb_metrics(history) == _finite_rows(out)  # every finite value of every row; the NaN left out
    assert config["logger"]["wandb"]["enabled"] is True and "git_commit" in config  # the resolved config
    assert config["logger"]["mlflow"]["tracking_uri"] == "http://***@127.0.0.1:1"  # the password redacted
    assert {"report/training_curves", "report/pass_at_k"} <= set(history[2]) and "report/training_curves" in history[3]
    files = next((out / "wandb").glob("offline-run-*/files"))
    assert {"config.yaml", "placement_plan.txt"} <= {p.name for p in files.iterdir()}
    assert "torch" in (files / "placement_plan.txt").read_text()  # the embedded run's plan: the torch engine
    assert "secret" not in (files / "config.yaml").read_text()
    kinds = [e["event"] for e in events]
    assert "tracker_started" in kinds and not {"tracker_start_failed", "tracker_unreachable"} & set(kinds), events

    events = _run(cfg, ids, range(2, 6))  # resumed from a step-1 checkpoint: steps 2 and 3 run again
    (first_id, first, _), (second_id, second, _) = wandb_runs(out)
    assert second_id == first_id == ids["wandb"]  # the same run continues: no second run
    assert {"step": 5, "event": "tracker_started", "tracker": "wandb", "run_id": first_id, "resumed": True} \
        in events, events
    # the second folder holds only steps after the last one delivered (3): `wandb sync` replays nothing
    assert sorted(first) == [0, 1, 2, 3] and sorted(second) == [4, 5]
    rows, first_rows = _finite_rows(out), {s: _finite_rows_of(_metrics(s)) for s in range(4)}
    assert _wandb_metrics(first) == first_rows and _wandb_metrics(second) == {s: rows[s] for s in (4, 5)}


def test_mode_auto_is_online_only_with_credentials(tmp_path, monkeypatch):
    assert wandb_mode("auto") == "offline"
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert wandb_mode("auto") == "online"  # `wandb login` wrote the key there
    with pytest.raises(TrackerError, match="logger.wandb.mode='onlin'"):
        wandb_mode("onlin")


def test_wandb_mode_in_the_environment_wins_in_auto_and_online_needs_a_key(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled" and wandb_mode("offline") == "offline"  # the config's own mode wins
    monkeypatch.setenv("WANDB_MODE", "online")
    out = tmp_path / "run"
    ids: dict = {}
    events = _run(_cfg(out, wandb=True), ids, range(0, 2))  # online, no key: no login prompt, a warning
    [failed] = [e for e in events if e["event"] == "tracker_start_failed"]
    assert failed["tracker"] == "wandb" and "no API key" in failed["error"], failed
    assert sorted(_finite_rows(out)) == [0, 1] and not (out / "wandb").exists()


def test_wandb_online_that_cannot_start_logs_offline(tmp_path, monkeypatch):
    """An API key, but the server (WANDB_BASE_URL: a closed 127.0.0.1 port) does not answer: the job logs
    offline, with an event, and its folder is there for `wandb sync`."""
    from nemo_prorl.trainer import trackers

    monkeypatch.setattr(trackers, "WANDB_INIT_TIMEOUT_S", 3.0)  # wandb retries until then
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_free_port()}")
    out, ids = tmp_path / "run", {}
    cfg = _cfg(out, wandb=True)
    cfg.logger.wandb.mode = "online"
    events = _run(cfg, ids, range(0, 2))
    [fallback] = [e for e in events if e["event"] == "tracker_offline_fallback"]
    assert fallback["run_id"] == ids["wandb"] and "tracker_start_failed" not in [e["event"] for e in events]
    [(run_id, history, _)] = wandb_runs(out)
    assert run_id == ids["wandb"] and _wandb_metrics(history) == _finite_rows(out)


def test_a_fork_starts_new_runs_and_a_requeue_continues_them(tmp_path):
    parent, fork = tmp_path / "parent", tmp_path / "fork"
    stored = {"wandb": "abcd1234", "mlflow": "f" * 32, "mlflow_run_key": "k1"}
    assert tracker_ids_for(stored, fork / "checkpoints" / "step_000003", fork) == stored  # a requeue
    forked = tracker_ids_for(stored, parent / "checkpoints" / "step_000003", fork)  # resume=PATH of another run
    assert forked == {"forked_from": {"checkpoint": str(parent / "checkpoints" / "step_000003"), **stored}}
    events = _run(_cfg(fork, wandb=True), forked, range(0, 2))
    assert "forked_from" not in forked and forked["wandb"] not in ("abcd1234", "") and len(forked["wandb"]) == 8
    [event] = [e for e in events if e["event"] == "tracker_fork"]
    assert event["parent"]["wandb"] == "abcd1234"
    assert [run_id for run_id, _, _ in wandb_runs(fork)] == [forked["wandb"]]


def test_an_enabled_tracker_without_its_package_fails_at_launch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError, as when not installed
    with pytest.raises(TrackerError, match=r"logger.mlflow.enabled=true .* pip install 'nemo_prorl\[mlflow\]'"):
        require_packages(_cfg(tmp_path, mlflow="http://127.0.0.1:1"))


class _Stuck(Tracker):
    """A tracker whose server hangs: every log waits until released."""

    name, key = "stuck", "logger.stuck"

    def __init__(self) -> None:
        super().__init__()
        self.release, self.logged = threading.Event(), []

    def start(self, run_id):
        return "r1"

    def log(self, step, metrics):
        self.release.wait(30)
        self.logged.append(step)

    def log_params(self, params):
        pass

    def log_text(self, name, text):
        pass

    def log_artifact(self, path, step):
        pass

    def close(self, status="FINISHED"):
        pass


def test_a_hung_tracker_never_blocks_the_loop(tmp_path):
    """The queue is bounded: items beyond it are dropped and counted, with one warning; close gives up
    after its timeout. Every row still reaches metrics.jsonl."""
    stuck = _Stuck()
    hub = TrackerHub([stuck], {}, queue_size=3, close_timeout_s=1.0)
    logger = MetricsLogger(tmp_path, total_steps=20, start_step=0, tensorboard=False, progress_bar=False,
                           trackers=hub)
    for step in range(1, 21):
        logger.log(step, {"reward/mean": float(step)})
    logger.close()  # returns after ~1 s: the hung call is left behind on its daemon thread
    stuck.release.set()  # the server answers again: the thread takes what is queued, then our close ends it
    hub._queue.put(("close", ()), timeout=10)
    hub._thread.join(30)
    assert not hub._thread.is_alive()
    events = read_jsonl(tmp_path / "events.jsonl")[0]
    kinds = [e["event"] for e in events]
    assert kinds.count("tracker_queue_full") == 1 and "tracker_close_timeout" in kinds, kinds
    [counted] = [e for e in events if e["event"] == "tracker_failures"]
    # 20 steps and the closing report: 3 queued, at most 1 in the hung call, the rest dropped
    assert 17 <= counted["dropped"] <= 18, counted
    assert sorted(_finite_rows(tmp_path)) == list(range(1, 21))


# ---------------------------------------------------------------- MLflow, a real server
def _mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, mlflow_key(key)))


def test_an_unreachable_server_at_start_is_a_warning_naming_the_key(tmp_path):
    out = tmp_path / "run"
    events = _run(_cfg(out, mlflow=f"http://127.0.0.1:{_free_port()}"), {}, range(0, 3))
    [failed] = [e for e in events if e["event"] == "tracker_start_failed"]
    assert failed["tracker"] == "mlflow" and "logger.mlflow" in failed["fix"], failed
    assert "Connection refused" in failed["error"] or "Max retries" in failed["error"], failed
    assert sorted(_finite_rows(out)) == [0, 1, 2]  # the run went on; the JSONL is complete


def test_mlflow_server_gets_every_row_artifacts_and_a_resume_continues_the_run(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    uri, _ = mlflow_server
    out = tmp_path / "run"
    cfg, ids = _cfg(out, mlflow=uri), {}
    cfg.experiment_name = "trk_resume"
    _run(cfg, ids, range(0, 4))
    client = MlflowClient(uri)
    run = client.get_run(ids["mlflow"])
    rows = _finite_rows(out)
    for key in ("reward/mean", "actor/entropy", "val/pass@1", "val/pass@4"):
        assert _mlflow_history(uri, run.info.run_id, key) == [(s, r[key]) for s, r in rows.items() if key in r]
    assert "actor/kl" not in run.data.metrics  # NaN left out
    assert run.data.params["logger.mlflow.tracking_uri"] == uri and "git_commit" in run.data.params
    assert run.info.status == "FINISHED"
    listed = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"config.yaml", "placement_plan.txt", "report/training_curves.png", "report/pass_at_k.txt"} <= listed

    _run(cfg, ids, range(2, 6))  # resumed from a step-1 checkpoint: steps 2 and 3 are logged again
    [only] = client.search_runs([run.info.experiment_id])
    assert only.info.run_id == ids["mlflow"] == run.info.run_id and only.info.status == "FINISHED"
    rows = _finite_rows(out)
    got = _mlflow_history(uri, only.info.run_id, "reward/mean")
    assert [s for s, _ in got] == [0, 1, 2, 2, 3, 3, 4, 5]  # MLflow keeps both values of a re-run step
    assert dict(got) == {s: r["reward/mean"] for s, r in rows.items()}


def test_mlflow_finds_its_run_by_key_and_replaces_only_a_missing_one(tmp_path, mlflow_server):
    """A checkpoint written before the MLflow run existed holds its key: the next job finds that run. A
    stored run the server does not have is replaced (an event says it); a server that cannot be reached
    keeps the stored id."""
    from mlflow import MlflowClient

    uri, _ = mlflow_server
    out = tmp_path / "run"
    cfg, ids = _cfg(out, mlflow=uri), {}
    cfg.experiment_name = "trk_key"
    _run(cfg, ids, range(0, 2))
    run_id = ids["mlflow"]
    early = {"mlflow_run_key": ids["mlflow_run_key"]}  # the first checkpoint, before the thread had started
    events = _run(cfg, early, range(2, 3))
    assert early["mlflow"] == run_id
    assert {"step": 2, "event": "tracker_started", "tracker": "mlflow", "run_id": run_id, "resumed": True} in events
    client = MlflowClient(uri)
    [only] = client.search_runs([client.get_experiment_by_name("trk_key").experiment_id])
    assert [s for s, _ in _mlflow_history(uri, run_id, "reward/mean")] == [0, 1, 2]

    gone = {"mlflow": "0" * 32, "mlflow_run_key": "gone0001"}
    events = _run(cfg, gone, range(3, 4))
    [new] = [e for e in events if e["event"] == "tracker_new_run"]
    assert new["lost_run"] == "0" * 32 and gone["mlflow"] not in ("0" * 32, run_id), (new, gone)

    down = dict(ids)
    cfg.logger.mlflow.tracking_uri = f"http://user:secret@127.0.0.1:{_free_port()}"
    events = _run(cfg, down, range(4, 5))
    assert down == ids  # kept: the next job continues the run
    [failed] = [e for e in events if e["event"] == "tracker_start_failed"]
    assert "secret" not in json.dumps(events), failed


def test_a_crashed_run_is_failed_and_a_preempted_one_killed(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    uri, _ = mlflow_server
    statuses = []
    for how in ("crash", "preempt"):
        out, ids = tmp_path / how, {}
        cfg = _cfg(out, mlflow=uri)
        logger = MetricsLogger(out, total_steps=2, start_step=0, tensorboard=False, progress_bar=False,
                               trackers=open_trackers(cfg, OmegaConf.structured(cfg), out, ids))
        with contextlib.suppress(RuntimeError):
            try:
                logger.log(0, _metrics(0))
                if how == "crash":
                    raise RuntimeError("a step failed")
                logger.event(0, "preempted", signal="SIGUSR1")
            finally:  # as ProRLTrainer.train closes its logger
                logger.close()
        statuses.append(MlflowClient(uri).get_run(ids["mlflow"]).info.status)
    assert statuses == ["FAILED", "KILLED"]


def test_prorl_train_with_both_trackers_resumed_once(tiny_model_dir, tmp_path, mlflow_server):
    """The tiny run end to end: W&B (offline) and MLflow (the server) get the trainer's rows; the run ids
    live in the checkpoint's trainer state, and the resumed job continues both runs; a fork (resume=PATH into a
    new output_dir) opens new ones."""
    from mlflow import MlflowClient

    from nemo_prorl.config import load_config
    from nemo_prorl.train import run_training
    from tests.conftest import TINY_OVERRIDES

    uri, _ = mlflow_server
    run = tmp_path / "run"
    args = [*TINY_OVERRIDES, f"model.path={tiny_model_dir}", f"trainer.output_dir={run}", "experiment_name=trk_e2e",
            "validation.every_n_steps=1", "trainer.checkpoint_every_n_steps=1", "trainer.tensorboard=false",
            "logger.wandb.enabled=true", "logger.mlflow.enabled=true", f"logger.mlflow.tracking_uri={uri}"]
    run_training(*load_config([*args, "trainer.num_steps=2"]))
    first = json.loads((run / "checkpoints" / "step_000001" / "trainer_state.json").read_text())["trackers"]
    # chosen before the trackers' thread starts: in the first checkpoint, however slow the thread
    assert {"wandb", "mlflow_run_key"} <= set(first), first
    ids = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())["trackers"]
    run_training(*load_config([*args, "trainer.num_steps=3", "resume=auto"]))
    last = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json").read_text())["trackers"]

    rows = read_jsonl(run / "metrics.jsonl")[0]
    client = MlflowClient(uri)
    [only] = client.search_runs([client.get_experiment_by_name("trk_e2e").experiment_id])  # found again
    assert only.info.status == "FINISHED" and only.data.tags["nemo_prorl.run_key"] == first["mlflow_run_key"]
    assert only.data.tags["nemo_prorl.output_dir"] == str(run.absolute())
    ids["mlflow"] = only.info.run_id
    for state in (first, ids, last):  # the MLflow id arrives with the thread: in a checkpoint or not yet
        assert state["wandb"] == first["wandb"] and state.get("mlflow", only.info.run_id) == only.info.run_id
    for key in ("reward/mean", "val/pass@1", "actor/entropy"):
        assert _mlflow_history(uri, ids["mlflow"], key) == [(r["step"], r[key]) for r in rows if key in r], key
    assert [s for s, _ in _mlflow_history(uri, ids["mlflow"], "val/pass@1")] == [0, 1, 2, 3]
    (first_id, hist1, _), (second_id, hist2, _) = wandb_runs(run)
    assert first_id == second_id == ids["wandb"] and sorted(hist1) == [0, 1, 2] and sorted(hist2) == [3]
    assert {**_wandb_metrics(hist1), **_wandb_metrics(hist2)} == _finite_rows(run)
    events = [e["event"] for e in read_jsonl(run / "events.jsonl")[0]]
    assert events.count("tracker_started") == 4 and "tracker_unreachable" not in events, events

    fork = tmp_path / "fork"  # resume=PATH of this run into a new output_dir: new tracker runs
    fork_args = [a for a in args if not a.startswith("trainer.output_dir=")]
    run_training(*load_config([*fork_args, f"trainer.output_dir={fork}", "trainer.num_steps=3",
                               f"resume={run / 'checkpoints' / 'step_000002'}"]))
    forked = json.loads((fork / "checkpoints" / "step_000003" / "trainer_state.json").read_text())["trackers"]
    assert forked["wandb"] != ids["wandb"] and forked["mlflow_run_key"] != first["mlflow_run_key"], forked
    [event] = [e for e in read_jsonl(fork / "events.jsonl")[0] if e["event"] == "tracker_fork"]
    assert event["parent"]["wandb"] == ids["wandb"]
    assert len(client.search_runs([client.get_experiment_by_name("trk_e2e").experiment_id])) == 2


# ---------------------------------------------------------------- prorl doctor
@contextlib.contextmanager
def _healthz_server():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  http.server's name
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _doctor(cfg: ProRLConfig) -> dict[str, doctor.Finding]:
    return {f.name: f for f in doctor.trackers(cfg)}


def test_doctor_checks_the_configured_trackers(tmp_path, monkeypatch, mlflow_server):
    uri, _ = mlflow_server
    assert [f.status for f in doctor.trackers(_cfg(tmp_path))] == [doctor.OK]  # none configured
    found = _doctor(_cfg(tmp_path, wandb=True, mlflow=uri))
    assert found["mlflow"].status == doctor.OK and "/health answers" in found["mlflow"].detail
    assert found["wandb"].status == doctor.WARN and "will run offline" in found["wandb"].detail
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with _healthz_server() as base:
        monkeypatch.setenv("WANDB_BASE_URL", base)  # a W&B server that answers /healthz, on 127.0.0.1
        found = _doctor(_cfg(tmp_path, wandb=True, mlflow=f"http://user:secret@127.0.0.1:{_free_port()}"))
    assert found["wandb"].status == doctor.OK and "mode online, API key from WANDB_API_KEY" in found["wandb"].detail
    assert found["mlflow"].status == doctor.WARN and "not reachable" in found["mlflow"].detail
    assert "secret" not in found["mlflow"].detail and "http://***@127.0.0.1" in found["mlflow"].detail
    assert "logger.mlflow.tracking_uri" in found["mlflow"].fix
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    found = _doctor(_cfg(tmp_path, wandb=True))
    assert found["wandb"].status == doctor.WARN and "/healthz not reachable" in found["wandb"].detail, found
    assert _doctor(_cfg(tmp_path, mlflow="http://bad host:x"))["mlflow"].status == doctor.WARN  # no traceback
    assert _doctor(_cfg(tmp_path / "local", mlflow=""))["mlflow"].status == doctor.OK  # a writable local store
    monkeypatch.setitem(sys.modules, "wandb", None)
    found = _doctor(_cfg(tmp_path, wandb=True))
    assert found["wandb"].status == doctor.FAIL and "nemo_prorl[wandb]" in found["wandb"].fix


DOCTOR_MEGATRON_ONLY = """
import contextlib, sys
from nemo_prorl import cli, doctor
doctor.CHECKS[:] = [doctor.megatron_core]
if sys.argv[1] == "unquieted":
    doctor._quiet_loggers = contextlib.nullcontext
sys.exit(cli.main(["doctor", "--no-engine-start", "trainer.output_dir=" + sys.argv[2]]))
"""


def test_doctor_prints_no_megatron_info_lines(tmp_path):
    """`prorl doctor` (the CLI's logging: INFO to stderr) with its megatron-core check alone. Run with
    "unquieted" (the doctor's quieting off), the same process prints megatron-core 0.16's three "Megatron-FSDP"
    INFO lines: this test fails without the fix (checked when it was written; a second process costs ~20 s)."""
    proc = subprocess.run([sys.executable, "-c", DOCTOR_MEGATRON_ONLY, "quieted", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "megatron-core      0.16" in proc.stdout, out
    assert "INFO megatron" not in out and "Megatron-FSDP" not in out, out


def test_a_server_killed_mid_run_costs_warnings_not_steps(tmp_path, mlflow_server):
    """It kills the module's server (the fixture starts it again for the next test)."""
    uri, proc = mlflow_server
    out = tmp_path / "run"
    cfg, ids = _cfg(out, mlflow=uri), {}
    cfg.experiment_name = "trk_outage"
    logger = MetricsLogger(out, total_steps=8, start_step=0, tensorboard=False, progress_bar=False,
                           trackers=open_trackers(cfg, OmegaConf.structured(cfg), out, ids))
    for step in range(3):
        logger.log(step, _metrics(step))
    deadline = time.monotonic() + 120
    while len(_mlflow_history(uri, ids.get("mlflow", ""), "reward/mean") if "mlflow" in ids else []) < 3:
        assert time.monotonic() < deadline, "the first steps never reached the server"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    t0 = time.monotonic()
    for step in range(3, 8):
        logger.log(step, _metrics(step))
    logger.close()
    print(f"outage: 5 steps and close took {time.monotonic() - t0:.1f}s")
    assert sorted(_finite_rows(out)) == list(range(8))  # the JSONL is complete
    events = read_jsonl(out / "events.jsonl")[0]
    assert ids["mlflow"]  # the stored id stays: a later job continues the run
    unreachable = [e for e in events if e["event"] == "tracker_unreachable"]
    assert len(unreachable) == 1 and unreachable[0]["tracker"] == "mlflow", events  # warned once
    [counted] = [e for e in events if e["event"] == "tracker_failures"]
    assert counted["failed_calls"]["mlflow"] >= 5, counted  # then counted: the steps, the report, the close
