"""Local process supervisor: real nats-server and S3 (moto) processes for tests and `cfs dev`.

with NatsCluster(3, tmp_path) as cluster:
    cluster.server("n2").kill9()
    cluster.server("n2").restart(wait=False)
    cluster.wait_healthy()
"""

from cfs.supervisor.errors import SupervisorError
from cfs.supervisor.nats import (
    DEFAULT_MAX_PAYLOAD,
    NatsCluster,
    NatsServer,
    nats_server_binary,
)
from cfs.supervisor.ports import free_port, free_ports
from cfs.supervisor.process import ManagedProcess, kill_all, live_processes
from cfs.supervisor.s3 import S3Server
from cfs.supervisor.site import LocalSite

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "LocalSite",
    "ManagedProcess",
    "NatsCluster",
    "NatsServer",
    "S3Server",
    "SupervisorError",
    "free_port",
    "free_ports",
    "kill_all",
    "live_processes",
    "nats_server_binary",
]
