"""Start a private PostgreSQL on a free loopback port (for tests, demos, benchmarks).

    from local_postgres import LocalPostgres
    with LocalPostgres() as pg:
        print(pg.url("mqbtt"))      # postgresql://mqbtt:PASSWORD@127.0.0.1:PORT/mqbtt

Needs Debian's ``postgresql`` (``initdb``, ``pg_ctl``, ``postgres`` in
/usr/lib/postgresql/<version>/bin).  The cluster lives in a temporary
directory, listens on 127.0.0.1 only (its unix socket stays in that directory),
and requires a password (scram-sha-256) for TCP connections.  PostgreSQL
refuses to run as root: when started by root, the cluster runs as ``nobody``
(the directory is handed over to it) and every command runs through
``runuser``.
"""
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time

__all__ = ["LocalPostgres", "pg_bindir"]


def pg_bindir() -> str:
    """The directory holding initdb/pg_ctl (the newest installed version)."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                    reverse=True):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """A private PostgreSQL cluster.

    :param user: the superuser's name (also the owner of :meth:`create_db` databases).
    :param password: its password (default: a random one).
    :param settings: extra ``postgresql.conf`` lines.
    """

    def __init__(self, user="mqbtt", password=None, settings=""):
        self.bindir = pg_bindir()
        self.user = user
        self.password = password or secrets.token_hex(8)
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="mqbtt-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "postgres.log")
        self.settings = settings
        self.as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self.started = False

    def _run(self, args, **kw):
        cmd = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)

    def start(self, timeout=60.0):
        pwfile = os.path.join(self.dir, "pw")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        if self.as_root:
            os.chmod(self.dir, 0o755)
            os.chown(self.dir, 65534, 65534)
            os.chown(pwfile, 65534, 65534)
        os.chmod(pwfile, 0o600)
        self._run(["initdb", "-D", self.data, "-U", self.user, "--pwfile", pwfile,
                   "--auth-local", "trust", "--auth-host", "scram-sha-256", "-E", "UTF8",
                   "--locale", "C", "--no-sync"])
        os.unlink(pwfile)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.dir}'\n"
                    "fsync = on\nshared_buffers = 128MB\nmax_connections = 50\n"
                    f"{self.settings}\n")
        self._run(["pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", str(int(timeout)),
                   "start"])
        self.started = True
        return self

    def url(self, dbname="postgres", password=True) -> str:
        auth = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql, dbname="postgres") -> str:
        """Run *sql* with psql over the unix socket; return its output."""
        return self._run(["psql", "-h", self.dir, "-p", str(self.port), "-U", self.user, "-d", dbname,
                          "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]).stdout

    def create_db(self, name) -> str:
        """Create the database *name* (dropping an older one); return its URL."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self, mode="fast"):
        """Stop the server (``immediate``: no shutdown checkpoint, for a cluster about to be deleted)."""
        if self.started:
            try:
                self._run(["pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"])
            except subprocess.CalledProcessError:
                pass
            self.started = False

    def cleanup(self):
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        if not self.started:
            self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()


if __name__ == "__main__":  # pragma: no cover - manual use
    with LocalPostgres() as pg:
        print(pg.url("postgres"), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
