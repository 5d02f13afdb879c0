"""`vdev ctl`'s side of the control socket: send one request, return its reply."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from vdev.ctl.protocol import encode

#: How long to wait for a reply (a resize waits up to 5 s for the front-end's ack).
REPLY_TIMEOUT = 30.0


class CtlError(Exception):
    """No daemon there, no sensible reply, or an error reply (its message)."""


def request(path: Path, message: dict[str, Any], timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
    """Send `message` to the control socket at `path`; the reply, if it is ``ok``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise CtlError(f"no control socket at {path} (is `vdev run` running?)") from None
        except ConnectionRefusedError:
            raise CtlError(f"nothing listens on {path} (the daemon is gone)") from None
        except OSError as exc:
            raise CtlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(encode(message))
            with sock.makefile("rb") as replies:
                line = replies.readline()
        except TimeoutError:
            raise CtlError(f"{path}: no reply in {timeout:g}s") from None
        except OSError as exc:
            raise CtlError(f"{path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise CtlError(f"{path}: not a control reply: {line[:200]!r}")
    if not reply["ok"]:
        raise CtlError(str(reply.get("error", "failed, with no reason given")))
    return reply
