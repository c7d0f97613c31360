"""Shared pytest fixtures: a private Mosquitto per test, on a free loopback port.

No test ever talks to the public default broker: every test passes the URI of
the broker started here.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from local_broker import LocalBroker, mosquitto_path  # noqa: E402

# Hypothesis explores new random examples at every run on a developer's machine; under
# CI (``$CI`` set, as .ci/run does) it runs a fixed set, so that one CI run cannot fail
# on an example nobody ran before (a new failure is found, and fixed, locally).
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:     # reported with the other missing packages below
    pass
else:
    _hypothesis_settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")

def _initdb_path():
    from local_postgres import pg_bindir
    try:
        return os.path.join(pg_bindir(), "initdb")
    except RuntimeError:
        return None


#: Programs the tests start, with the Debian package that has them (scripts/apt-install.sh
#: installs them).  None: look for the program on $PATH.
PROGRAMS = {
    "mosquitto": ("mosquitto", mosquitto_path),
    "mosquitto_passwd": ("mosquitto", None),
    "protoc": ("protobuf-compiler", None),
    "openssl": ("openssl", None),
    "strace": ("strace", None),
    "prometheus": ("prometheus", None),
    "promtool": ("prometheus", None),
    "tmux": ("tmux", None),
    "initdb": ("postgresql", _initdb_path),
}


def _requirements(path):
    """The distribution names in a requirements file (following ``-r``)."""
    import re
    names = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r"):
                names += _requirements(os.path.join(os.path.dirname(path), line[2:].strip()))
            elif line:
                names.append(re.match(r"[A-Za-z0-9._-]+", line).group(0))
    return names


def missing_parts():
    """What the test suite needs but this machine lacks: ``(programs, packages)``."""
    import shutil
    from importlib import metadata
    programs = sorted({package for program, (package, find) in PROGRAMS.items()
                       if (find() if find else shutil.which(program)) is None})
    packages = []
    for name in _requirements(os.path.join(ROOT, "requirements-dev.txt")):
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            packages.append(name)
    return programs, packages


def pytest_sessionstart(session):
    """Stop at once, with one message, when a part the tests need is missing
    (instead of one error per test)."""
    programs, packages = missing_parts()
    if programs or packages:
        what = [f"apt packages {' '.join(programs)}"] if programs else []
        what += [f"Python packages {' '.join(packages)}"] if packages else []
        raise pytest.UsageError(f"the test suite needs {' and '.join(what)}: run `make test`, which installs "
                    "them (or apt-get install / pip install -r requirements-dev.txt)")


@pytest.fixture
def broker():
    """A running private Mosquitto (``broker.uri``, ``broker.port``,
    ``broker.restart()``, ``broker.stop()``)."""
    b = LocalBroker().start()
    yield b
    b.cleanup()


@pytest.fixture
def persistent_broker():
    """A private Mosquitto with persistence on (sessions survive restarts)."""
    b = LocalBroker(persistence=True).start()
    yield b
    b.cleanup()


@pytest.fixture(autouse=True)
def _no_default_broker(monkeypatch):
    # a test that forgets to pass its broker must fail, not reach the public host
    monkeypatch.setenv("MQBTT_BROKER", "mqtt://127.0.0.1:1")
