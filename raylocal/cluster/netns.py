"""A real network on one machine: network namespaces joined by kernel-shaped links.

Each node is a network namespace with one address in 198.51.100.0/24 (TEST-NET-2,
reserved for documentation: no real host uses it) on a veth pair whose other end
sits on a bridge in a hub namespace. Each node's link is shaped in the kernel
with ``tbf`` at its own rate, in both directions (the node's end shapes what it
sends, the hub's end what it receives). Nothing is routed out: the namespaces
reach each other and nothing else. Everything is torn down on exit, on an
error and on Ctrl-C, processes first.

    node 1 ──veth (tbf 10mbit)──┐
    node 2 ──veth (tbf 10mbit)──┤ br0 (hub namespace)
    node 3 ──veth (tbf 100mbit)─┘

Needs root (``ip netns``); ``available()`` says whether this machine allows it.
``python -m raylocal.cluster.netns`` starts a Ray cluster across such nodes and runs a
command on its head (``scripts/real_cluster.sh``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylocal.errors import ClusterError

# the ray command of this Python's environment (a venv's bin need not be on PATH)
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"
SUBNET = "198.51.100"  # TEST-NET-2 (RFC 5737): documentation only, never a real host


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def available() -> str | None:
    """None where namespaces can be made here, else why not (one line)."""
    probe = f"rl-probe-{os.getpid()}"
    try:
        done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    except FileNotFoundError:
        return "network namespaces need iproute2's `ip`, which is not installed"
    if done.returncode != 0:
        return f"network namespaces are not permitted here ({done.stderr.strip()}); they need root"
    _ip("netns", "del", probe, check=False)
    return None


def _sysctl(name: str) -> str | None:
    """A kernel setting of this process's namespace, as ``sysctl -n`` shows it (None off Linux)."""
    path = Path("/proc/sys", *name.split("."))
    return path.read_text().strip() if path.is_file() else None


def congestion_controls() -> list[str]:
    """The TCP congestion controls this kernel offers (loaded ones)."""
    return (_sysctl(AVAILABLE_SYSCTL) or "").split()


def check_congestion(name: str | None) -> None:
    """A congestion control this kernel offers and lets a namespace take, or None (the host's default)."""
    if name is None:
        return
    if name not in congestion_controls():
        raise ClusterError(f"TCP congestion control {name!r} is not one this kernel offers: "
                           f"{', '.join(congestion_controls())}")  # fmt: skip
    allowed = (_sysctl(ALLOWED_SYSCTL) or "").split()
    if name not in allowed:  # a namespace other than the host's may take only these
        raise ClusterError(
            f"TCP congestion control {name!r} is not allowed in a namespace on this host (allowed: "
            f"{' '.join(allowed)}); as root: sysctl -w {ALLOWED_SYSCTL}='{' '.join([*allowed, name])}'"
        )


def host_congestion() -> str:
    """The host's TCP congestion control, which a namespace made now takes ("unknown" off Linux)."""
    return _sysctl(CONGESTION_SYSCTL) or "unknown"


def rate_bits(rate: str) -> float:
    """Bits per second of a ``tc`` rate such as 10mbit, 500kbit or 1gbit."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate.lower())
    if not m:
        raise ClusterError(f"link rate {rate!r} is not like 10mbit, 500kbit or 1gbit")
    return float(m.group(1)) * {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[m.group(2)]


CONGESTION_SYSCTL = "net.ipv4.tcp_congestion_control"
ALLOWED_SYSCTL = "net.ipv4.tcp_allowed_congestion_control"
AVAILABLE_SYSCTL = "net.ipv4.tcp_available_congestion_control"
QUEUE_MS = 100.0  # the token bucket's queue, in ms of the rate: a shallow buffer, which TCP overflows


def tbf_args(rate: str, queue_ms: float = QUEUE_MS) -> list[str]:
    """``tc`` arguments of a token bucket at ``rate`` (e.g. 10mbit): a burst of a
    tick's worth of bytes (at least 32 kB, so that a fast link is not held below
    its rate), and a queue of at most ``queue_ms`` (what overflows is dropped)."""
    if not queue_ms > 0:
        raise ClusterError(f"a link's queue must hold some ms, not {queue_ms!r}")
    burst = max(int(rate_bits(rate) / 8 / 100), 32 * 1024)
    return ["tbf", "rate", rate, "burst", str(burst), "latency", f"{queue_ms:g}ms"]


@dataclass
class Network:
    """``len(rates)`` nodes, node k's link shaped at ``rates[k]`` (None: unshaped).
    A context manager: ``with Network(["10mbit", "10mbit"]) as net: ...``."""

    rates: Sequence[str | None]
    queue_ms: float = QUEUE_MS
    congestion: str | None = None  # TCP's congestion control in every namespace (None: the host's default)
    tag: str = field(default_factory=lambda: f"rl{os.getpid() % 100000}")
    made: list[str] = field(default_factory=list)  # namespaces, in the order made

    @property
    def hub(self) -> str:
        return f"{self.tag}-hub"

    def node(self, k: int) -> str:
        return f"{self.tag}-n{k}"

    def gloo_env(self, k: int) -> dict[str, str]:
        """What a gloo process on node k needs: gloo binds where the host name resolves,
        outside the namespace, unless told the node's own veth."""
        return {"GLOO_SOCKET_IFNAME": self.veth(k)}

    def veth(self, k: int) -> str:
        """Node k's end of its veth pair (the hub's end adds an ``o``)."""
        return f"{self.tag}n{k}i"

    def link_ends(self, k: int) -> list[tuple[str, str, str]]:
        """Node k's veth pair, each end as (namespace, device, what its qdisc shapes):
        node k's own end shapes what it sends, the hub's end what is sent to it."""
        inner = self.veth(k)
        return [(self.node(k), inner, "sent"), (self.hub, inner[:-1] + "o", "received")]

    @staticmethod
    def address(k: int) -> str:
        return f"{SUBNET}.{k + 1}"

    def __enter__(self) -> Network:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _add(self, name: str) -> None:
        _ip("netns", "add", name)
        self.made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        if self.congestion:
            setting = f"{CONGESTION_SYSCTL}={self.congestion}"
            done = subprocess.run(
                ["ip", "netns", "exec", name, "sysctl", "-qw", setting], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise ClusterError(f"TCP congestion control {self.congestion!r}: {done.stderr.strip()}")

    def congestion_control(self) -> str:
        """The TCP congestion control node 0's namespace runs (a new namespace takes the host's default)."""
        done = self.run(0, ["sysctl", "-n", CONGESTION_SYSCTL], capture_output=True, text=True)
        return done.stdout.strip() or "unknown"

    def up(self) -> None:
        check_congestion(self.congestion)
        self._add(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for k, rate in enumerate(self.rates):
            self._add(self.node(k))
            (_, inner, _), (_, outer, _) = self.link_ends(k)
            _ip("link", "add", inner, "netns", self.node(k), "type", "veth", "peer", "name", outer, "netns", self.hub)
            _ip("-n", self.node(k), "addr", "add", f"{self.address(k)}/24", "dev", inner)
            _ip("-n", self.node(k), "link", "set", inner, "up")
            _ip("-n", self.hub, "link", "set", outer, "master", "br0")
            _ip("-n", self.hub, "link", "set", outer, "up")
            if rate:
                for ns, dev, _ in self.link_ends(k):
                    done = subprocess.run(
                        ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf_args(rate, self.queue_ms)],
                        capture_output=True, text=True,
                    )  # fmt: skip
                    if done.returncode != 0:
                        raise ClusterError(f"tc tbf {rate} on {dev}: {done.stderr.strip()}")

    def down(self) -> None:
        """Every process in the namespaces, then the namespaces (their links go with them)."""
        for name in reversed(self.made):
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
        self.made = []

    def dropped(self) -> dict[str, int]:
        """Packets each shaped link's tbf has dropped so far: ``"n<k> sent"`` for what
        node k sends, ``"n<k> received"`` for what is sent to it (its hub end's)."""
        counts = {}
        for k, rate in enumerate(self.rates):
            if not rate:
                continue
            for ns, dev, way in self.link_ends(k):
                shown = subprocess.run(
                    ["tc", "-s", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True
                )
                m = re.search(r"dropped (\d+)", shown.stdout)
                if shown.returncode != 0 or m is None:
                    raise ClusterError(f"tc -s qdisc show dev {dev}: {shown.stderr.strip() or shown.stdout.strip()}")
                counts[f"n{k} {way}"] = int(m.group(1))
        return counts

    def popen(self, k: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """``argv`` in node k's namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.node(k), *argv], **kwargs)

    def run(self, k: int, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.node(k), *argv], **kwargs)


def leftovers(tag: str) -> list[str]:
    """Namespaces and links of ``tag`` that still exist (none after ``down``)."""
    spaces = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = _ip("-o", "link", check=False).stdout
    return [n for n in spaces if n.startswith(tag)] + re.findall(rf"\d+: ({re.escape(tag)}\S*?)[@:]", links)


_SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    n += len(b)
print(n, flush=True)
"""

_SOURCE = """
import socket, sys, time
payload = b"x" * int(sys.argv[2])
c = socket.create_connection((sys.argv[1], 5201), timeout=60)
began = time.time(); t = time.perf_counter(); c.sendall(payload); c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(time.perf_counter() - t, began, flush=True)
"""


def _sink(net: Network, k: int) -> subprocess.Popen:
    """A TCP sink listening on node k's address, ready once it returns."""
    sink = net.popen(k, [sys.executable, "-c", _SINK, net.address(k)], stdout=-1, text=True)
    if sink.stdout.readline().strip() != "ready":
        sink.kill()
        raise ClusterError("the TCP sink did not start")
    return sink


def _timed(
    returncode: int, source_out: str, sink: subprocess.Popen, nbytes: int, err: str
) -> tuple[float, float, float]:
    """A finished transfer's bits per second, start and end (``time.time()``), checked
    against its source's exit and the bytes its sink read."""
    fields = source_out.split()
    if returncode != 0 or len(fields) != 2 or int(sink.stdout.readline()) != nbytes:
        raise ClusterError(f"the TCP transfer failed: {err.strip()[-200:]}")
    seconds, began = float(fields[0]), float(fields[1])
    return nbytes * 8 / seconds, began, began + seconds


def tcp_rate(net: Network, nbytes: int, sender: int = 1, receiver: int = 0) -> float:
    """Bits per second of one TCP transfer of ``nbytes`` between two nodes, timed by
    the sender from its first byte until the receiver has read the last one."""
    sink = _sink(net, receiver)
    try:
        argv = [sys.executable, "-c", _SOURCE, net.address(receiver), str(nbytes)]
        done = net.run(sender, argv, capture_output=True, text=True, timeout=600)
        return _timed(done.returncode, done.stdout, sink, nbytes, done.stderr)[0]
    finally:
        sink.kill()
        sink.wait()


def tcp_both_ways(net: Network, nbytes: int) -> list[tuple[float, float, float]]:
    """Two TCP transfers of ``nbytes`` at once, node 1 to node 0 and node 0 to node 1,
    as a two-worker all-reduce sends: each one's bits per second, start and end.
    Each direction's acknowledgements then queue behind the other's data."""
    sinks: list[subprocess.Popen] = []
    try:
        sinks = [_sink(net, 0), _sink(net, 1)]
        sources = [
            net.popen(sender, [sys.executable, "-c", _SOURCE, net.address(1 - sender), str(nbytes)],
                      stdout=-1, stderr=-1, text=True)
            for sender in (1, 0)
        ]  # fmt: skip
        done = [source.communicate(timeout=600) for source in sources]
        return [
            _timed(source.returncode, out, sink, nbytes, err) for source, (out, err), sink in zip(sources, done, sinks)
        ]
    finally:
        for sink in sinks:
            sink.kill()
            sink.wait()


# What each rank's sender did to recover lost bytes, as the kernel counts it for its namespace
TCP_COUNTERS = ("TcpRetransSegs", "TcpExtTCPTimeouts", "TcpExtTCPLossProbes")

_GLOO_RANK = """
import json, sys, time
import torch, torch.distributed as dist
rank, address, nbytes, n, pause = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
watched, fenced = sys.argv[6].split(","), sys.argv[7] == "fenced"

def tcp_counters():  # this namespace's TCP counters, as nstat reads them (/proc/net is per namespace)
    counts = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = open(path).read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            prefix, names = names.split(":", 1)
            counts.update({prefix + k: int(v) for k, v in zip(names.split(), values.split(":", 1)[1].split())})
    return [counts[k] for k in watched]

dist.init_process_group("gloo", init_method=f"tcp://{address}:29512", rank=rank, world_size=2)
dist.all_reduce(torch.ones(2))  # the connections made
x, starts, ends, tcp = torch.ones(nbytes // 4), [], [], []
for _ in range(n):
    time.sleep(pause)
    x.fill_(rank + 1.0)
    before = tcp_counters()
    starts.append(time.time())
    dist.all_reduce(x)
    ends.append(time.time())
    if fenced:  # queued behind what this rank's socket still holds: both ranks' sends delivered, counted alike
        dist.barrier()
    tcp.append([b - a for a, b in zip(before, tcp_counters())])
print(json.dumps({"starts": starts, "ends": ends, "tcp": tcp, "sum": float(x[0])}), flush=True)
dist.destroy_process_group()
"""


@dataclass
class AllReduceEnd:
    """One gloo all-reduce between node 0 and node 1: when each rank's started and
    ended (``time.time()``, the hosts' shared clock), and what each rank's sender
    retransmitted while it ran (``TCP_COUNTERS``, counted by the kernel)."""

    starts: tuple[float, float]
    ends: tuple[float, float]
    tcp: tuple[dict[str, int], dict[str, int]]

    @property
    def apart_ms(self) -> float:
        """Rank 1's end minus rank 0's, in ms."""
        return 1e3 * (self.ends[1] - self.ends[0])

    @property
    def seconds(self) -> float:
        """From when both ranks had started it until both had ended."""
        return max(self.ends) - max(self.starts)


def gloo_ends(net: Network, nbytes: int, n: int, pause: float = 0.5, fenced: bool = False) -> list[AllReduceEnd]:
    """``n`` gloo all-reduces of ``nbytes`` between node 0 and node 1, each after a
    ``pause`` of the same length on both (a step's compute), as ``AllReduceEnd``s.
    ``fenced``: a barrier after each all-reduce, before its counters are read, so that
    both ranks count until both ranks' sends are delivered (gloo ends a send once the
    kernel holds its bytes) and the next pause starts on both at once."""
    ranks = [
        net.popen(k, [sys.executable, "-c", _GLOO_RANK, str(k), net.address(0), str(nbytes), str(n), str(pause),
                      ",".join(TCP_COUNTERS), "fenced" if fenced else "free"],
                  stdout=-1, stderr=-1, text=True, env=os.environ | net.gloo_env(k))
        for k in (0, 1)
    ]  # fmt: skip
    try:
        done = [rank.communicate(timeout=600) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    if any(rank.returncode != 0 for rank in ranks):
        raise ClusterError(f"the gloo all-reduces failed: {(done[0][1] + done[1][1]).strip()[-300:]}")
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in done]
    if any(r["sum"] != 3.0 for r in reports):  # 1 + 2: both ranks' values in every element
        raise ClusterError(f"the gloo all-reduce summed wrong: {[r['sum'] for r in reports]}")
    counted = [[dict(zip(TCP_COUNTERS, c)) for c in r["tcp"]] for r in reports]
    zero, one = reports
    return [
        AllReduceEnd(starts, ends, tcp)
        for starts, ends, tcp in zip(zip(zero["starts"], one["starts"]), zip(zero["ends"], one["ends"]), zip(*counted))
    ]


def start_ray(net: Network, cpus: int, port: int = 6379, ray_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A Ray head on node 0 and a worker on every other node, each bound to its
    namespace's address and carrying the resource ``node<k>``; returns the
    environment in which a command joins the cluster (``ray_env``: what Ray's own
    processes on every node get beside it). Authentication stays off: these
    addresses are reachable from these namespaces only."""
    head = f"{net.address(0)}:{port}"
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": head}
    temp = f"/tmp/raylocal-{net.tag}"
    common = ["--num-cpus", str(cpus), "--disable-usage-stats"]
    for k in range(len(net.rates)):
        where = ["--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard", "false"] if k == 0 else []
        where += [] if k == 0 else ["--address", head]
        argv = [RAY, "start", *where, "--node-ip-address", net.address(k), "--resources", f'{{"node{k}": 1}}']
        here = env | dict(ray_env or {}) | net.gloo_env(k)
        done = net.run(k, [*argv, *common], env=here, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ClusterError(f"ray start on node {k}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return env


@contextlib.contextmanager
def ray_cluster(net: Network, cpus: int, ray_env: Mapping[str, str] | None = None) -> Iterator[dict[str, str]]:
    """``start_ray`` on ``net``; yields the environment that joins it. After, the
    network comes down (its processes first) and then Ray's session files go."""
    try:
        yield start_ray(net, cpus, ray_env=ray_env)
    finally:
        net.down()
        shutil.rmtree(f"/tmp/raylocal-{net.tag}", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m raylocal.cluster.netns --rates 10mbit,10mbit -- COMMAND...``: a Ray
    cluster across shaped namespaces, COMMAND on its head, then everything torn down."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="10mbit,10mbit", help="one link rate per node (none: unshaped)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs each Ray node offers")
    p.add_argument("--tcp", type=float, metavar="SECONDS", help="no Ray: time a TCP transfer of about this long "
                   "at each rate of --rates over a two-node link, one way and then both ways at once, and print "
                   "the rates they reached")  # fmt: skip
    p.add_argument("--gloo", type=int, metavar="N", help="no Ray: N gloo all-reduces of --gloo-bytes over a "
                   "two-node link at each rate of --rates, and how far apart the two ranks' ends were")  # fmt: skip
    p.add_argument("--gloo-bytes", type=int, default=617_728, help="bytes of each all-reduce (the race's gradient)")
    p.add_argument("--fenced", action="store_true", help="with --gloo: a barrier after each all-reduce, so that both "
                   "ranks count TCP's retransmissions until both ranks' sends are delivered")  # fmt: skip
    p.add_argument("--congestion", help="TCP's congestion control in every namespace, e.g. cubic or bbr "
                   "(default: the host's, which a new namespace takes)")  # fmt: skip
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run on the head node")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    why = available()
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    rates = [None if r in ("none", "") else r for r in args.rates.split(",")]
    try:
        check_congestion(args.congestion)
        if args.tcp:
            return _tcp_table(rates, args.tcp, args.congestion)
        if args.gloo:
            return _gloo_table(rates, args.gloo, args.gloo_bytes, args.congestion, args.fenced)
        with Network(rates, congestion=args.congestion) as net, ray_cluster(net, args.cpus) as env:
            return net.run(0, command or [RAY, "status"], env=env).returncode
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _congestion_line(congestion: str | None) -> str:
    """The line a table starts with: the congestion control its links ran."""
    return f"TCP congestion control: {congestion or 'the host default, ' + host_congestion()}"


def _tcp_table(rates: list[str | None], seconds: float, congestion: str | None) -> int:
    """One way, then both ways at once (each direction's own rate), per rate."""
    print(_congestion_line(congestion))
    print("| tbf rate | bytes | one way: TCP reached | of the rate | both ways at once: each reached | of the rate |")
    print("|---|---|---|---|---|---|")
    for rate in rates:
        if rate is None:
            continue
        bits = rate_bits(rate)
        nbytes = int(bits / 8 * seconds)
        with Network([rate, rate], congestion=congestion) as net:
            one = tcp_rate(net, nbytes)
            both = [reached for reached, _, _ in tcp_both_ways(net, nbytes)]
        each = " / ".join(f"{r / 1e6:.3g}" for r in both)
        shares = " / ".join(f"{r / bits:.1%}" for r in both)
        row = f"| {rate} | {nbytes:,} | {one / 1e6:.3g} Mbit/s | {one / bits:.1%} | {each} Mbit/s | {shares} |"
        print(row, flush=True)
    return 0


def _gloo_table(rates: list[str | None], n: int, nbytes: int, congestion: str | None, fenced: bool) -> int:
    """Per rate (none: unshaped) and all-reduce after the first (the first: the ranks'
    start-ups apart): how much later rank 1's ended than rank 0's, what each rank's
    sender retransmitted, timed out and probed in it, and how long it took; then the
    mean size of the differences and the packets each tbf dropped."""
    print(_congestion_line(congestion) + ("; fenced: a barrier after each all-reduce" if fenced else ""))
    print(
        "| tbf rate | all-reduce | rank 1's end − rank 0's, ms | rank 0 sent: retransmitted segments, "
        "timeouts, loss probes | rank 1 sent: the same | all-reduce, s |"
    )
    print("|---|---|---|---|---|---|")
    for rate in rates:
        with Network([rate, rate], congestion=congestion) as net:
            ends = gloo_ends(net, nbytes, n, fenced=fenced)
            dropped = net.dropped()
        for i, end in enumerate(ends[1:], start=2):
            sent = [" / ".join(str(tcp[c]) for c in TCP_COUNTERS) for tcp in end.tcp]
            print(f"| {rate or 'none'} | {i} | {end.apart_ms:+.0f} | {sent[0]} | {sent[1]} | {end.seconds:.3f} |")
        mean = sum(abs(end.apart_ms) for end in ends[1:]) / max(len(ends) - 1, 1)
        drops = ", ".join(f"{way} {count}" for way, count in dropped.items()) or "none shaped"
        print(f"| {rate or 'none'} | mean size of the differences: {mean:.0f} ms | tbf dropped: {drops} | | | |",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
