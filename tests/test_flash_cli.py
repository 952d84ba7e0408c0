"""`tinylstm flash` as users run it, in subprocesses: concurrent flashes of one model, `--stop` stopping only what
flash started, a second flash told that the firmware already runs, and bad names and ports refused in one line
with nothing left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.random_models import random_model
from tinylstm import firmware, qmodel


def tinylstm(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinylstm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def small_model(directory: Path) -> Path:
    return qmodel.save(random_model(3, layers=1, input_size=2, hidden_sizes=(4,), window=3, outputs=2),
                       directory / "m.npz")


def test_stop_with_an_unknown_board_is_a_one_line_error(tmp_path):
    result = tinylstm("flash", "--stop", "--board", "foo", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "unknown board 'foo'" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_port_leaves_no_project_behind(tmp_path):
    model = small_model(tmp_path)
    result = tinylstm("flash", "--model", str(model), "--board", "uno", "--port", "/dev/tinylstm-no-such-port",
                      cwd=tmp_path)
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]


@pytest.mark.slow
def test_concurrent_flashes_and_stop_only_what_flash_started(tmp_path):
    model = small_model(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: tinylstm("flash", "--model", str(model), "--board", "uno_sim",
                                                   cwd=tmp_path), range(4)))
    for result in results:
        assert result.returncode == 0, result.stderr
    assert sum("already running this firmware" in r.stderr for r in results) >= 1

    # An emulator that another command (a bench, a run) started and owns: flash --stop must leave it alone.
    elf = next(tmp_path.glob("tinylstm-firmware/uno_sim-*/.pio/build/*/firmware.elf"))
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from tinylstm import firmware
        emulator = firmware.start_emulator("uno_sim", {str(elf)!r})
        print(emulator.pid, flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        owned_pid = int(owner.stdout.readline())
        stopped = tinylstm("flash", "--stop", "--board", "uno_sim", cwd=tmp_path)
        assert stopped.returncode == 0 and stopped.stdout.count("stopped uno_sim") == 4, stopped.stdout
        os.kill(owned_pid, 0)  # still running
        assert owned_pid in [e.pid for e in firmware.running_emulators()]
    finally:
        owner.send_signal(signal.SIGKILL)  # as a crashed bench would die
        owner.wait()

    # The owner's emulator dies with it and leaves its run directory; the next start clears it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{owned_pid}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{owned_pid}").exists()

    def left_behind() -> list[Path]:
        return [p for p in firmware.run_dir().iterdir() if (p / "pid").read_text().strip() == str(owned_pid)]

    assert len(left_behind()) == 1
    with firmware.start_emulator("uno_sim", elf):
        assert left_behind() == []


@pytest.mark.slow
def test_a_real_board_without_registry_access_says_what_failed_and_where_the_project_is(tmp_path):
    """The registry made unreachable by a proxy on a closed local port, so the stock platform cannot download."""
    model = small_model(tmp_path)
    dead_proxy = {name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    result = tinylstm("build", "--model", str(model), "--board", "uno", "--out", "project", cwd=tmp_path,
                      env=dead_proxy)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "downloading the PlatformIO platform 'atmelavr'" in result.stderr
    assert f"pio run -d {Path('project')}" in result.stderr
    assert (tmp_path / "project" / "platformio.ini").is_file()  # the project stays, for a machine with internet


def test_bench_on_a_busy_port_or_a_dead_socket_is_a_one_line_error_at_once(tmp_path):
    import serial

    model = small_model(tmp_path)
    controller, device = os.openpty()
    holder = serial.Serial(os.ttyname(device), exclusive=True)  # a serial monitor, or another bench, holds it
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        for port, message in ((os.ttyname(device), "is busy"), (f"socket://127.0.0.1:{free}", "nothing is listening")):
            start = time.monotonic()
            result = tinylstm("bench", "--model", str(model), "--board", "uno", "--port", port, "--windows", "2",
                              cwd=tmp_path)
            errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
            assert result.returncode == 1 and len(errors) == 1 and message in errors[0], result.stderr
            assert "Traceback" not in result.stderr
            assert time.monotonic() - start < 20  # the interpreter's start-up; no 15 s wait for the port
    finally:
        holder.close()
        os.close(controller)
        os.close(device)
