"""Shared pytest fixtures: a private Mosquitto per test, on a free loopback port.

No test ever talks to the public default broker: every test passes the URI of
the broker started here.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from local_broker import LocalBroker  # noqa: E402


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
