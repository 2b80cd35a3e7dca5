"""Several hosts on one machine: Linux network namespaces on a private Linux bridge.

A `Network` is a "switch" namespace holding a bridge, and one namespace per host, each
joined to the switch by a veth pair (`eth0` in the host, `p<i>` on the switch) with an
address in 10.77.0.0/24. The addresses exist only inside these namespaces: nothing is
added to the machine's own network, and nothing here reaches any other address.
Latency (`tc netem`, 0.25 ms on each host's egress: 0.5 ms between two hosts) is added
where the kernel has netem; where it has not, the network works without it and
`latency_note` says so.

Processes run on a host through `ip netns exec` (`Host.prefix`). The test's own thread
(the map servers, the audit) enters a host's namespace with setns(2) (`Network.entered`):
a thread made there, and every socket it opens, stays on that host.

A partition is a cable pulled: `cut(host)` sets the switch's end of the host's veth down,
so its packets are dropped silently (TCP connections stay open and retransmit, as across
a real partition); `restore(host)` plugs it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import NoReturn

from tests.skips import need

# Lines for the terminal summary (tests/scale/conftest.py): what was not emulated, and
# the recovery times measured.
NOTES: list[str] = []
CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"
NETNS_DIR = "/var/run/netns"


def unavailable(what: str) -> NoReturn:
    """Skip, or fail where CI promised the capability: the scale suite must not pass by not
    running (tests.skips.need)."""
    need(False, what)
    raise AssertionError("not reached: need(False, ...) skips or fails")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _remove_orphans() -> None:
    """Namespaces of a test run that was killed before its teardown (its pid is gone)."""
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        orphan = len(parts) >= 3 and parts[0] == "mlscale" and parts[1].isdigit()
        if orphan and not os.path.exists(f"/proc/{parts[1]}"):
            _ip("netns", "del", name, check=False)


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    netns: str
    ip: str
    port: str  # the switch's end of its cable

    @property
    def hostname(self) -> str:
        return self.netns

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command on this host: `[*host.prefix, cmd, ...]`: in its network namespace
        and, where `unshare` is there, under its own host name (a UTS namespace), as the
        service names its workers by host name and pid."""
        net = ("ip", "netns", "exec", self.netns)
        if shutil.which("unshare") is None:
            return net
        return (*net, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.hostname)  # fmt: skip

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, *cmd], capture_output=True, text=True, timeout=30, check=check
        )


class Network:
    """The switch and its hosts; `close()` deletes every namespace it made."""

    def __init__(self, latency_us: int = 250) -> None:
        if os.geteuid() != 0:
            unavailable("network namespaces need root (ip netns add)")
        if shutil.which("ip") is None:
            unavailable("iproute2 (ip) is not installed")
        _remove_orphans()
        self.tag = f"mlscale-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self.latency_us = latency_us
        self.latency_note = ""
        self._made: list[str] = []
        try:
            self._add_netns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except RuntimeError as exc:
            self.close()
            unavailable(f"cannot make network namespaces here: {exc}")

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add(self, name: str) -> Host:
        index = len(self.hosts) + 1
        host = Host(name, f"{self.tag}-{name}", f"{SUBNET}.{index}", f"p{index}")
        try:
            self._add_netns(host.netns)
            _ip("-n", self.switch, "link", "add", host.port, "type", "veth",
                "peer", "name", "eth0", "netns", host.netns)  # fmt: skip
            _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
        except RuntimeError as exc:
            self.close()
            unavailable(f"cannot wire host {name} into the namespace network: {exc}")
        self.hosts[name] = host
        self._latency(host)
        return host

    def _latency(self, host: Host) -> None:
        if not self.latency_us:
            return
        res = host.run(
            "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
            "delay", f"{self.latency_us}us", check=False,
        )  # fmt: skip
        if res.returncode != 0 and not self.latency_note:
            self.latency_note = (
                f"no emulated latency: tc netem is not available here "
                f"({res.stderr.strip() or res.returncode}); the hosts talk at veth speed"
            )
            NOTES.append(self.latency_note)

    def cut(self, host: Host) -> None:
        """Pull the host's cable: everything it sends or is sent is dropped."""
        _ip("-n", self.switch, "link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.port, "up")

    @contextlib.contextmanager
    def entered(self, host: Host) -> Iterator[None]:
        """This thread on `host` (and the threads it starts meanwhile); back after."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(os.path.join(NETNS_DIR, host.netns))
            try:
                yield
            finally:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(own, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns back to the test's network: {os.strerror(err)}")
        finally:
            os.close(own)

    def close(self) -> None:
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()
