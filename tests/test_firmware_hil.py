"""The HIL client without a device: framing against published reference values, and clear, bounded errors for
a port that does not exist and for a device that never answers."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tinylstm import hil

# Examples from the COBS paper (Cheshire and Baker, 1999) as listed in its Wikipedia article.
COBS_EXAMPLES = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
    (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255))),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
]


@pytest.mark.parametrize(("raw", "encoded"), COBS_EXAMPLES)
def test_cobs_matches_published_examples(raw, encoded):
    assert hil.cobs_encode(raw) == encoded
    assert hil.cobs_decode(encoded) == raw


def test_crc16_ccitt_false_check_value():
    assert hil.crc16(b"123456789") == 0x29B1  # the catalogue check value of CRC-16/CCITT-FALSE


def test_broken_frames_are_rejected():
    frame = hil.encode_frame(hil.CMD_RUN, 7, b"\x03\x00\x01\x02")
    assert frame.endswith(b"\x00") and b"\x00" not in frame[:-1]
    assert hil.decode_frame(frame[:-1]) == hil.Frame(1, hil.CMD_RUN, 7, b"\x03\x00\x01\x02")
    flipped = bytearray(frame[:-1])
    flipped[3] ^= 0x01
    with pytest.raises(hil.FrameError):
        hil.decode_frame(bytes(flipped))
    with pytest.raises(hil.FrameError):
        hil.decode_frame(b"\x05\x01\x02")  # the code byte points past the end


def test_missing_port_fails_fast_and_clearly():
    start = time.monotonic()
    with pytest.raises(hil.HILError, match="cannot open serial port /dev/tinylstm-no-such-port"):
        hil.connect("/dev/tinylstm-no-such-port", ready_timeout=0.5)
    assert time.monotonic() - start < 3


def test_silent_device_times_out():
    """A port that opens but never answers: HILTimeout within the ready timeout, not a hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received = bytearray()

    def swallow() -> None:
        connection, _ = server.accept()
        with connection:
            while chunk := connection.recv(4096):
                received.extend(chunk)

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    start = time.monotonic()
    with pytest.raises(hil.HILTimeout, match="no HIL device answered"):
        hil.connect(f"socket://127.0.0.1:{server.getsockname()[1]}", ready_timeout=1.5)
    assert time.monotonic() - start < 4
    thread.join(2)
    server.close()
    assert hil.encode_frame(hil.CMD_INFO, 1) in bytes(received)  # it did ask
