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


def _info_payload(input_size: int, window: int, output_size: int) -> bytes:
    fixed = hil.DeviceInfo._FIXED.pack(1, 0, b"0123456789abcdef", input_size, window, output_size, 1, 16_000_000,
                                       16_000_000, 0, 64, 0xFFFFFFFF)
    return fixed + bytes([4]) + b"fake"


def test_a_stale_error_frame_is_not_blamed_on_a_correct_request():
    """A device that, before answering a RUN, still sends the unsequenced error frame earlier garbage earned:
    the client returns the RUN's own reply instead of raising the stale error."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def device() -> None:
        connection, _ = server.accept()
        buffer = bytearray()
        with connection:
            while chunk := connection.recv(4096):
                buffer += chunk
                while b"\x00" in buffer:
                    encoded, _, rest = bytes(buffer).partition(b"\x00")
                    buffer = bytearray(rest)
                    if not encoded:
                        continue
                    frame = hil.decode_frame(encoded)
                    if frame.command == hil.CMD_INFO:
                        reply = hil.encode_frame(hil.CMD_INFO | hil.REPLY, frame.sequence, _info_payload(2, 3, 1))
                    else:  # RUN of all 3 steps: first the stale error, then the reply
                        stale = hil.encode_frame(hil.CMD_ERROR, 0, bytes([1, 0]))
                        reply = stale + hil.encode_frame(hil.CMD_RUN | hil.REPLY, frame.sequence,
                                                         (1234).to_bytes(4, "little") + (3).to_bytes(2, "little")
                                                         + bytes([0x7B]))
                    connection.sendall(reply)

    thread = threading.Thread(target=device, daemon=True)
    thread.start()
    with hil.connect(f"socket://127.0.0.1:{server.getsockname()[1]}", timeout=2.0, ready_timeout=3.0) as client:
        result = client.run([[1, 2], [3, 4], [5, 6]])
    assert result.counts == 1234 and result.steps == 3 and result.output.tolist() == [0x7B]
    server.close()


def test_a_busy_port_a_refused_socket_and_a_bad_url_fail_at_once():
    import os

    import serial

    controller, device = os.openpty()
    name = os.ttyname(device)
    holder = serial.Serial(name, exclusive=True)
    try:
        start = time.monotonic()
        with pytest.raises(hil.HILError, match="is busy"):
            hil.connect(name, ready_timeout=10)
        assert time.monotonic() - start < 2
    finally:
        holder.close()
        os.close(controller)
        os.close(device)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    for url, message in ((f"socket://127.0.0.1:{free}", "nothing is listening"),
                         ("nosuchscheme://somewhere", "cannot open serial port")):
        start = time.monotonic()
        with pytest.raises(hil.HILError, match=message):
            hil.connect(url, ready_timeout=10)
        assert time.monotonic() - start < 2
