"""The sandbox backends by name (`reward.sandbox.backend`): "local" (sandbox.py, this machine) and "remote"
(remote.py, an HTTP sandbox server). This module sits above both and registers both, so the registry
is whole as soon as it is imported, and neither backend imports the other for it. The remote backend's
module is imported when one is built: it is also the server's command (`python -m nemo_prorl.confine.remote`),
which runpy warns about when the package has imported it already."""

from __future__ import annotations

from typing import Callable

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.confine.sandbox import LocalSandbox, Sandbox
from nemo_prorl.registry import Registry

SANDBOXES: Registry[Callable[[SandboxConfig], Sandbox]] = Registry("sandbox backend")
SANDBOXES.register("local")(LocalSandbox)


@SANDBOXES.register("remote")
def remote_sandbox(cfg: SandboxConfig) -> Sandbox:
    from nemo_prorl.confine.remote import RemoteSandbox

    return RemoteSandbox(cfg)


def make_sandbox(cfg: SandboxConfig) -> Sandbox:
    return SANDBOXES.get(cfg.backend, "reward.sandbox.backend")(cfg)
