"""Shared pytest fixtures: a private Mosquitto per test, on a free loopback port.

No test ever talks to the public default broker: every test passes the URI of
the broker started here.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from local_broker import LocalBroker, free_port, mosquitto_path  # noqa: E402

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


@pytest.fixture
def flood_broker():
    """A broker that queues without limit for a disconnected persistent
    session (the setting a recording site needs, see the README)."""
    b = LocalBroker(extra="max_queued_messages 0\nmax_queued_bytes 0").start()
    yield b
    b.cleanup()


@pytest.fixture(scope="session")
def pg():
    """One private PostgreSQL for the whole session (examples/local_postgres.py)."""
    from local_postgres import LocalPostgres
    server = LocalPostgres().start()
    yield server
    server.cleanup()


_dbs = iter(range(10 ** 6))


@pytest.fixture
def pg_url(pg):
    """A fresh, empty database of the private cluster (URL with the password)."""
    return pg.create_db(f"t{next(_dbs)}")


EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")   # fast to make


def openssl(cwd, *args):
    """Run ``openssl ARGS`` in *cwd* (failing on an error)."""
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two CAs made with openssl: ``ca`` signs the broker's certificate and
    the good client certificates, ``rogue`` signs a client certificate the
    broker must refuse.  Also an encrypted key and a mismatched key."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue"):
        openssl(d, "req", "-x509", *EC, "-nodes", "-days", "2", "-keyout",
                f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN=mqbtt test {ca}")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")

    def cert(name, ca, ext, extra=()):
        openssl(d, "req", *EC, "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}")
        openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext)
    cert("server", "ca", "server.ext")
    cert("client", "ca", "client.ext")
    cert("intruder", "rogue", "client.ext")
    openssl(d, "pkey", "-in", "client.key", "-aes256", "-passout", "pass:hunter2", "-out", "enc.key")
    (d / "both.pem").write_text((d / "client.crt").read_text() + (d / "client.key").read_text())
    (d / "garbage.pem").write_text("not a certificate\n")
    return d


@pytest.fixture(scope="module")
def mtls_broker(pki):
    """A private Mosquitto requiring a client certificate of the *pki* CA on
    ``tls_port`` (and plain MQTT on ``port``)."""
    port = free_port()
    b = LocalBroker(listeners=(f"listener {port} 127.0.0.1\ncafile {pki}/ca.crt\n"
                               f"certfile {pki}/server.crt\nkeyfile {pki}/server.key\n"
                               "require_certificate true\n")).start()
    b.tls_port = port
    yield b
    b.cleanup()


@pytest.fixture
def ws_server():
    """make(sessions, refuse=None): a testlib.FakeWS log websocket, closed after the test."""
    from testlib import FakeWS
    servers = []

    def make(sessions, refuse=None):
        servers.append(FakeWS(sessions, refuse))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def _no_default_broker(monkeypatch):
    # a test that forgets to pass its broker must fail, not reach the public host
    monkeypatch.setenv("MQBTT_BROKER", "mqtt://127.0.0.1:1")
