"""libvirt domain XML for vdev devices: what `vdev qemu-args --libvirt` prints.

The same devices as the ``qemu-configs/vdev-*.args`` templates, expressed in libvirt's
schema (checked against libvirt 9.0, Debian 12): a ``<disk type='vhostuser'>``, an
``<interface type='vhostuser'>`` and the shared guest memory vhost-user needs
(``<memoryBacking>`` with a memfd source and shared access).

libvirt has no attribute for a NIC's MSI-X ``vectors``; the legacy interrupts that QEMU
7.2 under TCG needs for a vhost-user NIC are set with ``<qemu:override>`` on the NIC's
user alias (libvirt >= 8.2; libvirt marks such a domain as tainted).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

#: libvirt's namespace for QEMU-specific extensions (``<qemu:override>``).
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: Prefix libvirt requires of aliases chosen by the user (they then stay stable).
USER_ALIAS_PREFIX = "ua-"
_ALIAS = re.compile(r"[A-Za-z0-9_.-]+")

ET.register_namespace("qemu", QEMU_NS)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    child = ET.SubElement(parent, tag, attrs)
    child.text = text
    return child


def user_alias(device_id: str) -> str:
    """libvirt's user alias for QEMU device id `device_id`; `ValueError` if it cannot be one."""
    if not _ALIAS.fullmatch(device_id):
        raise ValueError(f"{device_id!r} may only hold letters, digits, '_', '-' and '.'")
    return USER_ALIAS_PREFIX + device_id


def shared_memory(mib: int) -> list[ET.Element]:
    """``<memory>`` and the ``<memoryBacking>`` that make guest RAM a shared memfd."""
    memory = ET.Element("memory", unit="MiB")
    memory.text = str(mib)
    backing = ET.Element("memoryBacking")
    _sub(backing, "source", type="memfd")
    _sub(backing, "access", mode="shared")
    return [memory, backing]


def _socket_source(parent: ET.Element, socket: Path, **attrs: str) -> None:
    source = _sub(parent, "source", type="unix", path=str(socket), **attrs)
    # QEMU reconnects to a restarted vdev daemon (vdev resets the device on disconnect).
    _sub(source, "reconnect", enabled="yes", timeout="10")


def disk(socket: Path, *, device_id: str, queues: int = 1, target: str = "vda") -> ET.Element:
    """A vhost-user-blk disk on the vdev socket `socket` (vdev listens, QEMU connects)."""
    element = ET.Element("disk", type="vhostuser", device="disk")
    driver = _sub(element, "driver", name="qemu", type="raw")
    if queues > 1:
        driver.set("queues", str(queues))
    _socket_source(element, socket)
    _sub(element, "target", dev=target, bus="virtio")
    _sub(element, "alias", name=user_alias(device_id))
    return element


def interface(socket: Path, *, device_id: str, mac: str, queues: int = 1) -> ET.Element:
    """A vhost-user virtio-net NIC on `socket`; ``mode='client'``: QEMU connects to vdev."""
    element = ET.Element("interface", type="vhostuser")
    _sub(element, "mac", address=mac)
    _socket_source(element, socket, mode="client")
    _sub(element, "model", type="virtio")
    if queues > 1:
        _sub(element, "driver", queues=str(queues))  # libvirt then turns mq on
    _sub(element, "rom", enabled="no")  # no PXE option ROM, as romfile= in vdev-net.args
    _sub(element, "alias", name=user_alias(device_id))
    return element


def legacy_interrupts(device_id: str) -> ET.Element:
    """``<qemu:override>`` giving the NIC `device_id` ``vectors=0`` (see the module doc)."""
    override = ET.Element(f"{{{QEMU_NS}}}override")
    device = _sub(override, f"{{{QEMU_NS}}}device", alias=user_alias(device_id))
    frontend = _sub(device, f"{{{QEMU_NS}}}frontend")
    _sub(frontend, f"{{{QEMU_NS}}}property", name="vectors", type="unsigned", value="0")
    return override


def domain_snippet(
    kind: str,
    socket: Path,
    *,
    mib: int,
    device_id: str,
    queues: int = 1,
    mac: str | None = None,
) -> ET.Element:
    """The parts of a ``<domain>`` that attach one vdev device of `kind` (blk or net).

    A partial domain: merge its children into yours (a real domain also has ``<name>``,
    ``<os>`` and the rest).
    """
    root = ET.Element("domain", type="kvm")
    root.append(ET.Comment(f" vdev {kind} on {socket}: merge into your domain "))
    root.extend(shared_memory(mib))
    devices = _sub(root, "devices")
    if kind == "blk":
        devices.append(disk(socket, device_id=device_id, queues=queues))
    elif kind == "net":
        if mac is None:
            raise ValueError("a NIC needs a MAC address")
        devices.append(interface(socket, device_id=device_id, mac=mac, queues=queues))
        root.append(legacy_interrupts(device_id))
    else:
        raise ValueError(f"unknown device type {kind!r} (blk or net)")
    return root


def to_text(element: ET.Element) -> str:
    """`element` as indented XML text."""
    ET.indent(element, space="  ")
    return ET.tostring(element, encoding="unicode") + "\n"
