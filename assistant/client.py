"""Small helpers for programs that talk to the app over its API (benchmarks, tests, scripts)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ``--trusted-proxies`` for an app whose test or benchmark clients play several users over
# loopback (``as_client``).  Not the default: the default trusts no proxy, so a caller cannot
# pick its own address.
LOOPBACK_PROXIES = "127.0.0.1,::1"


def as_client(number: int) -> dict[str, str]:
    """Headers that make simulated user ``number`` a client of its own: the app counts limits
    and fair scheduling per client address, and takes it from X-Forwarded-For only when the
    connection comes from a trusted proxy, so the app must run with ``--trusted-proxies
    127.0.0.1,::1`` (``LOOPBACK_PROXIES``; the default trusts none and ignores the header).
    Addresses from 198.18.0.0/15, the range reserved for benchmarks (RFC 2544)."""
    return {"X-Forwarded-For": f"198.18.{number // 250 % 256}.{number % 250 + 1}"}


def message_text(message: dict) -> str:
    """The text of one Chatbot message as the API returns it: Gradio 6 sends content either
    as a string or as a list of typed parts (``[{"type": "text", "text": ...}]``)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))
