"""The tables `vdev ctl` prints, from replies as the control socket sends them."""

from __future__ import annotations

from vdev.ctl.render import domain_summary, render_list, render_reply, render_stats, table


def queue(index: int, **counters: object) -> dict[str, object]:
    return {
        "index": index,
        "size": 128,
        "enabled": True,
        "running": True,
        "in_flight": 2,
        "failure": None,
        **counters,
    }


DISK = {
    "name": "disk0",
    "type": "blk",
    "socket": "/run/vdev/disk0.sock",
    "client": False,
    "connected": True,
    "sessions": 3,
    "status": {"hex": "0xf", "names": ["ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"]},
    "features": {"hex": "0x100000000", "names": ["VERSION_1"]},
    "protocol_features": {"hex": "0x2", "names": ["LOG_SHMFD"]},
    "in_flight": 4,
    "queues": [queue(0, requests=10, kicks=4), queue(1, requests=7, kicks=1)],
    "domain": {"status": "serving", "pid": 4242, "restarts": 1, "failure": None},
    "counters": {"requests": 17, "bytes_read": 4096},
}
NIC = {
    **DISK,
    "name": "nic",
    "type": "net",
    "socket": "/run/vdev/nic.sock",
    "connected": False,
    "sessions": 0,
    "status": None,
    "features": None,
    "protocol_features": None,
    "in_flight": 0,
    "queues": [],
    "domain": None,
    "counters": {"rx_frames": 0},
}


def test_table_aligns_columns_and_shows_none_and_bools() -> None:
    assert table(("A", "LONGER"), [("xyz", None), (1, True)]) == [
        "A    LONGER",
        "xyz  -",
        "1    yes",
    ]


def test_list_is_one_line_per_device() -> None:
    lines = render_list([DISK, NIC]).splitlines()
    assert lines[0].split() == [
        "NAME", "TYPE", "FRONT-END", "SESSIONS", "QUEUES", "IN-FLIGHT", "DOMAIN", "SOCKET"
    ]  # fmt: skip
    assert lines[1].split("  ")[0] == "disk0" and "2/2 enabled" in lines[1]
    assert "serving pid 4242, 1 restart" in lines[1] and lines[1].endswith("disk0.sock")
    assert lines[2].startswith("nic    net   -  ")
    # Columns line up: every row has the socket where the header has SOCKET.
    column = lines[0].index("SOCKET")
    assert [line[column:] for line in lines[1:]] == ["/run/vdev/disk0.sock", "/run/vdev/nic.sock"]


def test_stats_show_state_counters_and_a_queue_table() -> None:
    text = render_stats([DISK, NIC])
    disk, nic = text.split("\n\n")
    lines = disk.splitlines()
    assert lines[0] == "disk0 (blk, /run/vdev/disk0.sock): connected, sessions 3"
    assert "  status: 0xf ACKNOWLEDGE DRIVER DRIVER_OK FEATURES_OK" in lines
    assert "  features: 0x100000000 VERSION_1" in lines
    assert "  domain: serving pid 4242, 1 restart" in lines
    assert "  counters: requests=17 bytes_read=4096" in lines
    header = next(line for line in lines if line.lstrip().startswith("QUEUE"))
    assert header.split() == [
        "QUEUE", "SIZE", "ENABLED", "IN-FLIGHT", "REQUESTS", "KICKS", "FAILURE"
    ]  # fmt: skip
    assert lines[-2].split() == ["0", "128", "yes", "2", "10", "4", "-"]
    assert nic.splitlines() == [
        "nic (net, /run/vdev/nic.sock): no front-end, sessions 0",
        "  counters: rx_frames=0",
    ]


def test_domain_summary() -> None:
    assert domain_summary(None) == "-"
    gone = {"status": "given up", "pid": None, "restarts": 5, "failure": "crashed 5 times"}
    assert domain_summary(gone) == "given up, 5 restarts (crashed 5 times)"


def test_replies_to_changes() -> None:
    resized = {"ok": True, "device": "disk0", "size": 2 << 30, "notified": True}
    assert render_reply("resize", resized) == (
        "disk0: resized to 2147483648 bytes; the front-end was told"
    )
    link = {"ok": True, "device": "nic", "up": False, "notified": False}
    assert render_reply("link", link) == "nic: link down; no front-end was told"
