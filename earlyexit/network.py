"""The network: the Hugging Face hub, asked only when a user names something that lives there, and loopback
addresses (what the server may expose and the judge may reach without a key).

Without a network, ``from_pretrained`` and ``load_dataset`` retry for tens of seconds before they fail with a
long traceback. :func:`require_hub` answers first, in a few seconds at most: it honours ``HF_HUB_OFFLINE`` at
once, otherwise opens one TCP connection to the hub with a short timeout, and turns a failure into one
:class:`EarlyExitError` line that says what to pass instead.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from urllib.parse import urlparse

from earlyexit.errors import EarlyExitError

PROBE_TIMEOUT_S = 3.0
_reachable: bool | None = None  # one probe per process


def hub_offline() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to 1/true/yes)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub's endpoint, name resolution included, bounded by ``timeout`` seconds."""
    global _reachable
    if _reachable is None:
        result = [False]

        def probe() -> None:
            try:
                with socket.create_connection(_endpoint(), timeout=timeout):
                    result[0] = True
            except OSError:
                pass

        # getaddrinfo has no timeout of its own: run the probe in a thread and stop waiting for it.
        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout)
        _reachable = result[0]
    return _reachable


def require_hub(what: str, instead: str) -> None:
    """Raise one clear line when the hub cannot be asked for ``what``; return at once when ``HF_HUB_OFFLINE``
    is set (the caller then reads the local cache only, and reports a miss with :func:`offline_miss`).

    Args:
        what: what would be fetched, e.g. ``"dataset 'tatsu-lab/alpaca'"``.
        instead: what the user can pass instead, e.g. ``"--data.source alpaca-sample"``.
    """
    if hub_offline():
        return
    if not hub_reachable():
        host, _ = _endpoint()
        raise EarlyExitError(f"{what} is on the Hugging Face hub, which is unreachable ({host}: no network?); pass {instead}")


def offline_miss(what: str, instead: str) -> EarlyExitError:
    """The error for something the hub holds that the local cache lacks while ``HF_HUB_OFFLINE`` is set."""
    return EarlyExitError(f"{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; pass {instead}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
