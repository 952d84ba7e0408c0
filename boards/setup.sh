#!/usr/bin/env bash
# Set up everything tinylstm needs on a Debian/Ubuntu machine, idempotently:
#   1. the cross compilers and emulators for the boards (only the missing packages, with sudo when not root);
#   2. a virtual environment in .venv with tinylstm and its dependencies.
# Usage: bash boards/setup.sh            (quiet when everything is already there)
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(gcc-avr avr-libc simavr libsimavr-dev gcc-arm-none-eabi libnewlib-arm-none-eabi
                 qemu-system-arm arduino-core-avr chromium)
VENV=.venv

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp="$VENV/.tinylstm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing tinylstm into $VENV"
    [ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
    log="$VENV/pip-install.log"
    # torch and executorch in one command, so executorch gets the pinned CPU torch.
    if ! "$VENV/bin/pip" install torch==2.13.0 executorch==1.5.1 -e ".[dev,plot,search]" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "setup: pip install failed; full log in $log" >&2
        exit 1
    fi
    touch "$stamp"
fi
