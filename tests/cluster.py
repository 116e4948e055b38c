"""What the cluster tests read off the processes of a Ray cluster (``bench.cluster``)."""

from __future__ import annotations

import contextlib
import ipaddress

import psutil

from bench.cluster import RayCluster


def cluster_processes(c: RayCluster) -> list[psutil.Process]:
    """Every process of the cluster: the nodes' and their descendants (workers, agents)."""
    out = []
    for node in c.nodes:
        for infos in node.all_processes.values():
            for info in infos:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p = psutil.Process(info.process.pid)
                    out += [p, *p.children(recursive=True)]
    return out


def listening_addresses(procs: list[psutil.Process]) -> set[str]:
    """The local addresses these processes listen on (TCP) or receive on (UDP)."""
    pids = {p.pid for p in procs}
    return {conn.laddr.ip for conn in psutil.net_connections(kind="inet")
            if conn.pid in pids and (conn.status == psutil.CONN_LISTEN or not conn.raddr)}


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 too
