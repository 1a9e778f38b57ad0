"""A real Slurm cluster on this machine for the tests: munge, slurmctld, and two slurmd
"nodes", each in its own network, UTS and mount namespace, joined by a bridge.

Debian's munge/slurmctld/slurmd/slurm-client 22.05 run as root. What matters:
- Network: a bridge on the host (the controller's address) plus one network namespace per
  node (a veth into the bridge, its own address). slurmd enters it with `nsenter --net`,
  not `ip netns exec`, which remounts /sys so that slurmd's cgroup code fails to start; it
  also gets its own UTS namespace (hostname = node name) and a private mount namespace in
  which this cluster's hosts file is bound over /etc/hosts. `slurmd -N <node>` picks the node.
- slurm.conf: `ProctrackType=proctrack/pgid` (linuxproc leaves orphaned children behind),
  `TaskPlugin=task/none`, no accounting, `MailProg=/bin/true`, `cred_expire=10`, and
  `SchedulerParameters=sched_interval=2,bf_interval=1`, without which a requeued job waits
  minutes (not seconds) to start again.
- Several clusters may run at once (two test sessions, or a test that starts a second
  one): every machine-wide name (bridge, veths, namespaces) carries a random suffix, the
  /24 subnet under 10.0.0.0/8 is one no interface or route here uses, and the TCP ports are
  checked free. Choosing and taking them happens under a file lock, so two clusters
  starting together cannot pick the same ones. Cluster.stop() stops and deletes exactly what
  this instance started and created, nothing else; a killed test session leaves its
  `trpy<suffix>*` links and namespaces behind (`ip link del`, `ip netns del` remove them).
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODES = ("n1", "n2")  # node names are per-cluster (slurm.conf, hosts file), not machine-wide
PACKAGES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "ip", "nsenter", "unshare")
# Below the kernel's ephemeral range (32768-60999 by default), so no outgoing connection
# takes one of them between the check and the daemon's bind.
PORT_RANGE = (10000, 32000)
LOCK = Path(tempfile.gettempdir()) / "trainpy-slurm-cluster.lock"


def missing_tools() -> list[str]:
    return [t for t in PACKAGES if shutil.which(t) is None]


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of this machine's interfaces and routes (host namespace)."""
    text = sh("ip", "-o", "-4", "addr").stdout + sh("ip", "-o", "-4", "route").stdout
    nets = [ipaddress.ip_network(m, strict=False)
            for m in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", text)]
    return [n for n in nets if not n.is_unspecified]


def free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    used = used_networks()
    for _ in range(1000):
        net = ipaddress.ip_network(f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free /24 under 10.0.0.0/8 (in use: {used})")


def port_free(port: int, netns: str | None = None) -> bool:
    """Whether a TCP listener could bind `port` on every address (of the host, or of netns)."""
    if netns is None:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                return False
            return True
    probe = f"import socket; socket.socket().bind(('', {port}))"
    return sh("nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", probe,
              check=False).returncode == 0


def free_port(rng: random.Random, netns: tuple[str, ...] = (), host: bool = True,
              avoid: tuple[int, ...] = ()) -> int:
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        if port not in avoid and (not host or port_free(port)) and all(
                port_free(port, ns) for ns in netns):
            return port
    raise RuntimeError("no free TCP port found")


class Cluster:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.netns: list[str] = []
        self.links: list[str] = []
        self.munge_socket = self.dir / "munge" / "munge.socket"
        # Machine-wide names: "trpy" + 6 random hex digits + a role (at most 15 characters,
        # the limit for interface names). Subnet, addresses and ports are chosen in start().
        self.suffix = secrets.token_hex(3)
        self.bridge = f"trpy{self.suffix}b"
        self.node_netns = {node: f"trpy{self.suffix}{node}" for node in NODES}
        self.subnet: ipaddress.IPv4Network | None = None
        self.controller_ip = ""
        self.node_ips: dict[str, str] = {}
        self.ports: tuple[int, int] = (0, 0)  # slurmctld, slurmd

    # -------------------------------------------------------------- start
    def start(self) -> "Cluster":
        try:
            with open(LOCK, "a") as lock:
                # Held until the daemons listen: no other cluster picks our subnet or ports.
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._network()
                self._munge()
                self._config()
                self._daemons()
                self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        rng = random.Random()
        self.subnet = free_subnet(rng)
        hosts = list(self.subnet.hosts())
        self.controller_ip = str(hosts[0])
        self.node_ips = {node: str(hosts[10 + i]) for i, node in enumerate(NODES)}
        prefix = self.subnet.prefixlen
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        sh("ip", "addr", "add", f"{self.controller_ip}/{prefix}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, (node, addr) in enumerate(self.node_ips.items()):
            ns, veth = self.node_netns[node], f"trpy{self.suffix}v{i}"
            sh("ip", "netns", "add", ns)
            self.netns.append(ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.links.append(veth)
            sh("ip", "link", "set", veth, "master", self.bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/{prefix}", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # slurmctld listens on all of the host's addresses, slurmd on all of its namespace's.
        ctld = free_port(rng)
        self.ports = (ctld, free_port(rng, tuple(self.netns), host=False, avoid=(ctld,)))
        hosts = ["127.0.0.1 localhost", f"{self.controller_ip} {socket.gethostname()}"]
        hosts += [f"{addr} {node}" for node, addr in self.node_ips.items()]
        (self.dir / "hosts").write_text("\n".join(hosts) + "\n")

    def _munge(self) -> None:
        self.munge_socket.parent.mkdir(parents=True)
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={self.dir}/munge/munged.pid",
                     f"--log-file={self.dir}/munge/munged.log",
                     f"--seed-file={self.dir}/munge/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), "munged")

    def _config(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs=2 State=UNKNOWN"
                          for n, a in self.node_ips.items())
        self.conf.write_text(f"""\
ClusterName=trainpy
SlurmctldHost={socket.gethostname()}({self.controller_ip})
SlurmctldPort={self.ports[0]}
SlurmdPort={self.ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MinJobAge=3600
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemons(self) -> None:
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            script = (f"hostname {node} && mount --bind {self.dir}/hosts /etc/hosts && "
                      f"exec slurmd -D -N {node} -f {self.conf}")
            self._spawn(["nsenter", f"--net=/run/netns/{self.node_netns[node]}", "unshare", "--uts",
                         "--mount", "--propagation", "private", "sh", "-c", script])

    def _wait_idle(self) -> None:
        def idle() -> bool:
            return list(self.node_states().values()) == ["idle"] * len(NODES)
        self._wait(idle, "two idle slurmd nodes", timeout=60)

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.dir / f"{Path(cmd[0]).name}-{len(self.procs)}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))

    def _wait(self, ok, what: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited while waiting for {what}; logs in {self.dir}")
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}; logs in {self.dir}")

    # -------------------------------------------------------------- use
    def node_states(self) -> dict[str, str]:
        """{node: state} as sinfo reports it, e.g. {"n1": "idle", "n2": "idle"}."""
        out = sh("sinfo", "-h", "-N", "-o", "%N %T", check=False, env=self.env).stdout
        return dict(sorted(line.split() for line in out.splitlines() if line.strip()))

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        out = sh("sbatch", "--parsable", *args, cwd=cwd, env={**self.env, **(env or {})})
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = sh("scontrol", "-o", "show", "job", job_id, env=self.env).stdout
        jobs = [dict(f.split("=", 1) for f in line.split() if "=" in f)
                for line in out.splitlines()]
        return jobs[0] if len(jobs) == 1 else {"jobs": jobs}

    def wait(self, job_id: str, timeout: float = 300, until=("COMPLETED", "FAILED",
                                                             "CANCELLED", "TIMEOUT",
                                                             "NODE_FAIL", "OUT_OF_MEMORY")
             ) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            states = [j["JobState"] for j in info.get("jobs", [info])]
            if all(s in until for s in states):
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {states} after {timeout}s; logs in {self.dir}")

    # -------------------------------------------------------------- stop
    def stop(self) -> None:
        if self.conf.exists() and self.procs:
            sh("scancel", "--full", "--user", "root", check=False, env=self.env)
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 15)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        self.procs.clear()
        for link in reversed(self.links):
            sh("ip", "link", "del", link, check=False)
        for ns in self.netns:
            sh("ip", "netns", "del", ns, check=False)
        self.links.clear()
        self.netns.clear()
