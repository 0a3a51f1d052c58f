"""Compose the run configuration: Hydra over the typed schema, CLI overrides, then value checks.

Any error names the offending key and, where the set is closed, the allowed values."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_prorl.config.errors import ConfigError  # noqa: F401  (re-exported: nemo_prorl.config.loader.ConfigError)
from nemo_prorl.config.schema import ProRLConfig

SCHEMA_NAME = "prorl_schema"


def default_config_dir() -> Path:
    """`$PRORL_CONF_DIR`, else the `conf/` folder of this checkout."""
    env = os.environ.get("PRORL_CONF_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "conf"


def _normalise(overrides: Sequence[str]) -> list[str]:
    # `+experiment=NAME` (append) and `experiment=NAME` (replace the default) mean the same to a user;
    # the defaults list already has an experiment, so Hydra only accepts the second spelling.
    return [o[1:] if o.startswith("+experiment=") else o for o in overrides]


def compose_config(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=ProRLConfig)
    config_dir = Path(config_dir) if config_dir else default_config_dir()
    if not (config_dir / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in config directory {config_dir} (set PRORL_CONF_DIR)")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=_normalise(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e)) from e
    return cfg


def _explain(e: BaseException) -> str:
    """Hydra's message plus the causes it wraps (which name the missing key), and a close match."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).strip()
        if text and text not in parts:
            parts.append(text)
        e = e.__cause__ or e.__context__
    msg = "invalid configuration: " + "\n".join(parts)
    m = re.search(r"Key '([^']+)' not in '([^']+)'", msg)
    if m:
        fields = _schema_fields(m.group(2))
        close = difflib.get_close_matches(m.group(1), fields, n=1)
        if close:
            msg += f"\ndid you mean '{close[0]}'?"
    return msg


def _schema_fields(class_name: str) -> list[str]:
    from nemo_prorl.config import schema

    cls = getattr(schema, class_name, None)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def load_config(
    overrides: Sequence[str] = (), config_dir: str | Path | None = None
) -> tuple[ProRLConfig, DictConfig]:
    """The typed config (for code) and the resolved DictConfig (saved with every checkpoint)."""
    cfg = compose_config(overrides, config_dir)
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from e
    assert isinstance(typed, ProRLConfig)
    from nemo_prorl.config.validate import validate_config

    _resolve_layout(typed, cfg)
    validate_config(typed)
    return typed, cfg


def _resolve_layout(typed: ProRLConfig, cfg: DictConfig) -> None:
    """Check that the run can be placed (nemo_prorl/cluster/plan.py), and fill in what the plan decides
    (`policy.megatron.data_parallel_size: null` -> the number of replicas), in both configs."""
    from nemo_prorl.cluster.plan import PlacementError, plan_from_config
    from nemo_prorl.config.validate import _get

    try:
        plan = plan_from_config(typed)
    except PlacementError as e:
        raise ConfigError(f"invalid configuration:\n  {e.key}={_get(typed, e.key)!r}: {str(e).split(': ', 1)[1]}") \
            from None
    if typed.policy.backend == "megatron" and typed.policy.megatron.data_parallel_size is None:
        typed.policy.megatron.data_parallel_size = plan.data_parallel_size
        cfg.policy.megatron.data_parallel_size = plan.data_parallel_size
