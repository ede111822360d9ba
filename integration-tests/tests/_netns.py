"""What the network-namespace tests need from the machine, checked once per module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

_IP_TIMEOUT = 30.0
_MASQUERADE_LO = ("-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "MASQUERADE")


def netns_unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here (``None`` when they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root to exercise real networks)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"pilot-ft-probe-{os.getpid()}"
    added = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=_IP_TIMEOUT
    )
    if added.returncode != 0:
        return f"`ip netns add` is unavailable: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=_IP_TIMEOUT)
    return None


def nat_unavailable_reason() -> str | None:
    """Why masquerading routers cannot be built in namespaces here (``None``: they can)."""
    reason = netns_unavailable_reason()
    if reason is not None:
        return reason
    if shutil.which("iptables") is None:
        return "iptables is not installed (scripts/_iptables.sh installs Debian's package)"
    probe = f"pilot-nat-probe-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=_IP_TIMEOUT)
    try:
        nat = subprocess.run(
            ["ip", "netns", "exec", probe, "iptables", *_MASQUERADE_LO],
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT,
        )
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=_IP_TIMEOUT)
    if nat.returncode != 0:
        return f"iptables cannot masquerade in a namespace: {nat.stderr.strip()}"
    return None
