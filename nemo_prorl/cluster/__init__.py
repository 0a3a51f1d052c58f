"""Process placement and actors: the placement plan (plan.py), Ray start/attach with token authentication
(runtime.py) and actor groups placed by the plan (actors.py). Backends and the trainer ask this package for
actors; they do not start processes themselves.

One `ClusterSession` per process holds the run's Ray and is reused by the backends of that process (a
test that builds several policies starts Ray once); it is closed at exit, or by `close_session()`.
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass, field
from typing import Any

from nemo_prorl.cluster.current import current_session, set_session  # noqa: F401  (current_session: re-exported)
from nemo_prorl.cluster.plan import Plan, PlacementError, format_plan, plan_from_config  # noqa: F401
from nemo_prorl.cluster.runtime import CPU_SLOT, RayRuntime, RayStartError, attach, start_private, wait_for_nodes

log = logging.getLogger("nemo_prorl")


@dataclass
class ClusterSession:
    runtime: RayRuntime
    # placement groups per plan, shared by the actors of one run (the policy's ranks and the engines sit
    # on the same devices), with the number of users
    placements: dict[Plan, list[Any]] = field(default_factory=dict)
    # the tag of the run this process drives (cluster/shm.py): its actors name their transfer buffers after it
    run_tag: str = ""

    def place(self, plan: Plan, timeout_s: float) -> Any:
        """The placement groups of `plan` (one per node), created on first use; `release` when done."""
        from nemo_prorl.cluster.actors import NodePlacement

        if plan not in self.placements:
            self.placements[plan] = [NodePlacement(plan, timeout_s), 0]
        self.placements[plan][1] += 1
        return self.placements[plan][0]

    def release(self, placement: Any) -> None:
        for plan, entry in list(self.placements.items()):
            if entry[0] is placement:
                entry[1] -= 1
                if entry[1] <= 0:
                    placement.close()
                    del self.placements[plan]

    def close(self) -> None:
        for placement, _ in list(self.placements.values()):
            placement.close()
        self.placements.clear()
        self.runtime.close()


def session(cfg: Any, plan: Plan) -> ClusterSession:
    """This process's Ray session for `cfg`: reused if it is on the same cluster (cluster.ray_address, or
    a private one), else replaced."""
    from nemo_prorl.cluster.shm import run_tag

    want = cfg.cluster.ray_address
    current = current_session()
    if current is not None:
        same = (not want and current.runtime.private) or want == current.runtime.address
        if same:
            current.run_tag = run_tag(cfg.trainer.output_dir)
            return current
        close_session()
    c = cfg.cluster
    if want:
        rt = attach(want, c.ray_token_file, c.ray_timeout_s)
        lay = plan.layout
        try:  # a launcher's nodes join one by one: all of them, or a named error
            wait_for_nodes(lay.num_nodes, c.ray_timeout_s, resource="GPU" if lay.kind == "gpu" else CPU_SLOT,
                           per_node=float(lay.devices_per_node))
        except RayStartError:
            rt.close()
            raise
    else:
        lay = plan.layout
        # CPU slots are counted, not pinned: a private cluster offers plenty, so that one process can run
        # plans of several sizes (the plan's placement groups take exactly what they need).
        resources = {} if lay.kind == "gpu" else {CPU_SLOT: float(max(lay.devices_per_node, 64))}
        rt = start_private(resources=resources, object_store_gb=c.ray_object_store_gb, dashboard=c.ray_dashboard)
    made = ClusterSession(rt, run_tag=run_tag(cfg.trainer.output_dir))
    set_session(made)
    return made


@atexit.register
def close_session() -> None:
    """Stop this process's actors and placement groups, and its private Ray cluster (if it started one)."""
    s = current_session()
    set_session(None)
    if s is not None:
        s.close()
