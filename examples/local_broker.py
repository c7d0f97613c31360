"""Start a private Mosquitto on a free loopback port (for tests, demos, benchmarks).

    from local_broker import LocalBroker
    with LocalBroker() as broker:
        print(broker.uri)          # mqtt://127.0.0.1:PORT

Needs the ``mosquitto`` binary (Debian package ``mosquitto``).  The broker gets
its own configuration in a temporary directory: loopback only, anonymous
access unless a password file is given, ``set_tcp_nodelay true`` (see the
README's note for broker operators), no persistence unless asked for.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


#: Where Debian puts the broker, which is often not on a user's $PATH.
SBIN_MOSQUITTO = "/usr/sbin/mosquitto"

#: How to get it, in one line.
INSTALL_HINT = ("mosquitto is not installed: sudo apt-get install mosquitto "
                "(or run `make demo` / `make test`, which install it)")


class MosquittoMissing(RuntimeError):
    """The ``mosquitto`` broker is not installed (the message says how to install it)."""


def mosquitto_path():
    """The path of the ``mosquitto`` binary (``$MQBTT_MOSQUITTO`` if set, else
    found on ``$PATH`` or in /usr/sbin), or None if it is not installed."""
    configured = os.environ.get("MQBTT_MOSQUITTO")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    found = shutil.which("mosquitto")
    if found is None and os.path.exists(SBIN_MOSQUITTO):
        found = SBIN_MOSQUITTO
    return found


_given_ports = set()


def free_port() -> int:
    """A free loopback port, never one this process was given before (a broker
    with several listeners asks for several: they must differ)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given_ports:
            _given_ports.add(port)
            return port


class LocalBroker:
    """A private ``mosquitto`` process.

    :param port: TCP port (default: a free one).
    :param persistence: keep sessions and queued messages across restarts.
    :param extra: more mosquitto.conf lines (global options, or the body of
      the default listener: e.g. TLS or ``password_file``/``acl_file`` lines).
    :param listeners: additional ``listener ...`` blocks, appended verbatim.
    :param users: ``{user: password}``: only these clients may connect.
    :param acl: the text of an ACL file (e.g. ``pattern readwrite mqbtt/%u/#``).
    :param stock: a broker configured as Mosquitto ships: only the listener,
      ``allow_anonymous true``, *extra* and *listeners* (no ``set_tcp_nodelay``,
      no log; as root also ``user root``, so that it can read files in
      private temporary directories such as TLS keys).
    """

    def __init__(self, port=None, persistence=False, extra="", listeners="", anonymous=True,
                 users=None, acl=None, stock=False):
        if mosquitto_path() is None:
            raise MosquittoMissing(INSTALL_HINT)
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="mqbtt-broker-")
        self.persistence = persistence
        self.extra = extra
        self.listeners = listeners
        self.anonymous = anonymous
        self.proc = None
        self.log_path = os.path.join(self.dir, "mosquitto.log")
        self.users = users
        self.acl = acl
        self.stock = stock
        if users:
            self.anonymous = False
            self.set_users(users)
        if acl:
            with open(os.path.join(self.dir, "acl"), "w") as f:
                f.write(acl)

    def set_users(self, users):
        """Write the password file: *users* maps user names to passwords (the
        broker reads it when it starts: call :meth:`restart` to apply a change)."""
        path = os.path.join(self.dir, "passwd")
        open(path, "w").close()
        for user, password in users.items():
            subprocess.run(["mosquitto_passwd", "-b", path, user, password], check=True,
                           capture_output=True)
        os.chmod(path, 0o644)

    @property
    def uri(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config(self) -> str:
        if self.stock:
            return "\n".join([
                "user root" if hasattr(os, "geteuid") and os.geteuid() == 0 else "",
                f"listener {self.port} 127.0.0.1",
                "allow_anonymous true",
                "log_dest none",   # the stderr pipe is read only if it fails to start
                self.extra,
                self.listeners,
            ]) + "\n"
        lines = [
            # as root, mosquitto would drop to the "mosquitto" user, which cannot read
            # the private temporary directories this broker's files live in
            "user root" if hasattr(os, "geteuid") and os.geteuid() == 0 else "",
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            "set_tcp_nodelay true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"log_dest file {self.log_path}",
            f"password_file {self.dir}/passwd" if self.users else "",
            f"acl_file {self.dir}/acl" if self.acl else "",
            f"listener {self.port} 127.0.0.1",
            self.extra,
            self.listeners,
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout=10.0):
        conf = os.path.join(self.dir, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(self.config())
        exe = mosquitto_path() or SBIN_MOSQUITTO
        self.proc = subprocess.Popen([exe, "-c", conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        ports = [self.port] + [int(line.split()[1]) for line in self.listeners.splitlines()
                               if line.startswith("listener ")]
        for port in ports:
            self._wait_port(port, deadline)
        return self

    def _wait_port(self, port, deadline):
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {err}{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not listen on port {port}")
                time.sleep(0.02)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()

    def restart(self):
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()
