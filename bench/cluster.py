"""A multi-node Ray cluster on this machine, for the cluster tests and ``bench.search --cluster``.

``ray.cluster_utils.Cluster`` starts each node as processes of its own (a raylet and an object
store per node; the GCS and the dashboard on the head), every one on 127.0.0.1 as long as
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set (conftest and ``bench`` set it; without it Ray
resolves even 127.0.0.1 to the machine's network address). Nodes are added through ``Cluster``
because, under that setting, ``ray start --address`` refuses to add one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from ray.cluster_utils import Cluster

from service.demo import free_port

# A node that stops answering is declared dead after about 2 s (Ray's default: 30 s).
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                 "health_check_timeout_ms": 500}


@dataclass
class RayCluster:
    cluster: Cluster
    gcs_port: int
    dashboard_port: int

    @property
    def address(self) -> str:
        """What ``RAY_ADDRESS`` names."""
        return self.cluster.address

    @property
    def dashboard(self) -> str:
        """The state API's address (``ray.util.state``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def nodes(self) -> list:
        return [self.cluster.head_node, *self.cluster.worker_nodes]

    @property
    def workers(self) -> list:
        return list(self.cluster.worker_nodes)

    def node_ids(self) -> set[str]:
        return {n.node_id for n in self.nodes}

    def kill_raylet(self, node) -> None:
        """SIGKILL a node's raylet: the node is lost (its workers end with it)."""
        for proc in node.all_processes["raylet"]:
            proc.process.kill()

    def kill_head(self) -> None:
        """SIGKILL every process of every node, the head's included (the GCS, the dashboard):
        the other nodes cannot outlive their head."""
        for node in reversed(self.nodes):
            node.kill_all_processes(check_alive=False, allow_graceful=False)

    def stop(self) -> None:
        self.kill_head()


def start_cluster(worker_nodes: int = 1, cpus_per_node: int = 1, gcs_port: int | None = None,
                  dashboard_port: int | None = None, dashboard: bool = True) -> RayCluster:
    """A head and ``worker_nodes`` more nodes, ``cpus_per_node`` CPUs each; the same ports again
    start a new head where a lost one was. ``dashboard``: what Ray's state API reads (the tests
    ask it where actors ran); benchmarks go without its processes."""
    gcs_port, dashboard_port = gcs_port or free_port(), dashboard_port or free_port()
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": cpus_per_node, "gcs_server_port": gcs_port, "include_dashboard": dashboard,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "_system_config": HEALTH_CHECKS})
    for _ in range(worker_nodes):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    return RayCluster(cluster, gcs_port, dashboard_port)


@contextlib.contextmanager
def ray_cluster(**kw) -> Iterator[RayCluster]:
    c = start_cluster(**kw)
    try:
        yield c
    finally:
        c.stop()
