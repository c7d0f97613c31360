"""Distribution tests (issue 3): mqbtt.pyz built by build_zipapp.py, the
mqbtt_* symlinks, the three ways to import mqbtt, and ``mqbtt upgrade``.

The pyz is built once per session (two builds: the current version and a
"99.0.0" one to upgrade to) and every run uses a private ``SHIV_ROOT``.
"""
import glob
import hashlib
import http.server
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import build_zipapp  # noqa: E402
import mqbtt  # noqa: E402
from testlib import pyenv_python  # noqa: E402

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
NEW_VERSION = "99.0.0"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(cmd, env=None, **kw):
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    """The built zipapps and the environment to run them with."""
    d = tmp_path_factory.mktemp("dist")
    shiv_root = d / "shiv"
    cur = d / "cur" / "mqbtt.pyz"
    new = d / "new" / "mqbtt.pyz"
    build_zipapp.build(str(cur), quiet=True)
    build_zipapp.build(str(new), version=NEW_VERSION, quiet=True)
    env = dict(os.environ, SHIV_ROOT=str(shiv_root))
    env.pop("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", None)

    class Dist:
        pass
    x = Dist()
    x.dir, x.pyz, x.new, x.env, x.shiv_root = d, str(cur), str(new), env, shiv_root
    return x


# ---- the build -----------------------------------------------------------------

class TestBuild:
    def test_checksum_file(self, dist):
        with open(dist.pyz + ".sha256") as f:
            assert f.read() == f"{sha256(dist.pyz)}  mqbtt.pyz\n"
        result = run(["sha256sum", "-c", "mqbtt.pyz.sha256"], cwd=os.path.dirname(dist.pyz))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_shebang_mode_and_contents(self, dist):
        import zipfile
        with open(dist.pyz, "rb") as f:
            assert f.readline() == b"#!/usr/bin/env python3\n"
        assert os.stat(dist.pyz).st_mode & 0o111
        names = zipfile.ZipFile(dist.pyz).namelist()
        for needed in ("site-packages/mqbtt.py", "site-packages/google/_upb/_message.abi3.so",
                       "site-packages/google/protobuf/internal/python_message.py",
                       "site-packages/paho/mqtt/client.py", "site-packages/requests/__init__.py",
                       "site-packages/websocket/__init__.py"):
            assert needed in names
        # no stale bytecode; an extension compiled for one CPython only (psycopg-binary,
        # build_zipapp.PSYCOPG_BINARY_PYTHONS) comes for each of 3.10-3.13
        assert not [n for n in names if n.endswith(".pyc")]
        # what only pip and type checkers read is left out (fewer entries: every start
        # reads the zip's directory); what importlib.metadata and licences need stays
        assert not [n for n in names if n.endswith((".pyi", "/RECORD", "/INSTALLER", "/WHEEL"))]
        assert "site-packages/bin/" not in names      # no shiv preamble any more
        assert [n for n in names if n.startswith("site-packages/psycopg-")
                and n.endswith(".dist-info/METADATA")]
        per_version = {}
        for n in names:
            m = re.search(r"^(.*)\.cpython-(\d+)-[^/]*\.so$", n)
            if m:
                per_version.setdefault(m.group(1), set()).add(m.group(2))
        assert per_version and all(v == {"310", "311", "312", "313"} for v in per_version.values())

    def test_reproducible(self, dist, tmp_path):
        again = tmp_path / "mqbtt.pyz"
        build_zipapp.build(str(again), quiet=True)
        assert sha256(again) == sha256(dist.pyz)

    def test_embedded_descriptor_matches_proto(self):
        with open(os.path.join(ROOT, "mqbtt.py")) as f:
            source = f.read()
        assert build_zipapp.embedded_descriptor(source) == build_zipapp.descriptor_base64()


@pytest.mark.parametrize("version", PYTHONS)
def test_version_under_each_python(dist, version):
    result = run([pyenv_python(version), dist.pyz, "--version"], env=dist.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mqbtt {mqbtt.__version__}\n"
    # the entry module leaves mqbtt.py's bytecode for this Python (even with PYTHONDONTWRITEBYTECODE)
    tag = "cpython-" + version.replace(".", "")
    assert list(dist.shiv_root.glob(f"mqbtt.pyz_*/site-packages/__pycache__/mqbtt.{tag}.pyc"))


def test_runs_through_its_shebang(dist):
    result = run([dist.pyz, "--version"], env=dist.env)
    assert (result.returncode, result.stdout) == (0, f"mqbtt {mqbtt.__version__}\n")


def test_concurrent_first_start(dist, tmp_path):
    """Several processes extracting the pyz at the same time all work."""
    env = dict(dist.env, SHIV_ROOT=str(tmp_path / "fresh"))
    script = tmp_path / "share.py"
    script.write_text("import mqbtt\ns = mqbtt.Share(nonce=7, job_id='j')\n"
                      "assert mqbtt.Share.from_bytes(s.to_bytes()) == s\nprint('ok')\n")
    procs = [subprocess.Popen([sys.executable, dist.pyz, "run", str(script)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert (p.returncode, out) == (0, "ok\n"), err
    assert len(list((tmp_path / "fresh").glob("mqbtt.pyz_*"))) == 1


def test_entry_module_removes_unused_old_builds(dist, tmp_path):
    env = dict(dist.env, SHIV_ROOT=str(tmp_path / "root"))
    for pyz in (dist.pyz, dist.new):
        assert run([sys.executable, pyz, "--version"], env=env).returncode == 0
    left = [p.name for p in (tmp_path / "root").iterdir() if not p.name.startswith(".")]
    assert len(left) == 1
    build_id = left[0].split("_", 1)[1]
    with __import__("zipfile").ZipFile(dist.new) as z:
        assert build_id in z.read("environment.json").decode()


# ---- dispatch ------------------------------------------------------------------

class TestDispatch:
    def test_top_help_lists_every_command(self, dist):
        result = run([sys.executable, dist.pyz, "--help"], env=dist.env)
        assert result.returncode == 0
        for cmd in mqbtt.COMMANDS:
            assert re.search(rf"^  {re.escape(cmd)} ", result.stdout, re.M), cmd
        for cmd in ("dump", "record", "echo", "upgrade", "restart", "wslog"):
            assert cmd in mqbtt.COMMANDS

    @pytest.mark.parametrize("cmd", list(mqbtt.COMMANDS))
    def test_each_command_has_help_and_version(self, dist, cmd):
        result = run([sys.executable, dist.pyz, cmd, "--help"], env=dist.env)
        assert result.returncode == 0, result.stderr
        assert re.match(rf"usage: {re.escape(dist.pyz)} {cmd}\s", result.stdout)  # as typed
        result = run([sys.executable, dist.pyz, cmd, "--version"], env=dist.env)
        assert (result.returncode, result.stdout) == (0, f"mqbtt {mqbtt.__version__}\n")

    def test_symlinks_dispatch(self, dist, tmp_path):
        result = run([sys.executable, dist.pyz, "install-links", "--parents", str(tmp_path / "bin")],
                     env=dist.env)
        assert result.returncode == 0, result.stderr
        names = sorted(os.listdir(tmp_path / "bin"))
        assert names == sorted(mqbtt.link_names())
        assert {"mqbtt_dump", "mqbtt_record", "mqbtt_echo", "mqbtt_upgrade",
                "mqbtt_restart", "mqbtt_wslog"} <= set(names)
        for name in names:
            link = tmp_path / "bin" / name
            assert os.readlink(link) == os.path.realpath(dist.pyz)
            result = run([str(link), "--help"], env=dist.env)  # through the shebang
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith(f"usage: {name} "), result.stdout
        # one shared extraction for all the names
        assert len(list(dist.shiv_root.glob("mqbtt.pyz_*"))) <= 2

    def test_symlinks_to_the_single_file(self, tmp_path):
        result = run([sys.executable, os.path.join(ROOT, "mqbtt.py"), "install-links",
                      str(tmp_path)])
        assert result.returncode == 0, result.stderr
        assert os.readlink(tmp_path / "mqbtt_echo") == os.path.realpath(
            os.path.join(ROOT, "mqbtt.py"))
        result = run([sys.executable, str(tmp_path / "mqbtt_echo"), "--help"])
        assert result.stdout.startswith("usage: mqbtt_echo ")
        # existing names are kept unless --force
        result = run([sys.executable, os.path.join(ROOT, "mqbtt.py"), "install-links",
                      str(tmp_path), "--force"])
        assert result.returncode == 0
        (tmp_path / "mqbtt_dump").unlink()
        (tmp_path / "mqbtt_dump").write_text("mine")
        result = run([sys.executable, os.path.join(ROOT, "mqbtt.py"), "install-links",
                      str(tmp_path)])
        assert result.returncode == 1 and "--force" in result.stderr
        assert (tmp_path / "mqbtt_dump").read_text() == "mine"

    @pytest.mark.parametrize("argv", [["bogus"], ["echo", "--bogus"], ["upgrade", "--nope"],
                                      ["install-links"]])
    def test_usage_errors_exit_2_without_traceback(self, dist, argv):
        result = run([sys.executable, dist.pyz, *argv], env=dist.env)
        assert result.returncode == 2
        assert "usage:" in result.stderr and "Traceback" not in result.stderr

    def test_lazy_imports(self, dist):
        for argv in (["--version"], ["--help"], ["upgrade", "--help"], ["dump", "--version"]):
            result = run([sys.executable, "-X", "importtime", dist.pyz, *argv], env=dist.env)
            assert result.returncode == 0
            loaded = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
            heavy = {m for m in loaded if m.split(".")[0] in ("paho", "requests", "websocket")
                     or m.startswith("google")}
            assert not heavy, (argv, heavy)
        code = ("import sys, mqbtt; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                "('paho', 'google', 'requests', 'websocket', 'urllib3')))")
        result = run([sys.executable, "-c", code], cwd=ROOT)
        assert result.stdout == "[]\n", result.stderr


# ---- import mqbtt, three ways ----------------------------------------------------

SCRIPT = """\
import sys, time
import mqbtt
from google.protobuf.internal import api_implementation
share = mqbtt.Share(version=0x20000000, prev_block=bytes(32), merkle_root=b"\\x01" * 32,
                    time=1700000000, nonce=0xC5E6FC28, pool_diff=1636.0, job_id="48",
                    extranonce2="0a0b", diff=32768.5, zeroes=40)
assert mqbtt.Share.from_bytes(share.to_bytes()) == share
n = 2000
t = time.perf_counter()
for _ in range(n):
    mqbtt.Share.from_bytes(share.to_bytes())
us = (time.perf_counter() - t) / n * 1e6
import google.protobuf
print(api_implementation.Type(), mqbtt.__file__, google.protobuf.__file__, sys.argv[1:],
      f"{us:.1f}")
"""


class TestImportRoutes:
    def test_copied_single_file(self, tmp_path):
        shutil.copy(os.path.join(ROOT, "mqbtt.py"), tmp_path)
        (tmp_path / "opt.py").write_text(SCRIPT)
        result = run([sys.executable, "opt.py", "x"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[1] == str(tmp_path / "mqbtt.py")

    @pytest.mark.parametrize("impl", ["upb", "python"])
    def test_script_via_pyz(self, dist, tmp_path, impl):
        (tmp_path / "opt.py").write_text(SCRIPT)
        env = dict(dist.env)
        if impl == "python":
            env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
        # -S: no site-packages of the interpreter; everything comes from the pyz
        result = run([sys.executable, "-S", dist.pyz, "run", str(tmp_path / "opt.py"),
                      "a", "--b"], env=env)
        assert result.returncode == 0, result.stderr
        kind, mqbtt_file, pb_file, *rest = result.stdout.split(maxsplit=3)
        assert kind == impl
        assert mqbtt_file.startswith(str(dist.shiv_root)) and pb_file.startswith(str(dist.shiv_root))
        assert "['a', '--b']" in rest[0]

    def test_script_via_shiv_interpreter(self, dist, tmp_path):
        (tmp_path / "opt.py").write_text(SCRIPT)
        env = dict(dist.env, SHIV_INTERPRETER="1")
        result = run([sys.executable, "-S", dist.pyz, str(tmp_path / "opt.py"), "z"], env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("upb ")

    def test_run_reports_script_errors_like_python(self, dist, tmp_path):
        (tmp_path / "bad.py").write_text("import sys\nraise ValueError('boom')\n")
        result = run([sys.executable, dist.pyz, "run", str(tmp_path / "bad.py")], env=dist.env)
        assert result.returncode == 1 and "Traceback" in result.stderr and "boom" in result.stderr
        (tmp_path / "exit.py").write_text("import sys\nsys.exit(3)\n")
        result = run([sys.executable, dist.pyz, "run", str(tmp_path / "exit.py")], env=dist.env)
        assert result.returncode == 3
        result = run([sys.executable, dist.pyz, "run", str(tmp_path / "missing.py")],
                     env=dist.env)
        assert result.returncode == 1 and "Traceback" not in result.stderr

    def test_pip_install(self, tmp_path):
        src = tmp_path / "src"
        src.mkdir()
        for name in ("mqbtt.py", "pyproject.toml", "requirements.txt", "README.md"):
            shutil.copy(os.path.join(ROOT, name), src)
        venv = tmp_path / "venv"
        assert run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)]).returncode == 0
        py = str(venv / "bin" / "python")
        result = run([py, "-m", "pip", "install", "--quiet", str(src)],
                     timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        result = run([py, "-c", "import mqbtt; print(mqbtt.__file__, mqbtt.__version__)"],
                     cwd=tmp_path)
        where, version = result.stdout.split()
        assert where.startswith(str(venv)) and version == mqbtt.__version__
        result = run([str(venv / "bin" / "mqbtt"), "--version"])
        assert result.stdout == f"mqbtt {mqbtt.__version__}\n"
        for name in mqbtt.link_names():
            result = run([str(venv / "bin" / name), "--help"])
            assert result.stdout.startswith(f"usage: {name} "), (name, result.stderr)

    def test_pyproject_scripts_match_the_commands(self):
        with open(os.path.join(ROOT, "pyproject.toml")) as f:
            text = f.read()
        section = text.split("[project.scripts]")[1].split("\n[")[0]
        scripts = dict(re.findall(r'^(\w+) = "([^"]+)"', section, re.M))
        assert scripts == {n: "mqbtt:main" for n in ["mqbtt", *mqbtt.link_names()]}


# ---- mqbtt upgrade -------------------------------------------------------------

@pytest.fixture(scope="session")
def server(dist):
    """A local HTTP server publishing several release directories."""
    www = dist.dir / "www"
    www.mkdir()

    def publish(name, data, digest=None):
        d = www / name
        d.mkdir()
        (d / "mqbtt.pyz").write_bytes(data)
        digest = digest or hashlib.sha256(data).hexdigest()
        (d / "mqbtt.pyz.sha256").write_text(f"{digest}  mqbtt.pyz\n")

    with open(dist.new, "rb") as f:
        new = f.read()
    with open(dist.pyz, "rb") as f:
        cur = f.read()
    publish("new", new)
    publish("same", cur)
    publish("badsum", new, hashlib.sha256(b"something else").hexdigest())
    publish("truncated", new[: len(new) // 2], hashlib.sha256(new).hexdigest())
    publish("truncated-signed", new[: len(new) // 2])  # checksum of the truncated file
    publish("errorpage", b"<html>502 Bad Gateway</html>\n")
    (www / "nosum").mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def installed(dist, tmp_path):
    """A copy of the current pyz installed as bin/mqbtt.pyz (mode 0750) with a
    mqbtt_upgrade symlink to it, and its own SHIV_ROOT."""
    (tmp_path / "opt").mkdir()
    pyz = tmp_path / "opt" / "mqbtt.pyz"
    shutil.copy(dist.pyz, pyz)
    os.chmod(pyz, 0o750)
    (tmp_path / "bin").mkdir()
    link = tmp_path / "bin" / "mqbtt_upgrade"
    link.symlink_to(pyz)
    env = dict(dist.env, SHIV_ROOT=str(tmp_path / "shiv"))
    env.pop("MQBTT_UPGRADE_URL", None)
    return pyz, link, env


class TestUpgrade:
    def test_success(self, dist, server, installed):
        pyz, link, env = installed
        before = sha256(pyz)
        result = run([str(link), "--url", f"{server}/new"], env=env)
        assert result.returncode == 0, result.stderr
        assert f"upgraded from {mqbtt.__version__} to {NEW_VERSION}" in result.stdout
        assert link.is_symlink() and os.readlink(link) == str(pyz)
        assert sha256(pyz) == sha256(dist.new)
        assert stat.S_IMODE(os.stat(pyz).st_mode) == 0o750
        assert sha256(str(pyz) + ".bak") == before
        assert run([str(pyz), "--version"], env=env).stdout == f"mqbtt {NEW_VERSION}\n"
        assert sorted(os.listdir(pyz.parent)) == ["mqbtt.pyz", "mqbtt.pyz.bak"]

    def test_env_var_and_check(self, server, installed):
        pyz, link, env = installed
        before = sha256(pyz)
        env = dict(env, MQBTT_UPGRADE_URL=f"{server}/new/")
        result = run([str(pyz), "upgrade", "--check"], env=env)
        assert result.returncode == 0, result.stderr
        assert f"{NEW_VERSION} is available" in result.stdout
        assert sha256(pyz) == before

    def test_up_to_date(self, server, installed):
        pyz, link, env = installed
        before = sha256(pyz)
        result = run([str(link), "--url", f"{server}/same"], env=env)
        assert result.returncode == 0, result.stderr
        assert "up to date" in result.stdout
        assert sha256(pyz) == before and not os.path.exists(str(pyz) + ".bak")

    @pytest.mark.parametrize("where, message", [
        ("badsum", "checksum mismatch"),
        ("truncated", "checksum mismatch"),
        ("truncated-signed", "not a zipapp"),
        ("errorpage", "not a zipapp"),
        ("nosum", "HTTP 404"),
        ("missing", "HTTP 404"),
        ("http://127.0.0.1:1", "cannot download"),
    ])
    def test_failures_leave_the_file_untouched(self, server, installed, where, message):
        pyz, link, env = installed
        before = sha256(pyz)
        url = where if where.startswith("http") else f"{server}/{where}"
        result = run([str(link), "--url", url], env=env)
        assert result.returncode == 1
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
        assert sha256(pyz) == before
        assert stat.S_IMODE(os.stat(pyz).st_mode) == 0o750
        assert sorted(os.listdir(pyz.parent)) == ["mqbtt.pyz"]

    def test_unwritable_target(self, dist, server):
        """As an unprivileged user (root can write anywhere), the directory of
        the pyz is read-only."""
        base = tempfile.mkdtemp(prefix="mqbtt-ro-")
        try:
            os.chmod(base, 0o755)
            opt = os.path.join(base, "opt")
            os.mkdir(opt)
            pyz = os.path.join(opt, "mqbtt.pyz")
            shutil.copy(dist.pyz, pyz)
            os.chmod(pyz, 0o755)
            shiv_root = os.path.join(base, "shiv")
            os.mkdir(shiv_root)
            os.chmod(shiv_root, 0o777)
            env = dict(dist.env, SHIV_ROOT=shiv_root, HOME=base)
            kw = {}
            if os.geteuid() == 0:
                python = "/usr/bin/python3"
                ok = run([python, "-c", "import sys; assert sys.version_info >= (3, 10)"])
                if ok.returncode:
                    pytest.fail("test_unwritable_target runs the pyz as user nobody and needs a "
                                "Python >= 3.10 outside /root: /usr/bin/python3")
                kw["user"] = "nobody"
            else:
                python = sys.executable
                os.chmod(opt, 0o555)
            before = sha256(pyz)
            result = run([python, pyz, "upgrade", "--url", f"{server}/new"], env=env, **kw)
            assert result.returncode == 1
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert "not writable" in result.stderr or "Permission denied" in result.stderr
            assert sha256(pyz) == before and os.listdir(opt) == ["mqbtt.pyz"]
        finally:
            os.chmod(base, 0o700)
            for d in glob.glob(os.path.join(base, "*")):
                os.chmod(d, 0o755)
            shutil.rmtree(base, ignore_errors=True)

    def test_not_running_from_a_pyz(self):
        result = run([sys.executable, os.path.join(ROOT, "mqbtt.py"), "upgrade"])
        assert result.returncode == 1
        assert "not running from mqbtt.pyz" in result.stderr
        assert len(result.stderr.splitlines()) == 1


def test_version_key():
    key = mqbtt._version_key
    assert key("0.10.0") > key("0.9.1") > key("0.9.1rc1") > key("0.9")
    assert key("1.0") == key("1.0.0")
    with pytest.raises(ValueError):
        key("latest")
