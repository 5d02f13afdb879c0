"""The tables `vdev ctl` prints (without --json) from the control socket's replies."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

#: Queue fields shown in other columns, or not at all.
_QUEUE_SKIP = {"running"}
_WIDTH = 100


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart, under `headers`."""
    cells = [list(headers), *[[cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def domain_summary(domain: Mapping[str, Any] | None) -> str:
    """``-``, or e.g. ``serving pid 4242, 1 restart``."""
    if domain is None:
        return "-"
    pid = f" pid {domain['pid']}" if domain.get("pid") is not None else ""
    restarts = domain.get("restarts", 0)
    text = f"{domain['status']}{pid}, {restarts} restart{'' if restarts == 1 else 's'}"
    if domain.get("failure"):
        text += f" ({domain['failure']})"
    return text


def render_list(devices: Sequence[Mapping[str, Any]]) -> str:
    """One line per device: name, type, front-end, sessions, queues, in flight, domain."""
    headers = ("NAME", "TYPE", "FRONT-END", "SESSIONS", "QUEUES", "IN-FLIGHT", "DOMAIN", "SOCKET")
    rows = []
    for d in devices:
        queues = d["queues"]
        enabled = sum(1 for q in queues if q["enabled"])
        rows.append(
            (
                d["name"],
                d["type"],
                "connected" if d["connected"] else "-",
                d["sessions"],
                f"{enabled}/{len(queues)} enabled" if queues else "-",
                d["in_flight"],
                domain_summary(d["domain"]),
                d["socket"],
            )
        )
    return "\n".join(table(headers, rows))


def render_stats(devices: Sequence[Mapping[str, Any]]) -> str:
    """Per device: state, features, domain, counters, and a table of its queues."""
    return "\n\n".join(_device_stats(d) for d in devices)


def _device_stats(d: Mapping[str, Any]) -> str:
    front_end = "connected" if d["connected"] else "no front-end"
    lines = [f"{d['name']} ({d['type']}, {d['socket']}): {front_end}, sessions {d['sessions']}"]
    for key, label in (
        ("status", "status"),
        ("features", "features"),
        ("protocol_features", "protocol features"),
    ):
        if d[key] is not None:
            lines += _wrapped(f"{label}: {d[key]['hex']}", d[key]["names"])
    if d["domain"] is not None:
        lines.append(f"  domain: {domain_summary(d['domain'])}")
    lines += _wrapped("counters:", [f"{k}={v}" for k, v in d["counters"].items()])
    queues = d["queues"]
    if queues:
        # Why a queue failed is long: last.
        keys = [k for k in queues[0] if k not in _QUEUE_SKIP and k != "failure"] + ["failure"]
        headers = [("QUEUE" if k == "index" else k.upper().replace("_", "-")) for k in keys]
        rows = [[q.get(k) for k in keys] for q in queues]
        lines += ["  " + line for line in table(headers, rows)]
    return "\n".join(lines)


def _wrapped(label: str, words: Sequence[str]) -> list[str]:
    text = " ".join([label, *words])
    return textwrap.wrap(text, _WIDTH, initial_indent="  ", subsequent_indent="      ")


def render_reply(action: str, reply: Mapping[str, Any]) -> str:
    """What `vdev ctl ACTION` prints for the daemon's (successful) reply."""
    if action == "list":
        return render_list(reply["devices"])
    if action == "stats":
        return render_stats(reply["devices"])
    told = "the front-end was told" if reply["notified"] else "no front-end was told"
    if action == "resize":
        return f"{reply['device']}: resized to {reply['size']} bytes; {told}"
    return f"{reply['device']}: link {'up' if reply['up'] else 'down'}; {told}"
