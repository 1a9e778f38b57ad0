"""A real Slurm cluster on this machine for the tests: munge, slurmctld, and two slurmd
"nodes", each in its own network, UTS and mount namespace, joined by a bridge.

Debian's munge/slurmctld/slurmd/slurm-client 22.05 run as root. Settings and tricks that
matter here are in ../shared/DESIGN.md ("Slurm on one machine, for real"). Everything this
starts is recorded and stopped by Cluster.stop(); nothing else is touched.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

NODES = {"n1": "10.213.0.11", "n2": "10.213.0.12"}
CONTROLLER_IP = "10.213.0.1"
BRIDGE = "trpybr0"
PORTS = (16817, 16818)
PACKAGES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "ip", "nsenter", "unshare")


def missing_tools() -> list[str]:
    return [t for t in PACKAGES if shutil.which(t) is None]


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


class Cluster:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.netns: list[str] = []
        self.links: list[str] = []
        self.munge_socket = self.dir / "munge" / "munge.socket"

    # -------------------------------------------------------------- start
    def start(self) -> "Cluster":
        try:
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
        # Leftovers of an earlier test session that was killed (names are ours alone).
        for ns in (f"trpy{node}" for node in NODES):
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        self.links.append(BRIDGE)
        sh("ip", "addr", "add", f"{CONTROLLER_IP}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, (node, addr) in enumerate(NODES.items()):
            ns, veth = f"trpy{node}", f"trpyv{i}"
            sh("ip", "netns", "add", ns)
            self.netns.append(ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.links.append(veth)
            sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        hosts = ["127.0.0.1 localhost", f"{CONTROLLER_IP} {socket.gethostname()}"]
        hosts += [f"{addr} {node}" for node, addr in NODES.items()]
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
                          for n, a in NODES.items())
        self.conf.write_text(f"""\
ClusterName=trainpy
SlurmctldHost={socket.gethostname()}({CONTROLLER_IP})
SlurmctldPort={PORTS[0]}
SlurmdPort={PORTS[1]}
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
            self._spawn(["nsenter", f"--net=/run/netns/trpy{node}", "unshare", "--uts",
                         "--mount", "--propagation", "private", "sh", "-c", script])

    def _wait_idle(self) -> None:
        def idle() -> bool:
            out = sh("sinfo", "-h", "-o", "%n %T", check=False, env=self.env).stdout.split()
            return out.count("idle") == len(NODES)
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
