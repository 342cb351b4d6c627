"""A denoising loop's progress from the `unet` model's process to the streaming model's.

The streaming model keeps no UNet of its own: it sends its request to the `unet` model by
BLS, where it batches with everyone else's and runs on the same captured loops, and it
listens on a Unix socket for that model's report after every step. The socket lives in
Linux's abstract namespace (no file to clean up), named by a random token the streaming
model passes as the request's PROGRESS_TOKEN; a request cannot name any other address.
Messages keep their boundaries (SOCK_SEQPACKET). The other way, one byte says "cancelled",
which the unet reads before each report.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import secrets
import socket
import struct
from typing import Any

log = logging.getLogger("sd_backend")

_PREFIX = "sd-triton-progress-"
_TOKEN_HEX = 32  # 128 random bits
_HEADER = struct.Struct("<iiHH")  # step, total, preview height, preview width (0 x 0: none)
_CANCEL = b"c"
# the unet never waits on a slow reader: a full buffer drops that step's message. 4 MiB holds
# every step of a 150-step loop with a 1024x1024 preview at each.
_SEND_BUFFER = 4 << 20
_MAX_MESSAGE = _HEADER.size + 256 * 256 * 3  # a preview of a 2048x2048 image


@dataclasses.dataclass
class Progress:
    """One step done: `step` of `total` (1-based), and `preview` ((h, w, 3) uint8) or None."""

    step: int
    total: int
    preview: Any = None


def _address(token: str) -> str:
    return "\0" + _PREFIX + token


def check_token(token: str) -> str:
    """The token as given, or ValueError naming PROGRESS_TOKEN."""
    if len(token) != _TOKEN_HEX or any(c not in "0123456789abcdef" for c in token):
        raise ValueError(f"PROGRESS_TOKEN: {token[:40]!r} is not a token the streaming model made ({_TOKEN_HEX} hex digits)")
    return token


class Listener:
    """The streaming model's end: a fresh token and the socket the unet connects to."""

    def __init__(self):
        self.token = secrets.token_hex(_TOKEN_HEX // 2)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._server.bind(_address(self.token))
        self._server.listen(1)
        self._peer: socket.socket | None = None
        self._cancelled = False
        self.closed = False  # the unet hung up (its loop is over)

    def connected(self, timeout_s: float) -> bool:
        """Whether the unet has connected (waiting up to `timeout_s` for it to); a cancel
        asked for before it did is sent as it does."""
        if self._peer is None:
            self._server.settimeout(timeout_s)
            try:
                self._peer, _ = self._server.accept()
            except (socket.timeout, BlockingIOError):
                return False
            if self._cancelled:
                self._send_cancel()
        return True

    def receive(self, timeout_s: float) -> Progress | None:
        """The next report, or None when none came within `timeout_s` or the unet hung up
        (then `closed` is set)."""
        import numpy as np

        if self.closed or not self.connected(timeout_s):
            return None
        self._peer.settimeout(timeout_s)
        try:
            data = self._peer.recv(_MAX_MESSAGE)
        except socket.timeout:
            return None
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return None
        step, total, height, width = _HEADER.unpack_from(data)
        preview = None
        if height and width:
            preview = np.frombuffer(data, np.uint8, offset=_HEADER.size).reshape(height, width, 3)
        return Progress(step, total, preview)

    def cancel(self) -> None:
        """Tell the unet to stop this request (at its next step; once it connects, if it has not yet)."""
        if not self._cancelled:
            self._cancelled = True
            if self._peer is not None:
                self._send_cancel()

    def _send_cancel(self) -> None:
        try:
            self._peer.send(_CANCEL, socket.MSG_NOSIGNAL)
        except OSError:
            pass  # the unet is gone already

    def close(self) -> None:
        for end in (self._peer, self._server):
            if end is not None:
                end.close()


class Reporter:
    """The unet's end of one request's channel."""

    def __init__(self, token: str, connect_timeout_s: float = 1.0):
        address = _address(check_token(token))
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        self._socket.settimeout(connect_timeout_s)
        try:
            self._socket.connect(address)
        except OSError:
            self._socket.close()
            raise
        self._socket.setblocking(False)
        self._dropped = 0
        self._cancelled = False

    def cancelled(self) -> bool:
        """Whether the streaming model said stop, or went away."""
        if not self._cancelled:
            try:
                self._socket.recv(16)  # a cancel byte, or b"": the listener closed
                self._cancelled = True
            except BlockingIOError:
                pass
            except OSError:
                self._cancelled = True
        return self._cancelled

    def send(self, progress: Progress) -> None:
        """Send one report without waiting: a full buffer drops it (counted, logged at close)."""
        preview = progress.preview
        height, width = (0, 0) if preview is None else preview.shape[:2]
        message = _HEADER.pack(progress.step, progress.total, height, width)
        if preview is not None:
            message += preview.tobytes()
        try:
            self._socket.send(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            self._dropped += 1
        except OSError as err:
            if err.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED):
                raise
            self._cancelled = True

    def close(self) -> None:
        if self._dropped:
            log.warning("progress: %d step reports dropped (the streaming model read too slowly)", self._dropped)
        self._socket.close()
