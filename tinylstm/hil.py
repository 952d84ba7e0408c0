"""The host side of the HIL protocol (docs/hil-protocol.md): framing, and a client for a board on a serial port.

A frame is ``version, command, sequence, payload..., crc16`` (CRC-16/CCITT-FALSE, little endian), COBS-encoded
and terminated by a zero byte. ``HILClient`` talks to any port pyserial opens by URL: ``/dev/ttyACM0``,
``COM3``, a pty path, or ``socket://127.0.0.1:PORT``. Nothing here knows about emulators.
"""

from __future__ import annotations

import binascii
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import serial

PROTOCOL_VERSION = 1

CMD_INFO = 0x01
CMD_RESET = 0x02
CMD_STEP = 0x03
CMD_RUN = 0x04
CMD_SELECT = 0x05
CMD_BENCH = 0x06
CMD_ERROR = 0x7F
REPLY = 0x80

STEP_WITH_OUTPUT = 0x01
RUN_FIRST = 0x01
RUN_LAST = 0x02
BENCH_SEEDED = 0
BENCH_UPLOADED = 1
BENCH_WITH_OUTPUT = 0x01

ERROR_CODES = {
    1: "bad checksum",
    2: "bad length",
    3: "unknown command",
    4: "wrong model hash",
    5: "unsupported protocol version",
    6: "oversized frame",
    7: "bad framing",
    8: "bad state (RUN continued without a first chunk)",
    9: "bad argument",
}
# Counter kinds: what a count means (the unit once divided by counter_hz, or converted).
COUNTER_KINDS = {1: "cycles", 2: "qemu-icount", 3: "micros"}


class HILError(RuntimeError):
    """A serial-port, timeout or protocol failure talking to a device."""


class HILTimeout(HILError):
    """The device did not answer within the timeout, after the allowed retries."""


class DeviceError(HILError):
    """The device answered with an error frame."""

    def __init__(self, code: int, command: int) -> None:
        self.code = code
        self.command = command
        super().__init__(f"device error {code} ({ERROR_CODES.get(code, 'unknown code')}) "
                         f"for command 0x{command:02x}")


class FrameError(ValueError):
    """Bytes that do not decode to a valid frame."""


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: polynomial 0x1021, initial value 0xFFFF, no reflection, no final xor."""
    return binascii.crc_hqx(data, 0xFFFF)


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result has no zero byte (the frame delimiter is added apart)."""
    out = bytearray()
    start = 0
    while True:
        end = start
        while end < len(data) and data[end] != 0 and end - start < 254:
            end += 1
        code = end - start + 1
        out.append(code)
        out += data[start:end]
        if end == len(data):
            return bytes(out)
        start = end if code == 0xFF else end + 1


def cobs_decode(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        code = data[i]
        i += 1
        if code == 0 or i + code - 1 > len(data):
            raise FrameError("broken COBS encoding")
        out += data[i:i + code - 1]
        i += code - 1
        if code != 0xFF and i < len(data):
            out.append(0)
    return bytes(out)


def encode_frame(command: int, sequence: int, payload: bytes = b"", version: int = PROTOCOL_VERSION) -> bytes:
    """A complete frame on the wire: COBS(header + payload + CRC) + 0x00."""
    body = bytes([version, command, sequence]) + bytes(payload)
    return cobs_encode(body + struct.pack("<H", crc16(body))) + b"\x00"


@dataclass(frozen=True)
class Frame:
    version: int
    command: int
    sequence: int
    payload: bytes


def decode_frame(encoded: bytes) -> Frame:
    """Decode one frame (without its 0x00 delimiter); raise FrameError if it is broken."""
    raw = cobs_decode(encoded)
    if len(raw) < 5:
        raise FrameError(f"frame of {len(raw)} bytes is shorter than a header and a CRC")
    body, (crc,) = raw[:-2], struct.unpack("<H", raw[-2:])
    if crc16(body) != crc:
        raise FrameError("bad CRC")
    return Frame(body[0], body[1], body[2], body[3:])


@dataclass(frozen=True)
class DeviceInfo:
    """What the device reports about itself and its selected model (the INFO reply)."""

    model_count: int
    model_index: int
    model_hash: str
    input_size: int
    window: int
    output_size: int
    layers: int
    cpu_hz: int
    counter_hz: int
    counter_kind: str  # "cycles", "qemu-icount" or "micros"
    max_payload: int
    free_ram: int | None
    board: str

    _FIXED = struct.Struct("<BB16sHHHBIIBHI")

    @classmethod
    def parse(cls, payload: bytes) -> DeviceInfo:
        n = cls._FIXED.size
        if len(payload) < n + 1 or len(payload) != n + 1 + payload[n]:
            raise FrameError(f"INFO payload of {len(payload)} bytes is malformed")
        (count, index, digest, input_size, window, output_size, layers, cpu_hz, counter_hz, kind, max_payload,
         free_ram) = cls._FIXED.unpack(payload[:n])
        return cls(count, index, digest.decode("ascii", "replace"), input_size, window, output_size, layers, cpu_hz,
                   counter_hz, COUNTER_KINDS.get(kind, f"unknown-{kind}"), max_payload,
                   None if free_ram == 0xFFFFFFFF else free_ram, payload[n + 1:].decode("ascii", "replace"))

    @property
    def unit(self) -> str:
        """What ``counts_to_unit`` returns: cycles, instructions (QEMU) or microseconds."""
        return {"cycles": "cycles", "qemu-icount": "instructions", "micros": "us"}.get(self.counter_kind, "counts")

    def counts_to_unit(self, counts: int) -> int:
        """Device counter ticks -> cycles (exact counters), instructions (QEMU -icount shift=0) or µs."""
        if self.counter_kind == "qemu-icount":
            return round(counts * 1_000_000_000 / self.counter_hz)
        return counts


@dataclass(frozen=True)
class StepResult:
    counts: int  # counter ticks for the step (and the output, if asked)
    output: np.ndarray | None  # int8 [output_size]


@dataclass(frozen=True)
class RunResult:
    output: np.ndarray  # int8 [output_size]
    counts: int  # counter ticks for reset + all steps + output
    steps: int


@dataclass(frozen=True)
class BenchResult:
    counts: np.ndarray  # int64 [count]: counter ticks per window (reset + every step + output)
    outputs: np.ndarray | None  # int8 [count, output_size], if asked


def seeded_windows(seed: int, first: int, count: int, window: int, input_size: int) -> np.ndarray:
    """The int8 windows [count, window, input_size] that BENCH generates on the device from ``seed``, starting at
    window index ``first`` (docs/hil-protocol.md): xorshift32 from ``seed ^ ((index + 1) * 0x9E3779B9)``, each
    input byte the top byte of the next state, time step by time step."""
    index = np.arange(first, first + count, dtype=np.uint64)
    state = ((np.uint64(seed) ^ (((index + np.uint64(1)) * np.uint64(0x9E3779B9)) & np.uint64(0xFFFFFFFF)))
             .astype(np.uint32))
    state[state == 0] = 0x6D2B79F5
    out = np.empty((count, window * input_size), dtype=np.int8)
    for i in range(window * input_size):
        state ^= state << np.uint32(13)
        state ^= state >> np.uint32(17)
        state ^= state << np.uint32(5)
        out[:, i] = (state >> np.uint32(24)).astype(np.uint8).view(np.int8)
    return out.reshape(count, window, input_size)


class HILClient:
    """A device speaking the HIL protocol on a serial port.

    ``url`` is anything ``serial.serial_for_url`` opens. Opening retries until ``ready_timeout`` (ports that
    appear late, a socket not yet listening) and then waits for the device's ready banner, asking with INFO
    (boards that reset when the port opens). Every request waits ``timeout`` seconds for its reply; idempotent
    requests are re-sent up to ``retries`` times.
    """

    def __init__(self, url: str, *, baudrate: int = 115200, timeout: float = 5.0, retries: int = 2,
                 ready_timeout: float = 15.0) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self._sequence = 0
        self._buffer = bytearray()
        self.port = self._open(url, baudrate, ready_timeout)
        try:
            self.info = self._wait_ready(ready_timeout)
        except BaseException:
            self.port.close()
            raise

    @staticmethod
    def _open(url: str, baudrate: int, ready_timeout: float) -> serial.SerialBase:
        """Open the port for this client alone. A port that is missing is retried until ``ready_timeout`` (USB
        ports appear late); a malformed URL, a busy port and a refused socket fail at once."""
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                return serial.serial_for_url(url, baudrate=baudrate, timeout=0.05, write_timeout=5, exclusive=True)
            except ValueError as e:
                raise HILError(f"cannot open serial port {url}: {e}") from None
            except (serial.SerialException, OSError) as e:
                text = str(e)
                if "exclusively lock" in text or "Resource temporarily unavailable" in text:
                    raise HILError(f"serial port {url} is busy: another program has it open") from None
                if "Connection refused" in text or "Name or service not known" in text:
                    raise HILError(f"cannot open serial port {url}: nothing is listening there") from None
                if time.monotonic() >= deadline:
                    raise HILError(f"cannot open serial port {url}: {e}") from None
                time.sleep(0.1)

    def _wait_ready(self, ready_timeout: float) -> DeviceInfo:
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            self._send(CMD_INFO, self._next_sequence(), b"")
            for frame in self._frames(min(0.5, max(0.0, deadline - time.monotonic()))):
                if frame.command == CMD_INFO | REPLY:
                    return DeviceInfo.parse(frame.payload)
        raise HILTimeout(f"no HIL device answered on {self.url} within {ready_timeout:.1f} s "
                         "(wrong port, firmware not running, or a different baud rate?)")

    def close(self) -> None:
        self.port.close()

    def __enter__(self) -> HILClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------------------------

    def _next_sequence(self) -> int:
        self._sequence = self._sequence % 255 + 1  # 1..255; 0 marks unsolicited frames
        return self._sequence

    def _send(self, command: int, sequence: int, payload: bytes) -> None:
        try:
            # A leading delimiter ends whatever partial frame the device may hold.
            self.port.write(b"\x00" + encode_frame(command, sequence, payload))
            self.port.flush()
        except (serial.SerialException, OSError) as e:
            raise HILError(f"writing to {self.url} failed: {e}") from None

    def _drain(self) -> None:
        """Discard whatever arrived unasked: replies to abandoned requests, error frames for earlier garbage."""
        try:
            while self.port.in_waiting:
                self._buffer += self.port.read(self.port.in_waiting)
        except (serial.SerialException, OSError) as e:
            raise HILError(f"reading from {self.url} failed: {e}") from None
        for _ in self._frames(0):
            pass

    def _frames(self, timeout: float) -> Iterator[Frame]:
        """Valid frames as they arrive within ``timeout`` seconds; broken ones are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\x00" in self._buffer:
                encoded, _, rest = bytes(self._buffer).partition(b"\x00")
                self._buffer = bytearray(rest)
                if encoded:
                    try:
                        yield decode_frame(encoded)
                    except FrameError:
                        continue
            if time.monotonic() >= deadline:
                return
            try:
                chunk = self.port.read(max(1, self.port.in_waiting))
            except (serial.SerialException, OSError) as e:
                raise HILError(f"reading from {self.url} failed: {e}") from None
            self._buffer += chunk

    def request(self, command: int, payload: bytes = b"", *, idempotent: bool = False,
                timeout: float | None = None) -> bytes:
        """Send one request and return the reply's payload; raise DeviceError for an error frame."""
        timeout = self.timeout if timeout is None else timeout
        attempts = 1 + (self.retries if idempotent else 0)
        garbled = None  # an unsequenced error frame seen while waiting: perhaps for this request, perhaps older
        for _ in range(attempts):
            self._drain()
            sequence = self._next_sequence()
            self._send(command, sequence, payload)
            for frame in self._frames(timeout):
                if frame.sequence == sequence and frame.command == command | REPLY:
                    return frame.payload
                if frame.command == CMD_ERROR and len(frame.payload) >= 2:
                    code, failed = frame.payload[0], frame.payload[1]
                    if frame.sequence == sequence:
                        raise DeviceError(code, failed)
                    if frame.sequence == 0 and idempotent:
                        break  # re-sending is harmless
                    if frame.sequence == 0:
                        garbled = code  # keep waiting: the reply to this request may still come
        if garbled is not None:
            # No reply came: the request itself arrived garbled. Re-sending a STEP/RUN chunk could apply it twice.
            raise DeviceError(garbled, command)
        raise HILTimeout(f"no reply to command 0x{command:02x} from {self.url} within {timeout:.1f} s "
                         f"({attempts} attempt{'s' if attempts > 1 else ''})")

    # -- commands -------------------------------------------------------------------------------------------

    def refresh_info(self) -> DeviceInfo:
        self.info = DeviceInfo.parse(self.request(CMD_INFO, idempotent=True))
        return self.info

    def select(self, model_hash: str) -> DeviceInfo:
        """Make the model with this hash (QuantizedModel.digest()) current; DeviceError 4 if the device has none."""
        encoded = model_hash.encode("ascii")
        if len(encoded) != 16:
            raise ValueError(f"model hash {model_hash!r} must be 16 hex digits")
        self.info = DeviceInfo.parse(self.request(CMD_SELECT, encoded, idempotent=True))
        return self.info

    def reset(self) -> None:
        self.request(CMD_RESET, idempotent=True)

    def step(self, x_t: np.ndarray, *, output: bool = True) -> StepResult:
        """One time step of int8 input [input_size]; with ``output``, the model's output after it."""
        x = self._int8(x_t, (self.info.input_size,), "x_t")
        reply = self.request(CMD_STEP, bytes([STEP_WITH_OUTPUT if output else 0]) + x.tobytes())
        expected = 4 + (self.info.output_size if output else 0)
        if len(reply) != expected:
            raise HILError(f"STEP reply of {len(reply)} bytes, expected {expected}")
        (counts,) = struct.unpack_from("<I", reply)
        return StepResult(counts, np.frombuffer(reply[4:], dtype=np.int8).copy() if output else None)

    def run(self, window: np.ndarray) -> RunResult:
        """Reset, step through int8 inputs [T, input_size], and return the output with the device's count.

        The window goes in chunks of whole time steps that fit the device's receive buffer; the count covers
        only the computation (reset, every step, the output), not the serial transfer.
        """
        info = self.info
        x = np.asarray(window)
        if x.ndim != 2:
            raise ValueError(f"window has shape {list(x.shape)}, expected [T, {info.input_size}]")
        x = self._int8(x, (x.shape[0], info.input_size), "window")
        per_chunk = max(1, (info.max_payload - 1) // info.input_size)
        chunks = [x[i:i + per_chunk] for i in range(0, len(x), per_chunk)] or [x]
        for n, chunk in enumerate(chunks):
            flags = (RUN_FIRST if n == 0 else 0) | (RUN_LAST if n == len(chunks) - 1 else 0)
            reply = self.request(CMD_RUN, bytes([flags]) + chunk.tobytes())
        expected = 6 + info.output_size
        if len(reply) != expected:
            raise HILError(f"RUN reply of {len(reply)} bytes, expected {expected}")
        counts, steps = struct.unpack_from("<IH", reply)
        if steps != len(x):
            raise HILError(f"device ran {steps} steps, expected {len(x)}")
        return RunResult(np.frombuffer(reply[6:], dtype=np.int8).copy(), counts, steps)

    def bench_capacity(self, *, uploaded: bool, outputs: bool = True) -> int:
        """The most windows one BENCH request may hold (0: this model's windows or outputs do not fit a frame)."""
        info = self.info
        record = 4 + (info.output_size if outputs else 0)
        window_bytes = info.window * info.input_size
        if not uploaded:
            return max(0, (info.max_payload - info.input_size - 2) // record)
        if 4 + window_bytes > info.max_payload or 2 + record > info.max_payload:
            return 0
        if record > window_bytes:
            return 1
        return min((info.max_payload - 4) // window_bytes, (info.max_payload - 2) // record)

    def bench_seeded(self, count: int, seed: int, first: int = 0, *, outputs: bool = True,
                     timeout: float | None = None) -> BenchResult:
        """Run ``count`` windows generated on the device (``seeded_windows(seed, first, ...)``) and return each
        window's count and, with ``outputs``, its output. ``count`` must not exceed ``bench_capacity``."""
        if not 0 <= seed < 2**32 or not 0 <= first < 2**32:
            raise ValueError("seed and first must fit 32 bits")
        self._check_bench_count(count, self.bench_capacity(uploaded=False, outputs=outputs))
        payload = struct.pack("<BBHII", BENCH_SEEDED, BENCH_WITH_OUTPUT if outputs else 0, count, seed, first)
        return self._bench(payload, count, outputs, timeout)

    def bench_windows(self, windows: np.ndarray, *, outputs: bool = True,
                      timeout: float | None = None) -> BenchResult:
        """Upload int8 windows [count, window, input_size] in one BENCH request and run each on the device."""
        info = self.info
        x = np.asarray(windows)
        x = self._int8(x, (len(x) if x.ndim == 3 else -1, info.window, info.input_size), "windows")
        self._check_bench_count(len(x), self.bench_capacity(uploaded=True, outputs=outputs))
        flags = BENCH_WITH_OUTPUT if outputs else 0
        payload = struct.pack("<BBH", BENCH_UPLOADED, flags, len(x)) + x.tobytes()
        return self._bench(payload, len(x), outputs, timeout)

    @staticmethod
    def _check_bench_count(count: int, capacity: int) -> None:
        if capacity == 0:
            raise HILError("this model's windows or outputs do not fit one BENCH frame; use run() instead")
        if not 1 <= count <= capacity:
            raise ValueError(f"a BENCH request holds 1 to {capacity} windows, not {count}")

    def _bench(self, payload: bytes, count: int, outputs: bool, timeout: float | None) -> BenchResult:
        # Not idempotent in effect on the state, but each window starts from a reset: re-sending is harmless.
        reply = self.request(CMD_BENCH, payload, idempotent=True,
                             timeout=self.timeout * count if timeout is None else timeout)
        record = 4 + (self.info.output_size if outputs else 0)
        if len(reply) != 2 + count * record or struct.unpack_from("<H", reply)[0] != count:
            raise HILError(f"BENCH reply of {len(reply)} bytes, expected {2 + count * record} for {count} windows")
        records = np.frombuffer(reply[2:], dtype=np.uint8).reshape(count, record)
        counts = records[:, :4].copy().view("<u4")[:, 0].astype(np.int64)
        return BenchResult(counts, records[:, 4:].copy().view(np.int8) if outputs else None)

    @staticmethod
    def _int8(values: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
        a = np.asarray(values)
        if a.shape != shape:
            raise ValueError(f"{name} has shape {list(a.shape)}, expected {list(shape)}")
        if a.dtype != np.int8:
            if np.any(a < -128) or np.any(a > 127):
                raise ValueError(f"{name} has values outside int8")
            a = a.astype(np.int8)
        return np.ascontiguousarray(a)


def connect(url: str, **kwargs: object) -> HILClient:
    """Open a HIL device by serial URL and wait until it is ready (see HILClient)."""
    return HILClient(url, **kwargs)  # type: ignore[arg-type]
