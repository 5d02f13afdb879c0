"""libvirt domain XML: the qemu-configs/*.xml snippets and `vdev qemu-args --libvirt`,
validated against the installed libvirt schema with virt-xml-validate."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vdev import libvirt
from vdev.cli import default_mac, main
from vdev.qemu import configs_dir
from vdev.testing.pytest_plugin import REQUIRE_ALL

VALIDATOR = "virt-xml-validate"
#: Devices go in <devices>; everything else (memoryBacking, qemu:override) in <domain>.
DEVICE_TAGS = {"disk", "interface"}
SNIPPETS = sorted(configs_dir().glob("*.xml"))


def required(config: pytest.Config, *tools: str) -> None:
    """Skip without `tools` (Debian libvirt-clients, libxml2-utils); fail instead with
    --vdev-require-all or in CI."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        reason = f"{', '.join(missing)} not installed (Debian libvirt-clients, libxml2-utils)"
        if config.getoption(REQUIRE_ALL) or os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def validator(request: pytest.FixtureRequest) -> str:
    """virt-xml-validate with the xmllint it runs."""
    required(request.config, VALIDATOR, "xmllint")
    return VALIDATOR


@pytest.fixture(scope="module")
def virsh(request: pytest.FixtureRequest) -> str:
    required(request.config, "virsh")
    return "virsh"


def complete_domain(element: ET.Element) -> ET.Element:
    """`element` inside a minimal valid domain (a domain itself gets what it lacks)."""
    if element.tag == "domain":
        domain = element
    else:
        domain = ET.Element("domain", type="qemu")
        if element.tag in DEVICE_TAGS:
            ET.SubElement(domain, "devices").append(element)
        else:
            domain.append(element)
    if domain.find("name") is None:
        ET.SubElement(domain, "name").text = "vdev-test"
    if domain.find("os") is None:
        ET.SubElement(ET.SubElement(domain, "os"), "type").text = "hvm"
    return domain


def validate(validator: str, directory: Path, element: ET.Element) -> None:
    path = directory / "domain.xml"
    path.write_text(ET.tostring(complete_domain(element), encoding="unicode"))
    done = subprocess.run(
        [validator, str(path), "domain"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr + path.read_text()


def qemu_args_xml(capsys: pytest.CaptureFixture[str], *argv: str) -> ET.Element:
    assert main(["qemu-args", *argv, "--libvirt"]) == 0
    return ET.fromstring(capsys.readouterr().out)


def test_the_snippets_exist() -> None:
    names = {path.name for path in SNIPPETS}
    assert {"vdev-disk.xml", "vdev-interface.xml", "vdev-domain.xml"} <= names


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda path: path.name)
def test_snippet_validates(validator: str, tmp_path: Path, path: Path) -> None:
    validate(validator, tmp_path, ET.parse(path).getroot())


def test_a_broken_snippet_does_not_validate(validator: str, tmp_path: Path) -> None:
    disk = ET.parse(configs_dir() / "vdev-disk.xml").getroot()
    source = disk.find("source")
    assert source is not None
    source.set("type", "tcp")
    with pytest.raises(AssertionError, match="fails to validate"):
        validate(validator, tmp_path, disk)


def attrs(element: ET.Element, path: str) -> dict[str, str]:
    """The attributes of the element at `path` under `element` (which must exist)."""
    found = element.find(path)
    assert found is not None, path
    return found.attrib


def canonical(element: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(element), with_comments=False, strip_text=True)


def test_snippets_are_what_the_generator_builds() -> None:
    def snippet(name: str) -> ET.Element:
        return ET.parse(configs_dir() / name).getroot()

    blk, net = Path("/run/vdev/blk0.sock"), Path("/run/vdev/net0.sock")
    expected = {
        "vdev-disk.xml": libvirt.disk(blk, device_id="vdev-blk0"),
        "vdev-interface.xml": libvirt.interface(net, device_id="vdev-net0", mac=default_mac(net)),
        "vdev-net-tcg.xml": libvirt.legacy_interrupts("vdev-net0"),
        "vdev-memory-backing.xml": libvirt.shared_memory(1024)[1],
    }
    for name, element in expected.items():
        assert canonical(snippet(name)) == canonical(element), name
    domain = snippet("vdev-domain.xml")
    interface = domain.find("devices/interface")
    assert interface is not None and canonical(interface) == canonical(
        expected["vdev-interface.xml"]
    )
    override = domain.find(f"{{{libvirt.QEMU_NS}}}override")
    assert override is not None and canonical(override) == canonical(expected["vdev-net-tcg.xml"])


@pytest.mark.parametrize(
    "argv",
    [
        ["blk", "--socket", "/tmp/vdev-d.sock"],
        ["blk", "--socket", "/tmp/vdev d.sock", "--queues", "4", "--mem", "2G", "--id", "disk1"],
        ["net", "--socket", "/tmp/vdev-n.sock"],
        ["net", "--socket", "/tmp/n.sock", "--queues", "2", "--mac", "52:54:00:01:02:03"],
    ],
    ids=["blk", "blk-options", "net", "net-options"],
)
def test_qemu_args_libvirt_validates(
    validator: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    validate(validator, tmp_path, qemu_args_xml(capsys, *argv))


def test_qemu_args_libvirt_blk_renders_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["blk", "--socket", "/tmp/d.sock", "--queues", "4", "--mem", "2G", "--id", "disk1"]
    domain = qemu_args_xml(capsys, *argv)
    assert domain.findtext("memory") == "2048" and attrs(domain, "memory")["unit"] == "MiB"
    assert attrs(domain, "memoryBacking/source")["type"] == "memfd"
    assert attrs(domain, "memoryBacking/access")["mode"] == "shared"
    disk = domain.find("devices/disk")
    assert disk is not None and disk.get("type") == "vhostuser"
    assert attrs(disk, "source") == {"type": "unix", "path": "/tmp/d.sock"}
    assert attrs(disk, "driver") == {"name": "qemu", "type": "raw", "queues": "4"}
    assert attrs(disk, "target") == {"dev": "vda", "bus": "virtio"}
    assert attrs(disk, "alias")["name"] == "ua-disk1"
    assert domain.find(f"{{{libvirt.QEMU_NS}}}override") is None


def test_qemu_args_libvirt_net_matches_qemu_args(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sock = str(tmp_path / "n.sock")
    domain = qemu_args_xml(capsys, "net", "--socket", sock, "--queues", "2")
    assert main(["qemu-args", "net", "--socket", sock, "--queues", "2"]) == 0
    args = capsys.readouterr().out
    nic = domain.find("devices/interface")
    assert nic is not None and nic.get("type") == "vhostuser"
    mac = attrs(nic, "mac")["address"]
    assert f"mac={mac}" in args and mac == default_mac(Path(sock))
    assert attrs(nic, "source") == {"type": "unix", "path": sock, "mode": "client"}
    assert attrs(nic, "model")["type"] == "virtio"
    assert attrs(nic, "driver")["queues"] == "2"
    prop = domain.find(f".//{{{libvirt.QEMU_NS}}}property")
    assert prop is not None and prop.attrib == {"name": "vectors", "type": "unsigned", "value": "0"}
    device = domain.find(f".//{{{libvirt.QEMU_NS}}}device")
    assert device is not None and device.get("alias") == attrs(nic, "alias")["name"]
    assert "vectors=0" in args


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["net", "--id", "nic 1"], "--id: 'nic 1' may only hold"),
        (["blk", "--mem", "1000K"], "--mem"),
        (["blk", "--mac", "52:54:00:01:02:03"], "--mac: only a net device"),
        (["net", "--mac", "zz"], "--mac"),
    ],
)
def test_qemu_args_libvirt_bad_options(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    try:
        status = main(["qemu-args", *argv, "--socket", "/tmp/s.sock", "--libvirt"])
    except SystemExit as exc:  # argparse rejected the option
        status = exc.code
    assert status == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""


def libvirt_reads_back(virsh: str, directory: Path, element: ET.Element) -> ET.Element:
    """`element` (completed to a domain) as libvirt's own parser reads it back: defined
    on libvirt's in-process test driver (no daemon), then dumped."""
    domain = complete_domain(element)
    path = directory / "domain.xml"
    path.write_text(ET.tostring(domain, encoding="unicode"))
    name = domain.findtext("name")
    done = subprocess.run(
        [virsh, "-q", "-c", "test:///default", f"define {path}; dumpxml {name}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return ET.fromstring(done.stdout[done.stdout.index("<domain") :])


def test_libvirt_reads_the_example_domain(virsh: str, tmp_path: Path) -> None:
    domain = libvirt_reads_back(
        virsh, tmp_path, ET.parse(configs_dir() / "vdev-domain.xml").getroot()
    )
    assert attrs(domain, "memoryBacking/source") == {"type": "memfd"}
    assert attrs(domain, "memoryBacking/access") == {"mode": "shared"}
    assert attrs(domain, "devices/disk/source")["path"] == "/run/vdev/blk0.sock"
    assert attrs(domain, "devices/interface/source")["mode"] == "client"
    # (The test driver drops <qemu:override>: only libvirt's QEMU driver reads it.)


def test_libvirt_reads_qemu_args_output(
    virsh: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--socket", str(tmp_path / "n.sock"), "--queues", "4", "--mem", "768M"]
    domain = libvirt_reads_back(virsh, tmp_path, qemu_args_xml(capsys, "net", *argv))
    assert domain.findtext("memory") == str(768 * 1024)  # libvirt keeps KiB
    nic = domain.find("devices/interface")
    assert nic is not None and attrs(nic, "driver") == {"queues": "4"}
    assert attrs(nic, "source")["path"] == str(tmp_path / "n.sock")
