"""This process's cluster session (nemo_prorl.cluster.session sets it), kept apart so that the modules the
package builds on (actors.py) can read it without importing the package: the imports run one way."""

from __future__ import annotations

from typing import Any, Optional

_SESSION: Optional[Any] = None  # a nemo_prorl.cluster.ClusterSession


def current_session() -> Optional[Any]:
    """The ClusterSession this process drives, or None."""
    return _SESSION


def set_session(session: Optional[Any]) -> None:
    global _SESSION
    _SESSION = session
