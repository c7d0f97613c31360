#!/bin/sh
# Install the Debian/Ubuntu packages mqbtt needs that are missing (via sudo when
# not root).  The ONE place that lists them: used by `make demo`, `make test`
# and .ci/run.
#
#   scripts/apt-install.sh demo     # what `make demo` needs
#   scripts/apt-install.sh test     # what the test suite needs
set -eu

# `make demo`: a broker for the demo exchange
DEMO_PACKAGES="mosquitto"
# `make test`: everything the test suite starts or calls
TEST_PACKAGES="$DEMO_PACKAGES mosquitto-clients protobuf-compiler openssl strace prometheus tmux postgresql"

case "${1:-}" in
  demo) wanted=$DEMO_PACKAGES ;;
  test) wanted=$TEST_PACKAGES ;;
  *) echo "usage: $0 demo|test" >&2; exit 2 ;;
esac
# python3 -m venv needs ensurepip, which Debian's python3 ships in python3-venv
# (pyenv and python.org builds have it)
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
  wanted="$wanted python3-venv"
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
  exit 0  # not Debian/Ubuntu: the tools say what is missing when they run
fi
missing=""
for pkg in $wanted; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  case "$status" in
    *" installed") ;;
    *) missing="$missing $pkg" ;;
  esac
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
else
  echo "apt-install: missing packages:$missing; install them as root: apt-get install$missing" >&2
  exit 1
fi
echo "apt-install: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
