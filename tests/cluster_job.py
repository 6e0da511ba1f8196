"""Helper for tests/test_cluster.py, run in its own process: start a real
multi-node Ray cluster on this machine (a head with the job server and one CPU,
as a GPU cluster's head would be, and two worker nodes that carry the custom
resource ``worker``, as its GPU nodes would), submit a job through the Job
Submission API, wait for it, print a JSON report, and always tear the cluster
down.

    python tests/cluster_job.py <report.json> -- <job arguments for scripts/run_async.py>
"""

from __future__ import annotations

import json
import shlex
import socket
import sys
import time
from pathlib import Path

import yaml
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(client: JobSubmissionClient, entrypoint: str, runtime_env: dict, wait_s: float = 90.0) -> str:
    """Submit the job; the head's job agent can come up seconds after its nodes
    (later on a loaded machine), and the job server refuses until it has."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1)


def main() -> int:
    report_path = Path(sys.argv[1])
    job_args = sys.argv[sys.argv.index("--") + 1 :]
    report: dict = {"status": None, "seconds": {}}  # seconds: how long each stage took (where a slow run went)
    began = time.time()
    # Every node's dashboard agent on a port of its own: the default one (52365) can
    # be held by another Ray on this machine (the test session's), and the job
    # server then waits forever for the head's agent.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_agent_listen_port": free_port(),
        },
    )  # fmt: skip
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, resources={"worker": 1}, dashboard_agent_listen_port=free_port())
        cluster.wait_for_nodes()
        report["seconds"]["nodes_up"] = round(time.time() - began, 1)
        report["nodes"] = len(cluster.list_all_nodes())
        report["head_node_id"] = cluster.head_node.node_id
        url = f"http://{cluster.head_node.webui_url}"
        client = JobSubmissionClient(url)
        runtime_env = yaml.safe_load((ROOT / "ray_runtime_env.yaml").read_text())
        runtime_env["working_dir"] = str(ROOT)
        entrypoint = "python scripts/run_async.py " + shlex.join(job_args)
        job_id = submit(client, entrypoint, runtime_env)
        report["seconds"]["submitted"] = round(time.time() - began, 1)
        deadline = time.time() + 300
        status = client.get_job_status(job_id)
        while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
            time.sleep(1)
            status = client.get_job_status(job_id)
        report["status"] = str(status.value if hasattr(status, "value") else status)
        report["seconds"]["job_done"] = round(time.time() - began, 1)
        report["logs"] = client.get_job_logs(job_id)[-4000:]
    finally:
        cluster.shutdown()
        report["seconds"]["shut_down"] = round(time.time() - began, 1)
        report_path.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
