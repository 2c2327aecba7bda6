"""Network namespaces, veth links, a bridge and tc shaping: the plumbing of `lbgm lab`.

A lab is one namespace per host plus a "switch" namespace holding a Linux bridge and
the switch-side end of every host's veth link. Nothing is created in the root
namespace, so the lab's subnet cannot clash with the host's own routes and no lab
packet can leave the machine: the hosts have no route but the lab subnet.

Every namespace name starts with the lab's prefix, "lbgm" + the owning process id
in base 36, so labs started at the same time never collide, and the leftovers of a
lab whose process died (SIGKILL, power loss) are recognised: `stale_namespaces`.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")
PREFIX = "lbgm"
MAX_IFNAME = 15  # IFNAMSIZ - 1
NAME_PATTERN = re.compile(rf"^({PREFIX}[0-9a-z]+)-(s|sw|w\d+)$")
RATE_UNITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}
CLONE_NEWNET = 0x40000000
TBF_LATENCY_MS = 100  # queue at most this long before dropping: TCP sees a capped, not a lossy, link
MIN_BURST_BYTES = 16 * 1024  # a few full-size frames, so tbf never stalls on one packet


class NetnsError(RuntimeError):
    """An `ip` or `tc` command failed; carries the command and what it printed."""


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise NetnsError(f"`{' '.join(command)}` failed with status {result.returncode}: {result.stderr.strip()}")
    return result.stdout


# ------------------------------------------------------------------ names and rates

def _base36(number: int) -> str:
    digits = ""
    while True:
        number, digit = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
        if number == 0:
            return digits


def lab_prefix(pid: int) -> str:
    """The name prefix of the lab owned by process `pid` (short: interface names hold 15 characters)."""
    return f"{PREFIX}{_base36(pid)}"


def owner_pid(prefix: str) -> int:
    return int(prefix.removeprefix(PREFIX), 36)


def parse_rate(text: str) -> int:
    """'10mbit' -> 10_000_000 bits/s: tc's bit units only ('mbps' would mean megabytes in tc)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?bit)", text.strip().lower())
    if not match or float(match[1]) <= 0:
        raise ValueError(f"expected a rate like 10mbit, 500kbit or 1gbit, got {text!r}")
    return round(float(match[1]) * RATE_UNITS[match[2]])


def format_rate(bits_per_second: int | None) -> str:
    return "uncapped" if bits_per_second is None else f"{bits_per_second / 1e6:g} Mbit/s"


# ------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class Host:
    """One host of the lab: its namespace, the interface holding its address, and the switch port
    (the veth peer in the switch namespace) that faces it."""

    namespace: str
    interface: str
    port: str
    address: ipaddress.IPv4Interface


@dataclass(frozen=True)
class Layout:
    """Every name and address of one lab, fixed before anything is created."""

    prefix: str
    switch: str
    bridge: str
    server: Host
    workers: tuple[Host, ...]

    @property
    def hosts(self) -> tuple[Host, ...]:
        return (self.server, *self.workers)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.switch, *(host.namespace for host in self.hosts))


def plan(prefix: str, subnet: str, worker_hosts: int) -> Layout:
    """Server at the subnet's first address, worker host k at the (k+1)-th; raises ValueError when
    the subnet is not a private IPv4 network with room for them or a name would not fit."""
    network = ipaddress.ip_network(subnet, strict=True)
    if not isinstance(network, ipaddress.IPv4Network) or not network.is_private:
        raise ValueError(f"the lab subnet must be a private IPv4 network such as 10.77.0.0/24, got {subnet}")
    addresses = list(network.hosts())
    if worker_hosts < 1 or worker_hosts + 1 > len(addresses):
        raise ValueError(f"{subnet} holds {len(addresses)} hosts: room for 1 to {len(addresses) - 1} worker hosts "
                         f"besides the server, got {worker_hosts}")

    def host(label: str, index: int) -> Host:
        name = f"{prefix}-{label}"
        return Host(name, name, f"{name}p", ipaddress.IPv4Interface(f"{addresses[index]}/{network.prefixlen}"))

    layout = Layout(prefix, f"{prefix}-sw", f"{prefix}-br", host("s", 0),
                    tuple(host(f"w{k}", k) for k in range(1, worker_hosts + 1)))
    longest = max((layout.bridge, *(h.port for h in layout.hosts)), key=len)
    if len(longest) > MAX_IFNAME:
        raise ValueError(f"interface name {longest!r} is longer than {MAX_IFNAME} characters")
    return layout


# ------------------------------------------------------------------ building and shaping

def exec_prefix(namespace: str) -> tuple[str, ...]:
    """The command prefix that runs a program inside `namespace`."""
    return ("ip", "netns", "exec", namespace)


def build(layout: Layout, uplink: int | None, downlink: int | None) -> None:
    """Creates the namespaces, the bridge and one veth link per host; caps each worker host's
    egress (its uplink) and, if asked, the switch port towards it (its downlink)."""
    for namespace in layout.namespaces:
        run("ip", "netns", "add", namespace)
        run("ip", "-n", namespace, "link", "set", "lo", "up")
    run("ip", "-n", layout.switch, "link", "add", layout.bridge, "type", "bridge")
    run("ip", "-n", layout.switch, "link", "set", layout.bridge, "up")
    for host in layout.hosts:
        run("ip", "-n", layout.switch, "link", "add", host.port, "type", "veth",
            "peer", "name", host.interface, "netns", host.namespace)
        run("ip", "-n", layout.switch, "link", "set", host.port, "master", layout.bridge, "up")
        run("ip", "-n", host.namespace, "addr", "add", str(host.address), "dev", host.interface)
        run("ip", "-n", host.namespace, "link", "set", host.interface, "up")
    for host in layout.workers:
        if uplink is not None:
            shape(host.namespace, host.interface, uplink)
        if downlink is not None:
            shape(layout.switch, host.port, downlink)


def shape(namespace: str, interface: str, bits_per_second: int) -> None:
    """A token bucket on the interface's egress. The burst is 10 ms of traffic (at least a few
    frames); tbf splits the veth's large GSO packets itself, so offloads may stay on."""
    burst = max(bits_per_second // 800, MIN_BURST_BYTES)
    run("tc", "-n", namespace, "qdisc", "add", "dev", interface, "root", "tbf", "rate", f"{bits_per_second}bit",
        "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms")


def counters(namespace: str, interface: str) -> dict[str, int]:
    """The interface's kernel byte and packet counters (what really crossed the link, TCP/IP headers
    and retransmissions included)."""
    [link] = json.loads(run("ip", "-n", namespace, "-s", "-j", "link", "show", "dev", interface))
    stats = link["stats64"]
    return {f"{direction}_{kind}": stats[direction][kind]
            for direction in ("tx", "rx") for kind in ("bytes", "packets")}


# ------------------------------------------------------------------ reaching into a namespace

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


def connect_in(namespace: str, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A TCP connection opened from inside `namespace`. Only the calling thread enters it, and only
    while the socket is created: a socket keeps the namespace it was made in."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / namespace, os.O_RDONLY)
    try:
        _setns(target)
        try:
            connection = socket.create_connection(address, timeout)
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
    connection.settimeout(None)
    return connection


class Forwarder:
    """A loopback port of this process relayed to HOST:PORT inside a namespace: how `lbgm lab`, which
    stays in the root namespace, reads the server's GetStatus without giving that namespace a route
    into the lab. Used as a context: it yields the loopback target to dial."""

    def __init__(self, namespace: str, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._namespace, self._address = namespace, (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))

    def __enter__(self) -> str:
        threading.Thread(target=self._accept, daemon=True).start()
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def __exit__(self, *exc_info: object) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = connect_in(self._namespace, self._address)
            except OSError:
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copies one direction until either side closes, then closes both (a status poll needs no half-close)."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        source.close()
        sink.close()


# ------------------------------------------------------------------ finding and removing

def lab_namespaces(prefix: str | None = None) -> list[str]:
    """Namespaces named like a lab's: of the lab `prefix`, or of any lab."""
    names = sorted(path.name for path in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    return [name for name in names
            if (match := NAME_PATTERN.match(name)) and (prefix is None or match[1] == prefix)]


def root_links(prefix: str) -> list[str]:
    """Interfaces of the root namespace whose name starts with `prefix` (a lab creates none)."""
    return [link["ifname"] for link in json.loads(run("ip", "-j", "link", "show"))
            if link["ifname"].startswith(f"{prefix}-")]


def leftovers(prefix: str) -> list[str]:
    return lab_namespaces(prefix) + root_links(prefix)


def _pids(namespace: str) -> list[int]:
    return [int(pid) for pid in run("ip", "netns", "pids", namespace).split()]


def remove(namespaces: Iterable[str]) -> None:
    """Kills whatever still runs inside each namespace, then deletes it; its veth ends, and with them
    their peers in the other namespaces, go with it. Names already gone are skipped."""
    for namespace in namespaces:
        if not (NETNS_DIR / namespace).exists():
            continue
        for pid in _pids(namespace):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run("ip", "netns", "del", namespace)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_namespaces() -> Iterator[str]:
    """Namespaces of labs whose owning process no longer exists."""
    for name in lab_namespaces():
        match = NAME_PATTERN.match(name)
        if match and not _alive(owner_pid(match[1])):
            yield name
