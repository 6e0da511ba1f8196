"""A real multi-node Ray cluster on this machine, started and used with the README's
own commands: part actors spread over different nodes, and every heavy phase on
the worker nodes while the driver coordinates from the head."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import tiny_options, untrained_bpd

ROOT = Path(__file__).resolve().parent.parent


def _readme_cluster_block() -> list[str]:
    """The commands of the README's "Run on a cluster" block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Run on a cluster") :]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start : section.index("```", start)]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if shlex.split(line, comments=True)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readmes_cluster_block_works_as_pasted_on_a_head_and_three_worker_nodes(mnist_dir, tmp_path):
    """Its commands, from the README's text, on one machine: a head node with token
    authentication, three worker nodes, the job submitted through the job server and
    spread over the workers. Changed only where one machine must, or to check where
    things ran: ports of their own (another Ray may hold the defaults), the worker
    nodes at this machine's address, carrying a custom resource ``worker`` (as a GPU
    cluster's GPU nodes would) that the job asks for, so that every heavy phase
    stays off the head, the job's storage path and a tiny model, and lines that name
    a <placeholder> are left out."""
    head, dashboard, agent = _free_port(), _free_port(), _free_port()
    storage, nodes = tmp_path / "raylocal-runs", tmp_path / "nodes.json"
    job = tiny_options(  # one CPU a part: three parts and the model service on three nodes of two
        mnist_dir, storage, epochs=2, finetune_epochs=1, progress=False, worker_resource="worker", cpus_per_part=1
    )
    # a block that fails half-way still stops its head: a dead cluster's address file left in /tmp/ray would be
    # joined by any later bare `ray` command
    script = ["set -ex", "trap 'ray stop --force > /dev/null 2>&1 || true' EXIT"]
    for line in _readme_cluster_block():
        if line.startswith("ray start --address"):  # each worker node: one for each part, on this machine
            line = line.split(" #")[0].replace("<head-ip>:6379", f"127.0.0.1:{head}") + " --resources '{\"worker\": 1}'"
            script += [
                f"{line} --dashboard-agent-listen-port {_free_port()} --temp-dir {{temp}}/node{k}" for k in range(3)
            ]
            continue
        if "<" in line:
            continue
        line = line.replace(
            "--port 6379",
            f"--port {head} --dashboard-port {dashboard} --dashboard-agent-listen-port {agent}",
        )
        line = line.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard}").replace("/shared/raylocal-runs", str(storage))
        if "run_async.py" in line:
            line = line.split(" --storage-path")[0] + " " + shlex.join(job)
        if line.startswith("ray stop"):  # before it, while the cluster runs: its nodes, and a client with
            script.append(f"ray list nodes --format json > {shlex.quote(str(nodes))}")  # another token refused
            script.append("if RAY_AUTH_TOKEN=0123456789abcdef ray job list; then exit 3; fi")
        script.append(line)
    assert any(line.startswith("export RAY_AUTH_MODE=token") for line in script), script
    assert script[-1].startswith("ray stop") and script[-2].startswith("if RAY_AUTH_TOKEN="), script
    assert sum(line.startswith("ray start --address") for line in script) == 3, script
    assert any("--placement spread" in line for line in script), script
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}  # as a user's shell
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["HOME"] = str(tmp_path / "home")  # the token goes to ~/.ray/auth_token: a home of its own
    # In a PID namespace of its own: the block's `ray stop` stops every Ray it can
    # see, which must not be this session's; and when the block ends, the kernel
    # ends whatever it left running there.
    # (--kill-child: a block killed at its timeout takes its nodes with it)
    isolated = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if subprocess.run([*isolated, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a PID namespace (unshare --pid, as root) so that `ray stop` sees only its own cluster")
    # Each worker node's Ray files apart, as on machines of their own: nodes sharing one temp directory
    # unpack the job's code into one place, each removing the copy already there (Ray 2.60's working_dir
    # plugin), under the driver and under workers starting in it (a worker that cannot start costs 60 s).
    # Short: Ray's socket paths inside it must stay within 107 bytes.
    temp = tempfile.mkdtemp(prefix="rl-nodes-", dir="/tmp")
    script = [line.replace("{temp}", temp) for line in script]
    try:
        done = subprocess.run(
            [*isolated, "bash", "-c", "\n".join(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "SUCCEEDED" in done.stdout + done.stderr
    # no worker process died starting in a removed copy of the job's code (the raylet says so, and waits)
    assert "have not registered within the timeout" not in done.stdout + done.stderr
    (run,) = storage.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_parts"] == 3
    assert summary["restarts"] == [0, 0, 0]  # no part's actor was restarted
    listed = json.loads(nodes.read_text())
    assert len(listed) == 4
    (head_id,) = [n["node_id"] for n in listed if n["is_head_node"]]
    assert len(set(summary["actor_nodes"])) == 3, summary["actor_nodes"]  # spread: each part on a node of its own
    assert summary["queue_nodes"] == summary["actor_nodes"][1:]  # each inbox on its part's node, not the head
    assert summary["test_bpd"] < untrained_bpd(mnist_dir)
    # the driver ran on the head; the parts, the evaluations and the fine-tune on the worker nodes
    where = summary["where"]
    assert where["driver"]["node_id"] == head_id
    workers = [p["node_id"] for p in where["parts"]] + [where["service"]["node_id"], where["finished"]["node_id"]]
    assert head_id not in workers, where
    assert where["finished"]["phase"] == "ray train worker"  # the fine-tune and the final evaluation
