"""A real multi-node Ray cluster on this machine, a job submitted through the Job
Submission API: part actors spread over different nodes, and every heavy phase
on the worker nodes while the driver coordinates from the head."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import tiny_options

ROOT = Path(__file__).resolve().parent.parent


def test_job_on_three_nodes_spreads_the_parts_and_leaves_the_head_to_coordinate(mnist_dir, tmp_path):
    storage = tmp_path / "shared-storage"
    job = tiny_options(
        mnist_dir, storage, parts=2, part_spec="1|2", epochs=2, placement="spread", run_name="job",
        progress=False, cpus_per_part=1, finetune_epochs=1, worker_resource="worker",
    )  # fmt: skip
    report = tmp_path / "report.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "cluster_job.py"), str(report), "--", *job],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:  # never leave a cluster behind, also when this test fails
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert report.is_file(), output.decode()[-3000:]
    r = json.loads(report.read_text())
    assert r["nodes"] == 3
    assert r["status"] == "SUCCEEDED", r.get("logs", "")[-3000:]
    summary = json.loads((storage / "job" / "summary.json").read_text())
    assert len(set(summary["actor_nodes"])) == 2, summary["actor_nodes"]  # spread: different nodes
    assert summary["test_bpd"] < 8.0
    # the driver ran on the head; the parts, the evaluations and the fine-tune on the worker nodes
    where, head = summary["where"], r["head_node_id"]
    assert where["driver"]["node_id"] == head
    workers = [p["node_id"] for p in where["parts"]] + [where["service"]["node_id"], where["finished"]["node_id"]]
    assert head not in workers, where
    assert where["finished"]["phase"] == "ray train worker"  # the fine-tune and the final evaluation
