#!/usr/bin/env python3
"""Build ``mqbtt.pyz``, the self-contained mqbtt zipapp, with shiv.

    python3 build_zipapp.py [-o PATH]          # default: ./mqbtt.pyz (+ mqbtt.pyz.sha256)

One file runs on CPython 3.10-3.13 (and newer) on Linux x86_64 with glibc >= 2.17:
the wheels are chosen for that target, not for the Python that builds:

* protobuf's ``cp310-abi3-manylinux2014_x86_64`` wheel: its compiled upb backend
  loads on every CPython >= 3.10 (stable ABI), and the pure-Python backend it also
  carries is the fallback elsewhere (``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``);
* pure-Python or abi3 wheels for everything else (``--abi abi3 --abi none`` keeps out
  wheels compiled for one CPython only, such as a ``cp311-cp311`` charset_normalizer).

The archive is reproducible (``shiv --reproducible``: fixed timestamps; the build id
is a hash of the contents), so equal inputs give an equal checksum.  Beside it the
build writes ``mqbtt.pyz.sha256`` in the format ``sha256sum`` writes, which is what
``mqbtt upgrade`` expects to find next to a published ``mqbtt.pyz``.

Other jobs:

    python3 build_zipapp.py --descriptor          # print _DESCRIPTOR made by protoc from mqbtt.proto
    python3 build_zipapp.py --update-descriptor   # rewrite the _DESCRIPTOR block in mqbtt.py
"""
import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))

#: pip options selecting wheels for the pyz's target, whatever Python builds it
TARGET = ["--only-binary=:all:", "--platform", "manylinux2014_x86_64",
          "--python-version", "3.10", "--implementation", "cp", "--abi", "abi3", "--abi", "none"]

#: CPython versions whose compiled psycopg (psycopg-binary, one wheel per version:
#: it is not abi3) the pyz carries, so PostgreSQL recordings run at C speed on each
#: (the .so files are named per version and the bundled libpq etc. are identical)
PSYCOPG_BINARY_PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def _runtime_requirements(tmp):
    """requirements.txt for the abi3/none install: ``psycopg[binary]`` becomes
    ``psycopg`` (its binary part is added per CPython by ``_add_psycopg_binary``)."""
    import re as _re
    out = os.path.join(tmp, "requirements-pyz.txt")
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        text = _re.sub(r"^psycopg\[binary\]", "psycopg", f.read(), flags=_re.M)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    return out


def _add_psycopg_binary(site, tmp, wheel_dir=None):
    """Unpack psycopg-binary for every CPython of PSYCOPG_BINARY_PYTHONS into
    *site*, at exactly the version of the psycopg installed there."""
    import glob as _glob
    import zipfile
    found = _glob.glob(os.path.join(site, "psycopg-*.dist-info"))
    if not found:
        return
    version = os.path.basename(found[0])[len("psycopg-"):-len(".dist-info")]
    dest = os.path.join(tmp, "psycopg-binary-wheels")
    for py in PSYCOPG_BINARY_PYTHONS:
        abi = "cp" + py.replace(".", "")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
               "--python-version", py, "--implementation", "cp", "--abi", abi,
               "--dest", dest, f"psycopg-binary=={version}"]
        if wheel_dir:
            cmd += ["--no-index", "--find-links", wheel_dir]
        _run(cmd)
    for wheel in sorted(_glob.glob(os.path.join(dest, "psycopg_binary-*.whl"))):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if ".dist-info/" in name and not name.startswith(f"psycopg_binary-{version}.dist-info/"):
                    continue
                z.extract(name, site)
    for dirpath, _, files in os.walk(os.path.join(site, "psycopg_binary.libs")):
        for name in files:   # zipfile drops the modes: the libraries must be loadable
            os.chmod(os.path.join(dirpath, name), 0o755)


#: the housekeeping part of the entry module (mqbtt_boot.py), run at every start
#: of the pyz: keeps ``~/.shiv`` (or ``$SHIV_ROOT``) from growing with one
#: directory per build (shiv #188).  Every process holds a shared flock on
#: ``<cache dir>/.mqbtt-in-use`` for its lifetime; on a build's first start (and
#: then daily) the other ``<same name>_<build id>`` directories nobody holds are
#: removed.  It also byte-compiles mqbtt.py for the running Python once (see
#: ``_compile``).  It is part of the entry module rather than a shiv
#: ``--preamble``: shiv runs a preamble with runpy from source at every start
#: (compiled each time, and pkgutil imported), which made ``--version`` ~5 %
#: slower; the entry module is imported from its cached bytecode.
HOUSEKEEPING = '''\
def _clean(build_dir):
    root, me = os.path.split(build_dir)
    prefix = me.rsplit("_", 1)[0] + "_"
    for entry in os.scandir(root):
        name = entry.name
        if (name == me or not name.startswith(prefix) or not name[len(prefix):].isalnum()
                or not entry.is_dir(follow_symlinks=False)):
            continue
        try:
            fd = os.open(os.path.join(entry.path, ".mqbtt-in-use"), os.O_RDONLY)
        except FileNotFoundError:  # not started yet, or an older build: spare it for an hour
            if time.time() - entry.stat().st_mtime < 3600:
                continue
            fd = None
        except OSError:
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if in use
            trash = f"{entry.path}.del-{os.getpid()}"
            os.rename(entry.path, trash)
        except OSError:
            continue
        finally:
            if fd is not None:
                os.close(fd)
        import shutil
        shutil.rmtree(trash, ignore_errors=True)
        try:
            os.unlink(os.path.join(root, f".{name}_lock"))
        except OSError:
            pass


def _preamble(build_dir):
    marker = os.path.join(build_dir, ".mqbtt-in-use")
    try:
        due = time.time() - os.stat(marker).st_mtime > 86400
    except OSError:
        due = True
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_CREAT, 0o644)  # kept open until exit
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return
    if due:
        try:
            os.utime(marker)
            _clean(build_dir)
        except OSError:
            pass


def _compile(site_packages):
    # mqbtt.py's and this module's bytecode for this Python, even under
    # PYTHONDONTWRITEBYTECODE: without it every start recompiles the big module (~20 ms)
    import importlib.util
    for name in ("mqbtt.py", "mqbtt_boot.py"):
        src = os.path.join(site_packages, name)
        if not os.path.exists(importlib.util.cache_from_source(src)):
            import py_compile
            try:
                py_compile.compile(src, doraise=True)
            except Exception:
                pass


def _housekeeping():
    site_packages = os.path.dirname(os.path.abspath(__file__))
    _preamble(os.path.dirname(site_packages))
    _compile(site_packages)
'''


#: files of an installed distribution that only pip and type checkers read
PRUNED = {"RECORD", "INSTALLER", "REQUESTED", "WHEEL", "top_level.txt", "py.typed"}


def _prune(site):
    """Remove from *site* what nothing reads at run time (:data:`PRUNED`, ``*.pyi``):
    every start of the pyz reads the zip's directory twice (Python's zipimport for
    the pyz on sys.path, then shiv's bootstrap), at ~10 µs an entry; the METADATA
    and licence files stay."""
    for dirpath, _, files in os.walk(site):
        for name in files:
            if name in PRUNED or name.endswith(".pyi"):
                os.remove(os.path.join(dirpath, name))


def _run(cmd, **kw):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if r.returncode:
        sys.stderr.write(r.stdout)
        raise SystemExit(f"build_zipapp: command failed ({r.returncode}): {' '.join(cmd)}")
    return r.stdout


def descriptor_base64(proto=os.path.join(ROOT, "mqbtt.proto")):
    """The serialized FileDescriptorProto protoc makes of *proto*, base64-encoded
    (what mqbtt.py embeds as ``_DESCRIPTOR``)."""
    if shutil.which("protoc") is None:
        raise SystemExit("build_zipapp: protoc not found (Debian: apt-get install protobuf-compiler)")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        _run(["protoc", f"--proto_path={os.path.dirname(os.path.abspath(proto))}",
              f"--descriptor_set_out={out}", os.path.basename(proto)])
        with open(out, "rb") as f:
            data = f.read()
    # a FileDescriptorSet holding one file: field 1 (tag 0x0a), a varint length, the file
    if data[:1] != b"\x0a":
        raise SystemExit("build_zipapp: unexpected protoc output")
    n, shift, i = 0, 0, 1
    while True:
        n |= (data[i] & 0x7F) << shift
        shift += 7
        i += 1
        if not data[i - 1] & 0x80:
            break
    if i + n != len(data):
        raise SystemExit("build_zipapp: protoc output holds more than one file")
    return base64.b64encode(data[i:]).decode()


def descriptor_block(b64):
    """The ``_DESCRIPTOR = (...)`` assignment for mqbtt.py, 76 characters a line."""
    lines = [f'    "{b64[i:i + 76]}"' for i in range(0, len(b64), 76)]
    return "_DESCRIPTOR = (\n" + "\n".join(lines) + "\n)"


_DESCRIPTOR_RE = re.compile(r'^_DESCRIPTOR = \(\n(?:    "[A-Za-z0-9+/=]*"\n)*\)', re.M)


def embedded_descriptor(source):
    """The base64 text of ``_DESCRIPTOR`` in mqbtt.py source *source*."""
    m = _DESCRIPTOR_RE.search(source)
    if not m:
        raise SystemExit("build_zipapp: no _DESCRIPTOR block found in mqbtt.py")
    return "".join(re.findall(r'"([^"]*)"', m.group(0)))


def update_descriptor(path=os.path.join(ROOT, "mqbtt.py")):
    """Rewrite the ``_DESCRIPTOR`` block of mqbtt.py from mqbtt.proto; return True if it changed."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    b64 = descriptor_base64()
    if embedded_descriptor(source) == b64:
        return False
    source = _DESCRIPTOR_RE.sub(lambda m: descriptor_block(b64), source, count=1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    return True


BOOT = '''"""Entry point of mqbtt.pyz (generated by build_zipapp.py).

Answers ``--version`` without importing mqbtt (and so dataclasses, logging,
threading, ...); everything else goes to :func:`mqbtt.main`.  Before either,
the housekeeping of shiv's cache directory (see build_zipapp.HOUSEKEEPING).
"""
import fcntl
import os
import sys
import time

VERSION = {version!r}
COMMANDS = {commands!r}


def main():
    if sys.version_info < (3, 10):  # one line, before mqbtt.py (3.10 syntax) is imported
        sys.stderr.write("mqbtt: error: mqbtt needs Python 3.10 or newer, this is Python %d.%d (%s)\\n"
                         % (sys.version_info[0], sys.version_info[1], sys.executable))
        return 1
    _housekeeping()
    args = sys.argv[1:]
    name = sys.argv[0].replace("\\\\", "/").rsplit("/", 1)[-1]
    for suffix in (".pyz", ".py"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    linked = name.startswith("mqbtt_") and name[6:] in COMMANDS
    if args == ["--version"] or (not linked and len(args) == 2 and args[0] in COMMANDS
                                 and args[1] == "--version"):
        print("mqbtt " + VERSION)
        return 0
    import mqbtt
    return mqbtt.main()
'''


def boot_source(source):
    """The entry module for *source* (mqbtt.py's text): its version and command names."""
    import ast
    tree = ast.parse(source)
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("__version__", "COMMANDS"):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return (BOOT.format(version=values["__version__"], commands=sorted(values["COMMANDS"]))
            + "\n\n" + HOUSEKEEPING)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(output="mqbtt.pyz", version=None, wheel_dir=None, python="/usr/bin/env python3",
          quiet=False):
    """Build the zipapp *output* (and ``output + '.sha256'``); return its SHA-256.

    :param version: build with ``__version__`` replaced by this string (for testing upgrades)
    :param wheel_dir: a directory of wheels to install from instead of the package index
    """
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        import shiv  # noqa: F401
    except ImportError:
        raise SystemExit("build_zipapp: shiv is not installed (pip install -r requirements-dev.txt)")
    with open(os.path.join(ROOT, "mqbtt.py"), encoding="utf-8") as f:
        source = f.read()
    if shutil.which("protoc") and embedded_descriptor(source) != descriptor_base64():
        raise SystemExit("build_zipapp: _DESCRIPTOR in mqbtt.py does not match mqbtt.proto "
                         "(run: python3 build_zipapp.py --update-descriptor)")
    if version is not None:
        source, n = re.subn(r'^__version__ = "[^"]*"', f'__version__ = "{version}"', source,
                            count=1, flags=re.M)
        if not n:
            raise SystemExit("build_zipapp: no __version__ line in mqbtt.py")
    output = os.path.abspath(output)
    with tempfile.TemporaryDirectory() as tmp:
        site = os.path.join(tmp, "site-packages")
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-compile", "--no-warn-script-location", "--target", site, *TARGET,
               "-r", _runtime_requirements(tmp)]
        if wheel_dir:
            pip += ["--no-index", "--find-links", wheel_dir]
        say("build_zipapp: installing the dependencies for CPython >= 3.10, manylinux2014_x86_64")
        _run(pip, env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})
        say("build_zipapp: adding psycopg-binary for CPython " + ", ".join(PSYCOPG_BINARY_PYTHONS))
        _add_psycopg_binary(site, tmp, wheel_dir)
        # console scripts made by pip point at the building Python: useless in the pyz
        shutil.rmtree(os.path.join(site, "bin"), ignore_errors=True)
        for dirpath, dirnames, _ in os.walk(site):
            if "__pycache__" in dirnames:
                shutil.rmtree(os.path.join(dirpath, "__pycache__"))
                dirnames.remove("__pycache__")
        _prune(site)
        with open(os.path.join(site, "mqbtt.py"), "w", encoding="utf-8") as f:
            f.write(source)
        shutil.copy(os.path.join(ROOT, "mqbt.py"), os.path.join(site, "mqbt.py"))
        with open(os.path.join(site, "mqbtt_boot.py"), "w", encoding="utf-8") as f:
            f.write(boot_source(source))
        tmp_out = os.path.join(tmp, "mqbtt.pyz")
        say("build_zipapp: building the zipapp with shiv")
        _run([sys.executable, "-m", "shiv", "--site-packages", site, "--entry-point", "mqbtt_boot:main",
              "--python", python, "--reproducible",
              "--output-file", tmp_out],
             env={**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "315532800")})
        os.makedirs(os.path.dirname(output), exist_ok=True)
        shutil.move(tmp_out, output)
    os.chmod(output, 0o755)
    digest = sha256_file(output)
    with open(output + ".sha256", "w", encoding="utf-8") as f:
        f.write(f"{digest}  {os.path.basename(output)}\n")
    say(f"build_zipapp: wrote {output} ({os.path.getsize(output)} bytes) and {output}.sha256")
    return digest


def main(argv=None):
    p = argparse.ArgumentParser(prog="build_zipapp.py", description="Build mqbtt.pyz with shiv.")
    p.add_argument("-o", "--output", metavar="PATH", default="mqbtt.pyz",
                   help="the zipapp to write (default: mqbtt.pyz); PATH.sha256 is written beside it")
    p.add_argument("--version-override", metavar="VERSION",
                   help="build with this __version__ instead of mqbtt.py's (for testing upgrades)")
    p.add_argument("--wheel-dir", metavar="DIR",
                   help="install the dependencies from the wheels in DIR, not from the index")
    p.add_argument("--python", metavar="SHEBANG", default="/usr/bin/env python3",
                   help="interpreter line of the zipapp (default: /usr/bin/env python3)")
    p.add_argument("--descriptor", action="store_true",
                   help="print the _DESCRIPTOR block protoc makes of mqbtt.proto and exit")
    p.add_argument("--update-descriptor", action="store_true",
                   help="rewrite the _DESCRIPTOR block of mqbtt.py from mqbtt.proto and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    a = p.parse_args(argv)
    if a.descriptor:
        print(descriptor_block(descriptor_base64()))
        return 0
    if a.update_descriptor:
        changed = update_descriptor()
        print("mqbtt.py: _DESCRIPTOR " + ("updated" if changed else "already up to date"))
        return 0
    build(a.output, version=a.version_override, wheel_dir=a.wheel_dir, python=a.python,
          quiet=a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
