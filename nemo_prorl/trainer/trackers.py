"""Experiment trackers (logger.wandb, logger.mlflow) beside metrics.jsonl and TensorBoard.

MetricsLogger hands each tracker the one metrics dict per step that metrics.jsonl gets. A dashboard is a
view, never a dependency of the run: every tracker call runs on one background thread behind a bounded
queue (full: the item is dropped with a warning), a tracker that fails mid-run is warned about once and
then counted, and closing waits a bounded time. A tracker whose package is missing fails at launch (the
extra to install is named); one that cannot start (bad URI, server down) is a warning and the run goes on
without it. The run ids are kept in the trainer state, so a resumed job continues the same runs: they are
chosen on the training thread before the trackers' thread starts (W&B takes the id it is given; the MLflow
run is found again by its `nemo_prorl.run_key` tag), so the first checkpoint already holds them. A resume
from another run's checkpoint (a fork into a new output_dir) starts new runs (`tracker_ids_for`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import re
import secrets
import string
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Optional

from nemo_prorl.config.schema import WANDB_MODES
from nemo_prorl.registry import Registry
from nemo_prorl.trainer.report import validation_report

log = logging.getLogger("nemo_prorl")

QUEUE_SIZE = 1000  # items (a step's metrics, a report); a 2,000-step run logs ~1 a step: minutes of outage
CLOSE_TIMEOUT_S = 60.0  # at the end of a run: what is queued gets this long to reach the trackers
# W&B's own upload wait at finish (wandb.Settings.finish_timeout), inside ours so that its run is finished
# (the rest stays on disk for `wandb sync`) before we give up on the thread; init_timeout bounds the start.
WANDB_FINISH_TIMEOUT_S, WANDB_INIT_TIMEOUT_S = CLOSE_TIMEOUT_S - 10, 60.0
# MLflow's HTTP client retries 7 times with exponential backoff and waits 120 s per request by default:
# minutes per call against a dead server. Ours run off the training thread, but a stuck call still holds
# the queue; these make a dead server cost seconds. MLflow reads them from os.environ at each request and has
# no per-client setting, so they are set in the process environment, only where unset (the user's own win).
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker name -> pyproject extra and module
RUN_KEY_TAG, OUT_DIR_TAG = "nemo_prorl.run_key", "nemo_prorl.output_dir"  # MLflow run tags
_CREDENTIALS_IN_URI = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


class TrackerError(RuntimeError):
    """A tracker that cannot run as configured; the message names the config key."""


class RunNotFound(RuntimeError):
    """The stored run does not exist on the tracker's server (another server, deleted): a new one is opened."""


def new_id() -> str:
    """A run id in W&B's form (8 base-36 characters), made here so it exists before any tracker call."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def redact(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host`: URIs go into params, events and doctor lines."""
    return _CREDENTIALS_IN_URI.sub(r"\1***@", text)


class Tracker(ABC):
    """One experiment tracker. `prepare` runs on the training thread; every other call comes from the
    TrackerHub's thread, in order."""

    name = ""
    key = ""  # its config section, named in warnings

    def __init__(self) -> None:
        self.notices: list[tuple[str, dict[str, Any]]] = []  # (event, info) from start, for events.jsonl

    def prepare(self, run_ids: dict[str, Any]) -> None:
        """Before the thread starts: put into `run_ids` (saved with each checkpoint) what finds this run
        again. `run_ids` holds what the checkpoint had."""

    @abstractmethod
    def start(self, run_id: Optional[str]) -> str:
        """Open a new run (run_id None) or continue the given one; returns the run's id. Raises RunNotFound
        when the given run does not exist (a new run is opened then); any other error keeps the stored id."""

    @abstractmethod
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    @abstractmethod
    def log_params(self, params: dict[str, Any]) -> None: ...

    @abstractmethod
    def log_text(self, name: str, text: str) -> None: ...

    @abstractmethod
    def log_artifact(self, path: Path, step: int) -> None: ...

    @abstractmethod
    def close(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED (the run crashed) or KILLED (preempted: a requeue continues it)."""


TRACKERS: Registry[Callable[[Any, Path], Tracker]] = Registry("experiment tracker")


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """NaN and inf are left out of the trackers (metrics.jsonl keeps them): MLflow's stores and W&B's
    charts treat them differently, and a chart with a gap says the same."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _netrc_has(host: str) -> bool:
    import netrc

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def wandb_credentials() -> Optional[str]:
    """Where W&B's API key would come from (WANDB_API_KEY or `wandb login`'s netrc entry), or None."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = re.sub(r"^https?://", "", wandb_base_url()).split("/")[0]
    return "netrc" if _netrc_has(host.split(":")[0]) else None


def wandb_mode(mode: str) -> str:
    """logger.wandb.mode resolved: auto is WANDB_MODE when the environment sets it, else online with
    credentials and offline without (`wandb sync` later)."""
    if mode not in WANDB_MODES:
        raise TrackerError(f"logger.wandb.mode={mode!r}: one of {', '.join(WANDB_MODES)}")
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env in ("online", "offline", "disabled", "dryrun"):
            return "offline" if env == "dryrun" else env
        return "online" if wandb_credentials() else "offline"
    return mode


@TRACKERS.register("wandb")
class WandbTracker(Tracker):
    """W&B's step is the trainer's step (no custom x-axis: W&B's own step axis, media and sync all agree).
    W&B's steps only grow, and a resumed run re-runs the steps after its checkpoint: a step at or below the
    last one this run already delivered is not sent again, so W&B keeps the values first logged for it
    (metrics.jsonl, rewritten at the resume, has the re-run's; a rollback's folder keeps the first ones).
    The last delivered step is kept in <dir>/wandb/prorl-last-step-<id>.json (written at each log), and
    online also comes from the server (run.step): each offline folder of a requeued run (one per job, the
    same id) then holds distinct steps, and `wandb sync` of them all, in order, replays nothing."""

    name, key = "wandb", "logger.wandb"

    def __init__(self, cfg: Any, out_dir: Path) -> None:
        super().__init__()
        self.w = cfg.logger.wandb
        self.run_name = self.w.name or cfg.experiment_name
        self.dir = Path(self.w.dir) if self.w.dir else out_dir
        self.out_dir = out_dir
        self.mode = wandb_mode(self.w.mode)
        self.run: Any = None
        self.resuming = False
        self.min_step = 0

    def prepare(self, run_ids: dict[str, Any]) -> None:
        self.resuming = "wandb" in run_ids
        run_ids.setdefault("wandb", new_id())  # wandb.init(id=...) takes it: in the first checkpoint already

    def _step_file(self, run_id: str) -> Path:
        return self.dir / "wandb" / f"prorl-last-step-{run_id}.json"

    def _init(self, run_id: str, mode: str) -> Any:
        import wandb

        # console off: wandb would otherwise wrap the process's stdout/stderr; no system stats sampler thread
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True,
                                  finish_timeout=WANDB_FINISH_TIMEOUT_S, init_timeout=WANDB_INIT_TIMEOUT_S)
        return wandb.init(project=self.w.project, entity=self.w.entity, name=self.run_name, tags=list(self.w.tags),
                          mode=mode, dir=str(self.dir), id=run_id, resume="allow", settings=settings,
                          reinit="create_new")

    def start(self, run_id: Optional[str]) -> str:
        run_id = run_id or new_id()
        if self.mode == "online" and wandb_credentials() is None:  # wandb would prompt for a key on this thread
            raise TrackerError("logger.wandb.mode=online (or WANDB_MODE=online) but no API key: export "
                               "WANDB_API_KEY=... or run `wandb login`, or logger.wandb.mode=offline")
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = self._init(run_id, self.mode)
        except Exception as e:  # noqa: BLE001  online did not start (server, network): keep the data offline
            if self.mode != "online":
                raise
            self.notices.append(("tracker_offline_fallback", {
                "run_id": run_id, "error": f"{type(e).__name__}: {str(e)[:300]}",
                "note": "W&B online did not start: this job logs offline; `wandb sync` its folder later"}))
            self.mode = "offline"
            import wandb

            wandb.teardown()  # else wandb still holds the failed online run: "run ID ... is in use"
            self.run = self._init(run_id, "offline")
        try:
            last = int(json.loads(self._step_file(run_id).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            last = -1
        self.min_step = max(last + 1, int(self.run.step or 0) if self.resuming else 0)
        return str(self.run.id)

    def _delivered(self, step: int) -> None:
        path = self._step_file(str(self.run.id))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, path)  # a kill mid-write leaves the previous value

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.min_step:
            self.run.log(finite(metrics), step=step)
            self._delivered(step)

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_text(self, name: str, text: str) -> None:
        path = self.out_dir / "report" / name  # beside the curves and the table: also a record in the run folder
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def log_artifact(self, path: Path, step: int) -> None:
        import wandb

        if step < self.min_step:
            return
        if path.suffix == ".png":
            self.run.log({f"report/{path.stem}": wandb.Image(str(path))}, step=step)
        else:
            self.run.log({f"report/{path.stem}": wandb.Html(f"<pre>{path.read_text()}</pre>")}, step=step)
        self._delivered(step)

    def close(self, status: str = "FINISHED") -> None:
        if self.run is not None:
            import wandb

            if status == "KILLED":  # preempted: W&B shows it as such, and the requeue resumes it
                self.run.mark_preempting()
            self.run.finish(exit_code=1 if status == "FAILED" else 0)
            self.run = None
            wandb.teardown()  # stops the wandb-core service process: nothing of wandb outlives the run


def mlflow_uri(cfg: Any, out_dir: Path) -> str:
    """logger.mlflow.tracking_uri, or a SQLite store in <output_dir>/mlruns (MLflow 3 refuses new file
    stores: its FileStore is in maintenance mode)."""
    if cfg.logger.mlflow.tracking_uri:
        return cfg.logger.mlflow.tracking_uri
    return f"sqlite:///{(out_dir / 'mlruns' / 'mlflow.db').absolute()}"


def mlflow_key(name: str) -> str:
    """MLflow's metric and param names allow letters, digits, _ - . / and space: val/pass@1 -> val/pass_at_1."""
    return re.sub(r"[^\w\-./ ]", "_", name.replace("@", "_at_"))


@TRACKERS.register("mlflow")
class MlflowTracker(Tracker):
    """MLflow keeps every value of a step: the steps a resume re-runs are logged again, beside the first.
    Each run is tagged with a key chosen on the training thread (saved in the first checkpoint) and the
    output folder: a job whose checkpoint has no run id yet (the server was slow) finds its run by the key."""

    name, key = "mlflow", "logger.mlflow"

    def __init__(self, cfg: Any, out_dir: Path) -> None:
        super().__init__()
        for k, v in MLFLOW_HTTP_ENV.items():
            os.environ.setdefault(k, v)
        m = cfg.logger.mlflow
        self.uri = mlflow_uri(cfg, out_dir)
        self.local = self.uri.startswith("sqlite:") and not m.tracking_uri
        self.out_dir = out_dir.absolute()
        self.artifacts = self.out_dir / "mlruns" / "artifacts"
        self.experiment = m.experiment_name or cfg.experiment_name
        self.run_name = m.run_name or cfg.experiment_name
        self.client: Any = None
        self.run_id = ""
        self.run_key = ""
        self.continued = False  # found again by its key

    def prepare(self, run_ids: dict[str, Any]) -> None:
        self.run_key = run_ids.setdefault("mlflow_run_key", new_id())

    def start(self, run_id: Optional[str]) -> str:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if self.local:
            self.artifacts.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    raise RunNotFound(f"MLflow run {run_id} does not exist at {redact(self.uri)}") from e
                raise  # the server is down or refuses: the stored id is kept for the next job
            self.run_id = run_id
            return run_id
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            self.experiment, artifact_location=self.artifacts.as_uri() if self.local else None)
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'",
                                        max_results=1)  # active runs, RUNNING or FINISHED alike
        if found:  # the checkpoint predates the run's id: the same run, continued
            self.run_id, self.continued = found[0].info.run_id, True
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=self.run_name, tags={
                RUN_KEY_TAG: self.run_key, OUT_DIR_TAG: str(self.out_dir)}).info.run_id
        return self.run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), v, now, step) for k, v in finite(metrics).items()]
        for i in range(0, len(batch), 1000):  # MLflow's log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000], synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # a param is written once: a resumed run's are already there (and MLflow refuses a changed value)
        have = self.client.get_run(self.run_id).data.params
        named = {mlflow_key(k)[:250]: v for k, v in flatten(params).items()}
        new = [Param(k, str(v)[:6000]) for k, v in named.items() if k not in have]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100], synchronous=True)

    def log_text(self, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_artifact(self, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), "report")

    def close(self, status: str = "FINISHED") -> None:
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id, status)


def enabled(cfg: Any) -> list[str]:
    return [name for name in TRACKERS.names() if getattr(cfg.logger, name).enabled]


def require_packages(cfg: Any) -> None:
    """At launch: an enabled tracker whose package is missing fails the run here, not silently later."""
    import importlib.util

    for name in enabled(cfg):
        if importlib.util.find_spec(EXTRAS[name]) is None:
            raise TrackerError(f"logger.{name}.enabled=true but {EXTRAS[name]} is not installed: "
                               f"pip install 'nemo_prorl[{EXTRAS[name]}]' (or set logger.{name}.enabled=false)")
    if cfg.logger.wandb.enabled:
        wandb_mode(cfg.logger.wandb.mode)


def tracker_ids_for(stored: dict[str, Any], ckpt: Path, out_dir: Path) -> dict[str, Any]:
    """The tracker run ids a resume from `ckpt` continues: the checkpoint's, when it lies under this run's
    output_dir (a requeue, a rollback). A checkpoint of another run (`resume=PATH` into a new output_dir: a
    fork) gets new runs, so the fork never writes into its parent's; the parent's ids are kept for the
    `tracker_fork` event (TrackerHub), not saved again."""
    own = {k: v for k, v in stored.items() if k != "forked_from"}
    if not own or Path(ckpt).resolve().is_relative_to(Path(out_dir).resolve()):
        return own
    return {"forked_from": {"checkpoint": str(ckpt), **own}}


def git_commit() -> Optional[str]:
    """The code's git commit (with -dirty for uncommitted changes); None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def placement_text(cfg: Any) -> str:
    """What `prorl plan` prints for this config: which node and device hosts each rank and engine."""
    from nemo_prorl.cluster.plan import format_plan, plan_from_config

    try:
        return format_plan(plan_from_config(cfg))
    except Exception as e:  # noqa: BLE001  the run was already planned at launch; this is only a record
        return f"(no placement plan: {type(e).__name__}: {e})"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _redacted(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _redacted(v) for k, v in d.items()}
    return redact(d) if isinstance(d, str) else d


class TrackerHub:
    """The trackers of a run behind one background thread. `submit` never blocks the training loop: a
    full queue (a tracker stuck on a dead server) drops the item, with a warning. Failures become events
    (`drain_events`, written by MetricsLogger to events.jsonl on the training thread): the first of each
    tracker is logged and recorded, the rest are counted and reported at close."""

    def __init__(self, trackers: list[Tracker], run_ids: dict[str, Any], *, queue_size: int = QUEUE_SIZE,
                 close_timeout_s: float = CLOSE_TIMEOUT_S, title: str = "ProRL training") -> None:
        self.trackers, self.title = trackers, title  # title: of the curves PNG
        self.run_ids = run_ids  # the trainer's dict, saved with each checkpoint: filled in here and as runs start
        self.close_timeout_s = close_timeout_s
        self.failures: dict[str, int] = {t.name: 0 for t in trackers}
        self.dropped = 0
        self.status = "FINISHED"
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        fork = run_ids.pop("forked_from", None)
        if fork:
            self._event("tracker_fork", parent=fork, note="resumed from another run's checkpoint: new tracker "
                        "runs; the parent's are left as they were")
        self.stored = {t.name: run_ids.get(t.name) for t in trackers}  # what the checkpoint had
        for t in trackers:
            t.prepare(run_ids)  # on this thread: the ids are in the next checkpoint, whatever the thread does
        self._thread = threading.Thread(target=self._work, name="prorl-trackers", daemon=True)
        self._thread.start()

    def submit(self, op: str, *args: Any) -> None:
        """Queue `tracker.<op>(*args)` for every live tracker."""
        try:
            self._queue.put_nowait((op, args))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                self._event("tracker_queue_full", warn=True, dropped=op, queue_size=self._queue.maxsize,
                            note="the trackers fall behind (a slow or dead server); items are dropped, counted")

    def submit_report(self, out_dir: Path, step: int) -> None:
        """The curves PNG and the pass@k table of the run so far, made on the trackers' thread (a plot takes
        a second), as artifacts of every tracker."""
        self.submit("report", functools.partial(validation_report, out_dir, step, self.title))

    def drain_events(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            out, self._events = self._events, []
        return out

    def _event(self, kind: str, warn: bool = False, **info: Any) -> None:
        info = _redacted(info)  # an error message may quote a URI with its password
        if warn:
            log.warning("%s: %s", kind, info)
        with self._lock:
            self._events.append((kind, info))

    def _start(self, t: Tracker) -> bool:
        stored = self.run_ids.get(t.name)
        try:
            try:
                run_id = t.start(stored)
            except RunNotFound as e:  # another server, or deleted: a new run; any other error keeps the id
                run_id = t.start(None)
                self._event("tracker_new_run", warn=True, tracker=t.name, lost_run=stored, error=str(e))
            self.run_ids[t.name] = run_id
            for kind, info in t.notices:
                self._event(kind, warn=True, tracker=t.name, **info)
            self._event("tracker_started", tracker=t.name, run_id=run_id,
                        resumed=run_id == self.stored[t.name] or getattr(t, "continued", False))
            return True
        except Exception as e:  # noqa: BLE001  a dashboard that cannot start never stops the run
            self._event("tracker_start_failed", warn=True, tracker=t.name,
                        error=f"{type(e).__name__}: {str(e)[:300]}",
                        fix=f"check {t.key} (e.g. {t.key}.tracking_uri, credentials); training goes on "
                            f"without it (the run id, if any, is kept: the next job continues that run)")
            return False

    def _work(self) -> None:
        live = [t for t in self.trackers if self._start(t)]
        while True:
            op, args = self._queue.get()
            if op == "close":
                break
            if op == "report":  # made here, off the training thread: (op, args) items for every tracker
                try:
                    items = args[0]()
                except Exception as e:  # noqa: BLE001  a plot that fails is no reason to stop
                    self._event("tracker_report_failed", warn=True, error=f"{type(e).__name__}: {e}")
                    continue
            else:
                items = [(op, args)]
            for t in live:
                for item_op, item_args in items:
                    self._call(t, item_op, item_args)
        for t in live:
            self._call(t, "close", (self.status,))

    def _call(self, t: Tracker, op: str, args: tuple) -> None:
        try:
            getattr(t, op)(*args)
        except Exception as e:  # noqa: BLE001  an outage: warned once, then counted
            self.failures[t.name] += 1
            if self.failures[t.name] == 1:
                self._event("tracker_unreachable", warn=True, tracker=t.name, op=op,
                            error=f"{type(e).__name__}: {str(e)[:300]}",
                            note="training goes on; metrics.jsonl stays complete; later failures are counted")

    def close(self, status: str = "FINISHED") -> None:
        """Flush what is queued, close the runs with `status` (FINISHED, FAILED, KILLED); gives up after
        close_timeout_s (a dead server)."""
        self.status = status
        deadline = time.monotonic() + self.close_timeout_s
        while self._thread.is_alive():
            try:
                self._queue.put(("close", ()), timeout=0.5)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._event("tracker_close_timeout", warn=True, seconds=self.close_timeout_s,
                        note="what was still queued is lost to the trackers (metrics.jsonl has it)")
        failed = {k: v for k, v in self.failures.items() if v}
        if failed or self.dropped:
            self._event("tracker_failures", failed_calls=failed, dropped=self.dropped)


def open_trackers(cfg: Any, resolved: Any, out_dir: Path, run_ids: dict[str, Any]) -> Optional[TrackerHub]:
    """The enabled trackers, started on their thread (continuing the runs in `run_ids`), with the run's
    record queued first: the resolved config (params and config.yaml, passwords in URIs redacted), the git
    commit and the placement plan. None when no tracker is enabled."""
    names = enabled(cfg)
    if not names:
        return None
    require_packages(cfg)
    from omegaconf import OmegaConf

    hub = TrackerHub([TRACKERS.get(n, "logger")(cfg, out_dir) for n in names], run_ids,
                     title=f"{cfg.experiment_name}: ProRL training")
    params = _redacted(OmegaConf.to_container(resolved, resolve=True))  # nested: W&B shows sections
    commit = git_commit()
    if commit is not None:
        params["git_commit"] = commit
    hub.submit("log_params", params)
    hub.submit("log_text", "config.yaml", redact(OmegaConf.to_yaml(resolved, resolve=True)))
    hub.submit("log_text", "placement_plan.txt", placement_text(cfg))
    return hub

