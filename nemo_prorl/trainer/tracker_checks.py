"""`prorl doctor`'s lines for the experiment trackers (logger.wandb, logger.mlflow; nemo_prorl/doctor.py
shows them): the package, W&B's mode, credentials and server, the MLflow server or local store."""

from __future__ import annotations

import http.client
import importlib.util
import os
import urllib.request
from pathlib import Path
from typing import Any

from nemo_prorl.trainer.trackers import (EXTRAS, TrackerError, enabled, mlflow_uri, redact, wandb_base_url,
                                         wandb_credentials, wandb_mode)

HEALTH_TIMEOUT_S = 5.0  # GET <WANDB_BASE_URL>/healthz, <tracking_uri>/health

Finding = tuple[str, str, str, str]  # (OK/WARN/FAIL, name, detail, fix)


def _get_ok(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as r:
            return r.status == 200, "answers" if r.status == 200 else f"answered {r.status}"
    except (OSError, ValueError, http.client.HTTPException) as e:  # refused, timeout, DNS; not a URL
        return False, f"not reachable ({type(e).__name__}: {getattr(e, 'reason', e)})"


def tracker_findings(cfg: Any) -> list[Finding]:
    """logger.wandb, logger.mlflow: the package (a missing one fails the launch), W&B's mode, credentials
    and server, the MLflow server's /health or the local store's folder. A dashboard that cannot be reached
    is a WARN: the run goes on without it."""
    names = enabled(cfg)
    if not names:
        return [("OK", "trackers", "logger.wandb, logger.mlflow off (metrics.jsonl and TensorBoard only)", "")]
    out: list[Finding] = []
    for name in names:
        if importlib.util.find_spec(EXTRAS[name]) is None:
            out.append(("FAIL", name, f"logger.{name}.enabled=true but {EXTRAS[name]} is not installed",
                        f"pip install 'nemo_prorl[{EXTRAS[name]}]', or logger.{name}.enabled=false"))
        else:
            out.append(_wandb_finding(cfg) if name == "wandb" else _mlflow_finding(cfg))
    return out


def _wandb_finding(cfg: Any) -> Finding:
    w = cfg.logger.wandb
    try:
        mode = wandb_mode(w.mode)
    except TrackerError as e:
        return ("FAIL", "wandb", str(e), "logger.wandb.mode=auto")
    source = wandb_credentials()
    if mode == "online" and source is None:
        return ("WARN", "wandb", "mode online but no API key (WANDB_API_KEY, `wandb login`): the run would go "
                "on without W&B", "export WANDB_API_KEY=... or run `wandb login` on this node")
    if mode == "offline" and w.mode == "auto" and "WANDB_MODE" not in os.environ:
        return ("WARN", "wandb", "no API key (WANDB_API_KEY, `wandb login`): will run offline",
                "`wandb sync <trainer.output_dir>/wandb/offline-run-*` afterwards, or set WANDB_API_KEY")
    if mode == "online":
        url = f"{wandb_base_url().rstrip('/')}/healthz"
        ok, said = _get_ok(url)
        if not ok:
            return ("WARN", "wandb", f"{redact(url)} {said}: the run would log offline",
                    "check the network or WANDB_BASE_URL; `wandb sync` the offline folder later")
    return ("OK", "wandb", f"mode {mode}{f', API key from {source}' if mode == 'online' else ''}, "
            f"project {w.project}", "")


def _mlflow_finding(cfg: Any) -> Finding:
    uri = mlflow_uri(cfg, Path(cfg.trainer.output_dir))
    shown = redact(uri)
    if uri.startswith(("http://", "https://")):
        ok, said = _get_ok(f"{uri.rstrip('/')}/health")
        return ("OK" if ok else "WARN", "mlflow", f"{shown}: /health {said}", "" if ok else
                "start the server or fix logger.mlflow.tracking_uri; the run would go on without MLflow")
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent.absolute()
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        ok = os.access(folder, os.W_OK)
        return ("OK" if ok else "WARN", "mlflow", f"{shown} ({folder} {'writable' if ok else 'NOT writable'})",
                "" if ok else "logger.mlflow.tracking_uri on a writable folder, or a server")
    return ("OK", "mlflow", f"{shown} (not checked by the doctor)", "")
