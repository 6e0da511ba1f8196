"""A real multi-node Ray cluster on this machine, a job submitted through the Job
Submission API: part actors spread over different nodes, and every heavy phase
on the worker nodes while the driver coordinates from the head."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_options, untrained_bpd

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
    assert r["status"] == "SUCCEEDED", (r.get("logs") or output.decode())[-3000:] + f"\nstages: {r['seconds']}"
    print("the job's stages, seconds from the start:", r["seconds"])  # (pytest -s): where its time goes
    summary = json.loads((storage / "job" / "summary.json").read_text())
    assert len(set(summary["actor_nodes"])) == 2, summary["actor_nodes"]  # spread: different nodes
    assert summary["queue_nodes"] == summary["actor_nodes"][1:]  # part 2's inbox on part 2's node, not the head
    assert summary["test_bpd"] < untrained_bpd(mnist_dir)
    # the driver ran on the head; the parts, the evaluations and the fine-tune on the worker nodes
    where, head = summary["where"], r["head_node_id"]
    assert where["driver"]["node_id"] == head
    workers = [p["node_id"] for p in where["parts"]] + [where["service"]["node_id"], where["finished"]["node_id"]]
    assert head not in workers, where
    assert where["finished"]["phase"] == "ray train worker"  # the fine-tune and the final evaluation


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


def test_the_readmes_cluster_block_works_as_pasted_on_a_local_head_node(mnist_dir, tmp_path):
    """Its commands, from the README's text, on one machine: a head node with token
    authentication, the job submitted through the job server. Changed only where
    one machine must: ports of their own (another Ray may hold the defaults), no
    worker node (its line needs a second machine), the job's storage path and a
    tiny model, no --placement spread (one node), and lines that name a
    <placeholder> are left out."""
    head, dashboard, agent = _free_port(), _free_port(), _free_port()
    storage = tmp_path / "raylocal-runs"
    tiny = shlex.join(tiny_options(mnist_dir, storage, epochs=1, finetune_epochs=0, progress=False))
    # a block that fails half-way still stops its head: a dead cluster's address file left in /tmp/ray would be
    # joined by any later bare `ray` command
    script = ["set -ex", "trap 'ray stop --force > /dev/null 2>&1 || true' EXIT"]
    for line in _readme_cluster_block():
        if "<" in line:
            continue
        line = line.replace(
            "--port 6379", f"--port {head} --dashboard-port {dashboard} --dashboard-agent-listen-port {agent}"
        )
        line = line.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard}").replace("/shared/raylocal-runs", str(storage))
        if "run_async.py" in line:
            line = line.replace(" --placement spread", "").split(" --storage-path")[0] + " " + tiny
        if line.startswith("ray stop"):  # before it, while the head runs: a client with another token is refused
            script.append("if RAY_AUTH_TOKEN=0123456789abcdef ray job list; then exit 3; fi")
        script.append(line)
    assert any(line.startswith("export RAY_AUTH_MODE=token") for line in script), script
    assert script[-1].startswith("ray stop") and script[-2].startswith("if RAY_AUTH_TOKEN="), script
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}  # as a user's shell
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["HOME"] = str(tmp_path / "home")  # the token goes to ~/.ray/auth_token: a home of its own
    # In a PID namespace of its own: the block's `ray stop` stops every Ray it can
    # see, which must not be this session's; and when the block ends, the kernel
    # ends whatever it left running there.
    isolated = ["unshare", "--pid", "--fork", "--mount-proc"]
    if subprocess.run([*isolated, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a PID namespace (unshare --pid, as root) so that `ray stop` sees only its own cluster")
    done = subprocess.run(
        [*isolated, "bash", "-c", "\n".join(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "SUCCEEDED" in done.stdout + done.stderr
    (run,) = storage.iterdir()
    assert json.loads((run / "summary.json").read_text())["n_parts"] == 3
