"""A newcomer's first hour (issue 13): the two-command setup, clear errors for
missing parts (Python too old, a missing dependency, no mosquitto, a bad
$MQBTT_BROKER), ``install-links``, usage lines, ``run``, and the README.

Missing parts are made real, not mocked: old CPythons from pyenv; ``python -S``
(no site-packages) with a PYTHONPATH holding links to only some of the real
installed packages; a pip installation with ``--no-deps``; a pyz extraction with
a package removed; mosquitto hidden by an empty tmpfs over /usr/sbin in a
private mount namespace (``unshare -m``, as root).
"""
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import build_zipapp  # noqa: E402
import mqbtt  # noqa: E402
from test_mqbtt import DOC_ECHO, DOC_OPTIMIZER  # noqa: E402
from testlib import pyenv_python  # noqa: E402

PY = sys.executable
SITE = sysconfig.get_paths()["purelib"]
OLD_PYTHONS = ["3.6", "3.7", "3.8", "3.9"]
UNREACHABLE = "mqtt://127.0.0.1:1"


def run(cmd, **kw):
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def one_line(text):
    lines = text.rstrip("\n").splitlines()
    assert len(lines) == 1, text
    return lines[0]


def module_dir(module):
    """The installed directory (or file) of top-level *module* and its dist-info dirs."""
    import importlib.util
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    path = spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin
    return path


#: what to link into a partial site for each dependency (top-level module names)
PARTS = {
    "paho": ["paho"],
    "google.protobuf": ["google"],
    "requests": ["requests", "urllib3", "idna", "charset_normalizer", "certifi"],
    "websocket": ["websocket"],
}


@pytest.fixture
def partial_site(tmp_path):
    """make(*keys) -> an environment for ``python -S`` where only those of mqbtt's
    dependencies are importable (links to the real installed packages)."""
    def make(*keys):
        site = tmp_path / ("site-" + "-".join(k.split(".")[0] for k in keys))
        site.mkdir(exist_ok=True)
        if any(site.iterdir()):
            return made[site]
        for key in keys:
            for module in PARTS[key]:
                path = module_dir(module)
                os.symlink(path, site / os.path.basename(path))
        env = dict(os.environ, PYTHONPATH=str(site), MQBTT_BROKER=UNREACHABLE)
        env.pop("PYTHONHOME", None)
        made[site] = env
        return env
    made = {}
    return make


# ---- A. setup in two commands -------------------------------------------------------

def test_one_apt_list_used_by_make_and_ci():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    with open(os.path.join(ROOT, "scripts", "apt-install.sh")) as f:
        apt = f.read()
    # CI runs the README's two commands, and holds no package list of its own
    assert re.search(r"^make test$", ci, re.M) and re.search(r"^make demo$", ci, re.M)
    assert "mosquitto" not in ci and "pip install" not in ci
    assert "scripts/apt-install.sh demo" in makefile and "scripts/apt-install.sh test" in makefile
    for package in ("mosquitto", "mosquitto-clients", "protobuf-compiler", "openssl"):
        assert package in apt
    # on this machine everything is installed: nothing to do, nothing printed
    for group in ("demo", "test"):
        r = run([os.path.join(ROOT, "scripts", "apt-install.sh"), group])
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = run([os.path.join(ROOT, "scripts", "apt-install.sh"), "bogus"])
    assert r.returncode == 2 and "usage" in r.stderr


def test_venv_is_ignored_by_git():
    r = run(["git", "check-ignore", "-q", ".venv/bin/python"], cwd=ROOT)
    assert r.returncode == 0


def test_make_demo_then_again(tmp_path):
    """make demo makes a venv with the runtime requirements only, runs the demo;
    the second run skips pip; a changed requirements file installs again."""
    venv = tmp_path / "venv"
    cmd = ["make", "-C", ROOT, "demo", f"VENV={venv}", f"PYTHON={PY}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    first = run(cmd, timeout=300, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "pip install -q -r requirements.txt" in first.stdout
    assert DOC_OPTIMIZER + DOC_ECHO in first.stdout
    freeze = run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"])
    names = {line.split("==")[0].lower() for line in freeze.stdout.split()}
    assert {"paho-mqtt", "protobuf", "requests", "websocket-client"} <= names
    assert not names & {"pytest", "matplotlib", "ipykernel", "shiv"}  # no notebook/test stack
    second = run(cmd, timeout=120, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "pip" not in second.stdout and "venv" not in second.stdout.replace(str(venv), "")
    assert DOC_OPTIMIZER + DOC_ECHO in second.stdout
    # the stamp is keyed on the requirements file: a newer one installs again (dry run)
    again = run(["make", "-C", ROOT, "-n", "-W", "requirements.txt", "demo", f"VENV={venv}",
                 f"PYTHON={PY}"])
    assert "pip install -q -r requirements.txt" in again.stdout
    test_dry = run(["make", "-C", ROOT, "-n", "test", f"VENV={venv}", f"PYTHON={PY}"])
    assert "pip install -q -r requirements-dev.txt" in test_dry.stdout
    assert re.search(r"/python -m pytest", test_dry.stdout)


def test_make_refuses_an_pyenv_python(tmp_path):
    r = run(["make", "-C", ROOT, "demo", f"VENV={tmp_path / 'v'}",
             f"PYTHON={pyenv_python('3.9')}"])
    assert r.returncode != 0
    assert "mqbtt needs Python 3.10 or newer" in r.stderr and "3.9" in r.stderr
    assert not (tmp_path / "v").exists()


# ---- C. Python older than 3.10 ------------------------------------------------------

@pytest.mark.parametrize("version", OLD_PYTHONS)
def test_old_python_one_line(version):
    py = pyenv_python(version)
    # the whole file must parse there, or the check never runs
    r = run([py, "-c", "import sys; compile(open(sys.argv[1]).read(), 'mqbtt.py', 'exec')",
             os.path.join(ROOT, "mqbtt.py")])
    assert r.returncode == 0, r.stderr
    for argv in (["dump", "--pid", "x"], ["--version"], ["echo", "--help"]):
        r = run([py, os.path.join(ROOT, "mqbtt.py"), *argv])
        assert r.returncode == 1 and r.stdout == ""
        line = one_line(r.stderr)
        assert line.startswith("mqbtt: error: mqbtt needs Python 3.10 or newer, this is Python "
                               f"{version} ")
    r = run([py, "-c", "import mqbtt"], cwd=ROOT)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith("ImportError: mqbtt needs Python 3.10 or newer")


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    d = tmp_path_factory.mktemp("pyz")
    path = d / "mqbtt.pyz"
    build_zipapp.build(str(path), quiet=True)
    return path


@pytest.mark.parametrize("version", OLD_PYTHONS)
def test_old_python_one_line_pyz(pyz, version, tmp_path):
    env = dict(os.environ, SHIV_ROOT=str(tmp_path))
    for argv in (["dump", "--pid", "x"], ["--version"]):
        r = run([pyenv_python(version), str(pyz), *argv], env=env)
        assert r.returncode == 1 and r.stdout == ""
        assert one_line(r.stderr).startswith(
            f"mqbtt: error: mqbtt needs Python 3.10 or newer, this is Python {version} ")


# ---- C. missing dependencies ----------------------------------------------------------

def test_dependency_table_matches_requirements():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        reqs = {line.split("#")[0].strip() for line in f} - {""}
    assert {req for req, _ in mqbtt.DEPENDENCIES.values()} == reqs


#: (command line, the dependency it lacks, the dependencies present)
MISSING = [
    (["echo", "p1"], "paho-mqtt", ()),
    (["echo", "p1"], "protobuf", ("paho",)),
    (["dump", "--pid", "p1"], "protobuf", ("paho",)),
    (["dump", "--pid", "p1"], "paho-mqtt", ("google.protobuf",)),
    (["record", "--db", "x.db"], "paho-mqtt", ("google.protobuf", "requests")),
    (["replay", "--db", "x.db", "--pid", "p1"], "paho-mqtt", ("google.protobuf",)),
    (["restart", "--pid", "10.0.0.1", "--no-history"], "requests", ("paho", "google.protobuf")),
    (["wslog", "--pid", "10.0.0.1", "--file", "x.log"], "websocket-client", ("requests",)),
]


@pytest.mark.parametrize("argv,missing,present", MISSING)
def test_copied_single_file_missing_dependency(tmp_path, partial_site, argv, missing, present):
    shutil.copy(os.path.join(ROOT, "mqbtt.py"), tmp_path)
    r = run([PY, "-S", "mqbtt.py", *argv], cwd=tmp_path, env=partial_site(*present))
    assert r.returncode == 1 and r.stdout == "", r.stderr
    line = one_line(r.stderr)
    req = next(req for req, _ in mqbtt.DEPENDENCIES.values() if req.startswith(missing + ">"))
    assert line.startswith(f"mqbtt {argv[0]}: error: the Python package {missing} ")
    assert line.endswith(f"is not installed: pip install '{req}'")
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "x.log").exists()


def test_help_version_and_usage_errors_need_no_dependency(tmp_path, partial_site):
    shutil.copy(os.path.join(ROOT, "mqbtt.py"), tmp_path)
    for argv in (["dump", "--help"], ["echo", "--version"], ["--help"], ["wslog", "-h"]):
        r = run([PY, "-S", "mqbtt.py", *argv], cwd=tmp_path, env=partial_site())
        assert r.returncode == 0, r.stderr
    for argv in (["dump"], ["echo", "--bogus"], ["record", "--db"], ["replay", "--speed", "x"]):
        r = run([PY, "-S", "mqbtt.py", *argv], cwd=tmp_path, env=partial_site())
        assert r.returncode == 2 and "usage:" in r.stderr and "pip install" not in r.stderr


def test_library_and_example_without_paho(tmp_path, partial_site):
    env = partial_site("google.protobuf")
    code = ("import mqbtt\ntry:\n    mqbtt.MQbtTOptimizer('mqtt://127.0.0.1:1', 'p')\n"
            "except mqbtt.MQbtTMissingDependency as e:\n"
            "    print(isinstance(e, ImportError), isinstance(e, mqbtt.MQbtTError), e)\n")
    r = run([PY, "-S", "-c", code], cwd=ROOT, env=env)
    assert r.stdout == ("True True the Python package paho-mqtt (needed for MQTT) is not "
                        "installed: pip install 'paho-mqtt>=2.1,<3'\n"), r.stderr
    # the example optimizer says it in one line too
    r = run([PY, "-S", os.path.join(ROOT, "examples", "optimizer.py"), "p"], env=env)
    assert r.returncode == 1
    assert one_line(r.stderr) == ("optimizer: the Python package paho-mqtt (needed for MQTT) is "
                                  "not installed: pip install 'paho-mqtt>=2.1,<3'")


def test_without_protobuf_messages_are_not_malformed(broker, partial_site):
    """A miner without protobuf gets a missing-dependency error for a valid
    request, not a decode error; so does every decoding entry point."""
    env = partial_site("paho")
    code = f"""
import sys, mqbtt
for call in (lambda: mqbtt.Request.from_bytes(b""), lambda: mqbtt.Share.from_bytes(b"\\x08\\x01"),
             lambda: mqbtt.decode("esp", b""), lambda: mqbtt.Reply().to_bytes()):
    try:
        call()
    except mqbtt.MQbtTMissingDependency as e:
        print("missing", "pip install 'protobuf" in str(e))
with mqbtt.MQbtTMiner({broker.uri!r}, "np1") as miner:
    print("ready", flush=True)
    try:
        miner.receive_request(timeout=60)
    except mqbtt.MQbtTDecodeError as e:
        print("MALFORMED", e)
    except mqbtt.MQbtTMissingDependency as e:
        print("missing", e)
"""
    p = subprocess.Popen([PY, "-S", "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(4):
            assert p.stdout.readline() == "missing True\n"
        assert p.stdout.readline() == "ready\n"
        with mqbtt.MQbtTOptimizer(broker.uri, "np1") as opt:
            opt.send_request(mqbtt.Request(timestamp_min=1))
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert out == ("missing the Python package protobuf (needed for message encoding) is not "
                   "installed: pip install 'protobuf>=5.26,<8'\n"), err


def test_pyz_missing_dependency(pyz, tmp_path):
    """The pyz bundles its dependencies; if one is gone from its extraction the
    command says which, in one line."""
    env = dict(os.environ, SHIV_ROOT=str(tmp_path), MQBTT_BROKER=UNREACHABLE)
    assert run([PY, str(pyz), "dump", "--version"], env=env).returncode == 0
    r = run([PY, "-S", str(pyz), "dump", "--pid", "p"], env=env)
    assert r.returncode == 1 and "cannot connect" in one_line(r.stderr)  # all there
    site = glob.glob(str(tmp_path / "mqbtt.pyz_*" / "site-packages"))[0]
    shutil.rmtree(os.path.join(site, "google", "protobuf"))
    r = run([PY, "-S", str(pyz), "dump", "--pid", "p"], env=env)
    assert r.returncode == 1
    assert one_line(r.stderr) == ("mqbtt dump: error: the Python package protobuf (needed for "
                                  "message encoding) is not installed: pip install "
                                  "'protobuf>=5.26,<8'")
    shutil.rmtree(os.path.join(site, "paho"))
    r = run([PY, "-S", str(pyz), "record", "--db", str(tmp_path / "x.db")], env=env)
    assert r.returncode == 1 and "paho-mqtt" in one_line(r.stderr)


@pytest.fixture(scope="module")
def pip_venv(tmp_path_factory):
    """``pip install --no-deps`` of this checkout into a venv without system site-packages."""
    d = tmp_path_factory.mktemp("pipvenv")
    src = d / "src"
    src.mkdir()
    for name in ("mqbtt.py", "mqbt.py", "pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    venv = d / "venv"
    r = run([PY, "-m", "venv", "--without-pip", str(venv)])
    assert r.returncode == 0, r.stderr
    r = run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(d / "wheel"), str(src)],
            timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = glob.glob(str(d / "wheel" / "mqbtt-*.whl"))
    r = run([PY, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
             "--no-deps", *wheel], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


def test_pip_install_missing_dependency(pip_venv):
    env = dict(os.environ, MQBTT_BROKER=UNREACHABLE)
    r = run([str(pip_venv / "bin" / "mqbtt_echo"), "p"], env=env)
    assert r.returncode == 1
    assert one_line(r.stderr) == ("mqbtt echo: error: the Python package paho-mqtt (needed for "
                                  "MQTT) is not installed: pip install 'paho-mqtt>=2.1,<3'")
    r = run([str(pip_venv / "bin" / "mqbtt"), "restart", "--pid", "10.0.0.1", "--no-history"],
            env=env)
    assert r.returncode == 1 and "pip install 'requests>=2.31,<3'" in one_line(r.stderr)


# ---- C. invalid $MQBTT_BROKER -------------------------------------------------------------

BAD_BROKERS = ["x://host", "mqtt://host:99999", "mqtt://:1883", "mqtt://u:s3cr3t@host:0",
               "mqtt://host?bogus=1", "ws://"]


@pytest.mark.parametrize("value", BAD_BROKERS)
@pytest.mark.parametrize("argv", [["echo", "p"], ["dump", "--pid", "p"],
                                  ["record", "--db", "x.db"],
                                  ["replay", "--db", "x.db", "--pid", "p"]])
def test_invalid_env_broker_is_named(tmp_path, value, argv):
    env = dict(os.environ, MQBTT_BROKER=value)
    r = run([PY, os.path.join(ROOT, "mqbtt.py"), *argv], env=env, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    line = one_line(r.stderr)
    assert f"{argv[0]}: error: $MQBTT_BROKER: invalid broker URI" in line
    assert "--broker" not in line and "s3cr3t" not in line
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("example", ["optimizer.py", "logger.py"])
def test_invalid_env_broker_in_examples_and_library(example):
    env = dict(os.environ, MQBTT_BROKER="mqtt://u:s3cr3t@host:0")
    r = run([PY, os.path.join(ROOT, "examples", example), "p"], env=env)
    assert r.returncode == 1 and "s3cr3t" not in r.stderr
    assert one_line(r.stderr) == (f"{example[:-3]}: $MQBTT_BROKER: invalid broker URI "
                                  "'mqtt://u:***@host:0': port out of range 1-65535")
    r = run([PY, "-c", "import mqbtt\ntry:\n    mqbtt.MQbtTMiner(None, 'p')\n"
             "except ValueError as e:\n    print(e)"], env=env, cwd=ROOT)
    assert r.stdout.startswith("$MQBTT_BROKER: invalid broker URI"), r.stderr


def test_valid_broker_option_overrides_invalid_env(tmp_path):
    env = dict(os.environ, MQBTT_BROKER="x://host")
    r = run([PY, os.path.join(ROOT, "mqbtt.py"), "dump", "--pid", "p", "--broker", UNREACHABLE],
            env=env)
    assert r.returncode == 1 and "cannot connect to mqtt://127.0.0.1:1" in one_line(r.stderr)
    r = run([PY, os.path.join(ROOT, "mqbtt.py"), "dump", "--pid", "p", "--broker", "x://y"],
            env=dict(os.environ, MQBTT_BROKER=UNREACHABLE))
    assert r.returncode == 2 and "argument --broker: invalid broker URI" in r.stderr
    assert "MQBTT_BROKER" not in r.stderr


# ---- C. no mosquitto ------------------------------------------------------------------------

def without_sbin(cmd):
    """*cmd* in a private mount namespace where /usr/sbin is empty and PATH has no
    mosquitto; where mount namespaces are not allowed (an unprivileged container),
    with $MQBTT_MOSQUITTO naming a binary that does not exist."""
    path = ":".join(p for p in os.environ["PATH"].split(":")
                    if not os.path.exists(os.path.join(p, "mosquitto")))
    env = dict(os.environ, PATH=path)
    script = 'mount -t tmpfs none /usr/sbin && exec "$@"'
    if run(["unshare", "-m", "sh", "-c", script, "sh", "true"]).returncode == 0:
        return run(["unshare", "-m", "sh", "-c", script, "sh", *cmd], env=env, cwd=ROOT)
    env["MQBTT_MOSQUITTO"] = "/nonexistent/mosquitto"
    return run(cmd, env=env, cwd=ROOT)


def test_mosquitto_path_setting(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import local_broker
    assert local_broker.mosquitto_path() is not None
    env = dict(os.environ, MQBTT_MOSQUITTO=str(tmp_path / "none"))
    r = run([PY, "examples/demo.py"], env=env, cwd=ROOT)
    assert r.returncode == 1 and one_line(r.stderr).startswith("demo: mosquitto is not installed")


def test_demo_without_mosquitto_says_how_to_install_it():
    r = without_sbin([PY, "examples/demo.py"])
    assert r.returncode == 1 and r.stdout == ""
    assert one_line(r.stderr) == ("demo: mosquitto is not installed: sudo apt-get install "
                                  "mosquitto (or run `make demo` / `make test`, which install it)")


def test_suite_without_mosquitto_fails_with_one_message():
    r = without_sbin([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mqbtt.py",
                      "test_record.py"])
    assert r.returncode == 4 and r.stdout == ""
    assert one_line(r.stderr) == (
        "ERROR: the test suite needs apt packages mosquitto: run `make test`, which installs "
        "them (or apt-get install / pip install -r requirements-dev.txt)")


def test_suite_without_python_packages_fails_with_one_message(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for name in os.listdir(SITE):  # pytest and its own dependencies only
        if re.match(r"(_?pytest|pluggy|iniconfig|packaging|pygments|py\.py)(-[\d.]+\.dist-info)?$", name):
            os.symlink(os.path.join(SITE, name), site / name)
    env = dict(os.environ, PYTHONPATH=str(site))
    r = run([PY, "-S", "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mqbtt.py"],
            env=env, cwd=ROOT)
    assert r.returncode == 4 and r.stdout == ""
    line = one_line(r.stderr)
    assert line.startswith("ERROR: the test suite needs Python packages paho-mqtt protobuf "
                           "requests ")
    assert " shiv " in line and "hypothesis" in line and "pytest " not in line


# ---- D. install-links -------------------------------------------------------------------------

def test_install_links_refuses_missing_directory(tmp_path):
    target = tmp_path / "no" / "bin"
    r = run([PY, os.path.join(ROOT, "mqbtt.py"), "install-links", str(target)])
    assert r.returncode == 1
    assert one_line(r.stderr) == (f"mqbtt install-links: error: no such directory: {target} "
                                  "(use --parents to create it)")
    assert not (tmp_path / "no").exists()
    (tmp_path / "file").write_text("x")
    r = run([PY, os.path.join(ROOT, "mqbtt.py"), "install-links", str(tmp_path / "file")])
    assert r.returncode == 1 and "is not a directory" in one_line(r.stderr)
    with pytest.raises(FileNotFoundError):
        mqbtt.install_links(str(target))
    r = run([PY, os.path.join(ROOT, "mqbtt.py"), "install-links", "--parents", str(target)])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(target)) == sorted(mqbtt.link_names())


def test_install_links_includes_mqbtt(tmp_path):
    assert mqbtt.link_names()[0] == "mqbtt"
    made = mqbtt.install_links(str(tmp_path))
    assert os.path.join(str(tmp_path), "mqbtt") in made
    r = run([str(tmp_path / "mqbtt"), "--version"])
    assert r.stdout == f"mqbtt {mqbtt.__version__}\n"
    r = run([str(tmp_path / "mqbtt"), "dump", "--bogus"])
    assert r.returncode == 2 and r.stderr.startswith("usage: mqbtt dump ")
    r = run([str(tmp_path / "mqbtt_dump"), "--bogus"])
    assert r.returncode == 2 and r.stderr.startswith("usage: mqbtt_dump ")


def test_install_links_under_pip_points_to_pips_scripts(pip_venv, tmp_path):
    bindir = pip_venv / "bin"
    r = run([str(bindir / "mqbtt"), "install-links", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    for name in mqbtt.link_names():
        link = tmp_path / name
        assert os.readlink(link) == os.path.realpath(bindir / name)
        r = run([str(link), "--help"])
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {name} "), (name, r.stderr)
    # into pip's own directory: nothing to do, nothing replaced
    before = {n: os.stat(bindir / n).st_ino for n in mqbtt.link_names()}
    r = run([str(bindir / "mqbtt"), "install-links", str(bindir)])
    assert r.returncode == 0 and "(made by pip)" in r.stdout, r.stderr
    assert before == {n: os.stat(bindir / n).st_ino for n in mqbtt.link_names()}
    assert not any(os.path.islink(bindir / n) for n in mqbtt.link_names())


# ---- D. usage lines name the program as typed ---------------------------------------------------

def test_usage_names_the_program_as_typed(tmp_path):
    py = os.path.basename(PY)
    cases = [
        ([PY, "mqbtt.py", "dump", "--bogus"], ROOT, f"usage: {py} mqbtt.py dump "),
        (["./mqbtt.py", "dump", "--bogus"], ROOT, "usage: ./mqbtt.py dump "),
        ([PY, "mqbtt.py", "record"], ROOT, f"usage: {py} mqbtt.py record "),
    ]
    shutil.copy(os.path.join(ROOT, "mqbtt.py"), tmp_path / "m.py")
    os.symlink(tmp_path / "m.py", tmp_path / "mqbtt_echo")
    cases.append(([str(tmp_path / "mqbtt_echo"), "--bogus"], tmp_path, "usage: mqbtt_echo "))
    for argv, cwd, start in cases:
        r = run(argv, cwd=cwd)
        assert r.returncode == 2 and r.stderr.startswith(start), (argv, r.stderr)
    r = run([PY, "mqbtt.py"], cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith(f"usage: {py} mqbtt.py [--version] ")
    assert f"Run '{py} mqbtt.py COMMAND --help'" in r.stderr
    r = run(["./mqbtt.py", "--help"], cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("usage: ./mqbtt.py [--version] ")
    # not executable: only "python3 FILE" can run it
    copy = tmp_path / "mqbtt.py"
    shutil.copy(os.path.join(ROOT, "mqbtt.py"), copy)
    os.chmod(copy, 0o644)
    r = run([PY, str(copy), "echo", "--help"])
    assert r.stdout.startswith(f"usage: {py} {copy} echo\n")  # (long: argparse wraps)


def test_usage_through_the_pyz(pyz, tmp_path):
    env = dict(os.environ, SHIV_ROOT=str(tmp_path / "shiv"))
    py = os.path.basename(PY)
    r = run([PY, "mqbtt.pyz", "dump", "--help"], cwd=pyz.parent, env=env)
    assert r.stdout.startswith(f"usage: {py} mqbtt.pyz dump "), r.stderr
    r = run(["./mqbtt.pyz", "replay", "--help"], cwd=pyz.parent, env=env)
    assert r.stdout.startswith("usage: ./mqbtt.pyz replay "), r.stderr
    env["PATH"] = f"{pyz.parent}:{env['PATH']}"
    r = run(["mqbtt.pyz", "echo", "--bogus"], cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.startswith("usage: mqbtt.pyz echo "), r.stderr


# ---- D. run -------------------------------------------------------------------------------------

BAD = "import sys\n\ndef f():\n    raise ValueError('boom')\n\nprint(sys.argv)\nf()\n"


@pytest.mark.parametrize("how", ["mqbtt.py", "pyz"])
def test_run_traceback_shows_only_the_script(pyz, tmp_path, how):
    (tmp_path / "bad.py").write_text(BAD)
    prog = [PY, os.path.join(ROOT, "mqbtt.py")] if how == "mqbtt.py" else [PY, str(pyz)]
    env = dict(os.environ, SHIV_ROOT=str(tmp_path / "shiv"))
    r = run([*prog, "run", "bad.py"], cwd=tmp_path, env=env)
    python = run([PY, "bad.py"], cwd=tmp_path)
    assert r.returncode == python.returncode == 1
    assert r.stdout == python.stdout == "['bad.py']\n"   # ARGS is optional
    # the same frames: the script's only (python names the file with its absolute path)
    assert r.stderr == python.stderr.replace(str(tmp_path / "bad.py"), "bad.py")
    assert "runpy" not in r.stderr and "mqbtt" not in r.stderr


def test_run_usage_shows_args_optional():
    r = run([PY, os.path.join(ROOT, "mqbtt.py"), "run", "--help"], cwd=ROOT)
    assert "SCRIPT [ARGS ...]" in r.stdout.splitlines()[0]
    r = run([PY, os.path.join(ROOT, "mqbtt.py"), "run"], cwd=ROOT)
    assert r.returncode == 2 and "SCRIPT" in r.stderr


@pytest.mark.parametrize("how", ["mqbtt.py", "pyz"])
def test_run_reads_the_script_from_stdin(pyz, tmp_path, how):
    prog = [PY, os.path.join(ROOT, "mqbtt.py")] if how == "mqbtt.py" else [PY, "-S", str(pyz)]
    env = dict(os.environ, SHIV_ROOT=str(tmp_path / "shiv"))
    script = ("import sys, mqbtt\nprint(sys.argv, __name__, mqbtt.Share.from_bytes("
              "mqbtt.Share(nonce=5).to_bytes()).nonce)\nsys.exit(3)\n")
    r = run([*prog, "run", "-", "a", "--b"], input=script, cwd=tmp_path, env=env)
    assert (r.returncode, r.stdout) == (3, "['-', 'a', '--b'] __main__ 5\n"), r.stderr
    r = run([*prog, "run", "-"], input="x = 1\n1 / 0\n", cwd=tmp_path, env=env)
    python = run([PY, "-"], input="x = 1\n1 / 0\n", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr == python.stderr
    assert r.stderr.splitlines()[1] == '  File "<stdin>", line 2, in <module>'


# ---- E. the README ------------------------------------------------------------------------------

def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def section(text, title, level=2):
    m = re.search(rf"^{'#' * level} {re.escape(title)}\n(.*?)(?=^#{{1,{level}}} |\Z)", text,
                  re.M | re.S)
    assert m, title
    return m.group(1)


def anchors(text):
    """GitHub's anchors of the README's headings."""
    out = set()
    for title in re.findall(r"^#+ (.*)$", text, re.M):
        a = re.sub(r"[^\w\- ]", "", title.lower().replace("`", "")).replace(" ", "-")
        out.add(a)
    return out


def test_quick_start_is_two_commands_and_shows_their_transcript():
    quick = section(readme(), "Quick start")
    first_block = re.search(r"```sh\n(.*?)```", quick, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]
    transcript = re.search(r"```console\n(.*?)```", quick, re.S).group(1)
    assert "$ make demo\n" in transcript and "$ make test\n" in transcript
    assert DOC_OPTIMIZER in transcript and DOC_ECHO in transcript
    assert transcript.index(DOC_OPTIMIZER) < transcript.index(DOC_ECHO) < transcript.index("$ make test")
    assert re.search(r"^(\d+ failed, )?\d+ passed in [\d.]+s", transcript, re.M)


def test_own_broker_section_follows_the_quick_start():
    text = readme()
    titles = re.findall(r"^## (.*)$", text, re.M)
    assert titles[titles.index("Quick start") + 1] == "Using mqbtt with your own broker"
    own = section(text, "Using mqbtt with your own broker")
    for needed in ("MQBTT_BROKER", "mqbtt echo", "examples/optimizer.py", "pair id"):
        assert needed in own


def test_every_command_is_under_commands_with_a_working_link():
    text = readme()
    commands = section(text, "Commands")
    found = set(anchors(text))
    for cmd in mqbtt.COMMANDS:
        m = re.search(rf"^- \[`{re.escape(cmd)}`\]\(#([\w-]+)\)", commands, re.M)
        assert m, cmd
        assert m.group(1) in found, (cmd, m.group(1))


def test_every_message_field_is_explained():
    fields = section(readme(), "What each message field means")
    for cls in (mqbtt.Request, mqbtt.Reply, mqbtt.Share):
        for f in dataclasses.fields(cls):
            assert re.search(rf"^\| `{f.name}` \|", fields, re.M), (cls.__name__, f.name)
    for kind in mqbtt.Kind:
        assert f"`{kind.name}`" in fields


def test_no_stray_markers():
    text = readme()
    for marker in ("TODO", "FIXME", "<<<<", ">>>>", "\n=======\n", "<!--"):
        assert marker not in text, marker
    assert "XXX" not in text.replace("\\uXXXX", "")   # `\uXXXX` is an escape, not a marker
    assert text.count("```") % 2 == 0
    # inline code spans are closed within their paragraph (outside fenced blocks)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for para in prose.split("\n\n"):
        assert para.count("`") % 2 == 0, para[:200]


def test_table_of_contents_lists_every_section():
    text = readme()
    toc = section(text, "Contents")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    titles = [t for t in re.findall(r"^##+ (.*)$", prose, re.M) if t != "Contents"]
    listed = re.findall(r"^\s*- \[(.*?)\]\(#([\w-]+)\)$", toc, re.M)
    assert [t for t, _ in listed] == titles
    found = anchors(text)
    assert all(a in found for _, a in listed)
    assert len({a for _, a in listed}) == len(listed)   # no two sections share an anchor
