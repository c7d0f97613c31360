#!/usr/bin/env python3
"""MQbtT: steer a Bitcoin miner from an optimizer over MQTT.

mqbtt lets an *optimizer* program talk to a *miner* (ESP-Miner/AxeOS on a
Bitaxe board, or cgminer driving a USB ASIC) through an MQTT broker, and
records, replays and analyses that traffic.

This is a single-file module: copy ``mqbtt.py`` into a project (its only
dependencies are ``paho-mqtt``, ``protobuf`` and, for the AxeOS/OpenObserve
helpers, ``requests``), or run the self-contained ``mqbtt.pyz`` built from it
by ``build_zipapp.py``.

Topics are ``mqbtt/<pair_id>/<subtopic>``:

========  ==================  ====  ==================================
subtopic  direction           QoS   payload
========  ==================  ====  ==================================
``srv``   optimizer -> miner  2     :class:`Request` (protobuf)
``esp``   miner -> optimizer  2     :class:`Reply` (protobuf)
``shr``   miner -> optimizer  1     :class:`Share` (protobuf)
``log``   miner -> anyone     1     UTF-8 text, one log line
========  ==================  ====  ==================================

Quick use::

    from mqbtt import MQbtTOptimizer, Request, Kind

    with MQbtTOptimizer('mqtt://localhost', 'test') as handle:
        handle.send_request(Request(timestamp_min=0, timestamp_max=1))
        reply = handle.receive_reply(timeout=10)
"""

__version__ = "0.1.0"
__license__ = "MIT"

# Python version check: this part runs before anything that needs 3.10 (dataclass
# kw_only, ``X | None`` annotations), so keep it parseable and runnable by Python 3.
import sys

if sys.version_info < (3, 10):
    _TOO_OLD = ("mqbtt needs Python 3.10 or newer, this is Python %d.%d (%s)"
                % (sys.version_info[0], sys.version_info[1], sys.executable))
    if __name__ == "__main__":
        sys.exit("mqbtt: error: " + _TOO_OLD)
    raise ImportError(_TOO_OLD)

import dataclasses
import enum
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from queue import Empty

__all__ = [
    # messages
    "Kind", "Request", "Reply", "Share",
    # pair classes
    "MQbtTBase", "MQbtTOptimizer", "MQbtTMiner", "MQbtTLogReceiver",
    "Empty", "DEFAULT_BROKER", "SUBTOPICS", "topic",
    # exceptions
    "MQbtTError", "MQbtTDecodeError", "MQbtTConnectionError",
    "MQbtTSubscribeError", "MQbtTSendError", "MQbtTSendTimeout",
    "APIException", "MQbtTConfigError", "MQbtTMissingDependency", "DEPENDENCIES",
    "check_dependencies",
    # secrets and text from the wire
    "safe_text", "BrokerURI", "HTTP_MAX_BYTES", "WSLOG_MAX_LINE", "WSLOG_SPLIT_MARK", "WSLOG_MAX_FRAME",
    "WSLOG_MAX_HANDSHAKE",
    "UPGRADE_MAX_BYTES",
    # external services (AxeOS, OpenObserve)
    "pid2url", "axeos_info", "axeos_restart", "o2_history", "restart", "wslog",
    "config_path", "HTTP_TIMEOUT", "AXEOS_PRIVATE_NETWORKS",
    # recording and analysis
    "MQbtTRecord", "MQbtTDataBase", "MQbtTDatabase", "Recorder", "record",
    "recorder_client_id", "dump", "format_dump", "replay", "request_reply_pairs", "MIN_SPEED",
    # recordings from the command line: info, export, replay checks
    "MQbtTNotFound", "open_recording", "replay_plan", "parse_time", "export",
    "describe_message", "EXPORT_FIELDS", "EXPORT_FORMATS",
    # PostgreSQL recordings, shared recording, copies
    "copy", "is_pg_url", "check_share_group", "PG_INSTALL",
    # distribution: zipapp, symlinks and upgrade
    "upgrade", "install_links", "link_names", "run_script", "running_zipapp", "UPGRADE_URL",
    "pip_scripts",
    # fleet statistics: mqbtt top and mqbtt exporter
    "FleetStats", "FleetPair", "run_top", "run_exporter", "format_fleet_table", "sort_fleet",
    "parse_listen", "FLEET_SORT_KEYS", "RTT_BUCKETS", "DIFF_BUCKETS",
    "main",
]

log = logging.getLogger("mqbtt")

#: The documented default broker host; ``$MQBTT_BROKER`` overrides it for the CLI
#: and for the examples.
DEFAULT_BROKER = "cudone.law.di.unimi.it"

#: The four subtopics of a pair, with the QoS mqbtt publishes and subscribes at.
#: ``srv``/``esp`` use QoS 2 (exactly once): a duplicated Request or Reply would
#: make the optimizer read the reply of the previous request.  Shares and log
#: lines use QoS 1 (at least once): a rare duplicate is harmless, a loss is not.
SUBTOPICS = {"srv": 2, "esp": 2, "shr": 1, "log": 1}


###############################################################################
# Exceptions ##################################################################
###############################################################################

class MQbtTError(Exception):
    """Base class of every exception mqbtt raises on purpose."""


class MQbtTDecodeError(MQbtTError, ValueError):
    """A payload is not a valid serialized message of the expected type.

    Raised by ``from_bytes()`` and therefore by the ``receive_T()`` methods
    (the bad message is consumed; the next one can be received normally).
    Never a half-filled message."""


class MQbtTConnectionError(MQbtTError, ConnectionError):
    """The broker cannot be reached, refused the connection (bad credentials,
    not authorised) or could not be connected within ``connect_timeout``."""


class MQbtTSubscribeError(MQbtTConnectionError):
    """The broker refused a subscription (SUBACK failure code), typically
    because an ACL does not give these credentials the pair's topics."""


class MQbtTSendError(MQbtTError):
    """A message could not be handed to the broker."""


class MQbtTSendTimeout(MQbtTSendError, TimeoutError):
    """A blocking send was not acknowledged by the broker within its timeout.

    The message is *not* lost: it stays queued in the client and is delivered
    when the connection is back (it is never sent twice by mqbtt)."""


class APIException(MQbtTError):
    """An AxeOS or OpenObserve API call failed (network error, timeout, HTTP
    error status or an unusable answer); the message says what and where."""


class MQbtTConfigError(MQbtTError, ValueError):
    """The configuration file (see :func:`config_path`) cannot be used: it
    is missing (when named by ``$MQBTT_CONFIG``), unreadable or not valid INI.

    The message is one line naming the file and, for syntax errors, the line
    number; it never quotes the file's content (which may hold a password).
    ``path`` and ``lineno`` (or None) are attributes."""

    def __init__(self, message, path=None, lineno=None):
        super().__init__(message)
        self.path = path
        self.lineno = lineno


###############################################################################
# Safe text: what a miner sends, made harmless for terminals and log files ####
###############################################################################

# Terminal escape sequences, 7-bit (ESC ...) and 8-bit (C1) forms: CSI
# (colours, cursor moves), OSC (titles, hyperlinks, clipboard) up to BEL or
# ST, DCS/SOS/PM/APC strings up to ST, and any other ESC sequence.  Their
# parameter classes exclude ESC, so a sequence nested in another never
# matches as one: its ESC is caught by the control-character branch below.
# String bodies exclude every C1 character too: otherwise each of n
# introducers in a row ("\x9d" * n) scans to the end: quadratic (20,000
# characters took 5 s).
_ESCAPE_SEQUENCE = (r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
                    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x80-\x9f]*(?:\x07|\x1b\\|\x9c)"
                    r"|(?:\x1b[PX^_]|[\x90\x98\x9e\x9f])[^\x1b\x80-\x9f]*(?:\x1b\\|\x9c)"
                    r"|\x1b[ -/]*[0-~]")
# C0 controls but tab, DEL, C1 controls, the bidirectional marks, embeddings,
# overrides and isolates ("Trojan Source"), line/paragraph separators, and
# lone surrogates (undecodable bytes; they cannot even be printed as UTF-8)
_UNSAFE_CHARACTER = ("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                     "\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_unsafe_re = _unsafe_char_re = None


def _escape_unsafe(m) -> str:
    text = m.group(0)
    if len(text) > 1:  # a whole escape sequence: removed
        return ""
    c = ord(text)
    if c in (10, 13):
        return "\\n" if c == 10 else "\\r"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def safe_text(text, *, strip_ansi: bool = True) -> str:
    """*text* made safe to print on a terminal or write to a log file, as one line.

    Terminal escape sequences (ANSI colours, cursor moves, window titles,
    hyperlinks; 7-bit and C1 forms) are removed in one pass; every other
    control character but tab (C0, DEL, C1, so also line breaks), the
    Unicode bidirectional overrides, embeddings, isolates and marks, the
    line and paragraph separators and lone surrogates are replaced by their
    escape (``\\x1b``, ``\\u202e``), so nothing in the result can move the
    cursor, recolour or retitle a terminal, reorder text or start a new
    line.  Printable text, tabs included, comes back unchanged.  Nested or
    cut sequences (``ESC [ ESC [31m 31m``) leave no working escape: the
    result contains no ESC and no C1 character at all.

    mqbtt passes through it every text that comes from a miner, a broker or
    a server before it reaches a terminal or a log file (``dump``, ``wslog``,
    error messages, the examples).

    :param text: a string (anything else is converted with ``str()``)
    :param strip_ansi: remove escape sequences (the default); if false, keep
      them visible with their ESC escaped (``\\x1b[2J``), as ``mqbtt dump``
      shows a log line
    :returns: the neutralised string"""
    global _unsafe_re, _unsafe_char_re
    if not isinstance(text, str):
        text = str(text)
    if text.isprintable():  # no control, format or separator character at all: fast path
        return text
    if _unsafe_re is None:
        import re
        _unsafe_re = re.compile(f"{_ESCAPE_SEQUENCE}|{_UNSAFE_CHARACTER}")
        _unsafe_char_re = re.compile(_UNSAFE_CHARACTER)
    return (_unsafe_re if strip_ansi else _unsafe_char_re).sub(_escape_unsafe, text)


def _json_escape_unsafe(text: str) -> str:
    """JSON text (from ``json.dumps(ensure_ascii=False)``, which escapes C0
    but not C1, bidi overrides or U+2028) with every unsafe character (see
    :func:`safe_text`) written as a ``\\uXXXX`` escape: the same JSON value,
    safe on a terminal.  Outside strings JSON text is plain ASCII, so only
    string contents change."""
    global _unsafe_json_re
    if text.isprintable():
        return text
    if _unsafe_json_re is None:
        import re
        _unsafe_json_re = re.compile(_UNSAFE_CHARACTER)
    return _unsafe_json_re.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


_unsafe_json_re = None


class _SafeFormatter(logging.Formatter):
    """A log formatter whose lines pass through :func:`safe_text` (a log
    message may quote a miner's or a server's text)."""

    def format(self, record):
        return safe_text(super().format(record))


###############################################################################
# Missing dependencies ########################################################
###############################################################################

#: The third-party packages mqbtt imports (lazily, where they are used):
#: top-level module -> (pip requirement, what needs it).  Keep the requirements
#: in step with requirements.txt (test_newcomer.py checks it).
DEPENDENCIES = {
    "paho": ("paho-mqtt>=2.1,<3", "MQTT"),
    "google.protobuf": ("protobuf>=5.26,<8", "message encoding"),
    "requests": ("requests>=2.31,<3", "the AxeOS/OpenObserve calls and upgrade"),
    "urllib3": ("urllib3>=2.6,<3", "bounded HTTP answers (decompression limited while streaming)"),
    "websocket": ("websocket-client>=1.6,<2", "wslog"),
    "prometheus_client": ("prometheus_client>=0.20,<1", "mqbtt exporter"),
    # review 3: in requirements.txt since the merge; PostgreSQL code says PG_INSTALL itself
    "psycopg": ("psycopg[binary]>=3.1,<4", "PostgreSQL databases"),
}


class MQbtTMissingDependency(MQbtTError, ImportError):
    """A package mqbtt needs for this feature is not installed; the message
    names it and the ``pip install`` command that installs it."""


def _dependency_of(module: str | None):
    """The :data:`DEPENDENCIES` key *module* (a dotted name) belongs to, or None."""
    for key in DEPENDENCIES:
        if module and (module == key or module.startswith(key + ".") or key.startswith(module + ".")):
            return key
    return None


def _missing_dependency(key: str) -> MQbtTMissingDependency:
    requirement, purpose = DEPENDENCIES[key]
    name = requirement.split(">")[0].split("<")[0].split("=")[0]
    return MQbtTMissingDependency(
        f"the Python package {name} (needed for {purpose}) is not installed: "
        f"pip install '{requirement}'")


def _require(module: str):
    """Import *module*; if one of mqbtt's dependencies is missing, raise
    :exc:`MQbtTMissingDependency` naming it and the pip command."""
    import importlib
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        key = _dependency_of(err.name)
        if key is None:
            raise
        raise _missing_dependency(key) from None


def check_dependencies(*keys: str) -> None:
    """Raise :exc:`MQbtTMissingDependency` for the first of the
    :data:`DEPENDENCIES` *keys* (``"paho"``, ``"google.protobuf"`` …) that
    is not installed, without importing any of them."""
    import importlib.util
    for key in keys:
        try:
            found = importlib.util.find_spec(key) is not None
        except ImportError:  # the parent package (``google``) is missing
            found = False
        if not found:
            raise _missing_dependency(key)


###############################################################################
# Messages and wire format ####################################################
###############################################################################

# mqbtt.proto compiled by protoc (a serialized FileDescriptorProto), so that
# this file works alone, with no generated *_pb2.py beside it.  test_mqbtt.py
# checks that it is exactly what `protoc --descriptor_set_out` makes of
# mqbtt.proto; regenerate it with `python build_zipapp.py --descriptor`.
_DESCRIPTOR = (
    "CgttcWJ0dC5wcm90bxIFbXFidHQiyAEKB1JlcXVlc3QSIwoNdGltZXN0YW1wX21pbhgBIAEoDVIM"
    "dGltZXN0YW1wTWluEiMKDXRpbWVzdGFtcF9tYXgYAiABKA1SDHRpbWVzdGFtcE1heBIfCgtub25j"
    "ZV9zdGFydBgDIAEoDVIKbm9uY2VTdGFydBIdCgpub25jZV9zaXplGAQgASgNUglub25jZVNpemUS"
    "FAoFcmVzZXQYBSABKAhSBXJlc2V0Eh0KCnJlcXVlc3RfaWQYBiABKARSCXJlcXVlc3RJZCKDAQoF"
    "UmVwbHkSHwoEa2luZBgBIAEoDjILLm1xYnR0LktpbmRSBGtpbmQSHQoKbnVtX3NoYXJlcxgCIAEo"
    "BFIJbnVtU2hhcmVzEhsKCW5ld19ibG9jaxgDIAEoCFIIbmV3QmxvY2sSHQoKcmVxdWVzdF9pZBgE"
    "IAEoBFIJcmVxdWVzdElkIr4CCgVTaGFyZRIYCgd2ZXJzaW9uGAEgASgNUgd2ZXJzaW9uEh0KCnBy"
    "ZXZfYmxvY2sYAiABKAxSCXByZXZCbG9jaxIfCgttZXJrbGVfcm9vdBgDIAEoDFIKbWVya2xlUm9v"
    "dBISCgR0aW1lGAQgASgNUgR0aW1lEhsKCXBvb2xfdGltZRgFIAEoDVIIcG9vbFRpbWUSEgoEYml0"
    "cxgGIAEoDVIEYml0cxIUCgVub25jZRgHIAEoDVIFbm9uY2USGwoJcG9vbF9kaWZmGAggASgBUghw"
    "b29sRGlmZhIVCgZqb2JfaWQYCSABKAlSBWpvYklkEiAKC2V4dHJhbm9uY2UyGAogASgJUgtleHRy"
    "YW5vbmNlMhISCgRkaWZmGAsgASgBUgRkaWZmEhYKBnplcm9lcxgMIAEoDVIGemVyb2VzKjEKBEtp"
    "bmQSCQoFSEVMTE8QABIKCgZSRVNVTFQQARIJCgVSRVNFVBACEgcKA0JZRRADYgZwcm90bzM="
)

_PB = {}


def _pb():
    """The protobuf message classes (``Request``, ``Reply``, ``Share``), built
    on first use from :data:`_DESCRIPTOR` (protobuf is imported lazily)."""
    if not _PB:
        import base64
        descriptor_pool = _require("google.protobuf.descriptor_pool")
        message_factory = _require("google.protobuf.message_factory")
        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(base64.b64decode(_DESCRIPTOR))
        fd = pool.FindFileByName("mqbtt.proto")
        for name in ("Request", "Reply", "Share"):
            _PB[name] = message_factory.GetMessageClass(fd.message_types_by_name[name])
    return _PB


def _decode_error(cls, b, err):
    try:
        preview = bytes(b[:32]).hex()
    except TypeError:
        preview = repr(b)[:64]
    more = "..." if isinstance(b, (bytes, bytearray)) and len(b) > 32 else ""
    return MQbtTDecodeError(
        f"cannot decode {cls.__name__} from {len(b) if hasattr(b, '__len__') else '?'} "
        f"bytes ({preview}{more}): {err}")


def _parse(cls, b):
    """Parse *b* with the protobuf class of *cls*, or raise MQbtTDecodeError."""
    pbclass = _PB.get(cls.__name__) or _pb()[cls.__name__]  # missing protobuf: not a decode error
    try:
        return pbclass.FromString(b)
    except Exception as err:  # google.protobuf.message.DecodeError, TypeError, ...
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise MQbtTDecodeError(
                f"cannot decode {cls.__name__} from {type(b).__name__}: bytes expected") from None
        raise _decode_error(cls, b, err) from None


def _serialize(self, pbname, **fields):
    try:
        return (_PB.get(pbname) or _pb()[pbname])(**fields).SerializeToString()
    except (ValueError, TypeError) as err:
        raise ValueError(f"cannot serialize {self!r}: {err}") from None


_new = object.__new__

# -- field validation (issue 12): constructors refuse wrong types and values
# out of range, so nothing goes out silently converted; from_bytes() bypasses
# it (decoded values are valid by construction).

class _FieldTypeError(TypeError, ValueError):
    """A message field of the wrong type: a ``TypeError``, and also a
    ``ValueError`` as documented before (``except ValueError`` still works)."""


_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


def _check_uint(obj, name, value, top):
    """*value* is an int in 0..*top* (bool excluded), else TypeError/ValueError."""
    if value.__class__ is not int:
        import operator
        if isinstance(value, bool):
            raise _FieldTypeError(f"{type(obj).__name__}.{name} must be an integer, not {value!r}")
        try:
            value = operator.index(value)
        except TypeError:
            raise _FieldTypeError(f"{type(obj).__name__}.{name} must be an integer, "
                                  f"not {type(value).__name__}") from None
    if not 0 <= value <= top:
        raise ValueError(f"{type(obj).__name__}.{name} must be in 0..{top}, not {value}"[:300])


def _check_bool(obj, name, value):
    if value is not True and value is not False:
        raise _FieldTypeError(f"{type(obj).__name__}.{name} must be a bool, not {value!r}"[:300])


def _check_real(obj, name, value):
    """*value* is a float, or an int that fits a double (NaN and infinities
    are allowed: the wire format is a protobuf double)."""
    if value.__class__ is float:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _FieldTypeError(f"{type(obj).__name__}.{name} must be a real number, "
                              f"not {type(value).__name__}")
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"{type(obj).__name__}.{name} is too large for a double") from None


def _check_type(obj, name, value, cls):
    if value.__class__ is not cls and not isinstance(value, cls):
        raise _FieldTypeError(f"{type(obj).__name__}.{name} must be {cls.__name__}, "
                              f"not {type(value).__name__}")


class Kind(enum.IntEnum):
    """The kind of a :class:`Reply`."""
    HELLO = 0
    RESULT = 1
    RESET = 2
    BYE = 3


_KINDS = frozenset(Kind) | frozenset(map(int, Kind))


@dataclass(frozen=True, kw_only=True)
class Request:
    """Request message sent by the optimizer to the miner.

    :param timestamp_min: Minimum timestamp.
    :param timestamp_max: Maximum timestamp.
    :param nonce_start: Minimum nonce.
    :param nonce_size: Maximum nonce.
    :param reset: Whether to reset the state.
    :param request_id: Correlation id (unsigned 64-bit, 0 = none): set by
      :meth:`MQbtTOptimizer.send_request`, copied by the miner into its
      :class:`Reply`.  Not part of ``repr`` nor of ``==``.

    Integers are unsigned 32-bit on the wire: the constructor raises
    ``TypeError`` for a value that is not an ``int`` (``reset``: not a
    ``bool``) and ``ValueError`` for one out of range.
    """
    timestamp_min: int = 0
    timestamp_max: int = 0
    nonce_start: int = 0
    nonce_size: int = 0
    reset: bool = False
    request_id: int = dataclasses.field(default=0, compare=False, repr=False)

    def __post_init__(self):
        d = self.__dict__
        for name in ("timestamp_min", "timestamp_max", "nonce_start", "nonce_size"):
            v = d[name]
            if v.__class__ is not int or not 0 <= v <= _U32:
                _check_uint(self, name, v, _U32)
        _check_bool(self, "reset", d["reset"])

    def to_bytes(self) -> bytes:
        """Serialize the Request to bytes using protobuf.

        :returns: The serialized protobuf representation of the request.
        :raises ValueError: if a field is out of range or of the wrong type."""
        return _serialize(self, "Request", timestamp_min=self.timestamp_min,
                          timestamp_max=self.timestamp_max, nonce_start=self.nonce_start,
                          nonce_size=self.nonce_size, reset=self.reset,
                          request_id=self.request_id)

    @classmethod
    def from_bytes(cls, b: bytes) -> "Request":
        """Deserialize bytes into a Request object.

        :param b: The bytes to deserialize.
        :returns: The deserialized Request object.
        :raises MQbtTDecodeError: if *b* is not a serialized Request."""
        m = _parse(cls, b)
        obj = object.__new__(cls)
        obj.__dict__.update(timestamp_min=m.timestamp_min, timestamp_max=m.timestamp_max,
                            nonce_start=m.nonce_start, nonce_size=m.nonce_size, reset=m.reset,
                            request_id=m.request_id)
        return obj


@dataclass(frozen=True, kw_only=True)
class Reply:
    """Reply message from the miner to the optimizer.

    :param kind: The kind of reply (e.g., RESULT).
    :param num_shares: Number of shares in the reply (unsigned 64-bit).
    :param new_block: Whether a new block was found.
    :param request_id: The ``request_id`` of the :class:`Request` this reply
      answers (unsigned 64-bit, 0 = unknown).  Not part of ``repr`` nor of ``==``.

    The constructor raises ``TypeError`` for a value of the wrong type (e.g.
    ``kind=1.0``) and ``ValueError`` for one out of range; an int *kind* is
    converted to :class:`Kind`.
    """
    kind: Kind = Kind.RESULT
    num_shares: int = 0
    new_block: bool = False
    request_id: int = dataclasses.field(default=0, compare=False, repr=False)

    def __post_init__(self):
        d = self.__dict__
        kind = d["kind"]
        if kind.__class__ is not Kind:
            if kind.__class__ is not int and not (isinstance(kind, int) and not isinstance(kind, bool)):
                raise _FieldTypeError(f"Reply.kind must be a Kind or an int, not {kind!r}"[:300])
            try:
                d["kind"] = Kind(kind)
            except ValueError:
                raise ValueError(f"Reply.kind must be one of "
                                 f"{', '.join(f'{k.name} ({k.value})' for k in Kind)}, "
                                 f"not {kind}"[:300]) from None
        v = d["num_shares"]
        if v.__class__ is not int or not 0 <= v <= _U64:
            _check_uint(self, "num_shares", v, _U64)
        _check_bool(self, "new_block", d["new_block"])

    def to_bytes(self) -> bytes:
        """Serialize the Reply to bytes using protobuf.

        :returns: The serialized protobuf representation of the reply.
        :raises ValueError: if a field is out of range or of the wrong type."""
        if self.kind not in _KINDS:
            raise ValueError(f"cannot serialize {self!r}: kind must be one of "
                             f"{', '.join(k.name for k in Kind)}")
        return _serialize(self, "Reply", kind=int(self.kind), num_shares=self.num_shares,
                          new_block=self.new_block, request_id=self.request_id)

    @classmethod
    def from_bytes(cls, b: bytes) -> "Reply":
        """Deserialize bytes into a Reply object.

        :param b: The bytes to deserialize.
        :returns: The deserialized Reply object.
        :raises MQbtTDecodeError: if *b* is not a serialized Reply (including
          a ``kind`` outside :class:`Kind`)."""
        m = _parse(cls, b)
        try:
            kind = Kind(m.kind)
        except ValueError:
            raise _decode_error(cls, b, f"unknown kind {m.kind}") from None
        obj = object.__new__(cls)
        obj.__dict__.update(kind=kind, num_shares=m.num_shares, new_block=m.new_block,
                            request_id=m.request_id)
        return obj


@dataclass(frozen=True, kw_only=True)
class Share:
    """Share message from the miner to the optimizer.

    :param version: The version rolled by the miner.
    :param prev_block: The hash of the previous block (bytes).
    :param merkle_root: The bytes of the merkle root.
    :param time: The timestamp of the share.
    :param pool_time: The timestamp provided by the mining pool.
    :param bits: The difficulty bits.
    :param nonce: The nonce rolled by the miner.
    :param pool_diff: The pool difficulty (a real number).
    :param job_id: The job ID (the stratum hex string).
    :param extranonce2: The extranonce2 (the stratum hex string).
    :param diff: The difficulty of the share (a real number).
    :param zeroes: The (approximate) number of leading binary zeroes in the share.

    The constructor raises ``TypeError`` for a value of the wrong type and
    ``ValueError`` for one out of range (integers are unsigned 32-bit; a real
    number must fit a double).
    """
    version: int = 0
    prev_block: bytes = b""
    merkle_root: bytes = b""
    time: int = 0
    pool_time: int = 0
    bits: int = 0
    nonce: int = 0
    pool_diff: float = 0.0
    job_id: str = ""
    extranonce2: str = ""
    diff: float = 0.0
    zeroes: int = 0

    def __post_init__(self):
        d = self.__dict__
        for name in _SHARE_U32:
            v = d[name]
            if v.__class__ is not int or not 0 <= v <= _U32:
                _check_uint(self, name, v, _U32)
        for name in ("pool_diff", "diff"):
            if d[name].__class__ is not float:
                _check_real(self, name, d[name])
        for name in ("prev_block", "merkle_root"):
            if d[name].__class__ is not bytes:
                _check_type(self, name, d[name], bytes)
        for name in ("job_id", "extranonce2"):
            if d[name].__class__ is not str:
                _check_type(self, name, d[name], str)

    def to_bytes(self) -> bytes:
        """Serialize the Share to bytes using protobuf.

        :returns: The serialized protobuf representation of the share.
        :raises ValueError: if a field is out of range or of the wrong type."""
        msg = self.__dict__.get("_pbmsg")
        if msg is not None:          # made by from_bytes: immutable, re-serialize as is
            return msg.SerializeToString()
        try:
            return (_PB.get("Share") or _pb()["Share"])(
                version=self.version, prev_block=self.prev_block, merkle_root=self.merkle_root,
                time=self.time, pool_time=self.pool_time, bits=self.bits, nonce=self.nonce,
                pool_diff=self.pool_diff, job_id=self.job_id, extranonce2=self.extranonce2,
                diff=self.diff, zeroes=self.zeroes).SerializeToString()
        except (ValueError, TypeError) as err:
            raise ValueError(f"cannot serialize {self!r}: {err}") from None

    @classmethod
    def from_bytes(cls, b: bytes) -> "Share":
        """Deserialize bytes into a Share object.

        The bytes are parsed (and validated) at once; each field is converted
        to a Python value the first time it is read, so that receiving a share
        costs little more than protobuf's own parsing.

        :param b: The bytes to deserialize.
        :returns: The deserialized Share object.
        :raises MQbtTDecodeError: if *b* is not a serialized Share."""
        try:  # _parse() inlined: this is the hot path of a share flood
            msg = (_PB.get("Share") or _pb()["Share"]).FromString(b)
        except Exception:
            _parse(cls, b)  # raises the MQbtTDecodeError
            raise
        obj = _new(cls)
        obj.__dict__["_pbmsg"] = msg
        return obj

    def __getattr__(self, name):
        # only called for attributes not in __dict__: the not-yet-read fields
        # of a Share made by from_bytes
        msg = self.__dict__.get("_pbmsg")
        if msg is None or name not in _SHARE_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = getattr(msg, name)
        self.__dict__[name] = value
        return value

    def __getstate__(self):
        return {f: getattr(self, f) for f in _SHARE_FIELDS}

    def __setstate__(self, state):
        self.__dict__.update(state)


_SHARE_FIELDS = frozenset(f.name for f in dataclasses.fields(Share))
_SHARE_U32 = ("version", "time", "pool_time", "bits", "nonce", "zeroes")
# The generated __init__ keeps the defaults; the class attributes holding them
# would hide the lazily-read fields from __getattr__.
for _name in _SHARE_FIELDS:
    delattr(Share, _name)
del _name


def _log_from_bytes(b: bytes) -> str:
    """Decode a log payload: UTF-8 (invalid bytes replaced), one trailing
    newline removed."""
    text = bytes(b).decode("utf-8", errors="replace")
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return text


#: How each subtopic's payload is decoded.
DECODERS = {"srv": Request.from_bytes, "esp": Reply.from_bytes,
            "shr": Share.from_bytes, "log": _log_from_bytes}


def decode(subtopic: str, payload: bytes):
    """Decode *payload* as the message type of *subtopic*.

    :raises MQbtTDecodeError: if the payload does not decode.
    :raises ValueError: for an unknown subtopic."""
    try:
        decoder = DECODERS[subtopic]
    except KeyError:
        raise ValueError(f"unknown subtopic {subtopic!r} (expected one of esp, log, shr, srv)") from None
    return decoder(payload)


###############################################################################
# Broker URIs, pair ids and client ids #######################################
###############################################################################

def topic(pair_id: str, subtopic: str) -> str:
    """The MQTT topic ``mqbtt/<pair_id>/<subtopic>``."""
    return f"mqbtt/{pair_id}/{subtopic}"


def check_pair_id(pair_id) -> str:
    """Return *pair_id* if it is usable in a topic, else raise ValueError.

    An empty pair id, or one containing ``/``, ``+``, ``#`` or NUL, would
    publish or subscribe to other pairs' traffic."""
    if not isinstance(pair_id, str) or not pair_id:
        raise ValueError(f"invalid pair id {pair_id!r}: a non-empty string is required")
    bad = [c for c in "/+#\x00" if c in pair_id]
    if bad:
        raise ValueError(f"invalid pair id {pair_id!r}: it must not contain {' '.join(map(repr, bad))}")
    if not pair_id.isprintable():
        raise ValueError(f"invalid pair id {pair_id!r}: it must not contain control characters")
    try:
        pair_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"invalid pair id {pair_id!r}: it is not valid text (UTF-8)") from None
    return pair_id


@dataclass(frozen=True)
class BrokerURI:
    """A parsed broker URI.

    Accepted forms: ``host``, ``host:port``, ``mqtt://[user[:password]@]host[:port]``,
    ``mqtts://…`` (TLS, default port 8883, system CAs or ``?cafile=PATH``;
    ``?insecure=1`` skips certificate checks; ``?certfile=PATH&keyfile=PATH``
    presents a client certificate, for mutual TLS), ``ws://…`` and ``wss://…``
    (MQTT over websockets, default ports 80/443, path default ``/mqtt``).

    The user information ends at the *last* ``@`` (as browsers read it), so
    a password may contain ``/ ? # : @`` unencoded; an ``@`` in a path or an
    option must then be written ``%40``.  A user name or password the URI
    leaves out is taken from ``$MQBTT_USERNAME`` / ``$MQBTT_PASSWORD``.
    The password never appears in ``str()``, ``repr()`` or error messages.
    """
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    path: str = "/mqtt"
    cafile: str | None = None
    insecure: bool = False
    certfile: str | None = None
    keyfile: str | None = None

    _PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
    _OPTIONS = ("cafile", "insecure", "certfile", "keyfile")

    @classmethod
    def parse(cls, uri: str, environ=None) -> "BrokerURI":
        """Parse *uri*; raise ValueError with a one-line reason if it is not valid.

        :param environ: where ``MQBTT_USERNAME``/``MQBTT_PASSWORD`` are read
          (default: :data:`os.environ`)"""
        from urllib.parse import urlsplit, parse_qs, unquote
        if not isinstance(uri, str) or not uri.strip():
            raise ValueError("invalid broker URI: empty")
        text = uri.strip()
        shown = _redact(text)
        scheme, userinfo, rest = _split_userinfo(text)
        if userinfo is not None and "@" in userinfo and any(
                c in userinfo[userinfo.index("@"):] for c in "/?#"):
            # "bob:pw@host/p@th": password "pw" for host, or "pw@host/p" for "th"?  Guessing
            # wrong sends the password to another host: refuse, say how to write it
            raise ValueError(f"invalid broker URI {shown!r}: ambiguous '@' (write it %40 in a "
                             "path or option; in a password, write / ? # as %2F %3F %23 or @ as %40)")
        if scheme is None:
            scheme = "mqtt"
        try:
            u = urlsplit(f"{scheme}://{rest}")
            port = u.port
        except ValueError as err:
            reason = ("port out of range 1-65535" if "out of range" in str(err) else
                      "invalid port or address")
            raise ValueError(f"invalid broker URI {shown!r}: {reason}") from None
        if port == 0:
            raise ValueError(f"invalid broker URI {shown!r}: port out of range 1-65535")
        scheme = scheme.lower()
        if scheme in ("tcp",):
            scheme = "mqtt"
        if scheme in ("ssl", "tls"):
            scheme = "mqtts"
        if scheme not in cls._PORTS:
            # the URI is not shown: what looks like a scheme may be a user name
            raise ValueError("invalid broker URI: unknown scheme (use mqtt, mqtts, ws or wss)")
        netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
        if not u.hostname:
            raise ValueError(f"invalid broker URI {shown!r}: no host")
        if not netloc.isprintable() or any(c.isspace() or c in "\\<>\"'{}|^`" for c in netloc):
            raise ValueError(f"invalid broker URI {shown!r}: invalid host")
        query = parse_qs(u.query)
        unknown = set(query) - set(cls._OPTIONS)
        if unknown:
            raise ValueError(f"invalid broker URI {shown!r}: unknown option(s) "
                             f"{safe_text(', '.join(sorted(unknown)))}")
        username = password = None
        if userinfo is not None:
            user, colon, pw = userinfo.partition(":")
            username = unquote(user)
            password = unquote(pw) if colon else None
        env = os.environ if environ is None else environ
        if username is None:
            username = env.get("MQBTT_USERNAME") or None
        if password is None and username is not None:
            password = env.get("MQBTT_PASSWORD") or None
        if password is None and env.get("MQBTT_PASSWORD") and username is None:
            raise ValueError("$MQBTT_PASSWORD is set but no user name is given "
                             "(in the broker URI or $MQBTT_USERNAME)")
        opt = {k: v[-1] for k, v in query.items()}
        certfile = os.path.expanduser(opt["certfile"]) if opt.get("certfile") else None
        keyfile = os.path.expanduser(opt["keyfile"]) if opt.get("keyfile") else None
        if (certfile or keyfile) and scheme not in ("mqtts", "wss"):
            raise ValueError(f"invalid broker URI {shown!r}: certfile/keyfile need TLS "
                             "(mqtts:// or wss://)")
        if keyfile and not certfile:
            raise ValueError(f"invalid broker URI {shown!r}: keyfile without certfile")
        path = u.path or "/mqtt"
        return cls(scheme=scheme, host=u.hostname, port=port or cls._PORTS[scheme],
                   username=username, password=password,
                   path=path, cafile=opt.get("cafile"),
                   insecure=opt.get("insecure", "0").lower() in ("1", "true", "yes"),
                   certfile=certfile, keyfile=keyfile)

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "wss")

    @property
    def transport(self) -> str:
        return "websockets" if self.scheme in ("ws", "wss") else "tcp"

    def __str__(self):
        user = ""
        if self.username is not None:
            user = safe_text(self.username) + (":***" if self.password is not None else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = self.path if self.transport == "websockets" else ""
        return f"{self.scheme}://{user}{host}:{self.port}{path}"


def _split_userinfo(text: str) -> tuple:
    """``(scheme or None, userinfo or None, rest)`` of a URI: the user
    information runs from ``//`` to the *last* ``@`` (as browsers read a
    URI), so a password may hold ``/ ? # : @``; *rest* is the host, port,
    path and query.  Without ``scheme://`` the text starts with the
    authority (``user:pw@host:port``)."""
    import re
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
    scheme, rest = (m.group(1), text[m.end():]) if m else (None, text)
    userinfo, at, hostpart = rest.rpartition("@")
    return (scheme, userinfo, hostpart) if at else (scheme, None, rest)


def _redact(uri: str) -> str:
    """*uri* with any password replaced by ``***``: everything between the
    first ``:`` of the user information and its last ``@`` (a password may
    itself contain ``/``, ``@``, ``#`` or ``?``)."""
    uri = str(uri)
    scheme, userinfo, rest = _split_userinfo(uri.strip())
    if userinfo is None:
        return uri
    prefix = scheme + "://" if scheme is not None else ""
    if scheme is not None and scheme.lower() not in _KNOWN_SCHEMES:
        # "bob://S3cret@host" may be user bob with password //S3cret: hide it all
        return f"***@{rest}"
    if ":" not in userinfo:
        return uri
    user = userinfo.split(":", 1)[0]
    return f"{prefix}{user}:***@{rest}"


_KNOWN_SCHEMES = ("mqtt", "mqtts", "ws", "wss", "tcp", "ssl", "tls", "http", "https")


def default_broker() -> str:
    """``$MQBTT_BROKER`` if set, else :data:`DEFAULT_BROKER`.

    :raises ValueError: naming ``$MQBTT_BROKER`` if its value is not a valid broker URI"""
    env = os.environ.get("MQBTT_BROKER")
    if env:
        try:
            BrokerURI.parse(env)
        except ValueError as err:
            raise ValueError(f"$MQBTT_BROKER: {err}") from None
    return env or DEFAULT_BROKER


def _host_tag() -> str:
    import socket
    return f"{socket.gethostname()}-{os.getuid() if hasattr(os, 'getuid') else 0}"


###############################################################################
# Pair classes ################################################################
###############################################################################

#: Sentinel pushed into every receive queue when the client gives up for good
#: (credentials refused on a reconnect): blocked receivers wake up and raise.
_FATAL = object()


def _paho_client(broker: "BrokerURI", client_id: str, clean_session: bool, **kwargs):
    """A paho-mqtt 2 client (callback API 2, MQTT 3.1.1) for *broker*: transport,
    TLS and credentials from the URI, reconnect back-off 1 s to 30 s, TCP_NODELAY,
    exceptions in callbacks logged instead of killing the network thread.
    *kwargs* go to :class:`paho.mqtt.client.Client` (e.g. ``manual_ack``)."""
    mqtt = _require("paho.mqtt.client")
    b = broker
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    clean_session=clean_session, transport=b.transport,
                    protocol=mqtt.MQTTv311, **kwargs)
    c.suppress_exceptions = True
    if log.isEnabledFor(logging.DEBUG):
        c.enable_logger(logging.getLogger("mqbtt.paho"))
    if b.transport == "websockets":
        c.ws_set_options(path=b.path)
    if b.tls:
        c.tls_set_context(_tls_context(b))
    if b.username is not None:
        c.username_pw_set(b.username, b.password)
    c.reconnect_delay_set(1, 30)
    c.connect_timeout = 5.0
    c.max_queued_messages_set(0)
    c.on_socket_open = _tcp_nodelay
    _install_quickack(c)
    return c


def _tls_context(b: "BrokerURI"):
    """The TLS context of *b*: its CA file (else the system CAs), optional
    verification, and its client certificate (``certfile``/``keyfile``, for
    brokers with ``require_certificate true``).

    :raises MQbtTConnectionError: in one line, if a file cannot be used
      (missing, unreadable, not PEM, key not matching the certificate, or an
      encrypted key: mqbtt never prompts for a passphrase)."""
    import ssl

    class _Encrypted(Exception):
        pass

    def no_passphrase():
        raise _Encrypted()

    import stat
    for what, path in (("CA file", b.cafile), ("client certificate", b.certfile),
                       ("client key", b.keyfile)):
        try:
            mode = os.stat(path).st_mode if path else None
        except OSError:
            continue  # missing or unreadable: reported by the load below
        if mode is not None and not stat.S_ISREG(mode):
            # OpenSSL would block for good on a FIFO, or read a device without end
            raise MQbtTConnectionError(f"cannot use the {what} {safe_text(path)} of {b}: "
                                       "not a regular file")
    try:
        ctx = ssl.create_default_context(cafile=b.cafile)
    except (OSError, ssl.SSLError) as err:
        raise MQbtTConnectionError(f"cannot use the CA file {b.cafile} of {b}: "
                                   f"{err.strerror or err}") from None
    if b.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if b.certfile:
        files = b.certfile + (f" and key {b.keyfile}" if b.keyfile else "")
        try:
            ctx.load_cert_chain(b.certfile, b.keyfile, password=no_passphrase)
        except _Encrypted:
            raise MQbtTConnectionError(f"cannot use the client certificate {files}: the key is "
                                       "encrypted (decrypt it: openssl pkey -in KEY -out NEW)") from None
        except ssl.SSLError as err:
            raise MQbtTConnectionError(f"cannot use the client certificate {files}: not a PEM "
                                       f"certificate with its matching key ({err.reason or err})") from None
        except OSError as err:
            raise MQbtTConnectionError(f"cannot use the client certificate {files}: "
                                       f"{err.strerror or err}") from None
    return ctx


def _tcp_nodelay(client, userdata, sock, on=True):
    """paho ``on_socket_open`` callback: turn Nagle's algorithm off (Nagle +
    delayed ACKs stall QoS>=1 exchanges by ~40 ms); with *on* False, turn it
    back on."""
    import socket
    raw = getattr(sock, "_socket", sock)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if on else 0)
    except (OSError, AttributeError):
        pass


#: CONNACK reason codes that end a client for good once it had connected:
#: bad credentials and "not authorized" (MQTT 3.1.1 codes 4 and 5, MQTT 5
#: codes 134, 135 and 140 "bad authentication method").  Any other refusal
#: ("server unavailable", "server busy", "quota exceeded"...) is transient:
#: retried with the usual back-off.
_FATAL_CONNACK = frozenset((4, 5, 134, 135, 140))


def _refusal_is_fatal(reason_code) -> bool:
    return getattr(reason_code, "value", reason_code) in _FATAL_CONNACK


###############################################################################
# Quick ACKs: no delayed-ACK stalls on brokers without set_tcp_nodelay ########
###############################################################################

# A broker that keeps Nagle's algorithm on (Mosquitto's default: no
# ``set_tcp_nodelay``) holds a small packet back while its previous one is
# unacknowledged, and the client's kernel delays its ACK by up to 40 ms when
# it has nothing to send back: after a PUBACK/PUBCOMP/SUBACK (or a message
# acknowledged later, as the recorder does), the broker's next packet -- the
# reply the optimizer waits for -- waits for that ACK.  Linux's TCP_QUICKACK
# sends the pending ACK at once; the kernel clears it again (it goes back to
# delayed ACKs as soon as the connection looks interactive), so it is set
# anew after every packet that gets no answer from us, from paho's callbacks
# (which run in the network thread right after the packet was read):
# on_publish (PUBACK, PUBCOMP), on_subscribe (SUBACK), and on_message for
# QoS 0 messages.  A packet we answer (PUBLISH at QoS >= 1, PUBREC, PUBREL)
# needs nothing: the answer carries the ACK; the same holds whenever paho has
# data waiting to be written.  The recorder, which acknowledges messages only
# once they are committed, calls it once per batch, right before the commit
# (per message it would cost a system call each during a flood).  Where the
# platform has no TCP_QUICKACK (macOS, Windows, the BSDs) this does nothing.

_QUICKACK = []   # [option number or None], resolved on first use


def _quickack_option():
    if not _QUICKACK:
        import socket
        _QUICKACK.append(getattr(socket, "TCP_QUICKACK", None))
    return _QUICKACK[0]


def _quickack(client, *_):
    """Make the kernel acknowledge at once what *client*'s socket has
    received (TCP_QUICKACK); a no-op where the option does not exist, while
    paho has data to send (it carries the ACK), or without a socket.  Its
    signature fits paho's callbacks (``on_publish``)."""
    opt = _QUICKACK[0] if _QUICKACK else _quickack_option()
    if opt is None or client.want_write():
        return
    sock = client.socket()
    try:   # TCP or TLS socket, or paho's websocket wrapper around one
        getattr(sock, "_socket", sock).setsockopt(6, opt, 1)   # 6: IPPROTO_TCP
    except (OSError, AttributeError, TypeError):
        pass


def _install_quickack(client):
    """Acknowledge PUBACK and PUBCOMP packets at once (paho's ``on_publish``)."""
    if _quickack_option() is not None:
        client.on_publish = _quickack


def _quickack_after_message(on_message):
    """*on_message* preceded by :func:`_quickack` for the messages paho does
    not answer (QoS 0; with ``manual_ack``, the caller acknowledges)."""
    if on_message is None or _quickack_option() is None:
        return on_message

    def on_message_quickack(client, userdata, msg):
        if not msg.qos:
            _quickack(client)
        on_message(client, userdata, msg)
    return on_message_quickack


class _Connection:
    """One MQTT connection: a paho client connected once synchronously (so
    that a failure is reported with its cause), then kept connected by paho's
    loop thread, re-subscribing to *subscriptions* on every CONNACK.  Used by
    the pair classes, the recorder, dump and replay.

    :param notify: called with a one-line text on disconnections and
      reconnections (default: ``log.info``).
    :param on_fatal: called with the error when, after :meth:`start`
      returned, the broker refuses the credentials (then no more retries) or
      a subscription.
    :param on_drop: called with the seconds the lost connection lasted.
    :param retry_refusals: after :meth:`start` returned, keep retrying (with
      the usual back-off, one *notify* line per outage) when the broker refuses
      the credentials, instead of giving up: for monitors (``FleetStats``),
      which must come back once the password file or ACL is fixed.
    :param kwargs: more :class:`paho.mqtt.client.Client` arguments (``manual_ack``).
    """

    def __init__(self, broker: BrokerURI, client_id: str, clean_session: bool,
                 subscriptions: list, on_message, keepalive=60, notify=None, *,
                 on_fatal=None, on_drop=None, retry_refusals=False, **kwargs):
        self.broker = broker
        self.notify = notify or log.info
        self.on_fatal = on_fatal
        self.on_drop = on_drop
        self.retry_refusals = retry_refusals
        self.refused = False      # a refusal of the credentials was reported (retry_refusals)
        self.stopping = False
        self.started = False
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.keepalive = keepalive
        self.cond = threading.Condition()
        self.generation = 0       # number of CONNACKs so far
        self.connected = False
        self.connected_at = 0.0
        self.subscribed = False
        self.error = None
        self.aborted = False
        self.client = c = _paho_client(broker, client_id, clean_session, **kwargs)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_message = _quickack_after_message(on_message)

    def start(self, timeout=10.0):
        """Connect and subscribe, or raise :exc:`MQbtTConnectionError` within *timeout* s."""
        c = self.client
        try:
            c.connect(self.broker.host, self.broker.port, self.keepalive)
        except Exception as err:  # OSError, ssl.SSLError, websocket errors, ValueError
            self.stop()
            raise MQbtTConnectionError(f"cannot connect to {self.broker}: {_describe(err)}") from None
        c.loop_start()
        deadline = time.monotonic() + timeout
        try:
            with self.cond:
                while not (self.subscribed or self.error or self.aborted):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
                err = self.error
                ok = self.subscribed and err is None and not self.aborted
                self.started = ok
                if self.aborted and err is None:
                    err = MQbtTConnectionError(f"connection to {self.broker} abandoned: stopped "
                                               "while connecting")
        except BaseException:   # Ctrl-C while connecting: leave no client running
            self.stop()
            raise
        if not ok:
            self.stop()
            raise err or MQbtTConnectionError(
                f"cannot connect to {self.broker}: no answer within {timeout:g} s")

    def _fail(self, err):
        with self.cond:
            fatal = self.started and self.error is None
            if self.error is None:
                self.error = err
            self.cond.notify_all()
        if fatal:   # before start() returned, start() raises it instead
            if self.on_fatal is not None:
                self.on_fatal(err)
            else:
                log.error("%s", err)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            if self.started and not _refusal_is_fatal(reason_code):
                # "server unavailable", v5 "server busy", "quota exceeded"...: paho
                # drops this connection and retries with the usual back-off
                self.notify(f"broker {self.broker} refused the connection ({reason_code}); "
                            "retrying")
                return
            if self.started and self.retry_refusals:
                if not self.refused:      # one line per outage, not one per attempt
                    self.refused = True
                    self.notify(f"broker {self.broker} refused the connection of client id "
                                f"{self.client_id!r}: {reason_code}; retrying (at most every 30 s)")
                return
            client.disconnect()
            self._fail(MQbtTConnectionError(
                f"broker {self.broker} refused the connection of client id "
                f"{self.client_id!r}: {reason_code} (not retrying)"))
            return
        with self.cond:
            self.generation += 1
            self.connected = True
            self.connected_at = time.monotonic()
            self.refused = False
            self.cond.notify_all()
        if self.generation > 1:
            self.notify(f"reconnected to {self.broker} (session present: {flags.session_present})")
        if self.subscriptions:
            client.subscribe(self.subscriptions)
        else:
            self._on_subscribe(client, userdata, 0, [], None)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        _quickack(client)
        bad = [(t, rc) for (t, _), rc in zip(self.subscriptions, reason_codes) if rc.is_failure]
        if bad:
            self._fail(MQbtTSubscribeError(
                f"broker {self.broker} refused subscription(s) "
                + ", ".join(f"{t} ({rc})" for t, rc in bad)
                + " — do these credentials have access to this pair?"))
        with self.cond:
            self.subscribed = True
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            was = self.connected
            self.connected = False
            lasted = time.monotonic() - self.connected_at
        if was and not self.stopping:
            self.notify(f"disconnected from {self.broker} ({reason_code}); reconnecting")
            if self.on_drop is not None:
                self.on_drop(lasted)

    def abort(self):
        """End a :meth:`start` in progress (safe from a signal handler)."""
        self.aborted = True
        with self.cond:
            self.cond.notify_all()

    def stop(self):
        self.stopping = True
        try:
            self.client.disconnect()
        except Exception:  # pragma: no cover - paho raises nothing here normally
            pass
        _loop_stop(self.client)


def _loop_stop(client, timeout: float = 2.0):
    """paho's ``loop_stop()`` without its unbounded join: a network thread
    stuck in a connection attempt (up to ``connect_timeout``) is left to end
    by itself (it is a daemon thread)."""
    thread = getattr(client, "_thread", None)
    if thread is None or thread is threading.current_thread():
        client.loop_stop()
        return
    client._thread_terminate = True
    thread.join(timeout)
    if not thread.is_alive():
        client._thread = None


class MQbtTBase:
    """Base class for all MQbtT classes.

    This class is not meant to be used directly, but only as a base class for
    other classes.  It connects to the MQTT broker, subscribes to
    ``mqbtt/<pair_id>/<subtopic>`` for every ``(subtopic, qos)`` in
    *receive_subtopics* (on every connect, so subscriptions survive broker
    restarts), and pushes every message received on a subtopic to that
    subtopic's :class:`queue.Queue`.  The paho-mqtt network thread only
    enqueues: decoding happens in the receiving thread, so a malformed payload
    surfaces as :exc:`MQbtTDecodeError` from the ``receive_T()`` call and can
    never kill the network thread.

    The constructor returns once the broker has accepted the connection and
    every subscription (or raises :exc:`MQbtTConnectionError` within
    *connect_timeout* seconds).  After that, a dropped connection is
    re-established automatically (back-off 1 s to 30 s).

    :param broker_uri: the URI of the MQTT broker (example: mqtt://localhost);
      see :class:`BrokerURI` for the accepted forms.
    :param pair_id: the pair id of the client (no ``/``, ``+``, ``#``).
    :param receive_subtopics: a list of (subtopic, qos) to receive from
      (i.e.: esp, srv or log).
    :param keepalive: maximum number of seconds allowed between communications
      with the broker, passed to :meth:`paho.mqtt.client.Client.connect`.
    :param clean_session: if True, the broker discards this client's
      subscription and any queued QoS 1/2 backlog the moment it disconnects;
      if False (the default here), the broker keeps a persistent session
      across reconnects — and across restarts of the program, since the client
      id is derived from the pair and role (see :attr:`client_id`).
    :param client_id: override the derived client id.
    :param connect_timeout: seconds to wait for the first connection.
    :param send_timeout: default seconds a blocking send waits for the broker.
    :param max_queue: bound each receive queue to this many messages
      (0, the default, means unbounded); messages arriving at a full queue are
      dropped and counted in :attr:`dropped`.

    Use it as a context manager, or call :meth:`stop` when done.
    """

    #: role tag used in the derived client id (``mqbtt-<role>-<pair_id>``)
    _role = "base"
    #: whether several instances of this role for one pair may run at once
    #: (then the client id gets a per-host or random suffix)
    _shared_role = False

    def __init__(self, broker_uri: str, pair_id: str, receive_subtopics: list,
                 keepalive: int = 60, clean_session: bool = False, *,
                 client_id: str | None = None, connect_timeout: float = 10.0,
                 send_timeout: float = 30.0, max_queue: int = 0):
        self.pair_id = check_pair_id(pair_id)
        self.broker = BrokerURI.parse(broker_uri if broker_uri is not None else default_broker())
        subs = []
        for sub, qos in receive_subtopics:
            if sub not in SUBTOPICS:
                raise ValueError(f"unknown subtopic {sub!r} (expected one of esp, log, shr, srv)")
            if qos not in (0, 1, 2):
                raise ValueError(f"invalid QoS {qos!r} for subtopic {sub!r}")
            subs.append((sub, qos))
        self.receive_subtopics = subs
        self.keepalive = int(keepalive)
        self.clean_session = bool(clean_session)
        self.send_timeout = send_timeout
        self.client_id = client_id or self._derive_client_id()
        #: per-subtopic count of messages dropped because the queue was full
        self.dropped = {sub: 0 for sub, _ in subs}
        # unbounded: the C SimpleQueue (put/get ~10x cheaper than Queue's)
        self._queues = {sub: queue.Queue(max_queue) if max_queue > 0 else queue.SimpleQueue()
                        for sub, _ in subs}
        # keyed by the topic's bytes: paho's MQTTMessage.topic decodes them each time
        self._topics = {topic(self.pair_id, sub).encode(): sub for sub, _ in subs}
        self._stopped = False
        self._stop_event = threading.Event()   # set by stop(): blocked senders give up
        self._waiting = set()     # MQTTMessageInfo a blocking send waits for
        self._pending = deque()   # MQTTMessageInfo of non-blocking QoS>0 sends
        self._short_sessions = deque(maxlen=4)
        self._takeover_warned = 0.0
        self._conn = _Connection(
            self.broker, self.client_id, self.clean_session,
            [(topic(self.pair_id, s), q) for s, q in subs], self._on_message, self.keepalive,
            on_fatal=self._on_fatal, on_drop=self._on_drop,
            **self._client_kwargs())
        self._client = self._conn.client
        self._client.on_socket_open = self._on_socket_open
        self._conn.start(connect_timeout)

    # -- client id ------------------------------------------------------------
    def _derive_client_id(self) -> str:
        cid = f"mqbtt-{self._role}-{self.pair_id}"
        if self._shared_role:
            if self.clean_session:
                cid += "-" + os.urandom(4).hex()
            else:
                cid += "-" + _host_tag()
        return cid

    # -- paho plumbing ----------------------------------------------------------
    def _client_kwargs(self) -> dict:
        return {}

    @property
    def connections(self) -> int:
        """The number of (re)connections so far."""
        return self._conn.generation

    @property
    def _error(self):
        """The fatal error (credentials or subscription refused, client stopped), or None."""
        return self._conn.error

    # TCP_NODELAY policy.  Request/reply exchanges need Nagle's algorithm off
    # (else a QoS>=1 handshake stalls ~40 ms on delayed ACKs), but while a flood
    # of QoS 1 shares or log lines arrives, Nagle lets the kernel coalesce our
    # PUBACKs instead of sending one segment each, which is ~30% faster.  So
    # Nagle is switched on when a share/log arrives and off again (which also
    # flushes anything pending) right before this client publishes.
    _nodelay = True
    _BULK = frozenset(("shr", "log"))

    def _on_socket_open(self, client, userdata, sock):
        _tcp_nodelay(client, userdata, sock)
        self._nodelay = True

    def _set_nodelay(self, on):
        self._nodelay = on
        sock = self._client.socket()
        if sock is not None:
            _tcp_nodelay(None, None, sock, on)

    def _on_fatal(self, err):
        """Credentials or a subscription refused after connecting: say so and
        make every receive raise it."""
        log.error("%s", err)
        self._wake_receivers()

    def _on_drop(self, lasted):
        """A lost connection: warn when the client id is being fought over."""
        if lasted >= 10 or self._stopped:
            return
        now = time.monotonic()
        self._short_sessions.append(now)
        if (len(self._short_sessions) >= 3 and now - self._short_sessions[-3] < 60
                and now - self._takeover_warned > 60):
            self._takeover_warned = now
            log.warning(
                "client id %r keeps being disconnected right after connecting: another "
                "%s of pair %r is probably connected with the same client id, and the two "
                "keep kicking each other off the broker. Stop one of them.",
                self.client_id, self._role_name(), self.pair_id)

    def _role_name(self):
        return {"opt": "optimizer", "esp": "miner"}.get(self._role, self._role)

    def _on_message(self, client, userdata, msg):
        sub = self._topics.get(getattr(msg, "_topic", None) or msg.topic.encode())
        if sub is None:
            return
        try:
            self._queues[sub].put_nowait(msg.payload)
        except queue.Full:
            self.dropped[sub] += 1
        if self._nodelay and sub in self._BULK:
            self._set_nodelay(False)

    def _wake_receivers(self):
        for q in self._queues.values():
            _put_always(q, _FATAL)

    # -- receiving ----------------------------------------------------------------
    def _receive(self, subtopic, blocking=True, timeout=None):
        """Next raw payload of *subtopic* with the documented semantics, or None."""
        q = self._queues[subtopic]
        if timeout is not None:
            if timeout < 0:
                raise ValueError("timeout must be a non-negative number")
            item = _timed_get(q, timeout)
        elif blocking:
            item = q.get()
        else:
            try:
                item = q.get_nowait()
            except Empty:
                return None
        if item is _FATAL:
            _put_always(q, _FATAL)
            raise self._error
        return item

    def _has(self, subtopic) -> bool:
        return not self._queues[subtopic].empty()

    # -- sending --------------------------------------------------------------------
    #: at most this many non-blocking sends may await the broker's
    #: acknowledgement; more make the next send wait (paho's message ids are
    #: 16-bit, so it cannot track more than 65535)
    max_pending = 30000

    def _publish(self, subtopic, payload: bytes, blocking=True, timeout=None):
        if self._stopped:
            raise MQbtTSendError("cannot send: the client is stopped")
        if self._error is not None:
            raise MQbtTSendError(f"cannot send: {self._error}")
        qos = SUBTOPICS[subtopic]
        if timeout is None:
            timeout = self.send_timeout
        pending = self._pending
        while pending and pending[0]._published:
            pending.popleft()
        if len(pending) >= self.max_pending and not _wait_published(pending[0], timeout,
                                                                    self._stop_event):
            raise MQbtTSendTimeout(
                f"{len(pending)} messages still wait for the broker {self.broker}'s "
                f"acknowledgement after {timeout:g} s; not sending more")
        if not self._nodelay:
            self._set_nodelay(True)
        info = self._client.publish(topic(self.pair_id, subtopic), payload, qos)
        if qos == 0:
            return
        if info.rc == _MQTT_ERR_QUEUE_SIZE:
            raise MQbtTSendError("cannot send: too many messages wait for the broker's "
                                 "acknowledgement")
        if not blocking:
            pending.append(info)
            return
        waiting = self._waiting
        waiting.add(info)
        try:
            ok = _wait_published(info, timeout, self._stop_event)
        finally:
            waiting.discard(info)
        if not ok and self._stopped:
            raise MQbtTSendError(
                f"the client was stopped before the broker {self.broker} acknowledged the "
                f"message on {topic(self.pair_id, subtopic)}: it may or may not have been "
                "delivered")
        if not ok:
            pending.append(info)
            raise MQbtTSendTimeout(
                f"the broker {self.broker} did not acknowledge the message on "
                f"{topic(self.pair_id, subtopic)} within {timeout:g} s; it stays queued "
                "and will be delivered once the connection is back")

    # -- life cycle -------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether the client is connected to the broker right now."""
        return self._conn.connected

    def wait_sent(self, timeout: float | None = None) -> bool:
        """Wait until every message sent with ``blocking=False`` has been
        acknowledged by the broker; return False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            info = self._pending[0]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _wait_published(info, left, self._stop_event):
                return False
            self._pending.popleft()
        return True

    def stop(self, timeout: float = 5.0):
        """Stop the MQTT client and disconnect from the broker.

        Messages sent with ``blocking=False`` are given up to *timeout*
        seconds to reach the broker first.  Calling it twice is harmless."""
        if self._stopped:
            return
        if self.connected and self._error is None:
            self.wait_sent(timeout)
        self._shutdown()

    def _shutdown(self):
        self._stopped = True
        self._stop_event.set()
        for info in list(self._waiting):   # a blocking send in another thread raises
            with info._condition:
                info._condition.notify_all()
        with self._conn.cond:
            if self._conn.error is None:
                self._conn.error = MQbtTConnectionError("the client is stopped")
        self._conn.stop()
        self._wake_receivers()   # a receive blocked in another thread raises

    close = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        state = "stopped" if self._stopped else ("connected" if self.connected else "disconnected")
        return (f"<{type(self).__name__} pair_id={self.pair_id!r} broker='{self.broker}' "
                f"client_id={self.client_id!r} {state}>")


#: paho's MQTTErrorCode.MQTT_ERR_QUEUE_SIZE (publish() could not queue the message)
_MQTT_ERR_QUEUE_SIZE = 15


#: whether ``SimpleQueue.get(timeout=...)`` survives signals: on CPython <= 3.12,
#: interrupted by a signal whose handler returns, it waits again with the time
#: left, and a negative remainder means "wait for ever"
_SIGNAL_SAFE_GET = sys.version_info >= (3, 13) or sys.platform == "win32"

#: the asynchronous signals held back while a thread waits on a SimpleQueue
#: (see :func:`_timed_get`); synchronous ones (SIGSEGV...) are never blocked
_ASYNC_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM",
                  "SIGCHLD", "SIGWINCH", "SIGPIPE", "SIGIO", "SIGURG", "SIGPROF", "SIGVTALRM")


def _timed_get(q, timeout):
    """``q.get(True, timeout)`` that can neither miss its deadline nor hang
    because of a signal, on every supported Python.

    On CPython <= 3.12 a :class:`queue.SimpleQueue` wait interrupted by a
    signal whose Python handler returns may wait for ever.  Only the main
    thread runs Python handlers, and only a handler other than the defaults
    (SIGINT's raises KeyboardInterrupt) returns: there, and only there, the
    wait is cut into slices of at most 0.1 s during which the thread holds
    asynchronous signals back (they are delivered as soon as the slice ends):
    a signal costs at most 0.1 s of latency and an arriving message none.
    Everywhere else it is a plain wait (the slices cost ~25% of a share flood)."""
    if (_SIGNAL_SAFE_GET or not isinstance(q, queue.SimpleQueue)
            or threading.current_thread() is not threading.main_thread()
            or not _returning_handler()):
        return q.get(True, timeout)
    try:
        return q.get_nowait()
    except Empty:
        if timeout <= 0:
            raise
    import signal
    sigs = _timed_get.sigs
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Empty
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            return q.get(True, min(left, 0.1))
        except Empty:
            pass
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _returning_handler() -> bool:
    """Whether a Python handler that returns is installed for one of the
    asynchronous signals (see :func:`_timed_get`)."""
    import _signal   # signal.getsignal() wraps the answer in an enum: 20x slower
    sigs = _timed_get.sigs
    if sigs is None:
        sigs = _timed_get.sigs = {getattr(_signal, n) for n in _ASYNC_SIGNALS if hasattr(_signal, n)}
    default, getsignal = _signal.default_int_handler, _signal.getsignal
    for s in sigs:
        h = getsignal(s)
        if h is not default and callable(h):
            return True
    return False


_timed_get.sigs = None


def _put_always(q, item):
    """Put *item* in *q*, even beyond a full bounded queue's ``maxsize`` (the
    wake-up of the receivers must never be dropped: a receiver behind a full
    queue would block for ever once it has drained it)."""
    if isinstance(q, queue.Queue):
        with q.mutex:
            q.queue.append(item)
            q.unfinished_tasks += 1
            q.not_empty.notify_all()
    else:
        q.put_nowait(item)


def _wait_published(info, timeout, stop=None) -> bool:
    """Wait for the broker's acknowledgement of *info*.

    Unlike ``MQTTMessageInfo.wait_for_publish`` this does not raise when the
    message was queued while disconnected (paho sends it after reconnecting),
    and it reports a timeout instead of returning silently.  Returns False on
    timeout, or at once when the :class:`threading.Event` *stop* is set."""
    cond = info._condition
    deadline = None if timeout is None else time.monotonic() + timeout
    with cond:
        while not info._published:
            if stop is not None and stop.is_set():
                return False
            if deadline is None:
                cond.wait(1.0)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                cond.wait(min(left, 1.0))
    return True


def _describe(err: BaseException) -> str:
    """A one-line description of a connection error."""
    import socket
    import ssl
    if isinstance(err, socket.gaierror):
        return f"unknown host ({err.strerror})"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {err.verify_message or err.reason}"
    if isinstance(err, ssl.SSLError):
        return f"TLS error: {err.reason or err}"
    if isinstance(err, socket.timeout):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


class MQbtTOptimizer(MQbtTBase):
    """Class for the optimizer to send and receive messages to the miner.

    Sends :class:`Request` on ``srv``; receives :class:`Reply` on ``esp`` and
    :class:`Share` on ``shr``.  Its client id is ``mqbtt-opt-<pair_id>``, so a
    restarted optimizer (``clean_session=False``) receives the replies the
    broker queued while it was away (except replies to requests of an earlier
    process, see :attr:`stale_replies`).

    Every request goes out with a correlation id (``request_id``); see
    :meth:`request` for the one call that returns exactly the reply to a
    request.
    """
    _role = "opt"

    def __init__(self, broker_uri: str, pair_id: str, keepalive: int = 60,
                 clean_session: bool = False, **kwargs):
        _init_request_ids(self)
        super().__init__(broker_uri, pair_id, [("esp", SUBTOPICS["esp"]), ("shr", SUBTOPICS["shr"])],
                         keepalive, clean_session, **kwargs)

    def send_request(self, request: Request, blocking: bool = True, timeout: float | None = None):
        """Send a request to the miner.

        :param request: the :class:`Request` to send.
        :param blocking: whether to block until the broker acknowledged it.
        :param timeout: seconds to wait when blocking (default :attr:`send_timeout`).
        :returns: the :class:`Request` actually sent: *request* itself, or,
          when its ``request_id`` is 0, a copy with a fresh non-zero id.
        :raises MQbtTSendTimeout: if the broker did not acknowledge in time.
        :raises MQbtTSendError: if the client is stopped, also by :meth:`stop` in another
          thread while this send waits (the message may or may not have been delivered)."""
        request, payload = _with_request_id(self, request)
        self._publish("srv", payload, blocking, timeout)
        return request

    def has_reply(self) -> bool:
        """Check if there is a reply from the miner.

        :returns: True if there is a reply, False otherwise."""
        return self._has("esp")

    def receive_reply(self, blocking: bool = True, timeout: float | None = None) -> Reply | None:
        """Receive a reply from the miner.

        :param blocking: Whether to block until the queue becomes not empty.
        :param timeout: The maximum time to wait for the queue to become not empty.
        The next reply, in arrival order; its ``request_id`` tells which
        request it answers (0: the miner did not say).  A reply with a
        non-zero id this handle never sent (queued for an earlier process) is
        discarded, counted in :attr:`stale_replies`, and the next one is
        returned instead, unless :attr:`discard_stale_replies` is False (set
        it so to read replies republished by ``mqbtt replay``).

        :returns: the :class:`Reply`, or None (non-blocking, nothing there).
        :raises Empty: if *timeout* is given and no reply arrived in time.
        :raises MQbtTDecodeError: if the received payload is not a Reply."""
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            b = self._receive("esp", blocking, timeout)
            if b is None:
                return None
            reply = Reply.from_bytes(b)
            rid = reply.request_id
            if (not rid or self._first_id <= rid < self._next_id or rid in self._given_ids
                    or not self.discard_stale_replies):
                return reply
            _stale_reply(self, reply, None)
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())

    def request(self, request: Request, timeout: float | None = None) -> Reply:
        """Send *request* and return the reply to it: the next reply whose
        ``request_id`` is the one the request went out with.

        Replies to other ids are discarded, counted in :attr:`stale_replies`
        and logged (one warning each): late replies to requests that timed
        out, and replies queued for an earlier process.  A reply with
        ``request_id`` 0 (a miner that does not copy the id) is returned as
        the reply, as :meth:`receive_reply` would.

        Several threads may call it at once on one handle: a reply that
        answers another thread's pending request is handed over to that
        thread, not discarded.  (Do not mix it with :meth:`receive_reply` in
        other threads: that one takes the next reply, whoever it answers.)

        :param request: the :class:`Request`; if its ``request_id`` is 0 a
          fresh one is used (see :meth:`send_request`).
        :param timeout: seconds to wait for the reply (and, first, for the
          broker to acknowledge the request); None waits as long as needed.
        :returns: the :class:`Reply`.
        :raises Empty: if no reply came within *timeout* (also when the broker
          did not even acknowledge the request by then: it stays queued in the
          client).  The request stays pending: if its reply comes later, a
          later call discards it.
        :raises MQbtTSendTimeout: without *timeout*, if the broker did not
          acknowledge the request within :attr:`send_timeout`.
        :raises MQbtTDecodeError: if a payload on ``esp`` is not a Reply (it is
          consumed; the request stays pending, as after a timeout).
        :raises MQbtTSendError: if the client is stopped before the broker
          acknowledged the request (it may or may not have been delivered).
        :raises MQbtTConnectionError: if the client is stopped while the
          request waits for its reply."""
        return _request(self, request, timeout)

    def discard_replies(self) -> int:
        """Drop every reply received and not yet read (decoded or not) and
        return how many were dropped.  Replies the broker delivers afterwards
        are not affected.  They are not counted in :attr:`stale_replies`."""
        return _discard_replies(self)

    def has_share(self) -> bool:
        """Check if there is a share from the miner.

        :returns: True if there is a share, False otherwise."""
        return self._has("shr")

    def receive_share(self, blocking: bool = True, timeout: float | None = None) -> Share | None:
        """Receive a share from the miner.

        :param blocking: Whether to block until a share is received.
        :param timeout: The maximum time to wait for a share.
        :raises Empty: if *timeout* is given and no share arrived in time.
        :raises MQbtTDecodeError: if the received payload is not a Share."""
        b = self._receive("shr", blocking, timeout)
        return None if b is None else Share.from_bytes(b)


class MQbtTMiner(MQbtTBase):
    """Class for a (mock) miner to send and receive messages to the optimizer.

    Receives :class:`Request` on ``srv``; sends :class:`Reply` on ``esp``,
    :class:`Share` on ``shr`` and log lines on ``log``.  Client id
    ``mqbtt-esp-<pair_id>``.  :meth:`send_reply` copies the ``request_id`` of
    the request last returned by :meth:`receive_request` into the reply.
    """
    _role = "esp"
    #: ``request_id`` of the request most recently returned by receive_request
    _last_request_id = 0

    def __init__(self, broker_uri: str, pair_id: str, keepalive: int = 60,
                 clean_session: bool = False, **kwargs):
        super().__init__(broker_uri, pair_id, [("srv", SUBTOPICS["srv"])],
                         keepalive, clean_session, **kwargs)

    def has_request(self) -> bool:
        """Check if there is a request from the optimizer."""
        return self._has("srv")

    def receive_request(self, blocking: bool = True, timeout: float | None = None) -> Request | None:
        """Receive a request from the optimizer (same semantics as
        :meth:`MQbtTOptimizer.receive_reply`)."""
        b = self._receive("srv", blocking, timeout)
        if b is None:
            return None
        request = Request.from_bytes(b)
        self._last_request_id = request.request_id
        return request

    def send_reply(self, reply: Reply, blocking: bool = True, timeout: float | None = None):
        """Send a reply to the optimizer.

        When ``reply.request_id`` is 0 the reply is sent with the id of the
        request most recently returned by :meth:`receive_request`, so that the
        optimizer can tell which request it answers.

        :returns: the :class:`Reply` actually sent (with that id)."""
        if not isinstance(reply, Reply):
            raise TypeError(f"send_reply() needs a Reply, not {type(reply).__name__}")
        if not reply.request_id and self._last_request_id:
            reply = _copy_with_id(reply, self._last_request_id)
        self._publish("esp", reply.to_bytes(), blocking, timeout)
        return reply

    def send_share(self, share: Share, blocking: bool = True, timeout: float | None = None):
        """Send a share to the optimizer."""
        self._publish("shr", share.to_bytes(), blocking, timeout)

    def send_log(self, line: str, blocking: bool = True, timeout: float | None = None):
        """Send a log line (UTF-8 text)."""
        self._publish("log", line.encode("utf-8"), blocking, timeout)


class MQbtTLogReceiver(MQbtTBase):
    """Class to receive log messages from the MQTT broker.

    Unlike :class:`MQbtTBase`, *clean_session* defaults to True here: log
    messages are informational (QoS 1), so it is preferable to bound the
    broker-side backlog a disconnected or abandoned receiver could accumulate
    rather than to guarantee delivery of every log line.

    Several log receivers of one pair may run at once: with
    ``clean_session=True`` each gets a random client id; with False the id is
    ``mqbtt-log-<pair_id>-<host>-<uid>`` (pass *client_id* to run several
    persistent receivers on one host).
    """
    _role = "log"
    _shared_role = True

    def __init__(self, broker_uri: str, pair_id: str, keepalive: int = 60,
                 clean_session: bool = True, **kwargs):
        super().__init__(broker_uri, pair_id, [("log", SUBTOPICS["log"])],
                         keepalive, clean_session, **kwargs)

    def has_log(self) -> bool:
        """Check if there is a log line."""
        return self._has("log")

    def receive_log(self, blocking: bool = True, timeout: float | None = None) -> str | None:
        """Receive a log line (UTF-8 decoded, undecodable bytes replaced,
        trailing newline removed); same blocking semantics as the other
        receive methods."""
        b = self._receive("log", blocking, timeout)
        return None if b is None else _log_from_bytes(b)


###############################################################################
# Request/reply correlation ###################################################
###############################################################################

# Every Request an optimizer sends carries a request_id: a random 63-bit start
# drawn per handle, then +1 per request, so ids never repeat across processes
# and restarts (two handles collide with probability ~n/2^63).  A handle's own
# ids are then exactly [_first_id, _next_id) plus any non-zero id the caller
# set itself (_given_ids), so "did this handle send it?" costs two compares.

def _new_request_id_start() -> int:
    return (int.from_bytes(os.urandom(8), "big") >> 1) or 1


def _copy_with_id(message, rid):
    """A copy of a Request/Reply with ``request_id`` *rid* (its other fields
    were validated when it was made: this is ~10x cheaper than
    ``dataclasses.replace``, which would run ``__init__`` again)."""
    copy = _new(type(message))
    copy.__dict__.update(message.__dict__)
    copy.__dict__["request_id"] = rid
    return copy


def _init_request_ids(handle):
    #: replies discarded because they did not answer the request waited for:
    #: replies to requests this handle never sent (:meth:`receive_reply`,
    #: :meth:`request`) and late replies to earlier requests (:meth:`request`)
    handle.stale_replies = 0
    #: whether receive_reply discards replies to requests this handle never
    #: sent; False for an optimizer reading traffic republished by replay()
    handle.discard_stale_replies = True
    handle._id_lock = threading.Lock()
    handle._first_id = handle._next_id = _new_request_id_start()
    # non-zero ids set by the caller, the latest _given_ids_kept of them (a
    # dict used as an ordered set: a long run with its own ids stays bounded)
    handle._given_ids = {}
    handle._given_ids_kept = 65536
    # request() in several threads of one handle: one thread at a time takes
    # replies from the queue and hands over those that answer another
    # thread's pending request (request_id -> reply, _NO_REPLY while waiting)
    handle._reply_cond = threading.Condition()
    handle._awaited = {}
    handle._receiving = False


def _with_request_id(handle, request):
    """(*request* with its id filled in, its bytes) for ``send_request``."""
    if not isinstance(request, Request):
        raise TypeError(f"send_request() needs a Request, not {type(request).__name__}")
    rid = request.request_id
    if not rid:
        with handle._id_lock:
            rid = handle._next_id
            handle._next_id = rid + 1
        request = _copy_with_id(request, rid)
        return request, request.to_bytes()
    payload = request.to_bytes()   # validates the caller's id first
    if not handle._first_id <= rid < handle._next_id:
        with handle._id_lock:
            given = handle._given_ids
            given.pop(rid, None)
            given[rid] = None
            if len(given) > handle._given_ids_kept:
                del given[next(iter(given))]
    return request, payload


def _stale_reply(handle, reply, awaited):
    handle.stale_replies += 1
    rid = reply.request_id
    if handle._first_id <= rid < handle._next_id or rid in handle._given_ids:
        why = f"a late reply to an earlier request of this optimizer (awaited request_id {awaited})"
    else:
        why = ("it answers a request this optimizer did not send (a reply queued for an "
               "earlier run of the optimizer?)")
    log.warning("pair %r: discarded %r with request_id %d: %s; %d stale replies so far",
                handle.pair_id, reply, rid, why, handle.stale_replies)


_NO_REPLY = object()   # request() waiting for this id: no reply handed over yet


def _request(handle, request, timeout):
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be a non-negative number")
    deadline = None if timeout is None else time.monotonic() + timeout
    sent, payload = _with_request_id(handle, request)
    rid = sent.request_id
    cond, awaited = handle._reply_cond, handle._awaited
    with cond:      # before publishing: another thread may receive the reply first
        awaited[rid] = _NO_REPLY
    try:
        try:
            handle._publish("srv", payload, True, timeout)
        except MQbtTSendTimeout as err:
            if timeout is None:
                raise
            raise Empty(f"no reply within {timeout:g} s: {err}") from None
        while True:
            with cond:   # our reply handed over by another thread, or our turn to receive
                while True:
                    got = awaited.get(rid, _NO_REPLY)
                    if got is not _NO_REPLY:
                        return got
                    if not handle._receiving:
                        handle._receiving = True
                        break
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise Empty
                    cond.wait(left)
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                payload = handle._receive("esp", True, left)
            finally:
                with cond:
                    handle._receiving = False
                    cond.notify_all()
            reply = Reply.from_bytes(payload)
            other = reply.request_id
            if other == rid or not other:
                return reply
            with cond:
                if awaited.get(other) is _NO_REPLY:    # another thread's request: hand it over
                    awaited[other] = reply
                    cond.notify_all()
                    continue
            _stale_reply(handle, reply, rid)
    finally:
        with cond:
            awaited.pop(rid, None)


def _discard_replies(handle) -> int:
    q = handle._queues["esp"]
    n = 0
    while True:
        try:
            item = q.get_nowait()
        except Empty:
            return n
        if item is _FATAL:
            q.put_nowait(_FATAL)
            return n
        n += 1


class _Pairing:
    """Which request a reply answers (:func:`request_reply_pairs`, ``mqbtt
    dump``).  A reply with a non-zero id answers the request with that id; a
    reply with id 0 answers the latest request if it is still unanswered."""

    def __init__(self, max_pending: int = 10000):
        self.by_id = {}      # request_id -> (request, id), unanswered, in time order
        self.last = None     # (request, id) of the latest request while unanswered
        self.max_pending = max_pending

    def request(self, item, rid) -> list:
        """Add a request; returns the requests now known to be unanswered."""
        gone = []
        if rid:
            again = self.by_id.pop(rid, None)       # an id seen before: that one is over
            if again is not None:
                if again is self.last:
                    self.last = None
                gone.append(again[0])
            if len(self.by_id) >= self.max_pending:    # the oldest: never answered
                old = self.by_id.pop(next(iter(self.by_id)))
                if old is self.last:
                    self.last = None
                gone.append(old[0])
        if self.last is not None and not self.last[1]:
            gone.append(self.last[0])
        self.last = entry = (item, rid)
        if rid:
            self.by_id[rid] = entry
        return gone

    def reply(self, rid):
        """The request a reply with id *rid* answers (now answered), or None."""
        if rid:
            entry = self.by_id.pop(rid, None)
        else:
            entry = self.last
            if entry is not None and entry[1]:
                self.by_id.pop(entry[1], None)
        if entry is None:
            return None
        if entry is self.last:
            self.last = None
        return entry[0]

    def rest(self) -> list:
        """The requests still unanswered, in time order."""
        last = [self.last[0]] if self.last is not None and not self.last[1] else []
        return [entry[0] for entry in self.by_id.values()] + last


def _payload_request_id(subtopic: str, payload: bytes) -> int:
    """The request_id in a srv/esp payload (0 if none or undecodable)."""
    try:
        return (Request if subtopic == "srv" else Reply).from_bytes(payload).request_id
    except MQbtTDecodeError:
        return 0


def _request_id_of(message) -> int:
    """The ``request_id`` of a decoded Request/Reply (0 for anything else)."""
    return getattr(message, "request_id", 0) or 0


###############################################################################
# Echo miner ##################################################################
###############################################################################

def echo_reply(request: Request) -> Reply:
    """The reply of the echo fake miner to *request* (see ``mqbtt echo``)."""
    return Reply(
        num_shares=(request.timestamp_min * 1000000 + request.timestamp_max * 10000
                    + request.nonce_start * 100 + request.nonce_size),
        new_block=request.timestamp_min % 2 == 0,
        kind=Kind(request.timestamp_min % 4),
    )


def run_echo(broker_uri: str, pair_id: str, out=None, count: int | None = None, **kwargs):
    """Run the echo fake miner: answer every request with :func:`echo_reply`,
    printing ``Received request: …`` / ``Sent reply: …`` lines to *out*.

    Stops after *count* requests (forever if None).  A payload that does not
    decode is reported on stderr and skipped."""
    out = out or sys.stdout
    n = 0
    with MQbtTMiner(broker_uri, pair_id, **kwargs) as miner:
        print(f"mqbtt echo: answering the requests of pair {pair_id!r} on {miner.broker} "
              "(Ctrl-C to stop)", file=sys.stderr, flush=True)
        while count is None or n < count:
            try:
                request = miner.receive_request()
            except MQbtTDecodeError as err:
                print(f"mqbtt echo: skipped a malformed request: {err}", file=sys.stderr, flush=True)
                continue
            print(f"Received request: {request!r}", file=out, flush=True)
            reply = echo_reply(request)
            miner.send_reply(reply)
            print(f"Sent reply: {reply!r}", file=out, flush=True)
            n += 1


###############################################################################
# Recording: SQLite database, recorder, dump and replay #######################
###############################################################################

import datetime  # noqa: E402 - stdlib, already loaded by most programs; used in annotations

#: the ``messages`` table, exactly as documented
_SCHEMA = """CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp REAL NOT NULL,
    pair_id TEXT NOT NULL,
    subtopic TEXT NOT NULL CHECK (subtopic IN ('esp', 'log', 'shr', 'srv')),
    message BLOB NOT NULL
)"""

#: the indices the queries of :class:`MQbtTDataBase` need
_INDICES = (
    "CREATE INDEX IF NOT EXISTS messages_timestamp ON messages (timestamp)",
    "CREATE INDEX IF NOT EXISTS messages_pair_timestamp ON messages (pair_id, timestamp)",
    "CREATE INDEX IF NOT EXISTS messages_pair_subtopic_timestamp "
    "ON messages (pair_id, subtopic, timestamp)",
)


def _utc(ts: float):
    import datetime
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)


def _epoch(value, name="timestamp") -> float:
    """Seconds since the epoch of a datetime (naive = local time, as
    :meth:`datetime.datetime.timestamp` does) or of a number."""
    import datetime
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a datetime or seconds since the epoch, not {type(value).__name__}")


def _row_time(ts):
    """The UTC datetime of a stored timestamp, or None when another tool
    stored something that is not a usable time (text, NULL, 1e300, NaN)."""
    if ts.__class__ is float:
        try:
            return _utc(ts)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return None
    try:
        return _utc(float(ts))
    except (OverflowError, OSError, ValueError):
        return None


def _usable_ts(ts):
    """*ts* as seconds since the epoch if it is a usable stored time (see
    :func:`_row_time`), else None."""
    return float(ts) if _row_time(ts) is not None else None


def _row_payload(payload) -> bytes:
    """The bytes of a stored message: a BLOB as it is, TEXT as UTF-8, a
    number or NULL (written by another tool) as its text / empty."""
    if payload.__class__ is bytes:
        return payload
    if payload is None:
        return b""
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogatepass")
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    return str(payload).encode()


def _try_decode(subtopic, payload):
    try:
        return decode(subtopic, payload)
    except MQbtTMissingDependency:  # not a bad row: protobuf is not installed
        raise
    except Exception:  # a bad row must never stop an iteration
        return None


@dataclass(frozen=True, kw_only=True)
class MQbtTRecord:
    """A (deserialized) record from a :class:`MQbtTDataBase`.

    :param id: The ID of the message in the database (None for a record not
      stored yet; :meth:`MQbtTDataBase.insert` ignores it).
    :param pair_id: The pair_id of the message.
    :param subtopic: The subtopic of the message (``esp``, ``log``, ``shr``, ``srv``).
    :param timestamp: The timestamp of the message recording: a timezone-aware
      UTC datetime (a naive datetime given here is taken as local time, a
      number as seconds since the epoch).  None for a row whose timestamp is
      not a usable time (text, NULL or out of range, written by another tool).
    :param payload: The raw message payload (bytes, exactly as received).

    ``message`` is not a parameter: it is computed from *payload* — the
    deserialized message payload (:class:`Request` for ``srv``, :class:`Reply`
    for ``esp``, :class:`Share` for ``shr``, ``str`` for ``log``), or None when
    the bytes do not decode.  Building a record never raises because of a bad
    payload.
    """
    id: int | None = None
    pair_id: str
    subtopic: str
    timestamp: datetime.datetime
    payload: bytes
    message: object = dataclasses.field(init=False, default=None, compare=False)

    def __post_init__(self):
        import datetime
        ts = self.timestamp
        if not isinstance(ts, datetime.datetime) or ts.tzinfo is None \
                or ts.utcoffset() != datetime.timedelta(0):
            object.__setattr__(self, "timestamp", _utc(_epoch(ts)))
        if isinstance(self.payload, (bytearray, memoryview)):
            object.__setattr__(self, "payload", bytes(self.payload))
        object.__setattr__(self, "message", _try_decode(self.subtopic, self.payload))

    @classmethod
    def _from_row(cls, rid, ts, pair_id, subtopic, payload):
        """A record of a database row; ``timestamp`` and ``message`` are
        computed the first time they are read (see :meth:`__getattr__`)."""
        obj = _new(cls)
        obj.__dict__.update(id=rid, pair_id=pair_id, subtopic=subtopic, payload=payload, _ts=ts)
        return obj

    def __getattr__(self, name):
        # only called for attributes missing from __dict__: the lazy fields of
        # a record made by _from_row
        d = self.__dict__
        if "_ts" in d:
            if name == "timestamp":
                value = d["timestamp"] = _row_time(d["_ts"])
                return value
            if name == "message":
                value = d["message"] = _try_decode(d["subtopic"], d["payload"])
                return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state):
        self.__dict__.update(state)


# the generated __init__ keeps the defaults; class attributes holding them would
# hide the lazy fields of records read from a database from __getattr__
del MQbtTRecord.id, MQbtTRecord.message


def _check_db_path(path) -> str:
    """*path* as a string if it names a database file, else ValueError: an
    empty path or ``:memory:`` would make SQLite keep everything in memory
    (and throw it away on exit)."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path.strip() or path.strip() == ":memory:" or "\x00" in path:
        raise ValueError(f"invalid database path {path!r}: a file path is required "
                         "(an empty path or ':memory:' would keep nothing)")
    return path


def _sqlite_open(path: str, create: bool, read_only: bool = False):
    """``(connection, read_only)`` for the SQLite database *path*.

    A database that exists but cannot be written (read-only file, directory
    or medium) is opened read-only: ``mode=ro``, or ``immutable=1`` when even
    that fails (a WAL database whose ``-shm`` file cannot be created).  Else
    it is opened (created if *create*) in WAL mode with the schema."""
    import sqlite3
    from urllib.parse import quote
    writable = os.access(path, os.W_OK) and os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
    if not create and (read_only or not writable):
        uri = "file:" + quote(os.path.abspath(path))
        last = None
        for mode in ("?mode=ro", "?immutable=1"):
            try:
                conn = sqlite3.connect(uri + mode, uri=True, timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            except sqlite3.Error as err:
                last = err
                continue
            try:
                conn.execute("SELECT count(*) FROM messages WHERE 0").fetchall()
                return conn, True
            except sqlite3.Error as err:
                last = err
                conn.close()
        raise MQbtTError(f"cannot read the database {path!r}: {last}")
    try:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as err:
        raise MQbtTError(f"cannot open the database {path!r}: {err}") from None
    try:
        conn.execute("PRAGMA busy_timeout = 30000")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "messages" not in tables:   # another program's database: leave it alone
            conn.close()
            raise MQbtTError(f"the database {path!r} is not an mqbtt recording (it has no "
                             "messages table)")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit survives a power cut too, because the recorder
        # acknowledges messages to the broker only after it
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(_SCHEMA)
        for sql in _INDICES:
            conn.execute(sql)
    except sqlite3.Error as err:
        conn.close()
        raise MQbtTError(f"cannot use the database {path!r}: {err}") from None
    return conn, False


class MQbtTDataBase:
    """A SQLite database for MQbtT messages.

    The file is created by the first :meth:`insert` if needed (reading a
    database that does not exist raises :exc:`MQbtTError` "no such
    database", so a mistyped path never leaves an empty file behind), with
    exactly the documented table::

        TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            timestamp REAL NOT NULL,
            pair_id TEXT NOT NULL,
            subtopic TEXT NOT NULL CHECK (subtopic IN ('esp', 'log', 'shr', 'srv')),
            message BLOB NOT NULL
        );

    plus indices on ``(timestamp)``, ``(pair_id, timestamp)`` and
    ``(pair_id, subtopic, timestamp)``.  The database is put in WAL mode with a
    30 s busy timeout, so a notebook can read it while ``mqbtt record`` writes
    it.

    :param path: the database file, or a PostgreSQL URL
      (``postgresql://user@host:port/dbname``, also ``postgres://``): the same
      table in PostgreSQL types (``id bigserial``, ``timestamp double
      precision``, ``message bytea``), the same indices and results; see
      :class:`_PGConnection`.  Needs psycopg 3 (:data:`PG_INSTALL`).
    :param batch_size: :meth:`insert` commits after this many records...
    :param batch_timeout: ...or when the oldest uncommitted record is this many
      seconds old, whichever comes first (a timer commits even if no further
      record is inserted).  :meth:`close` commits what is left.
    :param read_only: open an existing SQLite database read-only, changing
      nothing in it (:func:`open_recording` does so for a database that is
      not in WAL mode, e.g. one written by another tool).

    Timestamps are stored as UTC seconds since the epoch and returned as
    timezone-aware UTC datetimes.  Datetimes given as filters may be aware
    (any zone) or naive: **a naive datetime is local time**, as for
    :meth:`datetime.datetime.timestamp` (so ``datetime.now()`` works as
    expected); numbers are seconds since the epoch.

    A database that exists but cannot be written (read-only file, directory
    or medium) is opened read-only (:attr:`read_only`): it can be read, and
    :meth:`insert` raises :exc:`MQbtTError`.  The path must name a file: an
    empty path or ``:memory:`` raises ``ValueError``.

    Use it as a context manager, or call :meth:`close` when done.  The
    documentation also spells it ``MQbtTDatabase``: both names work.
    """

    def __init__(self, path: str, batch_size: int = 100, batch_timeout: float = 10.0, *,
                 read_only: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        if not isinstance(batch_timeout, (int, float)) or batch_timeout < 0:
            raise ValueError(f"batch_timeout must be a non-negative number, not {batch_timeout!r}")
        self.path = _check_db_path(path)
        self.batch_size = batch_size
        self.batch_timeout = float(batch_timeout)
        self._lock = threading.RLock()
        self._pending = 0          # rows inserted since the last commit
        self._pending_since = 0.0  # monotonic time of the first of them
        self._timer = None
        self._conn = None
        self._closed = False
        #: whether the database could only be opened read-only (read-only media)
        self.read_only = False
        #: ``"sqlite"`` or ``"postgresql"`` (a ``postgresql://`` URL; see _PGConnection)
        self.backend = "sqlite"
        if is_pg_url(self.path):
            url, self.path = self.path, _redact_db(self.path)   # never show the password
            conn = _PGConnection(url, self.path)
            try:
                conn.create_schema()
            except BaseException:
                conn.close()
                raise
            self._conn, self.backend = conn, "postgresql"
            return
        if os.path.exists(self.path):
            self._conn, self.read_only = _sqlite_open(self.path, create=False, read_only=read_only)
        # else: created by the first insert, so that a mistyped path given
        # for reading raises "no such database" instead of making an empty one

    # -- writing ----------------------------------------------------------------
    def insert(self, record: MQbtTRecord) -> int:
        """Insert a mqtt record into the database with batched commits.

        The record's ``id`` is ignored: the database assigns it.

        :returns: the id of the new row.
        :raises ValueError: for an unknown subtopic or a payload that is not bytes."""
        if record.subtopic not in SUBTOPICS:
            raise ValueError(f"unknown subtopic {record.subtopic!r} (expected one of esp, log, shr, srv)")
        if not isinstance(record.payload, bytes):
            raise ValueError(f"payload must be bytes, not {type(record.payload).__name__}")
        return self._insert(record.timestamp.timestamp(), record.pair_id, record.subtopic,
                            record.payload)

    def _insert(self, ts: float, pair_id: str, subtopic: str, payload: bytes, *, autocommit=True) -> int:
        with self._lock:
            self._check_writable()
            if self._pending == 0:
                self._conn.execute("BEGIN")
                self._pending_since = time.monotonic()
            try:
                cur = self._conn.execute(
                    "INSERT INTO messages (timestamp, pair_id, subtopic, message) VALUES (?, ?, ?, ?)",
                    (ts, pair_id, subtopic, payload))
            except BaseException:
                if self._pending == 0:   # never leave an empty transaction open
                    self._rollback()
                raise
            self._pending += 1
            if autocommit:
                if (self._pending >= self.batch_size
                        or time.monotonic() - self._pending_since >= self.batch_timeout):
                    self.commit()
                elif self._timer is None:
                    self._timer = threading.Timer(self.batch_timeout, self._timed_commit)
                    self._timer.daemon = True
                    self._timer.start()
            return cur.lastrowid

    def _insert_many(self, rows) -> None:
        """Insert ``(timestamp, pair_id, subtopic, payload)`` rows and commit
        them, with the records inserted before (the recorder's path)."""
        with self._lock:
            self._check_writable()
            if not rows:
                self.commit()
                return
            if self._pending == 0 and self.backend == "postgresql":
                self._conn.insert_rows(rows)   # one statement: one round trip, atomic
                return
            if self._pending == 0:
                self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT INTO messages (timestamp, pair_id, subtopic, message) VALUES (?, ?, ?, ?)",
                    rows)
                self._pending += len(rows)
                self.commit()
            except BaseException:
                self._rollback()   # nothing of it is acknowledged: the broker resends it
                raise

    def _timed_commit(self):
        with self._lock:
            self._timer = None
            if self._conn is not None and self._pending:
                try:
                    self.commit()
                except Exception as err:  # pragma: no cover - disk full, ...
                    log.error("mqbtt: cannot commit to %s: %s", self.path, err)

    def commit(self) -> int:
        """Commit the records inserted so far now (without waiting for the
        batch to fill); return how many were committed."""
        with self._lock:
            self._check_open()
            n = self._pending
            if n or self._conn.in_transaction:
                self._conn.execute("COMMIT")
                self._pending = 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return n

    # -- reading ----------------------------------------------------------------
    def records(self, pair_id: str | None = None, subtopic: str | None = None,
                min_timestamp=None, max_timestamp=None, desc: bool = False):
        """Query the database for messages, auto-deserializing the message payload.

        :param pair_id: The pair_id to filter by.
        :param subtopic: The subtopic to filter by.
        :param min_timestamp: The minimum timestamp to filter by (inclusive).
        :param max_timestamp: The maximum timestamp to filter by (inclusive).
        :param desc: Whether to order the results in descending timestamp order.
        :returns: a generator of :class:`MQbtTRecord`, ordered by timestamp
          (then id).  The query runs on first iteration and rows are fetched
          in chunks, so memory stays flat on any database size.  A row whose
          payload does not decode yields a record with ``message`` None.
        """
        return self._select(pair_id, subtopic, min_timestamp, max_timestamp, None, desc)

    def logs(self, pair_id: str | None = None, min_timestamp=None, max_timestamp=None,
             text: str | None = None, desc: bool = False):
        """Query the database for log messages, auto-deserializing the message payload.

        :param pair_id: The pair_id to filter by.
        :param min_timestamp: The minimum timestamp to filter by (inclusive).
        :param max_timestamp: The maximum timestamp to filter by (inclusive).
        :param text: Optional text to filter log messages by: a plain,
          case-sensitive substring (quotes, ``%`` and ``_`` are ordinary characters).
        :param desc: Whether to order the results in descending timestamp order.
        :returns: a generator of :class:`MQbtTRecord` (``message`` is the log
          line as ``str``); same streaming behaviour as :meth:`records`.
        """
        return self._select(pair_id, "log", min_timestamp, max_timestamp, text, desc)

    @staticmethod
    def _filters(pair_id=None, subtopic=None, min_timestamp=None, max_timestamp=None):
        """``(conditions, params)`` of the usual filters (bound parameters, ``?``)."""
        where, params = [], []
        if pair_id is not None:
            where.append("pair_id = ?")
            params.append(pair_id)
        if subtopic is not None:
            where.append("subtopic = ?")
            params.append(subtopic)
        if min_timestamp is not None:
            where.append("timestamp >= ?")
            params.append(_epoch(min_timestamp, "min_timestamp"))
        if max_timestamp is not None:
            where.append("timestamp <= ?")
            params.append(_epoch(max_timestamp, "max_timestamp"))
        return where, params

    def _select(self, pair_id, subtopic, min_timestamp, max_timestamp, text, desc):
        if subtopic is not None and subtopic not in SUBTOPICS:
            raise ValueError(f"unknown subtopic {subtopic!r} (expected one of esp, log, shr, srv)")
        where, params = self._filters(pair_id, subtopic, min_timestamp, max_timestamp)
        if text is not None:
            # instr() on two BLOBs compares bytes: no LIKE wildcards, no escaping
            where.append("instr(message, ?) > 0")
            params.append(str(text).encode("utf-8"))
        sql = "SELECT id, timestamp, pair_id, subtopic, message FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY timestamp DESC, id DESC" if desc else " ORDER BY timestamp, id"
        self._check_open()
        return self._rows(sql, params)

    def _rows(self, sql, params):
        with self._lock:
            # PostgreSQL: a server-side cursor (rows come 1000 at a time)
            cur = (self._conn.stream if self.backend == "postgresql" else self._conn.execute)(sql, params)
        try:
            while True:
                with self._lock:
                    rows = cur.fetchmany(1000)
                if not rows:
                    return
                from_row = MQbtTRecord._from_row
                for rid, ts, pid, sub, payload in rows:
                    if payload.__class__ is not bytes:  # a row written by another tool
                        payload = _row_payload(payload)
                    yield from_row(rid, ts, pid, sub, payload)
        finally:
            try:
                cur.close()
            except Exception:   # the database was closed before the generator
                pass

    def count(self, pair_id: str | None = None, subtopic: str | None = None) -> int:
        """The number of stored messages (optionally of one pair and/or subtopic)."""
        where, params = self._filters(pair_id, subtopic)
        sql = "SELECT count(*) FROM messages" + (" WHERE " + " AND ".join(where) if where else "")
        with self._lock:
            self._check_open()
            return self._conn.execute(sql, params).fetchone()[0]

    def pair_ids(self) -> list:
        """The distinct pair ids in the database, sorted."""
        with self._lock:
            self._check_open()
            return [r[0] for r in self._conn.execute(
                "SELECT DISTINCT pair_id FROM messages ORDER BY pair_id")]

    # -- summaries and export (mqbtt info, mqbtt export) -----------------------
    def summary(self, pair_id: str | None = None, min_timestamp=None, max_timestamp=None) -> dict:
        """What the database holds, pair by pair (one ``GROUP BY`` query).

        :param pair_id: only this pair.
        :param min_timestamp: only messages at or after this time (inclusive).
        :param max_timestamp: only messages at or before this time (inclusive).
        :returns: ``{pair_id: {"messages": N, "srv": n, "esp": n, "shr": n,
          "log": n, "first": datetime, "last": datetime, "first_timestamp": s,
          "last_timestamp": s}}`` sorted by pair id: the message count per
          subtopic (0 included) and the times of the first and last message,
          as UTC datetimes and as seconds since the epoch.  Pairs without a
          message in the window are absent."""
        where, params = self._filters(pair_id, None, min_timestamp, max_timestamp)
        # SQLite columns hold any type: text or NULL written by another tool
        # must not become a pair's first or last time (review 3)
        t = ("CASE WHEN typeof(timestamp) IN ('integer', 'real') THEN timestamp END"
             if self.backend == "sqlite" else "timestamp")
        sql = (f"SELECT pair_id, subtopic, COUNT(*), MIN({t}), MAX({t}) FROM messages"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " GROUP BY pair_id, subtopic")
        with self._lock:
            self._check_open()
            rows = self._conn.execute(sql, params).fetchall()
        out = {}
        for pid, sub, n, first, last in rows:
            first, last = _usable_ts(first), _usable_ts(last)
            p = out.setdefault(pid, dict({"messages": 0}, **{s: 0 for s in SUBTOPICS},
                                         first_timestamp=None, last_timestamp=None))
            p["messages"] += n
            p[sub] = p.get(sub, 0) + n
            # bad rows of other tools (NaN, text, NULL) have no time: None
            p["first_timestamp"] = min((x for x in (p["first_timestamp"], first) if x is not None),
                                       default=None)
            p["last_timestamp"] = max((x for x in (p["last_timestamp"], last) if x is not None),
                                      default=None)
        for p in out.values():
            p["first"], p["last"] = _row_time(p["first_timestamp"]), _row_time(p["last_timestamp"])
        # a pair id written by another tool may be NULL or a number
        return dict(sorted(out.items(), key=lambda kv: (kv[0].__class__ is not str, str(kv[0]))))

    def info(self) -> dict:
        """:meth:`summary` of every pair, with the totals and the file's size.

        :returns: ``{"path": path, "size": bytes, "wal_size": bytes,
          "messages": N, "pairs": summary()}``; ``size`` is that of the
          database file (None when the database is not a file), ``wal_size``
          that of its write-ahead log (0 when there is none)."""
        pairs = self.summary()
        size = wal = None
        if os.path.isfile(self.path):
            size = os.path.getsize(self.path)
            wal = os.path.getsize(self.path + "-wal") if os.path.isfile(self.path + "-wal") else 0
        return {"path": self.path, "size": size, "wal_size": wal,
                "messages": sum(p["messages"] for p in pairs.values()), "pairs": pairs}

    def export_rows(self, pair_id: str | None = None, subtopic: str | None = None,
                    min_timestamp=None, max_timestamp=None):
        """The records (as :meth:`records` selects them) as flat dicts, for
        JSON lines, CSV or a data frame.

        Each row has ``time`` (ISO 8601, UTC), ``timestamp`` (seconds since
        the epoch), ``pair_id``, ``subtopic`` and the decoded fields: those of
        :class:`Request`, :class:`Reply` (``kind`` by name) or :class:`Share`
        (bytes in hex; its ``time`` field is called ``share_time``), or
        ``text`` for a log line.  A payload that does not decode gives
        ``payload`` (hex) and ``error`` instead.

        :returns: a generator; the query runs on first iteration."""
        for rec in self.records(pair_id, subtopic, min_timestamp, max_timestamp):
            yield _export_row(rec)

    # -- life cycle -------------------------------------------------------------
    def _check_open(self):
        if self._conn is None:
            if self._closed:
                raise MQbtTError(f"the database {self.path!r} is closed")
            if not os.path.exists(self.path):
                raise MQbtTError(f"no such database: {self.path}")
            # created since (e.g. by a recorder started later)
            self._conn, self.read_only = _sqlite_open(self.path, create=False)

    def _check_writable(self):
        """Create the database on the first write; refuse one opened read-only."""
        if self._conn is None and not self._closed and not os.path.exists(self.path):
            self._conn, self.read_only = _sqlite_open(self.path, create=True)
        self._check_open()
        if self.read_only:
            raise MQbtTError(f"the database {self.path!r} is read-only (read-only file, "
                             "directory or medium)")

    def _rollback(self):
        self._pending = 0
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except Exception as err:  # pragma: no cover - the connection is unusable anyway
            log.error("cannot roll back %s: %s", self.path, err)

    def close(self):
        """Close the database connection (committing pending records first).
        Calling it twice is harmless."""
        with self._lock:
            if self._conn is None:
                self._closed = True
                return
            try:
                self.commit()
            finally:
                self._conn.close()
                self._conn = None
                self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<MQbtTDataBase {self.path!r}{' closed' if self._closed else ''}>"


#: the spelling used in part of the documentation
MQbtTDatabase = MQbtTDataBase


def request_reply_pairs(records):
    """Match each request of a pair with its reply, for latency analysis.

    *records* is an iterable of :class:`MQbtTRecord` of one pair in time order
    (e.g. ``db.records(pair_id=...)``); other subtopics are ignored.

    A reply with a non-zero ``request_id`` answers the request with that id,
    however many requests were in flight (a reply to no recorded request is
    ignored).  A reply without id (0, or a payload that does not decode) is
    paired by order: it answers the latest request if that one is still
    unanswered; a request without id followed by another request before any
    reply is unanswered.  Pairs are yielded as their replies come; a request
    with an id that is never answered is yielded (unanswered) at the end, or
    once 10000 later requests with ids are waiting.

    :returns: a generator of ``(request_record, reply_record, latency_seconds)``,
      with ``reply_record`` and ``latency_seconds`` None for unanswered requests
      (``latency_seconds`` also None when a record has no usable timestamp).
    """
    pairing = _Pairing()
    for r in records:
        if r.subtopic == "srv":
            for old in pairing.request(r, _request_id_of(r.message)):
                yield old, None, None
        elif r.subtopic == "esp":
            req = pairing.reply(_request_id_of(r.message))
            if req is not None:
                t0, t1 = req.timestamp, r.timestamp   # None: a row without a usable time
                yield req, r, (None if t0 is None or t1 is None else (t1 - t0).total_seconds())
    for old in pairing.rest():
        yield old, None, None


def _parse_topic(t: str):
    """(pair_id, subtopic) of ``mqbtt/<pair_id>/<subtopic>``, or None."""
    parts = t.split("/")
    if len(parts) != 3 or parts[0] != "mqbtt" or not parts[1] or parts[2] not in SUBTOPICS:
        return None
    return parts[1], parts[2]


def parse_subtopics(text) -> list:
    """The subtopics of a comma-separated list such as ``"log,shr"`` (or of
    an iterable); raise ValueError for an unknown one."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        s = str(item).strip().lower()
        if not s:
            continue
        if s not in SUBTOPICS:
            raise ValueError(f"unknown subtopic {s!r} (expected some of esp, log, shr, srv)")
        if s not in out:
            out.append(s)
    return out


def recorder_client_id(broker_uri: str, db_path: str, pair_ids=(), share: str | None = None) -> str:
    """The client id ``mqbtt record`` uses: ``mqbtt-rec-`` plus a hash of this
    host and user, the broker and the absolute database path (a PostgreSQL
    URL without its password) and the ``--share`` group — the same when
    the same recorder is restarted, different for recorders writing
    different databases.  A recorder of some pairs only (*pair_ids*) gets
    its own id, since a persistent session keeps its subscriptions."""
    import hashlib
    where = _redact_db(db_path) if is_pg_url(db_path) else os.path.realpath(os.fspath(db_path))
    key = f"{_host_tag()}|{BrokerURI.parse(broker_uri)}|{where}"
    if pair_ids:
        key += "|" + "\x00".join(sorted(set(pair_ids)))
    if share is not None:
        key += f"|$share/{share}"
    # surrogateescape: a Linux file name need not be UTF-8
    return "mqbtt-rec-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _recorded_topic(t):
    """``(pair_id, subtopic)`` of a topic the recorder received (``str`` or
    the raw ``bytes``), or None when the schema cannot take it (not UTF-8).

    Anything matching ``mqbtt/+/<subtopic>`` is kept as it is, including an
    empty pair id (``mqbtt//log``) or one with odd characters."""
    if t.__class__ is not str:
        try:
            t = bytes(t).decode("utf-8")
        except UnicodeDecodeError:
            return None
    parts = t.split("/")
    if len(parts) != 3 or parts[0] != "mqbtt" or parts[2] not in SUBTOPICS:
        return None
    return parts[1], parts[2]


class _RecorderClaim:
    """The lock of one recorder (see :func:`_claim_recorder`)."""

    def __init__(self, path, fd):
        self.path, self.fd = path, fd

    def release(self):
        if self.fd is None:
            return
        try:
            os.unlink(self.path)   # still locked: a newcomer sees a new inode and retries
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _claim_recorder(db_path: str, client_id: str) -> _RecorderClaim:
    """Make sure no other recorder with *client_id* records into *db_path*.

    One recorder per (database, client id): two would share the client id
    and knock each other off the broker.  The claim is an exclusive
    ``flock`` on ``<db>.rec-<hash of client id>.lock`` holding the owner's
    pid, host and start time; the kernel drops it when the process dies, so
    a stale file never blocks a restart.  Raises :exc:`MQbtTError` naming the
    owner (one line)."""
    import hashlib
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no check
        return _RecorderClaim(None, None)
    digest = hashlib.sha256(client_id.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    path = f"{db_path}.rec-{digest}.lock"
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise MQbtTError(f"cannot record into {db_path!r}: {err.strerror} (creating "
                             f"the lock file {path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.read(fd, 512).decode("utf-8", "replace").strip() or "a process"
            finally:
                os.close(fd)
            raise MQbtTError(f"another recorder already records into {db_path} with client id "
                             f"{client_id}: {owner} (lock file {path})") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if not same:   # removed by the previous owner meanwhile: lock the new file
            os.close(fd)
            continue
        import socket
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{_utc(time.time()):%Y-%m-%d %H:%M:%S} UTC").encode())
        return _RecorderClaim(path, fd)
    raise MQbtTError(f"cannot lock {path!r}: it keeps being replaced")  # pragma: no cover


def _remove_empty_db(path: str) -> None:
    """Remove *path* (and its -wal/-shm files) if it holds no message: a
    record that failed to start leaves nothing behind."""
    import sqlite3
    from urllib.parse import quote
    try:
        conn = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
        try:
            empty = conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
        finally:
            conn.close()
    except sqlite3.Error:
        return
    if empty:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(path + suffix)
            except OSError:
                pass


class Recorder:
    """Record the traffic of every pair (``mqbtt/+/<subtopic>``) into a
    :class:`MQbtTDataBase`, losing no QoS>=1 message even on ``kill -9``.

    The recorder acknowledges a message to the broker only after the SQLite
    commit that stores it (paho-mqtt ``manual_ack``, acknowledgements in
    arrival order), in a persistent session (``clean_session=False``) whose
    client id stays the same across restarts (:func:`recorder_client_id`):
    whatever was received but not committed when the process died is
    redelivered by the broker when the same recorder starts again.  It
    subscribes at QoS 1 on every subtopic — also on ``srv``/``esp``, which are
    published at QoS 2: at QoS 2 paho answers PUBREC before the application
    sees the message, and after PUBREC the broker never resends it, so a kill
    in between would lose it.

    It commits as soon as the stream pauses or half of *window*
    unacknowledged messages are held (Mosquitto sends at most
    ``max_inflight_messages``, 20 by default, unacknowledged messages, then
    waits: with half a window per commit it can send the other half while one
    is being committed); *batch_size* and
    *batch_timeout* remain upper bounds.  The paho network thread only
    enqueues; SQLite work happens in the thread that calls :meth:`run`.

    :param broker_uri: the broker (see :class:`BrokerURI`).
    :param db_path: the SQLite database (created if needed) or a PostgreSQL URL.
    :param share: record as a member of this shared-subscription group
      (``$share/<share>/mqbtt/+/<subtopic>``): the broker deals each message
      to one member; on PostgreSQL only one recorder per client id may run.
    :param exclude: subtopics not to record (list, or ``"log,shr"``).
    :param client_id: the MQTT client id (default :func:`recorder_client_id`).
    :param status: a text stream for progress (None: silent).  On a terminal,
      a live status line; otherwise one summary line every *status_interval* s.
      Each shows this run's count and the database's total.
    :param pair_ids: record only these pairs (default None: every pair).
    :param duration: stop by itself after this many seconds of recording
      (default None: until :meth:`stop`).
    """

    def __init__(self, broker_uri: str, db_path: str, exclude=(), client_id: str | None = None, *,
                 batch_size: int = 100, batch_timeout: float = 10.0, window: int = 20,
                 keepalive: int = 60, connect_timeout: float = 10.0, status=None,
                 status_interval: float = 60.0, pair_ids=None, duration: float | None = None,
                 share: str | None = None):
        self.broker = BrokerURI.parse(broker_uri if broker_uri is not None else default_broker())
        #: the shared-subscription group (``$share/<share>/mqbtt/+/<subtopic>``) or None
        self.share = None if share is None else check_share_group(share)
        excluded = parse_subtopics(exclude)
        self.subtopics = [s for s in SUBTOPICS if s not in excluded]
        if not self.subtopics:
            raise ValueError("every subtopic is excluded: nothing to record")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, not {window!r}")
        self.pair_ids = _record_pair_ids(pair_ids)
        self.duration = _positive_seconds(duration, "duration")
        self.db_path = _check_db_path(db_path)
        self.client_id = client_id or recorder_client_id(str(self.broker), self.db_path,
                                                         self.pair_ids or (), self.share)
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout
        self.window = window
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.status = status
        self.status_interval = status_interval
        #: messages stored, per subtopic
        self.counts = {s: 0 for s in self.subtopics}
        #: number of commits so far
        self.commits = 0
        #: messages received but not storable (a topic that is not UTF-8 text),
        #: acknowledged and counted here
        self.skipped = 0
        self._queue = queue.SimpleQueue()
        self._stopping = False
        self._recording = False
        self._conn = None
        self._claim = None
        self._db = MQbtTDataBase(self.db_path, batch_size, batch_timeout)
        self.db_path = self._db.path   # a PostgreSQL URL without its password
        if self._db.backend == "postgresql":
            _claim_pg_recorder(self._db, self.client_id)
        #: messages the database held when the recorder started (0: it is created
        #: by the first commit)
        self.db_total_before = (self._db.count() if self._db.backend == "postgresql"
                                or os.path.exists(self.db_path) else 0)

    @property
    def total(self) -> int:
        """Messages stored so far."""
        return sum(self.counts.values())

    @property
    def db_total(self) -> int:
        """Messages in the database: those it held at the start plus this run's."""
        return self.db_total_before + self.total

    def _on_message(self, client, userdata, msg):
        # network thread: enqueue only (never raises, never blocks)
        if self._stopping:
            return  # left unacknowledged: the broker keeps it for the next run
        # the topic's raw bytes: paho's msg.topic raises on bytes that are not UTF-8
        t = getattr(msg, "_topic", None)
        self._queue.put((self._conn.generation, msg.mid, msg.qos,
                         msg.topic if t is None else t, msg.payload, time.time()))

    def stop(self):
        """Ask :meth:`run` to commit what it received and return (safe from a
        signal handler or another thread; also ends a connection attempt)."""
        self._stopping = True
        # wakes run() at once: SimpleQueue.get(timeout) interrupted by a signal
        # may otherwise wait for ever on CPython <= 3.12 (negative time left)
        self._queue.put(None)
        if self._conn is not None:
            self._conn.abort()

    def run(self):
        """Connect, record until :meth:`stop` is called, commit, disconnect.

        :returns: the number of messages stored.
        :raises MQbtTConnectionError: if the first connection fails, or if the
          broker later refuses the credentials (after committing what came).
        :raises MQbtTError: if the database cannot be written (nothing
          uncommitted is acknowledged, so the broker keeps it)."""
        subs = [(self._prefix + topic(p, s), min(SUBTOPICS[s], 1)) for p in (self.pair_ids or ["+"])
                for s in self.subtopics]
        pg = self._db.backend == "postgresql"   # claimed per client id in the database
        self._claim = None if pg else _claim_recorder(self.db_path, self.client_id)
        created = not pg and not os.path.exists(self.db_path)
        try:
            try:
                self._conn = _Connection(self.broker, self.client_id, False, subs,
                                         self._on_message, self.keepalive, notify=self._say,
                                         manual_ack=True, on_fatal=lambda err: self.stop())
                if self._stopping:
                    self._conn.abort()
                self._conn.start(self.connect_timeout)
                self._db._check_writable()   # creates the file: only once connected
            except BaseException as err:
                if self._conn is not None:
                    self._conn.stop()
                self._close_db()
                if created:
                    _remove_empty_db(self.db_path)
                if self._conn is not None and self._conn.aborted \
                        and isinstance(err, MQbtTConnectionError):
                    self._say("stopped while connecting: nothing recorded", line=True)
                    return 0   # stop() called while connecting
                raise
            self._recording = True
            self._say(f"recording {', '.join(t for t, _ in subs)} "
                      f"from {self.broker} into {self.db_path} (client id {self.client_id})",
                      line=True)
            try:
                self._loop()
            except BaseException:
                self._conn.stop()
                self._close_db()
                raise
            self._sync_acks()   # clean stop: the broker has taken every PUBACK sent
            self._conn.stop()
            self._close_db()
        finally:
            if self._claim is not None:
                self._claim.release()
        if self._conn.error is not None:   # credentials refused on a reconnect: stored, then fail
            raise self._conn.error
        self._say(f"stopped: {self.total} messages recorded ({self._per_subtopic()}), "
                  f"{self.db_total} in the database", line=True)
        return self.total

    def _close_db(self):
        try:
            self._db.close()
        except Exception as err:
            log.error("cannot close %s: %s", self.db_path, err)

    def _loop(self):
        tty = bool(self.status) and hasattr(self.status, "isatty") and self.status.isatty()
        interval = 0.5 if tty else self.status_interval
        last_status = time.monotonic()
        last_total = 0
        deadline = None if self.duration is None else time.monotonic() + self.duration
        while not self._stopping:
            if deadline is not None and time.monotonic() >= deadline:
                self._stopping = True   # as stop(): what arrives now stays unacknowledged
                break
            try:
                first = _timed_get(self._queue, 0.2)   # stop() also puts None to wake it
            except Empty:
                first = None
            if first is not None:
                self._store(first)
            now = time.monotonic()
            if self.status and now - last_status >= interval:
                rate = (self.total - last_total) / (now - last_status)
                last_status, last_total = now, self.total
                state = "" if self._conn.connected else " [disconnected]"
                self._say(f"{self.total} messages recorded, {rate:.1f}/s "
                          f"({self._per_subtopic()}), {self.db_total} in the database{state}",
                          line=not tty)
        # stop requested: on_message no longer enqueues; store what is queued
        while True:
            try:
                item = self._queue.get_nowait()
            except Empty:
                break
            if item is not None:
                self._store(item)
        if tty:
            self.status.write("\n")

    def _store(self, first):
        """Store *first* and whatever else is queued (up to the bounds),
        commit, then acknowledge in arrival order."""
        batch = [first]
        unacked = 1 if first[2] > 0 else 0
        started = time.monotonic()
        # half the broker's window per commit: while one half is being committed,
        # the broker can already send the other half (a full window would stall it)
        while (len(batch) < self.batch_size and unacked < max(1, self.window // 2)
               and time.monotonic() - started < self.batch_timeout):
            try:
                item = self._queue.get_nowait()
            except Empty:
                break  # the stream paused
            if item is None:   # stop()'s wake-up
                continue
            batch.append(item)
            if item[2] > 0:
                unacked += 1
        import sqlite3
        _quickack(self._conn.client)   # the PUBACKs come only after the commit
        stored = []
        rows = []
        for gen, mid, qos, t, payload, ts in batch:
            where = _recorded_topic(t)
            if where is None:
                self.skipped += 1   # the schema cannot take it: acknowledged, counted, shown
            elif where[1] in self.counts and (   # else: excluded now, subscribed by an old run
                    self.pair_ids is None or where[0] in self.pair_ids):
                rows.append((ts, where[0], where[1], payload))
                stored.append(where[1])
        try:
            if rows:   # none when every message of the batch is left out
                self._db._insert_many(rows)
        except sqlite3.Error as err:
            raise MQbtTError(f"cannot write to the database {self.db_path!r}: {err}") from None
        self.commits += 1
        for sub in stored:
            self.counts[sub] += 1
        client, gen_now = self._conn.client, self._conn.generation
        for gen, mid, qos, t, payload, ts in batch:
            # an ack belongs to the connection the message came on: after a
            # reconnect the broker redelivers it anyway (stored twice, not lost)
            if qos > 0 and gen == gen_now:
                client.ack(mid, qos)

    #: a topic filter the recorder never subscribes to: UNSUBSCRIBE from it
    #: changes nothing in the session, and its UNSUBACK comes after the broker
    #: has handled every packet sent before (see :meth:`_sync_acks`)
    _SYNC_FILTER = "mqbtt/+/.recorder-sync"

    def _sync_acks(self, timeout: float = 10.0):
        """Clean stop: wait (at most *timeout* s) until the broker has handled
        every PUBACK sent, before DISCONNECT.  Without it, paho closes the
        socket right after writing DISCONNECT; during a flood Mosquitto, still
        sending, gets "Broken pipe" and drops the connection without reading
        the last PUBACKs: after the restart it redelivers messages already
        stored (duplicates).  A round trip (UNSUBSCRIBE from a filter never
        subscribed, answered by UNSUBACK in order) proves they were taken.
        Messages arriving meanwhile stay unacknowledged (stored by the next run)."""
        conn = self._conn
        if not conn.connected:
            return   # a reconnection redelivers what was not acknowledged anyway
        done = threading.Event()
        acked = set()

        def on_unsubscribe(client, userdata, mid, *rest):
            acked.add(mid)
            done.set()
        conn.client.on_unsubscribe = on_unsubscribe
        try:
            rc, mid = conn.client.unsubscribe(self._SYNC_FILTER)
        except Exception:   # pragma: no cover - paho raises nothing here normally
            return
        if rc != 0 or mid is None:
            return
        deadline = time.monotonic() + timeout
        while mid not in acked and conn.connected:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%s did not confirm the last acknowledgements within %g s: "
                            "the next run may store a few messages twice", self.broker, timeout)
                return
            done.wait(min(left, 0.1))
            done.clear()

    @property
    def _prefix(self):
        return "" if self.share is None else f"$share/{self.share}/"

    def _per_subtopic(self):
        text = " ".join(f"{s}={n}" for s, n in self.counts.items())
        return text + (f", {self.skipped} skipped (topic not UTF-8)" if self.skipped else "")

    def _say(self, text, line=True):
        if not self.status:
            return
        try:
            if line:
                self.status.write(f"mqbtt record: {text}\n")
            else:
                self.status.write(f"\r\x1b[Kmqbtt record: {text}")
            self.status.flush()
        except (OSError, ValueError):
            pass


def record(broker_uri: str, db_path: str, exclude=(), client_id: str | None = None, **kwargs) -> int:
    """Record the traffic of every pair into *db_path* until SIGINT or SIGTERM
    (then commit everything received and return the number of messages stored).

    A thin wrapper over :class:`Recorder` (same parameters) that installs the
    signal handlers when called from the main thread."""
    import signal
    rec = Recorder(broker_uri, db_path, exclude, client_id, **kwargs)
    old = {}

    def on_signal(signum, frame):
        rec.stop()
        if not rec._recording:   # still connecting: give up at once
            raise KeyboardInterrupt
        if rec._db.backend == "postgresql" and signal.SIGALRM not in old:
            # a server that stopped answering must not hold the recorder for ever
            old[signal.SIGALRM] = signal.signal(signal.SIGALRM, _pg_watchdog(rec._db._conn))
            signal.setitimer(signal.ITIMER_REAL, 0.5, 0.5)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
    try:
        return rec.run()
    finally:
        if signal.SIGALRM in old:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in old.items():
            signal.signal(sig, handler)


#: what each ``mqbtt dump --mode`` receives
DUMP_MODES = {"log": ["log"], "miner": ["srv"], "optimizer": ["esp", "shr"],
              "all": ["srv", "esp", "shr", "log"]}


def _jsonable(message):
    if dataclasses.is_dataclass(message):
        out = {}
        for f in dataclasses.fields(message):
            if not f.repr:            # request_id: shown beside the message, when set
                continue
            v = getattr(message, f.name)
            if isinstance(v, enum.Enum):
                v = v.name
            elif isinstance(v, bytes):
                v = v.hex()
            out[f.name] = v
        return out
    return message


def format_dump(ts: float, subtopic: str, payload: bytes, rtt: float | None = None,
                as_json: bool = False, pair_id: str | None = None, *,
                name_pair: bool = False) -> str:
    """One ``mqbtt dump`` output line (without newline) for a message
    received at *ts* (seconds since the epoch).

    JSON lines carry ``pair_id`` and ``topic`` when *pair_id* is given, and
    every field of the message.  Text lines show a Share readably (see
    :func:`describe_message`); with *name_pair* they name the pair as
    ``<pair_id>/<subtopic>`` instead of ``<subtopic>``."""
    import datetime
    when = datetime.datetime.fromtimestamp(ts).astimezone()
    try:
        message = decode(subtopic, payload)
        err = None
    except Exception as e:
        message, err = None, str(e)
    if as_json:
        import json
        obj = {"time": when.isoformat(timespec="milliseconds"), "timestamp": ts}
        if pair_id is not None:
            obj["pair_id"] = pair_id
            obj["topic"] = topic(pair_id, subtopic)
        obj["subtopic"] = subtopic
        obj["type"] = None if message is None else (
            "log" if subtopic == "log" else type(message).__name__)
        obj["message"] = _jsonable(message)
        if _request_id_of(message):
            obj["request_id"] = message.request_id
        obj["payload"] = bytes(payload).hex()
        if err is not None:
            obj["error"] = err
        if rtt is not None:
            obj["rtt"] = rtt
        if isinstance(obj["message"], dict):   # JSON has no NaN or infinity: say it as text
            obj["message"] = {k: (str(v) if isinstance(v, float) and v != v or v in (
                float("inf"), float("-inf")) else v) for k, v in obj["message"].items()}
        return _json_escape_unsafe(json.dumps(obj, ensure_ascii=False, allow_nan=False))
    stamp = when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}" + when.strftime("%z")
    if message is None:
        text = f"undecodable {len(payload)} bytes: {bytes(payload).hex()}"
    elif subtopic == "log":
        # one line per message: no terminal escapes or line breaks from the wire
        text = safe_text(message, strip_ansi=False)
    elif subtopic == "shr":
        text = describe_message(message)
    else:
        text = repr(message)
    if rtt is not None:
        text += f"  rtt={rtt * 1000:.1f} ms"
    if name_pair and pair_id is not None:
        return f"{stamp} {_show_pair(pair_id)}/{subtopic} {text}"
    return f"{stamp} {subtopic} {text}"


def dump(broker_uri: str, pair_id: str, mode: str, out=None, as_json: bool = False,
         count: int | None = None, keepalive: int = 60, connect_timeout: float = 10.0,
         ready=None, *, duration: float | None = None) -> int:
    """Print what a role of a pair would receive, one line per message,
    flushed after every line (see :func:`format_dump`).

    *mode* ``log`` receives ``log``, ``miner`` receives ``srv``,
    ``optimizer`` receives ``esp`` and ``shr``, ``all`` receives all four; in
    optimizer mode dump also listens to ``srv`` (without printing it) to show
    each reply's round-trip time from the request it answers: the one with
    the reply's ``request_id``, or for a reply without id the latest
    unanswered request of its pair (``all`` shows it too).  *pair_id* ``"+"``
    watches every pair: text lines then name the pair; JSON lines always do.
    It subscribes at QoS 1 (receive times are those of the PUBLISH packets).  It uses a random client id and
    a clean session, so it never kicks the real optimizer or miner off the
    broker and leaves nothing behind.  Returns after *count* messages (never
    if None), or *duration* seconds after subscribing, with the number
    printed; *ready* (a callable) is called once subscribed.
    """
    if mode not in DUMP_MODES:
        raise ValueError(f"unknown mode {mode!r} (expected log, miner, optimizer or all)")
    if pair_id != "+":   # "+": every pair
        check_pair_id(pair_id)
    out = out or sys.stdout
    broker = BrokerURI.parse(broker_uri if broker_uri is not None else default_broker())
    shown = DUMP_MODES[mode]
    listen = shown + (["srv"] if mode == "optimizer" else [])
    # QoS 1 at most: with a clean session QoS 2 adds nothing (no redelivery
    # within a connection) but delays each srv/esp message by a round trip
    # (PUBREC/PUBREL), which would distort receive times and RTTs
    subs = [(topic(pair_id, s), min(SUBTOPICS[s], 1)) for s in listen]
    q = queue.SimpleQueue()

    def on_message(client, userdata, msg):
        q.put((time.time(), msg.topic, msg.payload))

    conn = _Connection(broker, f"mqbtt-dump-{os.urandom(6).hex()}", True, subs, on_message, keepalive)
    conn.start(connect_timeout)
    n = 0
    pairings = {}   # pair id -> its _Pairing (at most 10,000 pairs: the oldest goes)
    try:
        if ready is not None:
            ready()
        deadline = None if duration is None else time.monotonic() + duration
        while count is None or n < count:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                break
            try:
                ts, t, payload = _timed_get(q, wait)
            except Empty:
                continue
            where = _parse_topic(t)
            if where is None:
                continue
            pid, sub = where
            rtt = None
            if mode in ("optimizer", "all"):
                if sub == "srv":
                    if pid not in pairings and len(pairings) >= 10000:
                        del pairings[next(iter(pairings))]
                    pairings.setdefault(pid, _Pairing()).request(ts, _payload_request_id(sub, payload))
                    if mode == "optimizer":
                        continue
                elif sub == "esp" and pid in pairings:
                    sent = pairings[pid].reply(_payload_request_id(sub, payload))
                    if sent is not None:
                        rtt = ts - sent
            print(format_dump(ts, sub, payload, rtt, as_json, pid, name_pair=pair_id == "+"),
                  file=out, flush=True)
            n += 1
    finally:
        conn.stop()
    return n


def replay(db_path: str, broker_uri: str, pair_id: str, to_pid: str | None = None,
           speed: float = 1.0, *, min_timestamp=None, max_timestamp=None,
           keepalive: int = 60, connect_timeout: float = 10.0, send_timeout: float = 60.0,
           connected=None, progress=None, stop=None) -> int:
    """Republish a recorded pair's messages with their original timing.

    The messages of *pair_id* in *db_path* (optionally between *min_timestamp*
    and *max_timestamp*) are published in recording order to
    ``mqbtt/<to_pid>/<subtopic>`` (*to_pid* defaults to *pair_id*) at the QoS
    of their subtopic, the gaps between them divided by *speed* (``0``: as
    fast as possible).  Returns the number of messages published, once the
    broker acknowledged all of them.  *connected*, if given, is called once
    the broker accepted the connection.

    The database and the pair are checked before connecting: a missing
    database, a pair it does not hold, or a time window with none of the
    pair's messages raise :class:`MQbtTNotFound` (see :func:`replay_plan`).
    *progress*, if given, is called after each message as
    ``progress(published, total, eta_seconds)``.  *stop*, a
    :class:`threading.Event`, ends the replay early when set (from a signal
    handler or another thread): it returns at once with the number published
    so far, without waiting for outstanding acknowledgements.
    """
    _check_speed(speed)
    check_pair_id(pair_id)
    to_pid = check_pair_id(to_pid or pair_id)
    db_path = _check_db_path(db_path)
    plan = replay_plan(db_path, pair_id, min_timestamp, max_timestamp)
    total, t_last = plan["messages"], plan["last_timestamp"]
    # opened before connecting: a file that is not a database is reported first;
    # as open_recording does, so that another tool's database is not changed
    db = open_recording(db_path)
    # what was counted, even if a recorder adds more meanwhile: frozen by row id
    # (a time bound would also drop the rows whose time another tool wrote badly)
    try:
        last_id = db._conn.execute("SELECT MAX(id) FROM messages WHERE pair_id = ?",
                                   (pair_id,)).fetchone()[0]
    except BaseException:
        db.close()
        raise
    try:
        broker = BrokerURI.parse(broker_uri if broker_uri is not None else default_broker())
        conn = _Connection(broker, f"mqbtt-replay-{os.urandom(6).hex()}", True, [], None, keepalive)
        conn.start(connect_timeout)
    except BaseException:
        db.close()
        raise
    if connected is not None:
        connected()
    n = skipped = 0
    pending = deque()

    def wait(info):
        deadline = time.monotonic() + send_timeout
        while not _wait_published(info, 0.2 if stop is not None else send_timeout):
            if stop is not None and stop.is_set():
                return
            if time.monotonic() >= deadline:
                raise MQbtTSendTimeout(f"the broker {broker} did not acknowledge a replayed "
                                       f"message within {send_timeout:g} s")

    try:
        with db:
            t0 = m0 = None
            for rec in db.records(pair_id=pair_id, min_timestamp=min_timestamp,
                                  max_timestamp=max_timestamp):
                if last_id is not None and rec.id.__class__ is int and rec.id > last_id:
                    continue   # stored after the plan (a live recorder)
                qos = SUBTOPICS.get(rec.subtopic)
                if qos is None or not isinstance(rec.payload, bytes):
                    skipped += 1    # a row written by another tool: not replayable
                    continue
                when = rec.timestamp    # None: not a usable time, sent without a pause
                ts = None if when is None else when.timestamp()
                if ts is None:
                    pass
                elif t0 is None:
                    t0, m0 = ts, time.monotonic()
                elif speed > 0:
                    delay = m0 + (ts - t0) / speed - time.monotonic()
                    while delay > 0:
                        if stop is not None:
                            if stop.wait(min(delay, _MAX_SLEEP)):
                                break
                        else:
                            time.sleep(min(delay, _MAX_SLEEP))
                        delay = m0 + (ts - t0) / speed - time.monotonic()
                if stop is not None and stop.is_set():
                    break
                if len(pending) >= MQbtTBase.max_pending:   # paho's ids are 16-bit
                    wait(pending.popleft())
                info = conn.client.publish(topic(to_pid, rec.subtopic), rec.payload, qos)
                if info.rc == _MQTT_ERR_QUEUE_SIZE:
                    raise MQbtTSendError("cannot replay: too many messages wait for the "
                                         "broker's acknowledgement")
                n += 1
                if progress is not None:
                    if speed > 0 and ts is not None and t_last.__class__ is float \
                            and abs(t_last - ts) < 1e18:   # not a bad row's time (NaN, inf)
                        eta = (t_last - ts) / speed
                    elif m0 is not None:
                        eta = (time.monotonic() - m0) / n * (total - n)
                    else:   # no usable time seen yet
                        eta = 0.0
                    progress(n, total, max(0.0, eta))
                if qos == 2:
                    # the broker forwards a QoS 2 message only on PUBREL: without
                    # this wait a following QoS 1 message could overtake it
                    wait(info)
                elif qos == 1:
                    pending.append(info)
                    while pending and pending[0]._published:
                        pending.popleft()
        while pending and not (stop is not None and stop.is_set()):
            wait(pending.popleft())
    finally:
        conn.stop()
    if skipped:
        log.warning("replay: %d row(s) of %s skipped (unknown subtopic, written by another tool)",
                    skipped, db_path)
    return n


#: the slowest ``replay`` speed (a smaller one would turn a one-second gap
#: into more than a quarter of an hour)
MIN_SPEED = 1e-3
#: the longest single sleep of replay (the rest of a gap is slept in more calls)
_MAX_SLEEP = 86400.0


def _check_speed(speed):
    """ValueError/TypeError unless *speed* is 0 or a finite number >= :data:`MIN_SPEED`."""
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise TypeError(f"speed must be a number, not {type(speed).__name__}")
    if not (speed == 0 or MIN_SPEED <= speed < float("inf")):
        raise ValueError(f"speed must be 0 (as fast as possible) or a finite number >= "
                         f"{MIN_SPEED:g}, not {speed!r}")


###############################################################################
# Bounded HTTP: a total deadline and a size limit for every call ##############
###############################################################################

#: The largest answer an AxeOS or OpenObserve call accepts, in bytes
#: (ESP-Miner's system info is about 2 KB).  Larger ones raise :exc:`APIException`.
HTTP_MAX_BYTES = 1 << 20


class _AnswerTooLarge(Exception):
    pass


class _Deadline:
    """The total deadline of one HTTP call: when *timeout* seconds have
    passed, every socket the call opened is shut down, which wakes any read
    blocked on it (a server trickling a byte at a time never times out a
    per-read timeout)."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.end = time.monotonic() + timeout
        self.fired = False
        self._socks = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return max(0.001, self.end - time.monotonic())

    def add(self, sock) -> None:
        import socket
        watched = socket.fromfd(sock.fileno(), sock.family, sock.type)  # a dup: survives TLS wrapping
        with self._lock:
            self._socks.append(watched)
            if self.fired:
                self._shutdown(watched)

    @staticmethod
    def _shutdown(sock):
        import socket
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _fire(self):
        with self._lock:
            self.fired = True
            for sock in self._socks:
                self._shutdown(sock)

    def close(self):
        self._timer.cancel()
        with self._lock:
            for sock in self._socks:
                sock.close()
            self._socks = []


def _bounded_session(deadline: _Deadline):
    """A :class:`requests.Session` whose connections register their sockets
    with *deadline* (urllib3's documented ``ConnectionCls`` and
    ``pool_classes_by_scheme`` hooks)."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def watched(base):
        class Watched(base):
            def _new_conn(self):
                sock = super()._new_conn()
                deadline.add(sock)
                return sock
        return Watched

    class Pool(HTTPConnectionPool):
        ConnectionCls = watched(HTTPConnection)

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = watched(HTTPSConnection)

    pools = {"http": Pool, "https": TLSPool}

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy, **kwargs):
            manager = super().proxy_manager_for(proxy, **kwargs)
            manager.pool_classes_by_scheme = pools
            return manager

    session = requests.Session()
    session.mount("http://", Adapter())
    session.mount("https://", Adapter())
    return session


def _bounded_request(method: str, url: str, timeout: float, max_bytes: int, out=None, **kwargs):
    """One HTTP request (no redirect followed) that ends within *timeout*
    seconds in total and reads at most *max_bytes* of answer.

    The body is read as a stream: into ``r.content`` (so ``r.json()`` and
    ``r.text`` work), or, for a 200 answer, written to the binary file *out*.

    :raises _AnswerTooLarge: beyond *max_bytes* (announced or received)
    :raises requests.RequestException: on network errors; when the deadline
      passed, ``err.mqbtt_deadline`` is true (see :func:`_deadline_passed`)"""
    import requests
    deadline = _Deadline(timeout)
    try:
        with _bounded_session(deadline) as session:
            try:
                r = session.request(method, url, timeout=(timeout, timeout), stream=True,
                                    allow_redirects=False, **kwargs)
                try:
                    length = r.headers.get("Content-Length", "")
                    if length.strip().isdigit() and int(length) > max_bytes:
                        raise _AnswerTooLarge()
                    size, body = 0, bytearray()
                    for chunk in r.iter_content(1 << 16):
                        size += len(chunk)
                        if size > max_bytes:
                            raise _AnswerTooLarge()
                        if out is None or r.status_code != 200:  # out gets only a 200's body
                            body += chunk
                        else:
                            out.write(chunk)
                    r._content = bytes(body)   # what requests' own .content would hold
                finally:
                    r.close()
            except requests.RequestException as err:
                err.mqbtt_deadline = deadline.fired
                raise
            if deadline.fired:  # the shutdown can look like a clean end of a body without length
                err = requests.exceptions.ReadTimeout("total deadline passed")
                err.mqbtt_deadline = True
                raise err
            return r
    finally:
        deadline.close()


def _deadline_passed(err) -> bool:
    """Whether the requests error *err* comes from a total deadline (or is a timeout)."""
    import requests
    return bool(getattr(err, "mqbtt_deadline", False)) or isinstance(err, requests.Timeout)


###############################################################################
# Recordings from the command line: info, export, replay checks ##############
###############################################################################

class MQbtTNotFound(MQbtTError, LookupError):
    """A database file, or a pair or time window in it, does not exist (the
    command line reports it as a usage error, exit status 2)."""


def _show_pair(pair_id: str) -> str:
    """A pair id as one printable word: quoted, with escapes, when it holds
    spaces or control characters (a recorded topic can hold anything)."""
    if not isinstance(pair_id, str):   # NULL or a number, written by another tool
        return repr(pair_id)
    if pair_id and pair_id.isprintable() and not any(c.isspace() for c in pair_id):
        return pair_id
    return repr(pair_id)


def describe_message(message) -> str:
    """A compact one-line form of a message, as ``mqbtt dump`` shows shares:
    ``Share(version=536870912, prev_block=00…1f, nonce=3320249384, diff=1636.0)``.

    Kind by name, bytes in hex, text quoted (control characters escaped), and
    fields that are zero, empty or false left out.  ``--json`` (and
    :func:`format_dump` with ``as_json=True``) keeps every field."""
    if not dataclasses.is_dataclass(message):
        return repr(message)
    parts = []
    for f in dataclasses.fields(message):
        v = getattr(message, f.name)
        if not v:
            continue
        if isinstance(v, enum.Enum):
            text = v.name
        elif isinstance(v, bytes):
            text = v.hex()
        else:
            text = repr(v)
        parts.append(f"{f.name}={text}")
    return f"{type(message).__name__}({', '.join(parts)})"


def _positive_seconds(value, name):
    """*value* (None or a positive, finite number of seconds), else ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _record_pair_ids(pair_ids):
    """The checked, sorted, distinct pair ids of ``Recorder(pair_ids=…)``, or None."""
    if pair_ids is None:
        return None
    if isinstance(pair_ids, str):
        pair_ids = [pair_ids]
    out = sorted({check_pair_id(p) for p in pair_ids})
    if not out:
        raise ValueError("pair_ids is empty: nothing to record (None records every pair)")
    return out


_ISO_TIME = (r"\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:[.,]\d{1,9})?)?"
             r"(?:[Zz]|[+-]\d\d(?::?\d\d)?)?)?")


def parse_time(text) -> float:
    """Seconds since the epoch of a time given on the command line.

    Accepted: seconds since the epoch (``1764581234``, ``1764581234.25``)
    or ISO 8601 — ``2026-12-01``, ``2026-12-01T10:00``,
    ``2026-12-01 10:00:00.5``, each optionally followed by ``Z`` or an offset
    (``+01:00``, ``+0100``, ``-05``).  A time without ``Z`` or offset is local
    time (as a naive datetime is everywhere in mqbtt).

    :raises ValueError: for anything else (also NaN, infinities and dates
      outside years 1–9999)."""
    import datetime
    import re
    s = str(text).strip()
    if re.fullmatch(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", s):
        value = float(s)
        try:
            datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"invalid time {text!r}: out of range") from None
        return value
    if not re.fullmatch(_ISO_TIME, s):
        raise ValueError(f"invalid time {text!r}: expected ISO 8601 (2026-12-01T10:00:00Z, "
                         f"local time without Z or offset) or seconds since the epoch")
    iso = s[:-1] + "+00:00" if s[-1] in "Zz" else s
    m = re.search(r"([+-])(\d\d):?(\d\d)?$", iso) if len(iso) > 10 else None
    if m:   # Python 3.10 wants +HH:MM
        iso = iso[:m.start()] + f"{m.group(1)}{m.group(2)}:{m.group(3) or '00'}"
    frac = re.search(r"[.,](\d+)", iso)
    if frac:  # at most microseconds (3.10 wants 3 or 6 digits)
        iso = iso[:frac.start()] + "." + frac.group(1)[:6].ljust(6, "0") + iso[frac.end():]
    try:
        when = datetime.datetime.fromisoformat(iso)
        return when.timestamp()
    except (ValueError, OverflowError, OSError) as err:
        raise ValueError(f"invalid time {text!r}: {err}") from None


def open_recording(path) -> "MQbtTDataBase":
    """Open an existing recording (never creating one), for reading.

    :raises MQbtTNotFound: if *path* does not exist, is a directory, is not
      a SQLite database, or holds no ``messages`` table.  A database that is
      not a file (a ``scheme://`` URL) is passed to :class:`MQbtTDataBase`
      as it is."""
    path = os.fspath(path)
    if "://" not in path:
        if not os.path.exists(path):
            raise MQbtTNotFound(f"no such database: {path}")
        if os.path.isdir(path):
            raise MQbtTNotFound(f"{path} is a directory, not a database")
        import stat
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError as err:
            raise MQbtTNotFound(f"cannot read the database {path}: {err.strerror or err}") from None
        if not regular:   # a FIFO would block the open below for ever, a device too
            raise MQbtTNotFound(f"{path} is not a recording (not a regular file)")
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as err:
            raise MQbtTNotFound(f"cannot read the database {path}: {err.strerror or err}") from None
        if head != b"SQLite format 3\x00":
            raise MQbtTNotFound(f"{path} is not a recording (not an SQLite database)")
        import sqlite3
        import urllib.parse
        # bytes: a Linux file name need not be UTF-8; quoted: '?' and '#' are URI syntax
        uri = urllib.parse.quote(os.fsencode(os.path.abspath(path)))
        # immutable=1 when even mode=ro fails: a WAL database in a directory
        # this user cannot write (no -shm can be made), as _sqlite_open does (review 3)
        for mode in ("mode=ro", "immutable=1"):
            try:
                con = sqlite3.connect(f"file:{uri}?{mode}", uri=True, timeout=30.0)
                try:
                    found = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                        "AND name = 'messages'").fetchone()
                    journal = con.execute("PRAGMA journal_mode").fetchone()[0]
                finally:
                    con.close()
                break
            except sqlite3.Error as err:
                if mode == "immutable=1" or isinstance(err, sqlite3.DatabaseError) and \
                        "not a database" in str(err):
                    raise MQbtTNotFound(f"{path} is not a recording ({err})") from None
        if not found:
            raise MQbtTNotFound(f"{path} is not a recording (no messages table)")
        # a database in another journal mode (another tool's) is read without
        # being switched to WAL or given indices: reading changes nothing (review 3)
        return MQbtTDataBase(path, read_only=str(journal).lower() != "wal")
    elif is_pg_url(path) and not _pg_is_recording(path):
        # a reader never creates the table (as it never creates a SQLite file)
        raise MQbtTNotFound(f"{_redact_db(path)} is not a recording (no messages table)")
    return MQbtTDataBase(path)


def _list_pairs(pairs, limit: int = 20) -> str:
    if not pairs:
        return "it holds no messages"
    shown = ", ".join(_show_pair(p) for p in pairs[:limit])
    more = f" and {len(pairs) - limit} more" if len(pairs) > limit else ""
    return f"its pairs: {shown}{more}"


def replay_plan(db_path: str, pair_id: str, min_timestamp=None, max_timestamp=None) -> dict:
    """Check what :func:`replay` would publish, without connecting.

    :returns: the pair's :meth:`MQbtTDataBase.summary` entry for the window
      (``messages``, per-subtopic counts, ``first``, ``last``, …).
    :raises MQbtTNotFound: if the database does not exist or is not a
      recording, if it has no message of *pair_id* (the message lists the
      pairs it has), or none in the window (the message gives the pair's
      first and last time)."""
    with open_recording(db_path) as db:
        found = db.summary(pair_id, min_timestamp, max_timestamp).get(pair_id)
        windowed = min_timestamp is not None or max_timestamp is not None
        if found is not None and (found["first_timestamp"] is not None or not windowed):
            return found   # (a pair whose times are all unusable is sent without pauses)
        whole = db.summary(pair_id).get(pair_id)
        if whole is None:
            raise MQbtTNotFound(f"no pair {_show_pair(pair_id)} in {_redact_db(db_path)}; "
                                f"{_list_pairs(db.pair_ids())}")
        if whole["first_timestamp"] is None:   # review 3: rows of another tool
            raise MQbtTNotFound(f"pair {_show_pair(pair_id)} has no message with a usable time in "
                                f"{_redact_db(db_path)} (its times were written by another tool)")
        lo = "the start" if min_timestamp is None else _iso_utc(_epoch(min_timestamp))
        hi = "the end" if max_timestamp is None else _iso_utc(_epoch(max_timestamp))
        first, last = (t.isoformat(timespec="microseconds") if t is not None else "(no time)"
                       for t in (whole["first"], whole["last"]))
        raise MQbtTNotFound(f"pair {_show_pair(pair_id)} has no messages between {lo} and {hi} "
                            f"in {_redact_db(db_path)}; its messages go from {first} "
                            f"to {last}")


def _iso_utc(ts: float | None) -> str:
    """ISO 8601 in UTC with microseconds: ``2026-12-01T10:00:00.250000+00:00``
    (``unknown`` for None: rows without a usable time)."""
    if ts is None:
        return "unknown"
    return _utc(ts).isoformat(timespec="microseconds")


def _iso_utc_or_none(ts):
    """:func:`_iso_utc`, or None when there is no usable time (review 3)."""
    return None if ts is None else _iso_utc(ts)


def _export_columns(cls, renames=None):
    return [(f.name, (renames or {}).get(f.name, f.name)) for f in dataclasses.fields(cls)]


# (attribute, column) of each decoded subtopic; Share's ``time`` would clash
# with the row's own time
_EXPORT_ATTRS = {"srv": _export_columns(Request), "esp": _export_columns(Reply),
                 "shr": _export_columns(Share, {"time": "share_time"})}

#: the columns of each subtopic in :meth:`MQbtTDataBase.export_rows`
EXPORT_FIELDS = {sub: [col for _, col in attrs] for sub, attrs in _EXPORT_ATTRS.items()}
EXPORT_FIELDS["log"] = ["text"]

#: the export formats of :func:`export`
EXPORT_FORMATS = ("jsonl", "csv")

_iso_cache = [None, ""]   # [whole second, its ISO 8601 text]


def _iso_utc_fast(ts: float) -> str:
    """:func:`_iso_utc`, formatting each second once (exports are dense in time)."""
    sec = int(ts // 1)
    us = int(round((ts - sec) * 1e6))
    if us >= 1000000:
        sec, us = sec + 1, us - 1000000
    if _iso_cache[0] != sec:
        _iso_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _iso_cache[0] = sec
    return f"{_iso_cache[1]}.{us:06d}+00:00"


def _export_row(rec) -> dict:
    d = rec.__dict__
    if "_ts" in d:
        ts = d["_ts"]
    else:
        ts = None if rec.timestamp is None else rec.timestamp.timestamp()
    if ts.__class__ is float and -62135596800.0 <= ts < 253402300800.0:   # years 1-9999
        when = _iso_utc_fast(ts)
    else:   # a bad row of another tool (NaN, infinity, 1e300, text, NULL): no time
        when = _row_time(ts)
        when = None if when is None else when.isoformat(timespec="microseconds")
    sub = rec.subtopic
    row = {"time": when, "timestamp": ts, "pair_id": rec.pair_id, "subtopic": sub}
    message = rec.message
    if message is None:
        row["payload"] = bytes(rec.payload).hex()
        try:
            decode(sub, rec.payload)
            row["error"] = "does not decode"
        except Exception as err:
            row["error"] = str(err)
    elif sub == "log":
        row["text"] = message
    else:
        # a received Share reads its fields straight from the parsed protobuf
        src = message.__dict__.get("_pbmsg")
        if src is None:
            src = message
        for attr, col in _EXPORT_ATTRS[sub]:
            v = getattr(src, attr)
            if v.__class__ is bytes:
                v = v.hex()
            elif isinstance(v, enum.Enum):
                v = v.name
            row[col] = v
    return row


def export(db_path: str, out=None, format: str = "jsonl", *, pair_id: str | None = None,
           subtopic: str | None = None, min_timestamp=None, max_timestamp=None) -> int:
    """Write the decoded records of a recording to *out* (default stdout).

    :param format: ``jsonl`` (one JSON object per line; a float that JSON
      cannot hold, NaN or infinity, is written as a string) or ``csv`` (a
      header, then one line per record: ``time, timestamp, pair_id,
      subtopic``, the columns of the subtopics exported — see
      :data:`EXPORT_FIELDS` — and ``payload, error``; booleans as
      ``true``/``false``).
    :param pair_id, subtopic, min_timestamp, max_timestamp: filters, as for
      :meth:`MQbtTDataBase.records`.
    :returns: the number of rows written.  Rows are streamed: memory stays
      flat on any database size.
    :raises MQbtTNotFound: as :func:`open_recording`.
    :raises ValueError: for an unknown format or subtopic."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {format!r} (expected jsonl or csv)")
    if subtopic is not None and subtopic not in SUBTOPICS:
        raise ValueError(f"unknown subtopic {subtopic!r} (expected one of esp, log, shr, srv)")
    import json
    out = out or sys.stdout
    n = 0
    with open_recording(db_path) as db:
        rows = db.export_rows(pair_id, subtopic, min_timestamp, max_timestamp)
        if format == "jsonl":
            import re
            encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
            unsafe_chars = re.compile("[\x7f-\x9f\u2028\u2029]")
            unsafe, escape = unsafe_chars.search, unsafe_chars.sub
            for row in rows:
                try:
                    line = encode(row)
                except ValueError:   # NaN or infinity: as text
                    line = encode({k: _json_float(v) for k, v in row.items()})
                if unsafe(line):   # C1 controls, DEL, U+2028/9: escaped, as JSON allows
                    line = escape(lambda m: f"\\u{ord(m.group()):04x}", line)
                out.write(line + "\n")
                n += 1
        else:
            import csv
            columns = ["time", "timestamp", "pair_id", "subtopic"]
            for sub in ([subtopic] if subtopic else SUBTOPICS):
                columns += [c for c in EXPORT_FIELDS[sub] if c not in columns]  # request_id: once
            columns += ["payload", "error"]
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(columns)
            for row in rows:
                values = [row.get(c, "") for c in columns]
                # text cells (log lines, pair ids) keep no raw control character:
                # terminal escapes are shown, escaped, as dump shows them (review 3)
                writer.writerow([("true" if v else "false") if v.__class__ is bool
                                 else safe_text(v, strip_ansi=False)
                                 if v.__class__ is str and not v.isprintable() else v
                                 for v in values])
                n += 1
    out.flush()
    return n


def _json_float(v):
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    return v


###############################################################################
# PostgreSQL: database URLs, backend, shared recording, copy ##################
###############################################################################
# MQbtTDataBase talks to SQLite through a sqlite3.Connection.  For a
# ``postgresql://`` URL it gets a _PGConnection instead: the same calls
# (``execute(sql, params)`` with ``?`` placeholders, explicit BEGIN/COMMIT,
# cursors with fetchone/fetchmany/fetchall/lastrowid, ``executemany``,
# ``close``), so every generic method runs unchanged on both.  What differs
# lives here: connecting, the placeholder style, the DDL (bigserial, bytea),
# one-statement inserts, server-side cursors for streaming, COPY for bulk copies.

#: the URL prefixes that name a PostgreSQL database instead of a SQLite file
PG_SCHEMES = ("postgresql://", "postgres://")

#: what to install for PostgreSQL databases
PG_INSTALL = "pip install 'psycopg[binary]'"

#: the ``messages`` table on PostgreSQL: the same columns as :data:`_SCHEMA`
_PG_SCHEMA = """CREATE TABLE IF NOT EXISTS messages (
    id bigserial PRIMARY KEY,
    timestamp double precision NOT NULL,
    pair_id text NOT NULL,
    subtopic text NOT NULL CHECK (subtopic IN ('esp', 'log', 'shr', 'srv')),
    message bytea NOT NULL
)"""

#: where ``mqbtt copy`` remembers how far it copied each source (see :func:`copy`)
_COPIES_SCHEMA = """CREATE TABLE IF NOT EXISTS mqbtt_copies (
    source TEXT PRIMARY KEY,
    last_id BIGINT NOT NULL,
    copied BIGINT NOT NULL,
    origin TEXT,
    updated DOUBLE PRECISION
)"""


def is_pg_url(path) -> bool:
    """Whether *path* names a PostgreSQL database (``postgresql://…`` or
    ``postgres://…``) rather than a SQLite file."""
    return isinstance(path, str) and path[:13].lower().startswith(PG_SCHEMES)


def _redact_db(path) -> str:
    """*path* for display: a PostgreSQL URL with its password (in the user
    info or as a ``password=`` parameter) replaced by ``***``."""
    if not is_pg_url(path):
        return path
    import re
    scheme, rest = path.split("://", 1)
    at = rest.rfind("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1:]
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        rest = userinfo + "@" + rest
    rest = re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", rest)
    return f"{scheme}://{rest}"


def _psycopg():
    """The psycopg module, or MQbtTError naming the pip command (one line)."""
    try:
        import psycopg
    except ImportError as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else "not installed"
        raise MQbtTError(f"PostgreSQL databases need the psycopg 3 driver ({why}): "
                         f"{PG_INSTALL}") from None
    return psycopg


def _pg_message(err, secret=None) -> str:
    """One line of a driver error, never holding the password (libpq quotes
    the URL in some errors)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    for word in secret or ():
        text = text.replace(word, "***")
    return text


def _pg_password(url) -> list:
    """The texts to scrub from errors about *url*: its password(s), raw and decoded."""
    import re
    import urllib.parse
    rest = url.split("://", 1)[-1]
    found = []
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        found.append(rest[:at].split(":", 1)[1])
    found += re.findall(r"(?i)[?&]password=([^&#]*)", rest)
    found += [urllib.parse.unquote(w) for w in found]
    return sorted({w for w in found if w}, key=len, reverse=True)


import functools  # noqa: E402 - stdlib


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """SQLite-dialect SQL as mqbtt writes it -> psycopg: ``?`` -> ``%s`` (and
    ``%`` -> ``%%``) outside quotes; ``instr(col, ?)`` -> ``position(? in col)``."""
    import re
    sql = re.sub(r"\binstr\(\s*([A-Za-z_][\w.]*)\s*,\s*\?\s*\)", r"position(? in \1)", sql,
                 flags=re.I)
    out, quote = [], None
    for ch in sql:
        if quote:
            out.append("%%" if ch == "%" else ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out)


@functools.lru_cache(maxsize=64)
def _pg_insert_sql(n: int) -> str:
    return ("INSERT INTO messages (timestamp, pair_id, subtopic, message) VALUES "
            + ", ".join(["(%s, %s, %s, %s)"] * n))


class _PGCursor:
    """A psycopg cursor seen as a sqlite3 cursor (``lastrowid`` of an INSERT)."""
    __slots__ = ("_cur", "lastrowid")

    def __init__(self, cur, returning):
        self._cur = cur
        self.lastrowid = cur.fetchone()[0] if returning else None

    def __getattr__(self, name):
        return getattr(self._cur, name)

    def __iter__(self):
        return iter(self._cur)


class _PGStream:
    """A server-side cursor (``DECLARE … CURSOR``) on the reading connection:
    ``fetchmany(n)`` fetches the next *n* rows from the server."""

    def __init__(self, owner, cur):
        self._owner, self._cur = owner, cur

    def fetchmany(self, n=1000):
        try:
            return self._cur.fetchmany(n)
        except self._owner._error as err:
            raise MQbtTError(f"cannot read the database {self._owner.display}: "
                             f"{_pg_message(err, self._owner._secret)}") from None

    def __iter__(self):
        while True:
            rows = self.fetchmany(1000)
            if not rows:
                return
            yield from rows

    def close(self):
        cur, self._cur = self._cur, None
        if cur is not None:
            try:
                cur.close()
            finally:
                self._owner._end_stream()


class _PGConnection:
    """The PostgreSQL backend of :class:`MQbtTDataBase` (psycopg 3), shaped
    like the sqlite3.Connection it replaces.

    Statements run in autocommit mode unless a ``BEGIN`` opened a transaction
    (as with ``sqlite3.connect(isolation_level=None)``).  Streaming queries
    (:meth:`stream`) run on a second connection opened on first use, inside
    one read transaction shared by the open streams, so that they never see
    (or end) the writer's transactions.  Errors become :class:`MQbtTError`
    (one line, without the password)."""

    backend = "postgresql"

    def __init__(self, url: str, display: str, connect_timeout: float = 10.0):
        psycopg = _psycopg()
        scheme, rest = url.split("://", 1)
        url = scheme.lower() + "://" + rest    # libpq knows the lowercase schemes only
        self._url, self.display = url, display
        self._secret = _pg_password(url)
        userinfo = rest[:rest.rfind("@")] if "@" in rest else ""
        if ":" in userinfo and "?" not in userinfo and ("@" in userinfo or "/" in userinfo):
            # libpq ends the user info at the first '@' or '/': the rest of the
            # password would become the host or database name (and show in errors)
            raise MQbtTError(f"cannot open the database {display}: the password in the URL must be "
                             "percent-encoded ('@' as %40, '/' as %2F)")
        self._error = psycopg.Error
        self._timeout = connect_timeout
        self._pg = self._connect(autocommit=True)
        self._reader = None
        #: monotonic time when the write in progress started (0: none)
        self.busy = 0
        self._streams = 0
        self._names = 0
        self._rlock = threading.Lock()

    def _connect(self, autocommit):
        psycopg = _psycopg()
        try:
            return psycopg.connect(self._url, autocommit=autocommit, application_name="mqbtt",
                                   connect_timeout=max(1, int(self._timeout)))
        except psycopg.Error as err:
            raise MQbtTError(f"cannot open the database {self.display}: "
                             f"{_pg_message(err, self._secret)}") from None
        except (ValueError, TypeError) as err:   # a URL libpq cannot parse
            raise MQbtTError(f"cannot open the database {self.display}: "
                             f"{_pg_message(err, self._secret)}") from None

    def _fail(self, err, what="use"):
        return MQbtTError(f"cannot {what} the database {self.display}: {_pg_message(err, self._secret)}")

    # -- the sqlite3.Connection surface ------------------------------------------
    def execute(self, sql, params=()):
        q = _pg_sql(sql)
        # sqlite3's lastrowid of an INSERT into messages: RETURNING id
        returning = (bool(params) and " ".join(q.split()[:3]).upper() == "INSERT INTO MESSAGES"
                     and "RETURNING" not in q.upper())
        if returning:
            q += " RETURNING id"
        try:
            # always a tuple, even empty: psycopg then turns %% back into %
            return _PGCursor(self._pg.execute(q, tuple(params or ())), returning)
        except self._error as err:
            raise self._fail(err) from None

    def executemany(self, sql, rows):
        try:
            with self._pg.cursor() as cur:
                cur.executemany(_pg_sql(sql), rows)
        except self._error as err:
            raise self._fail(err, "write to") from None

    def close(self):
        try:
            if self._reader is not None:
                self._reader.close()
        finally:
            self._reader = None
            self._pg.close()

    # -- PostgreSQL only -----------------------------------------------------------
    def create_schema(self):
        """Create the ``messages`` table and its indices if missing (under an
        advisory lock, so that recorders starting together don't race)."""
        try:
            if self._pg.execute("SELECT to_regclass('messages')").fetchone()[0] is not None:
                return
            with self._pg.transaction():
                self._pg.execute("SELECT pg_advisory_xact_lock(hashtext('mqbtt-schema'))")
                self._pg.execute(_PG_SCHEMA)
                for sql in _INDICES:
                    self._pg.execute(sql)
        except self._error as err:
            raise self._fail(err) from None

    def insert_rows(self, rows):
        """Insert ``(timestamp, pair_id, subtopic, payload)`` rows and commit:
        one statement (one round trip, atomic in autocommit mode) per 1000 rows."""
        self.busy = time.monotonic()   # for _pg_watchdog
        try:
            if len(rows) <= 1000:
                self._pg.execute(_pg_insert_sql(len(rows)), [v for r in rows for v in r])
                return
            with self._pg.transaction():
                for i in range(0, len(rows), 1000):
                    part = rows[i:i + 1000]
                    self._pg.execute(_pg_insert_sql(len(part)), [v for r in part for v in r])
        except self._error as err:
            raise self._fail(err, "write to") from None
        except KeyboardInterrupt:
            raise MQbtTError(f"cannot write to the database {self.display}: it did not answer "
                             "(stopped; what was not stored was not acknowledged)") from None
        finally:
            self.busy = 0

    def stream(self, sql, params=()):
        """Run a SELECT through a server-side cursor; return a cursor whose
        ``fetchmany(n)`` fetches *n* rows at a time (memory stays flat)."""
        with self._rlock:
            if self._reader is None:
                self._reader = self._connect(autocommit=False)
            self._streams += 1
            self._names += 1
            name = f"mqbtt_stream_{self._names}"
        try:
            cur = self._reader.cursor(name=name)
            cur.itersize = 1000
            cur.execute(_pg_sql(sql), tuple(params or ()))
        except self._error as err:
            self._end_stream()
            raise self._fail(err, "read") from None
        return _PGStream(self, cur)

    def _end_stream(self):
        with self._rlock:
            self._streams -= 1
            if self._streams == 0 and self._reader is not None:
                try:
                    self._reader.commit()   # ends the read transaction: later streams see new rows
                except self._error:
                    self._reader.close()
                    self._reader = None

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (as sqlite3.Connection.in_transaction)."""
        return self._pg.info.transaction_status in (2, 3)   # INTRANS, INERROR

    def claim(self, key: str, what: str, wait: float = 3.0):
        """Hold a session advisory lock on *key* for the life of this
        connection; raise MQbtTError(*what*) if another session holds it
        after *wait* seconds (a killed holder's lock goes with its connection)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                got = self._pg.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                       (key,)).fetchone()[0]
            except self._error as err:
                raise self._fail(err) from None
            if got:
                return
            if time.monotonic() >= deadline:
                raise MQbtTError(what)
            time.sleep(0.2)

    def copy_rows(self, rows, with_ids: bool) -> None:
        """``COPY messages FROM STDIN`` in binary format (the bulk path of :func:`copy`)."""
        cols = "id, timestamp, pair_id, subtopic, message" if with_ids else \
            "timestamp, pair_id, subtopic, message"
        types = (["int8"] if with_ids else []) + ["float8", "text", "text", "bytea"]
        try:
            with self._pg.cursor() as cur:
                with cur.copy(f"COPY messages ({cols}) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(types)
                    write = cp.write_row
                    for r in rows:
                        write(r)
        except self._error as err:
            raise self._fail(err, "write to") from None

    def can_set_ids(self) -> bool:
        """Whether this user may move the id sequence (needed to copy rows with their ids)."""
        return bool(self.execute("SELECT has_sequence_privilege(pg_get_serial_sequence('messages', "
                                 "'id'), 'UPDATE')").fetchone()[0])

    def fix_sequence(self):
        """After rows were copied with their ids: the next id follows the largest."""
        self.execute("SELECT setval(pg_get_serial_sequence('messages', 'id'), "
                     "(SELECT max(id) FROM messages))")


def check_share_group(group) -> str:
    """*group* if it can name a shared subscription (``$share/<group>/…``):
    non-empty, no ``/``, ``+``, ``#`` or control characters; else ValueError."""
    if not isinstance(group, str) or not group:
        raise ValueError("the share group must be a non-empty string")
    bad = [c for c in group if c in "/+#" or not c.isprintable()]
    if bad:
        raise ValueError(f"the share group {group!r} must not contain {bad[0]!r} "
                         "(no '/', '+', '#' or control characters)")
    return group


def _pg_watchdog(conn, grace: float = 2.0):
    """A SIGALRM handler (armed by :func:`record` once asked to stop): a write
    to the PostgreSQL connection *conn* still waiting for the server after
    *grace* seconds is interrupted (psycopg then cancels it and closes the
    connection; nothing of it was acknowledged, so the broker keeps it)."""
    def on_alarm(signum, frame):
        since = conn.busy
        if since and time.monotonic() - since >= grace:
            conn.busy = 0
            import logging
            logging.getLogger("psycopg").setLevel(logging.ERROR)   # our one line says it
            raise KeyboardInterrupt
    return on_alarm


def _pg_is_recording(url: str) -> bool:
    """Whether the PostgreSQL database *url* has a ``messages`` table (without
    creating it, unlike :class:`MQbtTDataBase`); MQbtTError if unreachable."""
    conn = _PGConnection(url, _redact_db(url))
    try:
        return conn.execute("SELECT to_regclass('messages')").fetchone()[0] is not None
    finally:
        conn.close()


def _claim_pg_recorder(db, client_id: str) -> None:
    """One recorder per client id on a PostgreSQL database: hold an advisory
    lock named after the client id for the recorder's life (released by the
    server when its connection ends, also after a kill)."""
    try:
        db._conn.claim(f"mqbtt-recorder:{client_id}",
                       f"another recorder with client id {client_id!r} is writing {db.path} "
                       "(one recorder per client id: on one machine, give each member of a "
                       "--share group its own --client-id)")
    except BaseException:
        db.close()
        raise


def _db_identity(path) -> tuple:
    """What two names of one database have in common (for refusing a copy
    into itself): the real path of a file, host/port/dbname of a URL."""
    if is_pg_url(path):
        import urllib.parse
        try:
            u = urllib.parse.urlsplit(path)
            host = (u.hostname or os.environ.get("PGHOST") or "localhost").lower()
            if host in ("127.0.0.1", "::1"):
                host = "localhost"
            return ("pg", host, u.port or int(os.environ.get("PGPORT", "5432")),
                    u.path.lstrip("/") or u.username or os.environ.get("PGDATABASE", ""))
        except ValueError:
            return ("pg", path)
    return ("sqlite", os.path.realpath(path))


def _source_key(db) -> tuple:
    """(key, first id): a source recording is known by a hash of its first
    row, so it keeps its identity when its file moves or it is copied."""
    import hashlib
    row = db._conn.execute("SELECT id, timestamp, pair_id, subtopic, message FROM messages "
                           "ORDER BY id LIMIT 1").fetchone()
    if row is None:
        return None, None
    rid, ts, pid, sub, msg = row
    if not isinstance(msg, (bytes, bytearray, memoryview)):
        msg = str(msg).encode("utf-8")
    h = hashlib.sha256(f"{float(ts)!r}\0{pid}\0{sub}\0".encode("utf-8", "surrogateescape"))
    h.update(bytes(msg))
    return "first-row-sha256:" + h.hexdigest(), rid


def copy(src: str, dst: str, *, chunk: int = 50000, progress=None) -> tuple:
    """Copy the recording *src* into *dst*; each is a SQLite path or a
    PostgreSQL URL (SQLite -> PostgreSQL, back, or between two of a kind).

    Idempotent and incremental: *dst* keeps, in its table ``mqbtt_copies``,
    how far (which source id) each source was copied, updated in the same
    transaction as the rows of each chunk.  A second copy of the same source
    therefore adds nothing, a copy of a grown recording adds only the new
    rows, and an interrupted copy resumes where its last chunk committed.  A
    source is known by a hash of its first row, so moving the file or copying
    a copy does not make it look new.  Into a *dst* with no messages the ids
    are kept: the copy is an exact replica.

    :param progress: called with ``(rows_copied_so_far, rows_to_copy)`` after each chunk.
    :returns: ``(copied, skipped)``: rows added now, rows found already copied.
    :raises MQbtTError: for a missing source, a copy into itself, database errors."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, not {chunk!r}")
    for name, path in (("source", src), ("destination", dst)):
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"the {name} database must be a file path or a postgresql:// URL")
    if not is_pg_url(src) and not os.path.isfile(src):
        raise MQbtTError(f"no such database: {src}")
    if is_pg_url(src) and not _pg_is_recording(src):   # never create the source's table
        raise MQbtTError(f"{_redact_db(src)} is not a recording (no messages table)")
    if _db_identity(src) == _db_identity(dst) or (
            not is_pg_url(src) and not is_pg_url(dst) and os.path.exists(dst)
            and os.path.samefile(src, dst)):
        raise MQbtTError(f"{_redact_db(src)} and {_redact_db(dst)} are the same database")
    import sqlite3
    with MQbtTDataBase(src) as s, MQbtTDataBase(dst) as d:
        s._check_open()
        d._check_writable()   # a SQLite destination is created here
        key, first_id = _source_key(s)
        if key is None:
            return 0, 0
        with d._lock:
            d._check_writable()   # a new SQLite file is created here; a read-only one refused
        dpg = d.backend == "postgresql"
        try:
            d._conn.execute(_COPIES_SCHEMA)
            mark = d._conn.execute("SELECT last_id FROM mqbtt_copies WHERE source = ?",
                                   (key,)).fetchone()
            start = mark[0] if mark else first_id - 1
            if mark is None and _source_key(d)[0] == key:
                # *dst* holds the same recording (the origin of *src*, or a
                # copy with its ids): only rows after its last id are new
                start = max(start, d._conn.execute("SELECT max(id) FROM messages").fetchone()[0])
            keep_ids = mark is None and d._conn.execute(
                "SELECT 1 FROM messages LIMIT 1").fetchone() is None
            if keep_ids and dpg and not d._conn.can_set_ids():
                keep_ids = False   # ids from the sequence: explicit ones would collide later
            total, before = s._conn.execute(
                "SELECT count(*), count(CASE WHEN id <= ? THEN 1 END) FROM messages",
                (start,)).fetchone()
        except sqlite3.Error as err:
            raise MQbtTError(f"cannot use the database {d.path}: {err}") from None
        todo = total - before
        sql = ("SELECT id, timestamp, pair_id, subtopic, message FROM messages WHERE id > ? "
               "ORDER BY id")
        # into an empty destination: one transaction, the indices dropped and
        # built again at the end (several times faster than maintaining them
        # row by row); otherwise one transaction per chunk, so that an
        # interrupted copy resumes after its last committed chunk
        bulk = keep_ids and todo > chunk
        if not dpg:
            d._conn.execute("PRAGMA cache_size = -262144")   # up to 256 MiB for this connection
        cur = (s._conn.stream if s.backend == "postgresql" else s._conn.execute)(sql, (start,))
        copied = 0
        origin = s.path
        try:
            if bulk:
                d._conn.execute("BEGIN")
                try:
                    for index in _INDICES:
                        d._conn.execute(f"DROP INDEX IF EXISTS {index.split()[5]}")
                except (MQbtTError, sqlite3.Error):   # not the table's owner: row by row
                    d._conn.execute("ROLLBACK")
                    bulk = False
            while True:
                rows = cur.fetchmany(chunk)
                if not rows:
                    break
                last = rows[-1][0]
                if any(r[4].__class__ is not bytes for r in rows):
                    rows = [r if r[4].__class__ is bytes else
                            (*r[:4], r[4].encode("utf-8") if isinstance(r[4], str) else bytes(r[4] or b""))
                            for r in rows]
                if not bulk:
                    d._conn.execute("BEGIN")
                if dpg:
                    d._conn.copy_rows(rows if keep_ids else [r[1:] for r in rows], keep_ids)
                elif keep_ids:
                    d._conn.executemany("INSERT INTO messages (id, timestamp, pair_id, subtopic, "
                                        "message) VALUES (?, ?, ?, ?, ?)", rows)
                else:
                    d._conn.executemany("INSERT INTO messages (timestamp, pair_id, subtopic, "
                                        "message) VALUES (?, ?, ?, ?)", [r[1:] for r in rows])
                d._conn.execute(
                    "INSERT INTO mqbtt_copies (source, last_id, copied, origin, updated) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET "
                    "last_id = excluded.last_id, copied = mqbtt_copies.copied + excluded.copied, "
                    "origin = excluded.origin, updated = excluded.updated",
                    (key, last, len(rows), origin, time.time()))
                if not bulk:
                    d._conn.execute("COMMIT")
                copied += len(rows)
                if progress is not None:
                    progress(copied, todo)
            if bulk:
                for index in _INDICES:
                    d._conn.execute(index)
                d._conn.execute("COMMIT")
        except BaseException as err:
            try:
                d._conn.execute("ROLLBACK")
            except Exception:
                pass
            if isinstance(err, sqlite3.Error):
                raise MQbtTError(f"cannot copy {s.path} to {d.path}: {err}") from None
            raise
        finally:
            cur.close()
        if dpg and keep_ids and copied:
            d._conn.fix_sequence()
        return copied, before


###############################################################################
# External services: AxeOS and OpenObserve ####################################
###############################################################################

#: Default timeout, in seconds, of every AxeOS and OpenObserve HTTP call (and
#: of the websocket handshake of :func:`wslog`).
HTTP_TIMEOUT = 10.0

#: The networks ESP-Miner (AxeOS) answers; any other client gets ``401``.
AXEOS_PRIVATE_NETWORKS = "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16"

# CSI sequences (colours: ESC [ 0 ; 32 m), OSC sequences and two-byte escapes
_ANSI_PATTERN = r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])"


def config_path() -> str:
    """The path of the user configuration file: ``$MQBTT_CONFIG`` if set, else
    ``$XDG_CONFIG_HOME/mqbtt/config.ini`` (``~/.config/mqbtt/config.ini``
    when ``$XDG_CONFIG_HOME`` is not set).

    The file is INI: a ``[pairs]`` section maps pair ids to AxeOS addresses
    (an IP address, ``host``, ``host:port`` or an ``http(s)://`` URL) and an
    ``[openobserve]`` section gives ``url``, ``org``, ``stream``, ``user`` and
    ``password``::

        [pairs]
        test = 192.168.1.50
        gamma01 = 10.0.0.7:8080

        [openobserve]
        url = https://o2.example.org
        org = default
        stream = history
        user = me@example.org
        password = ...
    """
    path = os.environ.get("MQBTT_CONFIG")
    if path:
        return os.path.expanduser(path)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "mqbtt", "config.ini")


def _config():
    """The parsed configuration file (empty when the default file is absent).

    Warns once (on the ``mqbtt`` logger, as ssh does for its keys) when the
    file holds a password and others than its owner may read it.

    :raises MQbtTConfigError: (a :exc:`ValueError`) if ``$MQBTT_CONFIG``
      names a missing file, or the file is unreadable or not valid INI (the
      message gives the file and line number, never line contents, which
      may hold a password)."""
    import configparser
    path = config_path()
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # pair ids are case-sensitive
    import stat
    try:
        # O_NONBLOCK: a FIFO (or a device) must not hang the open; only regular files are read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise MQbtTConfigError(f"invalid configuration file {path}: not a regular file", path)
            data = f.read((1 << 20) + 1)
    except FileNotFoundError:
        if os.environ.get("MQBTT_CONFIG"):
            raise MQbtTConfigError(f"configuration file {path} (from $MQBTT_CONFIG) does not "
                                   "exist", path) from None
        return cp
    except OSError as err:
        raise MQbtTConfigError(f"cannot read configuration file {path}: "
                               f"{err.strerror or type(err).__name__}", path) from None
    if len(data) > 1 << 20:
        raise MQbtTConfigError(f"invalid configuration file {path}: larger than 1 MiB", path)
    try:
        text = data.decode("utf-8-sig")  # a byte order mark (Windows editors) is not content
    except UnicodeDecodeError as err:
        lineno = err.object.count(b"\n", 0, err.start) + 1  # (the object has no BOM)
        raise MQbtTConfigError(f"invalid configuration file {path}, line {lineno}: "
                               "not UTF-8 text", path, lineno) from None
    try:
        cp.read_string(text, source=path)
    except configparser.Error as err:
        raise _config_error(path, err) from None
    _warn_if_exposed(path, mode, cp)
    return cp


def _config_error(path: str, err) -> "MQbtTConfigError":
    """A one-line :exc:`MQbtTConfigError` for the configparser error *err*:
    the file, the line number(s) and the kind of error, never a line's content."""
    import configparser
    errors = getattr(err, "errors", None) or []   # ParsingError (3.12+: not on its subclasses)
    numbers = [n for n, *_ in errors if isinstance(n, int)]
    lineno = getattr(err, "lineno", None)
    if lineno is not None and lineno not in numbers:
        numbers.insert(0, lineno)
    where = (f", line {numbers[0]}" if len(numbers) == 1 else
             f", lines {', '.join(map(str, numbers))}" if numbers else "")
    if isinstance(err, configparser.MissingSectionHeaderError):
        what = "a setting before the first [section] header"
    elif isinstance(err, configparser.DuplicateSectionError):
        what = f"section [{safe_text(err.section)}] appears twice"
    elif isinstance(err, configparser.DuplicateOptionError):
        what = f"'{safe_text(err.option)}' appears twice in section [{safe_text(err.section)}]"
    elif isinstance(err, configparser.ParsingError):
        what = "expected a [section] header or a 'key = value' line"
    else:
        what = f"not a valid INI file ({type(err).__name__})"
    return MQbtTConfigError(f"invalid configuration file {path}{where}: {what}", path,
                            numbers[0] if numbers else None)


_exposed_warned = set()


def _warn_if_exposed(path: str, mode: int, cp) -> None:
    """Log a warning (once per file) if *cp* holds a password and the file's
    permissions let others than its owner read it."""
    import stat
    if not mode & 0o077 or path in _exposed_warned:
        return
    if not any(cp.get(section, "password", fallback="") for section in cp.sections()):
        return
    _exposed_warned.add(path)
    log.warning("WARNING: UNPROTECTED CONFIGURATION FILE! Permissions %04o for '%s' are too "
                "open: it holds a password that other users can read. Run: chmod 600 '%s'",
                stat.S_IMODE(mode), path, path)


def _base_url(text: str, what: str) -> str:
    """``scheme://host[:port][/path]`` (no trailing slash) from an address
    given as IP, host, ``host:port`` or ``http(s)://`` URL."""
    from urllib.parse import urlsplit
    t = text.strip() if isinstance(text, str) else ""
    if not t:
        raise ValueError(f"invalid {what}: empty")
    if "://" not in t:
        if t.count(":") > 1 and not t.startswith("["):  # a bare IPv6 address
            t = f"[{t}]"
        t = "http://" + t
    try:
        u = urlsplit(t)
        u.port
    except ValueError as err:
        raise ValueError(f"invalid {what} {_redact(text)!r}: {err}") from None
    if (u.scheme.lower() not in ("http", "https") or not u.hostname
            or any(c.isspace() or c == "\\" for c in u.netloc) or not u.netloc.isprintable()):
        # (a backslash ends the host for urllib3, not for urlsplit: "u:pw\\x@h" is host "u")
        raise ValueError(f"invalid {what} {_redact(text)!r}: an IP address, host, host:port "
                         "or http(s):// URL is expected")
    return f"{u.scheme.lower()}://{u.netloc}{u.path.rstrip('/')}"


def pid2url(pid: str) -> str:
    """Converts a pair identifier to the corresponding AxeOS API base URL.

    The pair ids are looked up in the ``[pairs]`` section of the
    configuration file (see :func:`config_path`).  If the *pid* is not known,
    it is returned as is, assuming it is an IP address (or ``host``,
    ``host:port``), made into ``http://host[:port]``.

    :param pid: The pair identifier or IP address of the device.
    :returns: The base URL of the AxeOS API for the given pair identifier or
      IP address (example: ``http://192.168.1.50``).
    :raises ValueError: for an unusable address or configuration file."""
    if not isinstance(pid, str) or not pid.strip():
        raise ValueError(f"invalid pair id {pid!r}: a non-empty string is required")
    cp = _config()
    target = cp.get("pairs", pid, fallback=None) if cp.has_section("pairs") else None
    if target is None:
        return _base_url(pid, "pair id or device address")
    return _base_url(target, f"address of pair {pid!r} in {config_path()}")


def _net_reason(err) -> tuple:
    """``(connected, reason)`` for a :mod:`requests` connection error:
    whether the TCP connection had been established, and a short reason."""
    import re
    text = str(err)
    connected = not any(k in text for k in ("NewConnectionError", "NameResolutionError",
                                            "Failed to establish", "Failed to resolve"))
    for pattern in (r"\[Errno -?\d+\] ([^'\"\)\]]+)", r"Error\(-?\d+, '([^']+)'\)",
                    r"RemoteDisconnected\('([^']+)'\)", r"Failed to resolve '([^']+)'"):
        m = re.search(pattern, text)
        if m:
            reason = m.group(1).strip().rstrip(".")
            if pattern.startswith("Failed"):
                reason = f"cannot resolve host {m.group(1)}"
            return connected, reason[:1].lower() + reason[1:]
    return connected, type(err).__name__


def _http(method: str, url: str, what: str, *, timeout=None, auth=None, json_body=None,
          no_retry_hint: bool = False):
    """One HTTP call with a timeout, never retried, redirects not followed.

    Network errors and timeouts become :exc:`APIException` ("*what*: METHOD
    URL: reason"); the response is returned whatever its status."""
    requests = _require("requests")
    timeout = HTTP_TIMEOUT if timeout is None else float(timeout)
    where = f"{method} {_redact(url)}"
    hint = ("; the device may restart anyway: check it with 'axeos_info' before trying again"
            if no_retry_hint else "")
    try:
        return _bounded_request(method, url, timeout, HTTP_MAX_BYTES, auth=auth, json=json_body,
                                headers={"Accept": "application/json, text/plain;q=0.9, */*;q=0.5",
                                         "User-Agent": f"mqbtt/{__version__}"})
    except _AnswerTooLarge:
        raise APIException(f"{what}: {where}: the answer is larger than {HTTP_MAX_BYTES} bytes "
                           "(mqbtt.HTTP_MAX_BYTES)") from None
    except requests.exceptions.ConnectTimeout:
        raise APIException(f"{what}: {where}: cannot connect within {timeout:g} s") from None
    except requests.exceptions.RequestException as err:
        if _deadline_passed(err):   # per-read timeout, or the total deadline
            raise APIException(f"{what}: {where}: no answer within {timeout:g} s{hint}") from None
        if isinstance(err, requests.exceptions.ConnectionError):
            connected, reason = _net_reason(err)
            if connected:
                raise APIException(f"{what}: {where}: connection lost before an answer "
                                   f"({reason}){hint}") from None
            raise APIException(f"{what}: {where}: cannot connect ({reason})") from None
        raise APIException(f"{what}: {where}: {type(err).__name__}: "
                           f"{safe_text(_scrub_url(' '.join(str(err).split()), url)[:200])}") from None


def _scrub_url(text: str, url: str) -> str:
    """*text* (an error message that may quote *url*) with *url*'s password hidden."""
    text = text.replace(url, _redact(url))
    _, userinfo, _ = _split_userinfo(url)
    password = userinfo.partition(":")[2] if userinfo else ""
    return text.replace(password, "***") if password else text


def _snippet(r, limit: int = 200) -> str:
    """The start of a response body, on one line (empty if there is none)."""
    try:
        text = " ".join(r.text.split())
    except Exception:  # pragma: no cover - undecodable body
        text = ""
    return safe_text(text[:limit]) + ("..." if len(text) > limit else "")


class _AxeOSUnauthorized(APIException):
    """AxeOS answered 401: the client is not on a private network."""


def _check_axeos(r, what: str) -> None:
    where = f"{r.request.method} {_redact(r.url)}"
    if 200 <= r.status_code < 300:
        return
    if r.status_code == 401:
        raise _AxeOSUnauthorized(
            f"{what}: {where}: 401 Unauthorized: AxeOS only answers clients on private "
            f"networks ({AXEOS_PRIVATE_NETWORKS}); run this from the miner's LAN or "
            "through a proxy with a private address")
    body = _snippet(r)
    if 300 <= r.status_code < 400:
        body = f"redirect to {_redact(r.headers.get('Location', '?'))}"
    raise APIException(f"{what}: {where}: HTTP {r.status_code} {safe_text(r.reason or '')}".rstrip()
                       + (f" ({body})" if body else ""))


def axeos_info(pid: str, *, timeout: float | None = None) -> dict:
    """Get system information from the AxeOS API (``GET /api/system/info``).

    :param pid: The pair identifier or IP address of the device.
    :param timeout: seconds to wait for the device (default :data:`HTTP_TIMEOUT`).
    :returns: A dictionary containing the system information (ESP-Miner's
      ``SystemInfo``: ``ASICModel``, ``hostname``, ``version``, ``hashRate``,
      ``uptimeSeconds``, ...).
    :raises APIException: on network errors (including timeouts), an HTTP
      error status (401: the client is not on a private network) or an answer
      that is not a JSON object."""
    r = _http("GET", pid2url(pid) + "/api/system/info", "AxeOS system info", timeout=timeout)
    _check_axeos(r, "AxeOS system info")
    try:
        info = r.json()
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise APIException(f"AxeOS system info: GET {_redact(r.url)}: the answer is not a JSON "
                           f"object ({_snippet(r, 80) or 'empty'})")
    return info


def axeos_restart(pid: str, *, timeout: float | None = None) -> None:
    """Restart the device using the AxeOS API (``POST /api/system/restart``).

    Any 2xx answer is success: firmware up to v2.12 answers ``text/plain``
    "System will restart shortly.", later versions the same text as JSON
    ``{"message": ...}``; the device restarts about a second later.  The
    request is never retried (a lost answer does not mean a lost restart).

    :param pid: The pair identifier or IP address of the device.
    :param timeout: seconds to wait for the device (default :data:`HTTP_TIMEOUT`).
    :raises APIException: on network errors (including timeouts) or an HTTP
      error status."""
    r = _http("POST", pid2url(pid) + "/api/system/restart", "AxeOS restart",
              timeout=timeout, no_retry_hint=True)
    _check_axeos(r, "AxeOS restart")
    log.debug("AxeOS restart of %s requested: %s", _redact(r.url), _snippet(r, 80))


@dataclass(frozen=True)
class _O2Settings:
    url: str
    org: str
    stream: str
    user: str | None
    password: str | None = dataclasses.field(default=None, repr=False)


def _o2_settings() -> _O2Settings:
    """OpenObserve settings: ``$MQBTT_O2_*`` over the ``[openobserve]`` section.

    :raises APIException: if no URL is configured."""
    cp = _config()
    section = cp["openobserve"] if cp.has_section("openobserve") else {}

    def get(key, default=None):
        return os.environ.get("MQBTT_O2_" + key.upper()) or section.get(key) or default

    url = get("url")
    if not url:
        raise APIException("OpenObserve is not configured: set $MQBTT_O2_URL, or 'url' in the "
                           f"[openobserve] section of {config_path()}")
    return _O2Settings(url=_base_url(url, "OpenObserve URL"), org=get("org", "default"),
                       stream=get("stream", "history"), user=get("user"),
                       password=get("password"))


def _o2_answer(r, s: _O2Settings, where: str) -> None:
    """Check an OpenObserve ingestion answer, raise APIException if the
    record was not stored."""
    what = "OpenObserve history"
    if r.status_code == 401:
        raise APIException(f"{what}: {where}: 401 Unauthorized: check the user and password "
                           "($MQBTT_O2_USER / $MQBTT_O2_PASSWORD, or the [openobserve] section "
                           f"of {config_path()})")
    try:
        answer = r.json()
    except ValueError:
        answer = None
    if not 200 <= r.status_code < 300:
        detail = answer.get("message") or answer.get("error") if isinstance(answer, dict) else None
        raise APIException(f"{what}: {where}: HTTP {r.status_code} {safe_text(r.reason or '')}".rstrip()
                           + f" ({safe_text(' '.join(str(detail).split())[:200]) if detail else _snippet(r)})")
    if not isinstance(answer, dict):
        raise APIException(f"{what}: {where}: the answer is not a JSON object "
                           f"({_snippet(r, 80) or 'empty'})")
    if answer.get("error"):
        raise APIException(f"{what}: {where}: OpenObserve reports an error: "
                           f"{safe_text(' '.join(str(answer['error']).split())[:200])}")
    if answer.get("code", 200) != 200:
        raise APIException(f"{what}: {where}: OpenObserve answered code {answer.get('code')}"
                           + (f" ({safe_text(' '.join(str(answer['message']).split())[:200])})"
                              if answer.get("message") else ""))
    status = answer.get("status")
    if not isinstance(status, list) or not all(isinstance(x, dict) for x in status):
        raise APIException(f"{what}: {where}: the answer has no per-stream status "
                           f"({_snippet(r, 80)})")
    ok = 0
    for entry in status:
        try:
            failed, successful = int(entry.get("failed", 0)), int(entry.get("successful", 0))
        except (TypeError, ValueError):
            raise APIException(f"{what}: {where}: unusable per-stream status ({_snippet(r, 80)})") from None
        if failed:
            error = entry.get("error")
            raise APIException(
                f"{what}: {where}: OpenObserve dropped the record (stream "
                f"{safe_text(entry.get('name', s.stream))!r}: {successful} successful, {failed} failed"
                + (f": {safe_text(' '.join(str(error).split())[:200])}" if error else "") + ")")
        ok += successful
    if ok < 1:
        raise APIException(f"{what}: {where}: OpenObserve stored no record ({_snippet(r, 80)})")


def o2_history(pid: str, detail: str, *, timeout: float | None = None, **fields) -> None:
    """Log an event to OpenObserve history stream.

    POSTs one JSON record (in a JSON array) to
    ``{url}/api/{org}/{stream}/_json`` with HTTP basic auth, taking URL,
    organisation (default ``default``), stream (default ``history``), user
    and password from ``$MQBTT_O2_URL``, ``$MQBTT_O2_ORG``,
    ``$MQBTT_O2_STREAM``, ``$MQBTT_O2_USER``, ``$MQBTT_O2_PASSWORD`` or the
    ``[openobserve]`` section of the configuration file (see
    :func:`config_path`).  The record holds ``_timestamp`` (now, in
    microseconds), ``pid``, ``detail``, ``host``, ``source`` (``mqbtt``) and
    any extra *fields*.

    OpenObserve answers 200 even when it drops records, so the per-stream
    ``failed`` counts of its answer are checked too.

    :param pid: The pair identifier or IP address of the device.
    :param detail: The detail to log in the history.
    :param timeout: seconds to wait for OpenObserve (default :data:`HTTP_TIMEOUT`).
    :raises APIException: if OpenObserve is not configured, on network
      errors (including timeouts), an HTTP error status, or an answer that
      does not report the record as stored.  Messages never contain the
      password."""
    import socket
    from urllib.parse import quote
    s = _o2_settings()
    record = {"_timestamp": int(time.time() * 1_000_000), "pid": str(pid),
              "detail": "" if detail is None else str(detail), "host": socket.gethostname(),
              "source": "mqbtt", "mqbtt_version": __version__}
    record.update(fields)
    url = f"{s.url}/api/{quote(s.org, safe='')}/{quote(s.stream, safe='')}/_json"
    # requests would encode the credentials as Latin-1; UTF-8 bytes serve every password
    auth = (s.user.encode("utf-8"), (s.password or "").encode("utf-8")) if s.user else None
    try:
        r = _http("POST", url, "OpenObserve history", timeout=timeout, auth=auth,
                  json_body=[record])
        _o2_answer(r, s, f"POST {_redact(url)}")
    except APIException as err:
        if s.password and s.password in str(err):
            raise APIException(str(err).replace(s.password, "***")) from None
        raise


def _wait_back(pid: str, url: str, before: dict | None, t0: float, wait: float,
               timeout: float | None) -> tuple:
    """Poll ``/api/system/info`` with back-off until the device answers with
    a reset ``uptimeSeconds``; ``(info, seconds since the restart request)``."""
    old = before.get("uptimeSeconds") if before else None
    old = old if isinstance(old, (int, float)) else None
    deadline = t0 + wait
    delay, last_err, was_down = 0.5, None, False
    per_call = min(HTTP_TIMEOUT if timeout is None else timeout, 5.0)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise APIException(f"AxeOS restart: {pid} ({url}) did not answer again within "
                               f"{wait:g} s of the restart request"
                               + (f" (last error: {last_err})" if last_err else ""))
        time.sleep(min(delay, left))
        delay = min(delay * 2, 10.0)
        try:
            info = axeos_info(pid, timeout=max(0.2, min(per_call, deadline - time.monotonic())))
        except _AxeOSUnauthorized:
            raise
        except APIException as err:
            last_err, was_down = err, True
            continue
        elapsed = time.monotonic() - t0
        up = info.get("uptimeSeconds")
        if isinstance(up, (int, float)) and old is not None:
            if up < old + elapsed - 2:
                return info, elapsed
        elif was_down:
            return info, elapsed


def restart(pid: str, detail: str = "", *, wait: float | None = None, history: bool = True,
            timeout: float | None = None, progress=None) -> dict:
    """Restart an AxeOS miner, record the event in the OpenObserve history
    stream and optionally wait until the device answers again.

    With *history*, OpenObserve must be configured (checked before the device
    is touched); the event is recorded with ``event="restart"`` and, after
    waiting, a second ``event="back online"`` with the ``downtime``.  The
    restart is never retried.  With *wait* (seconds), ``/api/system/info`` is
    polled with back-off (0.5 s doubling to 10 s) until ``uptimeSeconds``
    shows that the device rebooted.

    :param pid: The pair identifier or IP address of the device.
    :param detail: The reason of the restart, recorded in the history.
    :param wait: wait up to this many seconds for the device to come back.
    :param history: whether to record the event in OpenObserve.
    :param timeout: seconds each HTTP call may take (default :data:`HTTP_TIMEOUT`).
    :param progress: called with a one-line message at each step (optional).
    :returns: a dict with ``pid``, ``url``, ``recorded`` (bool),
      ``downtime`` (seconds from the restart request to the first answer
      after the reboot, or None) and ``info`` (the system info then, or None).
    :raises APIException: if any step fails (when the restart was requested
      but recording it failed, the message says so)."""
    say = progress or (lambda message: None)
    url = pid2url(pid)
    if history:
        _o2_settings()
    before = axeos_info(pid, timeout=timeout) if wait is not None else None
    t0 = time.monotonic()
    axeos_restart(pid, timeout=timeout)
    say(f"restart of {pid} ({url}) requested")
    result = {"pid": pid, "url": url, "recorded": False, "downtime": None, "info": None}
    failure = None
    if history:
        try:
            o2_history(pid, detail, timeout=timeout, event="restart")
            result["recorded"] = True
            say("restart recorded in the OpenObserve history")
        except APIException as err:
            failure = err
    if wait is not None:
        say(f"waiting up to {wait:g} s for {pid} to answer again")
        info, downtime = _wait_back(pid, url, before, t0, wait, timeout)
        result.update(info=info, downtime=downtime)
        up = info.get("uptimeSeconds")
        say(f"{pid} is back after {downtime:.1f} s" + (f" (uptime {up} s)" if up is not None else ""))
        if history and failure is None:
            try:
                o2_history(pid, f"back online after {downtime:.1f} s", timeout=timeout,
                           event="back online", downtime=round(downtime, 3))
            except APIException as err:
                failure = err
    if failure is not None:
        raise APIException(f"the restart of {pid} was requested, but recording it failed: {failure}")
    return result


#: The longest line :func:`wslog` writes, in characters; a longer line is
#: split into pieces of this length, each but the last ending with
#: :data:`WSLOG_SPLIT_MARK` (AxeOS log lines are well under 1000 characters).
WSLOG_MAX_LINE = 16384

#: What ends each piece of a line that :func:`wslog` had to split.
WSLOG_SPLIT_MARK = " [mqbtt: line split]"

#: The largest websocket frame :func:`wslog` accepts, in bytes (AxeOS sends
#: one log line per frame); a larger one drops the connection, which is then
#: re-established as after any loss.  Fragments of a message are taken one
#: frame at a time, never reassembled, so a message without end stays bounded.
WSLOG_MAX_FRAME = 1 << 20


#: The largest websocket handshake answer :func:`wslog` reads, in bytes
#: (AxeOS sends about 150); websocket-client reads header lines of any length.
WSLOG_MAX_HANDSHAKE = 64 << 10


class _HandshakeSocket:
    """A socket that refuses to receive more than *limit* bytes: given to
    websocket-client for the handshake only."""

    def __init__(self, sock, limit: int):
        self._sock, self._left = sock, limit

    def recv(self, bufsize, *args):
        import websocket
        data = self._sock.recv(bufsize, *args)
        self._left -= len(data)
        if self._left < 0:
            raise websocket.WebSocketException(
                f"handshake answer larger than {WSLOG_MAX_HANDSHAKE} bytes")
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _bound_ws_frames(ws, limit: int) -> None:
    """Make the websocket-client connection *ws* refuse, from its header, a
    frame longer than *limit* bytes (websocket-client would read a frame of
    any announced length into memory)."""
    import websocket
    frames = ws.frame_buffer
    recv_length = frames.recv_length

    def bounded_length():
        recv_length()
        if frames.length is not None and frames.length > limit:
            raise websocket.WebSocketProtocolException(
                f"a frame of {frames.length} bytes, more than {limit} (mqbtt.WSLOG_MAX_FRAME)")
    frames.recv_length = bounded_length


def _ws_socket(url: str, deadline: "_Deadline"):
    """The connected (for ``wss``, TLS-wrapped) socket for the websocket
    *url*, registered with *deadline* so the whole handshake, TLS included,
    ends when it passes (websocket-client's timeout is per read)."""
    import socket
    from urllib.parse import urlsplit
    u = urlsplit(url)
    secure = u.scheme == "wss"
    sock = socket.create_connection((u.hostname, u.port or (443 if secure else 80)),
                                    timeout=deadline.left())
    deadline.add(sock)
    if secure:
        import ssl
        try:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        except BaseException:
            sock.close()
            raise
    return sock


def _ws_url(base: str) -> str:
    return ("wss" if base.startswith("https:") else "ws") + base[base.index(":"):] + "/api/ws"


def wslog(pid: str, path: str, *, duration: float | None = None, stop=None,
          timeout: float | None = None, backoff: tuple = (1.0, 60.0), progress=None) -> int:
    """Append the AxeOS websocket log stream (``ws://<host>/api/ws``) to the
    file *path*, one clean line at a time.

    Frames are plain text; they may split a line or join several, and carry
    ANSI colour codes: complete lines are reassembled, stripped of escape
    sequences and ``\\r``, other control characters neutralised (see
    :func:`safe_text`), appended and flushed one by one.  A line longer than
    :data:`WSLOG_MAX_LINE` characters is split, each piece but the last
    ending with :data:`WSLOG_SPLIT_MARK`.  A dropped
    connection is re-established with exponential back-off (*backoff*:
    first and maximum delay in seconds, reset once data flows again); a line
    cut by the drop is written as it is.  The first connection must succeed.

    .. warning:: while the websocket is open the miner stops sending its logs
       over MQTT (so OpenObserve gets none); firmware forks based on ESP-Miner
       before v2.14 resume only after a miner restart.

    :param pid: The pair identifier or IP address of the device.
    :param path: the file to append to (created if needed, UTF-8).
    :param duration: stop after this many seconds (default: run until *stop*
      is set or the caller is interrupted, e.g. Ctrl-C).
    :param stop: a :class:`threading.Event` that ends the function when set.
    :param timeout: seconds for each connection handshake (default :data:`HTTP_TIMEOUT`).
    :param progress: called as ``progress(event, message)`` with *event*
      ``"connected"`` or ``"lost"`` (default: lost connections are logged as
      warnings on the ``mqbtt`` logger).
    :returns: the number of lines written.  A partial line pending when the
      function ends (also on ``KeyboardInterrupt``) is written first.
    :raises APIException: if the first connection fails, or the device
      refuses the stream (401: not on a private network; 404: no log
      websocket).
    :raises OSError: if the file cannot be written."""
    import codecs
    websocket = _require("websocket")
    url = _ws_url(pid2url(pid))
    where = f"AxeOS websocket log: {_redact(url)}"
    say = progress or (lambda event, message: event == "lost" and log.warning("wslog: %s", message))
    connect_timeout = HTTP_TIMEOUT if timeout is None else float(timeout)
    t_end = None if duration is None else time.monotonic() + duration

    def stopping():
        return ((stop is not None and stop.is_set())
                or (t_end is not None and time.monotonic() >= t_end))

    def pause(seconds):
        end = time.monotonic() + seconds
        if t_end is not None:
            end = min(end, t_end)
        while not stopping():
            left = end - time.monotonic()
            if left <= 0:
                return
            if stop is not None:
                stop.wait(min(left, 0.5))
            else:
                time.sleep(min(left, 0.5))

    count = 0
    pending = ""
    first = True
    delay = backoff[0]
    with open(path, "a", encoding="utf-8") as f:
        def emit(text):
            nonlocal count
            f.write(safe_text(text.replace("\r", "")) + "\n")
            f.flush()
            count += 1

        def take_lines(text):
            """Add *text* to the pending line; write every complete line, and
            split a line longer than WSLOG_MAX_LINE (each piece but the last
            ends with WSLOG_SPLIT_MARK).  Only new text is scanned, and the
            pending line stays bounded: linear in the stream's length."""
            nonlocal pending
            *lines, rest = text.split("\n")
            for line in lines:
                _long(pending + line)
                pending = ""
            pending += rest
            if len(pending) > WSLOG_MAX_LINE:
                pending = _long(pending, keep_tail=True)

        def _long(line, keep_tail=False):
            """Write *line* in pieces of WSLOG_MAX_LINE characters; with
            *keep_tail*, return the last (incomplete) piece instead."""
            start = 0
            while len(line) - start > WSLOG_MAX_LINE:
                emit(line[start:start + WSLOG_MAX_LINE] + WSLOG_SPLIT_MARK)
                start += WSLOG_MAX_LINE
            if keep_tail:
                return line[start:]
            emit(line[start:])
            return ""

        decoder = None
        try:
            while not stopping():
                ws = None
                deadline = _Deadline(connect_timeout)  # the handshake's total deadline
                try:
                    sock = _ws_socket(url, deadline)
                    ws = websocket.create_connection(url, timeout=connect_timeout,
                                                     suppress_origin=True,
                                                     skip_utf8_validation=True,
                                                     redirect_limit=0,  # no redirect followed
                                                     fire_cont_frame=True,  # fragments one by one
                                                     socket=_HandshakeSocket(
                                                         sock, WSLOG_MAX_HANDSHAKE))
                    ws.sock = sock   # the handshake is over: the plain socket again
                    _bound_ws_frames(ws, WSLOG_MAX_FRAME)
                except websocket.WebSocketBadStatusException as err:
                    code = err.status_code
                    if code == 401:
                        raise _AxeOSUnauthorized(
                            f"{where}: 401 Unauthorized: AxeOS only answers clients on private "
                            f"networks ({AXEOS_PRIVATE_NETWORKS})") from None
                    if code == 404:
                        raise APIException(f"{where}: 404 Not Found: this firmware has no "
                                           "websocket log") from None
                    reason = f"HTTP {code}"
                    if code == 429:
                        reason += " Too Many Requests (AxeOS serves at most 10 websocket clients)"
                    elif first:
                        raise APIException(f"{where}: handshake refused ({reason})") from None
                except (OSError, websocket.WebSocketException) as err:
                    reason = (err.strerror if isinstance(err, OSError) and err.strerror
                              else " ".join(str(err).split())[:200] or type(err).__name__)
                    if deadline.fired:
                        reason = f"no handshake answer within {connect_timeout:g} s"
                    reason = safe_text(reason)
                    if first:
                        raise APIException(f"{where}: cannot connect ({reason[:1].lower() + reason[1:]})") from None
                finally:
                    deadline.close()
                if ws is not None:
                    first = False
                    say("connected", f"connected to {_redact(url)}, appending to {path}")
                    got_data = False
                    decoder = codecs.getincrementaldecoder("utf-8")("replace")
                    reason = "closed by the device"
                    broken = False   # after a receive error the stream is unusable: no closing handshake
                    try:
                        ws.settimeout(0.5)
                        while not stopping():
                            try:
                                opcode, data = ws.recv_data()
                            except websocket.WebSocketTimeoutException:
                                continue
                            if opcode == websocket.ABNF.OPCODE_CLOSE:
                                break
                            got_data = True
                            take_lines(decoder.decode(data if isinstance(data, bytes) else data.encode()))
                    except (OSError, websocket.WebSocketException) as err:
                        reason = safe_text(" ".join(str(err).split())[:200] or type(err).__name__)
                        broken = True
                    finally:
                        pending += decoder.decode(b"", final=True)
                        decoder = None
                        try:
                            if not broken:   # (close() reads on: the rest of a refused frame)
                                ws.close(timeout=1)
                        except Exception:
                            pass
                        finally:
                            ws.shutdown()  # close the socket even if the handshake failed
                    if pending and not stopping():
                        emit(pending)  # the rest of this line is lost with the connection
                        pending = ""
                    if got_data:
                        delay = backoff[0]
                if stopping():
                    break
                say("lost", f"{_redact(url)}: connection lost ({reason}); "
                            f"reconnecting in {delay:g} s")
                pause(delay)
                delay = min(delay * 2, backoff[1])
        finally:
            if decoder is not None:
                pending += decoder.decode(b"", final=True)
            if pending:
                emit(pending)
    return count


###############################################################################
# Distribution: zipapp, symlinks and upgrade ##################################
###############################################################################

#: Where ``mqbtt upgrade`` looks for releases when neither ``--url`` nor
#: ``$MQBTT_UPGRADE_URL`` is given: a base URL under which ``mqbtt.pyz`` and
#: ``mqbtt.pyz.sha256`` (``sha256sum`` format) are published.  A placeholder
#: the maintainers set to the project's real release location.
UPGRADE_URL = "https://github.com/mqbtt/mqbtt/releases/latest/download"

#: The environment variable overriding :data:`UPGRADE_URL`.
UPGRADE_URL_ENV = "MQBTT_UPGRADE_URL"

#: Commands that manage the zipapp itself and get no ``mqbtt_*`` link.
_NO_LINK = ("install-links", "run")


def link_names() -> list:
    """The names :func:`install_links` creates: ``mqbtt`` itself and
    ``mqbtt_<command>`` for every command (``mqbtt_dump``, ``mqbtt_record``, …)."""
    return ["mqbtt"] + [f"mqbtt_{c}" for c in COMMANDS if c not in _NO_LINK]


def running_zipapp(argv0: str | None = None) -> str | None:
    """The resolved path of the zipapp this process runs from (symlinks
    followed), or None when mqbtt runs from a plain ``mqbtt.py`` or an
    installed package.

    :param argv0: the path the program was started as (default: ``sys.argv[0]``)"""
    import zipfile
    path = sys.argv[0] if argv0 is None else argv0
    if not path or not os.path.isfile(path):
        return None
    try:
        return os.path.realpath(path) if zipfile.is_zipfile(path) else None
    except OSError:
        return None


def install_links(directory: str, target: str | None = None, force: bool = False,
                  parents: bool = False) -> list:
    """Create the ``mqbtt`` and ``mqbtt_*`` symlinks (see :func:`link_names`) in
    *directory*, each pointing at *target*, so that ``mqbtt_dump …`` runs
    ``mqbtt dump …``.  Under a pip installation the links point at the console
    scripts pip made (see :func:`pip_scripts`).

    :param directory: where to create the links
    :param target: the program the links point at (default: the running
      ``mqbtt.pyz``, else pip's console scripts, else this ``mqbtt.py``), made absolute
    :param force: replace existing files or links of those names
    :param parents: create *directory* (and its parents) if it does not exist
    :returns: the paths of the links
    :raises FileNotFoundError: if *directory* does not exist and *parents* is false
    :raises FileExistsError: if a name is taken and *force* is false"""
    scripts = {} if target or running_zipapp() else pip_scripts()
    target = os.path.abspath(target or running_zipapp() or os.path.realpath(__file__))
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is not a directory")
    if not os.path.isdir(directory):
        if not parents:
            raise FileNotFoundError(f"no such directory: {directory} (use --parents to create it)")
        os.makedirs(directory, exist_ok=True)
    made = []
    for name in link_names():
        link = os.path.join(directory, name)
        dest = target
        if scripts:  # pip's console script (a link named mqbtt_X to pip's mqbtt runs X)
            dest = scripts.get(name) or scripts.get("mqbtt") or target
            if os.path.exists(link) and os.path.samefile(link, dest) and not os.path.islink(link):
                made.append(link)  # pip's own script, in its own directory
                continue
        if os.path.lexists(link):
            if os.path.islink(link) and os.readlink(link) == dest:
                made.append(link)
                continue
            if not force:
                raise FileExistsError(f"{link} exists (use --force to replace it)")
        tmp = f"{link}.tmp-{os.getpid()}"
        os.symlink(dest, tmp)
        os.replace(tmp, link)
        made.append(link)
    return made


def run_script(path: str, args: list = ()) -> None:
    """Run the Python script *path* as ``__main__`` with ``sys.argv = [path, *args]``,
    as ``python path args…`` would, but with mqbtt and (in the zipapp) its bundled
    dependencies importable: this is how ``mqbtt.pyz run optimizer.py`` works.
    *path* ``-`` reads the script from standard input (as ``python -``)."""
    import runpy
    if path == "-":
        _run_stdin(list(args))
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such script: {path}")
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    runpy.run_path(path, run_name="__main__")


def _run_stdin(args: list) -> None:
    """Run the script on standard input as ``__main__`` (``python - ARGS``)."""
    import types
    code = compile(sys.stdin.read(), "<stdin>", "exec")
    module = types.ModuleType("__main__")
    module.__builtins__ = __builtins__
    saved = sys.modules.get("__main__")
    sys.argv = ["-", *args]
    sys.path.insert(0, "")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _version_key(version: str) -> tuple:
    """A sort key for version strings: ``0.10.0 > 0.9.1 > 0.9.1rc1``."""
    import re
    m = re.match(r"(\d+(?:\.\d+)*)(.*)$", version.strip())
    if not m:
        raise ValueError(f"not a version: {version!r}")
    numbers = [int(x) for x in m.group(1).split(".")]
    while numbers and numbers[-1] == 0:  # 1.0 == 1.0.0
        numbers.pop()
    return tuple(numbers), m.group(2) == "", m.group(2)


#: The largest ``mqbtt.pyz`` that :func:`upgrade` downloads, in bytes (a
#: release is about 1.2 MB); ``mqbtt.pyz.sha256`` may have at most 4 KiB.
UPGRADE_MAX_BYTES = 64 << 20


def _check_release_url(url: str) -> None:
    """Refuse a release URL that is not ``https://``, except ``http://`` to
    this machine (``localhost``, 127.0.0.0/8, ``::1``): a plain-HTTP
    download can be replaced on the way, checksum included."""
    import ipaddress
    from urllib.parse import urlsplit
    from urllib3.util import parse_url
    try:
        u = urlsplit(url)
        scheme, host = u.scheme.lower(), (u.hostname or "")
        # the host requests (urllib3) will connect to must be the one checked here:
        # "http://evil.example\\@127.0.0.1/" is 127.0.0.1 to urlsplit, evil.example to urllib3
        connects_to = (parse_url(url).host or "").strip("[]").lower()
    except ValueError:
        raise MQbtTError(f"invalid release URL {safe_text(_redact(url))!r}") from None
    expected = host.lower().replace("%25", "%")   # (an IPv6 zone: urllib3 decodes it)
    try:
        expected = expected.encode("idna").decode("ascii")   # (urllib3 IDNA-encodes)
    except UnicodeError:
        pass
    if not url.isprintable() or any(c.isspace() for c in url) or connects_to != expected:
        raise MQbtTError(f"invalid release URL {safe_text(_redact(url))!r}: its host is ambiguous "
                         "(a backslash, space or control character in it)")
    if scheme == "https" and host:
        return
    if scheme == "http" and host:
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return
        raise MQbtTError(f"refusing plain http:// for {_redact(url)}: use https:// "
                         "(http:// is accepted only for this machine: localhost, 127.0.0.0/8, ::1)")
    raise MQbtTError(f"invalid release URL {_redact(url)!r}: https://HOST/... expected")


def _fetch(url: str, timeout: float, out=None, max_bytes: int = 4096) -> bytes:
    """GET *url* within *timeout* seconds in total, following up to 5
    redirects (each must pass :func:`_check_release_url`); write the body to
    the binary file *out* (return b"") or return it.  At most *max_bytes*.

    :raises MQbtTError: in one line, the URL's password redacted"""
    requests = _require("requests")
    from urllib.parse import urljoin
    shown = _redact(url)
    end = time.monotonic() + timeout
    for _ in range(6):
        _check_release_url(url)
        left = end - time.monotonic()
        if left <= 0:
            break
        try:
            r = _bounded_request("GET", url, left, max_bytes, out=out,
                                 headers={"User-Agent": f"mqbtt/{__version__}"})
        except _AnswerTooLarge:
            raise MQbtTError(f"cannot download {shown}: larger than {max_bytes} bytes") from None
        except requests.RequestException as err:
            if _deadline_passed(err):
                break
            raise MQbtTError(f"cannot download {shown}: {_net_reason(err)[1]}") from None
        if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("Location"):
            url = urljoin(url, r.headers["Location"])
            continue
        if r.status_code != 200:
            raise MQbtTError(f"cannot download {shown}: HTTP {r.status_code} "
                             f"{safe_text(r.reason or '')}".rstrip())
        return b"" if out is not None else r.content
    else:
        raise MQbtTError(f"cannot download {shown}: more than 5 redirects")
    raise MQbtTError(f"cannot download {shown}: no answer within {timeout:g} s") from None


def _zip_version(path: str) -> str:
    """The version of the mqbtt zipapp *path*, read from its content without
    running anything: the ``VERSION`` line build_zipapp.py writes into
    ``site-packages/mqbtt_boot.py`` (else ``__version__`` in
    ``site-packages/mqbtt.py``).

    :raises MQbtTError: if it is not a zip or holds no readable version"""
    import re
    import zipfile
    pattern = re.compile(rb"^(?:VERSION|__version__) = (['\"])([0-9][0-9A-Za-z.+_-]{0,63})\1\s*$", re.M)
    found = {}
    try:
        with zipfile.ZipFile(path) as z:
            for name in ("site-packages/mqbtt_boot.py", "site-packages/mqbtt.py"):
                try:
                    with z.open(name) as f:
                        versions = {m.group(2).decode("ascii")   # bounded read: no zip bomb
                                    for m in pattern.finditer(f.read(4 << 20))}
                except KeyError:
                    continue
                if versions:
                    found[name] = versions
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError) as err:
        raise MQbtTError(f"cannot read the version of {path}: {safe_text(err)}") from None
    # what --version prints (mqbtt_boot.py) and what runs (mqbtt.py) must agree
    versions = set().union(*found.values())
    if len(versions) > 1:
        raise MQbtTError(f"{path} holds inconsistent versions ("
                         + "; ".join(f"{n}: {', '.join(sorted(v))}" for n, v in found.items()) + ")")
    if versions:
        return versions.pop()
    raise MQbtTError(f"{path} is not an mqbtt zipapp: it has no site-packages/mqbtt_boot.py "
                     "or mqbtt.py with a version")


def _zipapp_version(path: str, timeout: float = 120) -> str:
    """The version the zipapp *path* reports with ``--version`` (run by this Python,
    with a throw-away shiv cache so no stray cache directory is left behind)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory(prefix="mqbtt-upgrade-") as root:
        # no MQBTT_* variable: $MQBTT_PASSWORD, $MQBTT_O2_PASSWORD, a URI with a password
        # in $MQBTT_BROKER are nothing a downloaded file needs to print its version
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MQBTT_")}
        env["SHIV_ROOT"] = root
        for var in ("SHIV_ENTRY_POINT", "SHIV_MODULE", "SHIV_CONSOLE_SCRIPT", "SHIV_INTERPRETER"):
            env.pop(var, None)
        try:
            r = subprocess.run([sys.executable, path, "--version"], env=env, timeout=timeout,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise MQbtTError(f"the downloaded mqbtt.pyz does not run: {err}") from None
    words = r.stdout.split()
    if r.returncode != 0 or len(words) != 2 or words[0] != "mqbtt":
        raise MQbtTError("the downloaded mqbtt.pyz does not run or does not report a version "
                         f"(exit {r.returncode}: {safe_text((r.stdout + r.stderr).strip()[-200:])!r})")
    return words[1]


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def upgrade(target: str, url: str | None = None, check: bool = False,
            timeout: float = 60.0, progress=None) -> tuple:
    """Replace the zipapp *target* by the newest release, if newer.

    The release location must be ``https://`` (``http://`` only for this
    machine: ``localhost``, 127.0.0.0/8, ``::1``); redirects are followed
    under the same rule.  Downloads ``<url>/mqbtt.pyz.sha256``
    (``sha256sum`` format) and ``<url>/mqbtt.pyz`` (at most
    :data:`UPGRADE_MAX_BYTES`) into a temporary file beside *target*, and
    checks that the download has that SHA-256, is a zip file with a ``#!``
    line and holds a newer version than *target*.  The versions are read
    from the zip files' content: nothing is executed to learn them, so
    *check* runs nothing it downloaded.  Before replacing, the new file is
    run once with ``--version`` by this Python (it must run and report the
    version it holds).  Only then is the download flushed to disk
    (``fsync``), the previous file kept as ``<target>.bak`` and *target*
    atomically replaced (``os.replace``, then an ``fsync`` of the
    directory; a symlink is resolved first, so the link stays and its
    target changes; the file mode is kept).  Any failure leaves *target*
    untouched.

    What this verifies: that the file is the one the server publishes,
    complete and uncorrupted, a zipapp of a newer mqbtt that runs.  What it
    does not: who made it.  The checksum comes from the same server as the
    file, so only TLS (the server's certificate, checked against the system
    CAs) vouches for both; nothing is signed.

    :param target: the installed ``mqbtt.pyz`` (symlinks are followed)
    :param url: the base URL (default: ``$MQBTT_UPGRADE_URL``, else :data:`UPGRADE_URL`)
    :param check: only find out whether a newer version exists; change and run nothing
    :param timeout: total time each download may take, in seconds
    :param progress: called with a one-line message at each step, if given
    :returns: ``(installed_version, available_version, replaced)``
    :raises MQbtTError: on a refused URL, a download, checksum or validation failure
    :raises OSError: if the target cannot be read or replaced"""
    import hashlib
    import shutil
    import tempfile
    import zipfile
    say = progress or (lambda message: None)
    base = (url or os.environ.get(UPGRADE_URL_ENV) or UPGRADE_URL).rstrip("/")
    shown = _redact(base)
    _check_release_url(base + "/")
    target = os.path.realpath(target)
    directory = os.path.dirname(target)
    installed = __version__ if running_zipapp() == target else _zip_version(target)
    text = _fetch(f"{base}/mqbtt.pyz.sha256", timeout).decode("utf-8", "replace")
    words = text.split()
    expected = words[0].lower() if words else ""
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise MQbtTError(f"{shown}/mqbtt.pyz.sha256 is not in sha256sum format")
    if not os.access(directory, os.W_OK | os.X_OK) and not check:
        raise MQbtTError(f"cannot replace {target}: directory {directory} is not writable")
    say(f"downloading {shown}/mqbtt.pyz")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".download",
                               dir=None if check else directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _fetch(f"{base}/mqbtt.pyz", timeout, out=f, max_bytes=UPGRADE_MAX_BYTES)
            f.flush()
            os.fsync(f.fileno())
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            head = f.read(2)
            f.seek(0)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != expected:
            raise MQbtTError(f"checksum mismatch for {shown}/mqbtt.pyz: "
                             f"got {h.hexdigest()}, published {expected}; nothing changed")
        if head != b"#!" or not zipfile.is_zipfile(tmp):
            raise MQbtTError(f"{shown}/mqbtt.pyz is not a zipapp (no #! line or not a zip file)")
        try:
            available = _zip_version(tmp)
        except MQbtTError as err:
            if "inconsistent versions" in str(err):
                raise MQbtTError(f"{shown}/mqbtt.pyz{str(err).split(tmp, 1)[-1]}; nothing changed") from None
            raise MQbtTError(f"{shown}/mqbtt.pyz is not an mqbtt zipapp (no version in it)") from None
        if check or _version_key(available) <= _version_key(installed):
            return installed, available, False
        reported = _zipapp_version(tmp)
        if reported != available:
            raise MQbtTError(f"{shown}/mqbtt.pyz reports version {safe_text(reported)} but "
                             f"holds {available}; nothing changed")
        os.chmod(tmp, os.stat(target).st_mode & 0o7777)
        backup = target + ".bak"
        shutil.copy2(target, tmp + ".bak")
        with open(tmp + ".bak", "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp + ".bak", backup)
        os.replace(tmp, target)
        _fsync_dir(directory)
        return installed, available, True
    finally:
        for path in (tmp, tmp + ".bak"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


###############################################################################
# Fleet statistics: mqbtt top and mqbtt exporter ##############################
###############################################################################

#: Upper bounds (seconds) of the ``mqbtt_reply_round_trip_seconds`` histogram buckets.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
               1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Upper bounds of the ``mqbtt_share_difficulty`` histogram buckets (1 to 10¹³).
DIFF_BUCKETS = tuple(float(10 ** k) for k in range(14))

#: Subtopics in the order :class:`FleetStats` keeps their counters.
_FLEET_SUBS = ("srv", "esp", "shr", "log")
_FLEET_INDEX = {s: i for i, s in enumerate(_FLEET_SUBS)}
_RATE_SLOTS = 60            # one-second slots: the "per minute" window
_RTT_SAMPLES = 64           # round trips kept per pair for the p50
_PENDING_IDS = 32           # unanswered request ids remembered per pair
_LOG_KEEP = 300             # characters of the last log line kept per pair
#: Pair ids longer than this (in characters) are ignored, not tracked: a
#: topic may be 65535 bytes long, and a pair's memory must stay bounded.
FLEET_MAX_PAIR_ID = 200


def _cells(text: str) -> int:
    """The number of terminal cells *text* (printable) takes."""
    if text.isascii():
        return len(text)
    import unicodedata
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


def _fit(text: str, width: int, right: bool = False) -> str:
    """*text* cut (with ``…``) or padded to exactly *width* terminal cells."""
    if width <= 0:
        return ""
    n = _cells(text)
    if n > width:
        out, used = [], 0
        for c in text:
            w = _cells(c)
            if used + w > width - 1:
                break
            out.append(c)
            used += w
        text, n = "".join(out) + "…", used + 1
    pad = " " * (width - n)
    return pad + text if right else text + pad


class _PairState:
    """What :class:`FleetStats` keeps about one pair (bounded: about 5 KB)."""
    __slots__ = ("pair_id", "first_seen", "last_seen", "counts", "last_ts", "undecodable",
                 "slot_sec", "slot_counts", "rtts", "rtt_n", "rtt_last", "rtt_hist", "rtt_sum",
                 "diff_hist", "diff_sum", "best_diff", "pending_ids", "pending_order",
                 "last_log", "last_log_ts")

    def __init__(self, pair_id, ts):
        from array import array
        self.pair_id = pair_id
        self.first_seen = self.last_seen = ts
        self.counts = array("q", bytes(8 * 4))
        self.last_ts = array("d", bytes(8 * 4))
        self.undecodable = array("q", bytes(8 * 4))
        self.slot_sec = array("q", [-1]) * _RATE_SLOTS
        self.slot_counts = array("q", bytes(8 * 4 * _RATE_SLOTS))
        self.rtts = array("d", bytes(8 * _RTT_SAMPLES))
        self.rtt_n = 0
        self.rtt_last = None
        self.rtt_hist = array("q", bytes(8 * (len(RTT_BUCKETS) + 1)))
        self.rtt_sum = 0.0
        self.diff_hist = array("q", bytes(8 * (len(DIFF_BUCKETS) + 1)))
        self.diff_sum = 0.0
        self.best_diff = None
        self.pending_ids = {}
        self.pending_order = None
        self.last_log = None
        self.last_log_ts = None

    def account(self, i, ts, message, ok):
        from bisect import bisect_left
        self.counts[i] += 1
        self.last_ts[i] = ts
        if ts > self.last_seen:
            self.last_seen = ts
        sec = int(ts)
        slot = sec % _RATE_SLOTS
        if self.slot_sec[slot] != sec:
            self.slot_sec[slot] = sec
            for k in range(4):
                self.slot_counts[slot * 4 + k] = 0
        self.slot_counts[slot * 4 + i] += 1
        if not ok:
            self.undecodable[i] += 1
            return
        if i == 0:      # srv: a request
            rid = getattr(message, "request_id", 0)
            if rid:
                ids = self.pending_ids
                ids.pop(rid, None)
                ids[rid] = ts
                if len(ids) > _PENDING_IDS:
                    del ids[next(iter(ids))]
            self.pending_order = ts
        elif i == 1:    # esp: a reply, paired by request id, else with the latest request
            rid = getattr(message, "request_id", 0)
            sent = None
            if rid:
                sent = self.pending_ids.pop(rid, None)
                if sent is not None and self.pending_order == sent:
                    self.pending_order = None
            elif self.pending_order is not None:
                sent, self.pending_order = self.pending_order, None
            if sent is not None:
                rtt = max(0.0, ts - sent)
                self.rtts[self.rtt_n % _RTT_SAMPLES] = rtt
                self.rtt_n += 1
                self.rtt_last = rtt
                self.rtt_hist[bisect_left(RTT_BUCKETS, rtt)] += 1
                self.rtt_sum += rtt
        elif i == 2:    # shr: a share
            import math
            diff = message.diff
            if math.isfinite(diff):
                if self.best_diff is None or diff > self.best_diff:
                    self.best_diff = diff
                self.diff_hist[bisect_left(DIFF_BUCKETS, diff)] += 1
                self.diff_sum += diff
        else:           # log: a line of text
            self.last_log = message[:_LOG_KEEP]
            self.last_log_ts = ts

    def in_window(self, now):
        """Messages per subtopic in the last 60 one-second slots up to *now*."""
        first = int(now) - _RATE_SLOTS + 1
        out = [0, 0, 0, 0]
        for slot in range(_RATE_SLOTS):
            if first <= self.slot_sec[slot] <= first + _RATE_SLOTS - 1:
                base = slot * 4
                for k in range(4):
                    out[k] += self.slot_counts[base + k]
        return out


def _cumulative(hist):
    out, total = [], 0
    for n in hist:
        total += n
        out.append(total)
    return tuple(out)


@dataclass(frozen=True)
class FleetPair:
    """A snapshot of one pair's statistics (see :meth:`FleetStats.pairs`).

    :param pair_id: the pair id, as it appears in the topic.
    :param first_seen: when its first message arrived (seconds since the epoch).
    :param last_seen: when its latest message arrived.
    :param age: seconds since ``last_seen``.
    :param stale: whether ``age`` exceeds the statistics' ``stale_after``.
    :param messages: messages received per subtopic (undecodable ones included).
    :param undecodable: messages per subtopic whose payload did not decode.
    :param last_message: arrival time of the latest message per subtopic (0 if none).
    :param requests_per_min: ``srv`` messages per minute (see :class:`FleetStats`).
    :param replies_per_min: ``esp`` messages per minute.
    :param shares_per_min: ``shr`` messages per minute.
    :param logs_per_min: ``log`` messages per minute.
    :param rtt_p50: median round trip (seconds) of the latest 64 request → reply
      exchanges, or None.
    :param rtt_last: the latest round trip, or None.
    :param rtt_count: round trips measured so far.
    :param rtt_buckets: cumulative counts for :data:`RTT_BUCKETS` and +Inf.
    :param rtt_sum: the sum of every round trip measured (seconds).
    :param best_share_difficulty: the highest share difficulty seen, or None.
    :param share_count: shares with a finite difficulty.
    :param share_buckets: cumulative counts for :data:`DIFF_BUCKETS` and +Inf.
    :param share_sum: the sum of those difficulties.
    :param last_log: the latest log line through :func:`safe_text`, or None.
    :param last_log_time: its arrival time, or None.
    """
    pair_id: str
    first_seen: float
    last_seen: float
    age: float
    stale: bool
    messages: dict
    undecodable: dict
    last_message: dict
    requests_per_min: float
    replies_per_min: float
    shares_per_min: float
    logs_per_min: float
    rtt_p50: float | None
    rtt_last: float | None
    rtt_count: int
    rtt_buckets: tuple
    rtt_sum: float
    best_share_difficulty: float | None
    share_count: int
    share_buckets: tuple
    share_sum: float
    last_log: str | None
    last_log_time: float | None


class FleetStats:
    """Live statistics of every pair on a broker, fed by one read-only
    subscription: ``mqbtt top`` and ``mqbtt exporter`` are views of it.

    ::

        with FleetStats("mqtt://localhost") as fleet:     # connects and subscribes
            time.sleep(10)
            for p in fleet.pairs():
                print(p.pair_id, p.requests_per_min, p.rtt_p50, p.best_share_difficulty)

    :param broker_uri: the broker (default: ``$MQBTT_BROKER``, then the
      documented host); only :meth:`start` connects.
    :param pair_ids: watch only these pairs (default, or when it contains
      ``+``: every pair, through one subscription to ``mqbtt/+/+``).
    :param max_pairs: the most pairs tracked at once.  A message of another
      pair when the table is full is dropped and counted (``dropped_messages``;
      ``dropped_pairs`` counts the distinct pair ids dropped), unless the
      pair seen least recently has been silent for *forget_after* seconds:
      then that one is forgotten (``forgotten_pairs``) to make room.
    :param stale_after: seconds of silence after which a pair is *stale*.
    :param forget_after: see *max_pairs*.
    :param client_id: default ``mqbtt-<role>-<12 random hex>``, in a clean
      session, so it never takes over a pair's session.
    :param role: the middle of the default client id (``fleet``; ``top`` and
      ``exporter`` for the commands).
    :param keepalive: the MQTT keepalive, in seconds.

    The connection is a clean session at QoS 1 (receive times are those of
    the PUBLISH packets), re-subscribed after every reconnect.  Once
    :meth:`start` returned it reconnects by itself, also after the broker
    refused its credentials (the password file or ACL changed): a monitor
    comes back when they are fixed, and :attr:`connected` is False meanwhile
    (:attr:`last_event` says why).  Rates are
    "per minute": the messages of the last 60 s, divided by the time watched
    within those 60 s (at least 10 s, so a burst just after the start does not
    show as thousands per minute).  Round trips pair each reply with the
    request of the same ``request_id`` when the reply carries one, else with
    the latest unanswered request.  :meth:`feed` is thread-safe and may also
    be called directly, e.g. with recorded traffic.
    """

    def __init__(self, broker_uri: str | None = None, pair_ids=None, *, max_pairs: int = 1000,
                 stale_after: float = 60.0, forget_after: float = 3600.0,
                 client_id: str | None = None, role: str = "fleet", keepalive: int = 60):
        from collections import OrderedDict
        if not isinstance(max_pairs, int) or isinstance(max_pairs, bool) or max_pairs < 1:
            raise ValueError(f"max_pairs must be a positive integer, not {max_pairs!r}")
        for name, value in (("stale_after", stale_after), ("forget_after", forget_after)):
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        ids = None
        if pair_ids is not None:
            ids = [pair_ids] if isinstance(pair_ids, str) else list(pair_ids)
            ids = None if "+" in ids or not ids else [check_pair_id(p) for p in ids]
        self.pair_ids = None if ids is None else tuple(dict.fromkeys(ids))
        self._filter = None if ids is None else frozenset(ids)
        self.broker = BrokerURI.parse(broker_uri if broker_uri is not None else default_broker())
        self.max_pairs = max_pairs
        self.stale_after = float(stale_after)
        self.forget_after = float(forget_after)
        self.client_id = client_id or f"mqbtt-{role}-{os.urandom(6).hex()}"
        self.keepalive = keepalive
        self._lock = threading.Lock()
        self._pairs = OrderedDict()          # least recently seen first
        self._dropped_ids = OrderedDict()    # recently dropped pair ids (at most max_pairs)
        self._t0 = time.time()
        #: messages of pairs not tracked because the table was full
        self.dropped_messages = 0
        #: distinct pair ids not tracked because the table was full (a pair id
        #: is counted again only if more than ``max_pairs`` others were dropped since)
        self.dropped_pairs = 0
        #: pairs forgotten after ``forget_after`` seconds of silence to make room
        self.forgotten_pairs = 0
        #: messages on topics that are not ``mqbtt/<pair id>/<subtopic>``
        #: (empty or over-long pair id, unknown subtopic)
        self.ignored_messages = 0
        #: the latest connection event (disconnected, reconnected, refused), or None
        self.last_event = None
        #: when true, connection events are only kept in :attr:`last_event`
        #: (``mqbtt top`` sets it while curses owns the terminal)
        self.quiet = False
        self._conn = None

    # -- feeding ---------------------------------------------------------------

    def feed(self, pair_id: str, subtopic: str, payload: bytes, ts: float | None = None) -> bool:
        """Account one message of *pair_id* on *subtopic* received at *ts*
        (seconds since the epoch, default now).  Returns whether the pair is
        tracked (False: ignored, filtered out or dropped)."""
        i = _FLEET_INDEX.get(subtopic)
        if i is None or not pair_id or len(pair_id) > FLEET_MAX_PAIR_ID:
            with self._lock:
                self.ignored_messages += 1
            return False
        if self._filter is not None and pair_id not in self._filter:
            return False
        if ts is None:
            ts = time.time()
        try:
            message, ok = DECODERS[subtopic](payload), True
        except Exception:   # MQbtTDecodeError, or a payload that is not bytes
            message, ok = None, False
        return self._account(pair_id, i, ts, message, ok)

    def _account(self, pair_id, i, ts, message, ok):
        with self._lock:
            p = self._pairs.get(pair_id)
            if p is None:
                p = self._admit(pair_id, ts)
                if p is None:
                    return False
            else:
                self._pairs.move_to_end(pair_id)
            p.account(i, ts, message, ok)
            return True

    def _admit(self, pair_id, ts):
        """A new state for *pair_id*, or None when the table is full (lock held)."""
        pairs = self._pairs
        if len(pairs) >= self.max_pairs:
            oldest = next(iter(pairs.values()))
            if ts - oldest.last_seen > self.forget_after:
                del pairs[oldest.pair_id]
                self.forgotten_pairs += 1
            else:
                self.dropped_messages += 1
                dropped = self._dropped_ids
                if pair_id in dropped:
                    dropped.move_to_end(pair_id)
                else:
                    self.dropped_pairs += 1
                    dropped[pair_id] = None
                    if len(dropped) > self.max_pairs:
                        dropped.popitem(last=False)
                return None
        self._dropped_ids.pop(pair_id, None)
        if ts < self._t0:
            self._t0 = ts
        p = pairs[pair_id] = _PairState(pair_id, ts)
        return p

    def _on_message(self, client, userdata, msg):
        try:
            where = msg.topic.split("/")
        except (UnicodeDecodeError, AttributeError):
            where = ()
        if len(where) != 3 or where[0] != "mqbtt":
            with self._lock:
                self.ignored_messages += 1
            return
        self.feed(where[1], where[2], msg.payload)

    # -- connection ------------------------------------------------------------

    @property
    def subscriptions(self) -> list:
        """The topic filters subscribed to (at QoS 1)."""
        if self.pair_ids is None:
            return [("mqbtt/+/+", 1)]
        return [(topic(p, "+"), 1) for p in self.pair_ids]

    def start(self, connect_timeout: float = 10.0) -> "FleetStats":
        """Connect and subscribe.

        :raises MQbtTConnectionError: when the broker cannot be reached or
          refuses the connection within *connect_timeout* seconds.
        :raises MQbtTSubscribeError: when it refuses the subscription."""
        if self._conn is not None and not self._conn.stopping:
            return self                      # already started (a stopped one reconnects)
        self._t0 = time.time()
        conn = _Connection(self.broker, self.client_id, True, self.subscriptions,
                           self._on_message, self.keepalive, self._notify, on_fatal=self._fatal,
                           retry_refusals=True)
        self._conn = conn
        try:
            conn.start(connect_timeout)
        except BaseException:
            self._conn = None
            raise
        return self

    def _notify(self, text):
        self.last_event = text
        if not self.quiet:
            log.info("%s", text)

    def _fatal(self, err):
        self.last_event = str(err)
        if not self.quiet:
            log.error("%s", err)

    @property
    def connected(self) -> bool:
        """Whether the connection to the broker is up right now."""
        return self._conn is not None and self._conn.connected and not self._conn.stopping

    def stop(self):
        """Disconnect (idempotent); the statistics stay readable."""
        conn = self._conn
        if conn is not None and not conn.stopping:
            conn.stop()

    close = stop

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- reading ---------------------------------------------------------------

    def __len__(self):
        return len(self._pairs)

    def pairs(self, now: float | None = None) -> list:
        """A snapshot of every tracked pair, as :class:`FleetPair` objects
        ordered by pair id, at *now* (seconds since the epoch, default now)."""
        if now is None:
            now = time.time()
        with self._lock:
            states = list(self._pairs.values())
            span = min(max(now - self._t0, 10.0), float(_RATE_SLOTS))
            out = [self._snapshot(p, now, span) for p in states]
        out.sort(key=lambda s: s.pair_id)
        return out

    def _snapshot(self, p, now, span):
        window = p.in_window(now)
        per_min = [n * 60.0 / span for n in window]
        n = min(p.rtt_n, _RTT_SAMPLES)
        p50 = sorted(p.rtts[:n])[(n - 1) // 2] if n else None
        age = max(0.0, now - p.last_seen)
        return FleetPair(
            pair_id=p.pair_id, first_seen=p.first_seen, last_seen=p.last_seen, age=age,
            stale=age > self.stale_after,
            messages=dict(zip(_FLEET_SUBS, p.counts)),
            undecodable=dict(zip(_FLEET_SUBS, p.undecodable)),
            last_message=dict(zip(_FLEET_SUBS, p.last_ts)),
            requests_per_min=per_min[0], replies_per_min=per_min[1],
            shares_per_min=per_min[2], logs_per_min=per_min[3],
            rtt_p50=p50, rtt_last=p.rtt_last, rtt_count=p.rtt_n,
            rtt_buckets=_cumulative(p.rtt_hist), rtt_sum=p.rtt_sum,
            best_share_difficulty=p.best_diff, share_count=sum(p.diff_hist),
            share_buckets=_cumulative(p.diff_hist), share_sum=p.diff_sum,
            last_log=None if p.last_log is None else safe_text(p.last_log),
            last_log_time=p.last_log_ts)

    def __repr__(self):
        return (f"<FleetStats {self.broker} pairs={len(self._pairs)}/{self.max_pairs} "
                f"dropped={self.dropped_pairs} connected={self.connected}>")


# ---- the table shown by mqbtt top ----------------------------------------------

#: ``mqbtt top`` sort keys: key -> (column, sort key, descending by default)
FLEET_SORT_KEYS = {
    "p": ("pair", lambda p: p.pair_id, False),
    "r": ("req/m", lambda p: p.requests_per_min, True),
    "e": ("rep/m", lambda p: p.replies_per_min, True),
    "t": ("rtt p50", lambda p: p.rtt_p50, True),
    "s": ("shr/m", lambda p: p.shares_per_min, True),
    "d": ("best diff", lambda p: p.best_share_difficulty, True),
    "l": ("log/m", lambda p: p.logs_per_min, True),
    "a": ("seen", lambda p: p.age, False),
}


def sort_fleet(pairs: list, key: str = "p", reverse: bool = False) -> list:
    """*pairs* (:class:`FleetPair`) sorted by the ``mqbtt top`` sort *key*
    (see :data:`FLEET_SORT_KEYS`), in its default direction unless *reverse*;
    pairs without a value (no round trip, no share) come last, ties by pair id."""
    if key not in FLEET_SORT_KEYS:
        raise ValueError(f"unknown sort key {key!r} (expected one of {', '.join(FLEET_SORT_KEYS)})")
    _, get, desc = FLEET_SORT_KEYS[key]
    if reverse:
        desc = not desc
    have = [p for p in pairs if get(p) is not None]
    missing = [p for p in pairs if get(p) is None]
    have.sort(key=lambda p: p.pair_id)
    have.sort(key=get, reverse=desc)
    return have + sorted(missing, key=lambda p: p.pair_id)


def _rate(value: float) -> str:
    return f"{value:.1f}" if value < 9.95 else f"{value:.0f}"


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.0995:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 0.9995:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.2f}s" if seconds < 9.995 else f"{seconds:.0f}s"


def _difficulty(value) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e18:      # beyond P (a hostile miner's value): exponent form, fits the column
        return f"{value:.2e}"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.2f}" if value != int(value) else f"{value:.0f}"


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


#: the columns of ``mqbtt top``: title, width, right-aligned
_TOP_COLUMNS = (("REQ/m", 6), ("REP/m", 6), ("RTT p50", 8), ("RTT last", 8), ("SHR/m", 6),
                ("BEST DIFF", 9), ("LOG/m", 6), ("SEEN", 10))


def _cell_text(text: str) -> str:
    """*text* for one cell of ``mqbtt top``'s table: :func:`safe_text`, a tab
    as a space, and whatever is still not printable (zero-width and other
    format characters, which would make look-alike pair ids or shift the
    columns) escaped as ``\\u200b``."""
    text = safe_text(text).replace("\t", " ")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else
                   f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else
                   f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}"
                   for ch in text)


def format_fleet_table(pairs: list, width: int | None = None) -> list:
    """The ``mqbtt top`` table of *pairs* (:class:`FleetPair`, in display
    order): a list of ``(line, stale)``, the column titles first.  Each line
    is *width* terminal cells wide (the last log line is cut to fit), or as
    long as needed when *width* is None.  Pair ids and log lines are shown
    with control characters neutralised."""
    # safe_text: escape sequences removed, other controls escaped; a tab,
    # which it keeps, would move the terminal's cursor past the cell widths
    ids = [_cell_text(p.pair_id) for p in pairs]
    pw = min(max([4] + [_cells(i) for i in ids]), 24)
    head = _fit("PAIR", pw) + "".join(" " + _fit(t, w, right=t != "SEEN") for t, w in _TOP_COLUMNS)
    head += "  LAST LOG"
    rows = [(head, False)]
    fixed = _cells(head) - len("LAST LOG")
    for p, pid in zip(pairs, ids):
        cells = (_rate(p.requests_per_min), _rate(p.replies_per_min), _duration(p.rtt_p50),
                 _duration(p.rtt_last), _rate(p.shares_per_min),
                 _difficulty(p.best_share_difficulty), _rate(p.logs_per_min),
                 _age(p.age) + (" stale" if p.stale else ""))
        line = _fit(pid, pw) + "".join(" " + _fit(c, w, right=t != "SEEN")
                                       for c, (t, w) in zip(cells, _TOP_COLUMNS))
        line += "  "
        logtext = _cell_text(p.last_log or "")
        if width is None:
            line += logtext
        else:
            line += _fit(logtext, max(0, width - fixed))
        rows.append((line.rstrip() if width is None else line, p.stale))
    if width is not None:
        rows[0] = (_fit(head, width), False)
        rows = [(_fit(line, width), stale) for line, stale in rows]
    return rows


def _fleet_title(stats: FleetStats, n: int, now: float) -> str:
    import datetime
    when = datetime.datetime.fromtimestamp(now).astimezone().strftime("%Y-%m-%d %H:%M:%S%z")
    state = "connected" if stats.connected else "DISCONNECTED"
    if not stats.connected and stats.quiet and stats.last_event:
        state += ": " + safe_text(stats.last_event).replace("\t", " ")
    extra = f", {stats.dropped_pairs} dropped (more than {stats.max_pairs})" if stats.dropped_pairs else ""
    # safe_text: a broker URI's path or user name may hold control characters (kept visible)
    return safe_text(f"mqbtt top  {when}  {stats.broker} ({state})  {n} pair{'s' * (n != 1)}{extra}",
                     strip_ansi=False)


def _stop_signals(stop: threading.Event):
    """Make SIGINT and SIGTERM set *stop* and interrupt the main thread (so
    that no wait, even one with a timeout, outlives them); returns the old
    handlers, or {} outside the main thread."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        stop.set()
        raise KeyboardInterrupt

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, handler)
    return old


def _restore_signals(old: dict):
    import signal
    for sig, h in old.items():
        signal.signal(sig, h)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):    # no isatty, or a closed stream
        return False


def _full_screen_ok(out) -> bool:
    """Whether *out* is a terminal that curses can drive full screen."""
    try:
        if out is not sys.stdout or not out.isatty() or not sys.stdin.isatty():
            return False
        import curses
        curses.setupterm(fd=out.fileno())     # raises curses.error for an unknown TERM
        return bool(curses.tigetstr("cup")) and bool(curses.tigetstr("clear"))
    except Exception:   # no curses module (Windows), unknown terminal, closed stream
        return False


def run_top(broker_uri: str | None = None, pair_ids=None, *, interval: float = 10.0,
            stale: float = 60.0, refresh: float = 1.0, max_pairs: int = 1000, sort: str = "p",
            out=None, full_screen: bool | None = None, connect_timeout: float = 10.0,
            stop: threading.Event | None = None, ready=None) -> int:
    """Show every pair's traffic (see :class:`FleetStats`) until ``q``,
    SIGINT or SIGTERM (or *stop* is set); returns 0.

    On a terminal that curses can drive, a full-screen table refreshed every
    *refresh* seconds, one row per pair; single keys change the sort
    (:data:`FLEET_SORT_KEYS`, the same key again reverses it) and ``q``
    quits.  Pairs silent for more than *stale* seconds are dimmed and marked
    ``stale``.  Otherwise (*out* not a terminal, ``TERM=dumb``…), one table
    every *interval* seconds.  *ready* is called once subscribed."""
    if sort not in FLEET_SORT_KEYS:
        raise ValueError(f"unknown sort key {sort!r} (expected one of {', '.join(FLEET_SORT_KEYS)})")
    for name, value in (("interval", interval), ("refresh", refresh)):
        if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    out = out or sys.stdout
    if full_screen is not False and out is sys.stdout and _isatty(out):
        # curses would take an exported LINES/COLUMNS over the real size of
        # the window (and ignore resizes): the terminal knows better
        for name in ("LINES", "COLUMNS"):
            os.environ.pop(name, None)
    stats = FleetStats(broker_uri, pair_ids, max_pairs=max_pairs, stale_after=stale, role="top")
    stop = stop or threading.Event()
    old = _stop_signals(stop)
    try:
        try:
            stats.start(connect_timeout)
            if ready is not None:
                ready(stats)
            if full_screen is None:
                full_screen = _full_screen_ok(out)
            if full_screen:
                import curses
                stats.quiet = True      # log lines would scribble over the screen
                try:
                    curses.wrapper(_top_screen, stats, stop, sort, refresh)
                except curses.error as err:
                    stats.quiet = False
                    log.warning("cannot drive the terminal full screen (%s): printing a table "
                                "every %g s instead", err, interval)
                    _top_plain(stats, stop, out, interval, sort)
            else:
                _top_plain(stats, stop, out, interval, sort)
        except KeyboardInterrupt:
            if not stop.is_set():
                raise
        finally:
            stats.stop()
            stats.quiet = False
    finally:
        _restore_signals(old)
    return 0


def _top_plain(stats, stop, out, interval, sort):
    next_at = time.monotonic() + interval
    while not stop.is_set():
        left = next_at - time.monotonic()
        if left > 0:
            time.sleep(min(left, 0.2))
            continue
        next_at += interval
        if next_at <= time.monotonic():     # after a stall (Ctrl-Z, SIGSTOP): no burst of tables
            next_at = time.monotonic() + interval
        now = time.time()
        pairs = sort_fleet(stats.pairs(now), sort)
        lines = [_fleet_title(stats, len(pairs), now)] + [line for line, _ in format_fleet_table(pairs)]
        text = "\n".join(lines) + "\n"
        encoding = getattr(out, "encoding", None)
        if encoding and not encoding.lower().replace("-", "").startswith("utf"):
            # a pair id or log line the output cannot encode (PYTHONIOENCODING=ascii,
            # a latin-1 locale) is shown escaped instead of stopping top
            text = text.encode(encoding, "backslashreplace").decode(encoding)
        print(text, file=out, flush=True)


def _top_screen(stdscr, stats, stop, sort, refresh):
    import curses
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    stdscr.timeout(100)
    dim = curses.A_DIM if curses.tigetstr("dim") else curses.A_NORMAL
    reverse = False
    next_draw = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_draw:
            next_draw = time.monotonic() + refresh
            _top_draw(stdscr, stats, sort, reverse, dim)
        ch = stdscr.getch()
        if ch == -1:
            continue
        if ch in (ord("q"), ord("Q")):
            break
        if ch == curses.KEY_RESIZE:
            next_draw = 0.0
            continue
        key = chr(ch).lower() if 0 < ch < 128 else None
        if key in FLEET_SORT_KEYS:
            reverse = not reverse if key == sort else False
            sort = key
            next_draw = 0.0


def _top_draw(stdscr, stats, sort, reverse, dim):
    import curses
    height, width = stdscr.getmaxyx()
    now = time.time()
    pairs = sort_fleet(stats.pairs(now), sort, reverse)
    table = format_fleet_table(pairs, width)
    column = FLEET_SORT_KEYS[sort][0]
    keys = "  ".join(f"{k} {c}" for k, (c, _, _) in FLEET_SORT_KEYS.items())
    footer = f"sort: {column}{' (reversed)' if reverse else ''}   keys: {keys}   q quit"
    lines = [(_fit(_fleet_title(stats, len(pairs), now), width), curses.A_BOLD),
             (table[0][0], curses.A_REVERSE)]
    body = height - 3
    lines += [(line, dim if stale else curses.A_NORMAL) for line, stale in table[1:1 + max(0, body)]]
    if len(table) - 1 > body > 0:
        lines[-1] = (_fit(f"… {len(table) - body} more pairs (make the window taller)", width),
                     curses.A_BOLD)
    stdscr.erase()
    for y, (text, attr) in enumerate(lines[:height - 1]):
        try:
            stdscr.addstr(y, 0, text, attr)
        except curses.error:    # writing the last cell of a line moves the cursor out
            pass
    try:
        stdscr.addstr(height - 1, 0, _fit(footer, width - 1), curses.A_DIM | curses.A_BOLD)
    except curses.error:
        pass
    stdscr.noutrefresh()
    curses.doupdate()


# ---- the Prometheus exporter ---------------------------------------------------

def _prometheus():
    """prometheus_client, or :exc:`MQbtTMissingDependency` naming the pip command."""
    return _require("prometheus_client")


def parse_listen(text: str) -> tuple:
    """``(host, port)`` of ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every
    interface); port 0 picks a free port.  Raises ValueError otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("invalid listen address: empty (expected HOST:PORT)")
    t = text.strip()
    host, sep, port = t.rpartition(":")
    if not sep:
        raise ValueError(f"invalid listen address {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"invalid listen address {text!r}: empty IPv6 address")
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"invalid listen address {text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not port.isdigit() or not port.isascii() or int(port) > 65535:
        raise ValueError(f"invalid listen address {text!r}: the port must be a number 0-65535")
    if any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"invalid listen address {text!r}: invalid host")
    return host or "0.0.0.0", int(port)


class _FleetCollector:
    """A prometheus_client collector reading a :class:`FleetStats` at every scrape."""

    def __init__(self, stats: FleetStats):
        self.stats = stats

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        from prometheus_client.utils import floatToGoString
        s = self.stats
        pairs = s.pairs()
        msgs = CounterMetricFamily("mqbtt_messages", "Messages received per pair and subtopic "
                                   "(undecodable ones included).", labels=["pair_id", "subtopic"])
        last = GaugeMetricFamily("mqbtt_last_message_timestamp_seconds", "When the latest message "
                                 "of a pair and subtopic arrived (Unix time).",
                                 labels=["pair_id", "subtopic"])
        bad = CounterMetricFamily("mqbtt_undecodable_messages", "Messages whose payload did not "
                                  "decode, per pair and subtopic.", labels=["pair_id", "subtopic"])
        rtt = HistogramMetricFamily("mqbtt_reply_round_trip_seconds", "Time from a request to its "
                                    "reply (paired by request id, else by order).", labels=["pair_id"])
        diff = HistogramMetricFamily("mqbtt_share_difficulty", "Difficulty of the shares "
                                     "received.", labels=["pair_id"])
        best = GaugeMetricFamily("mqbtt_best_share_difficulty", "The highest share difficulty "
                                 "seen per pair since the exporter started.", labels=["pair_id"])
        rtt_le = [floatToGoString(b) for b in RTT_BUCKETS] + ["+Inf"]
        diff_le = [floatToGoString(b) for b in DIFF_BUCKETS] + ["+Inf"]
        for p in pairs:
            for sub in _FLEET_SUBS:
                if p.messages[sub]:
                    labels = [p.pair_id, sub]
                    msgs.add_metric(labels, p.messages[sub])
                    last.add_metric(labels, p.last_message[sub])
                    bad.add_metric(labels, p.undecodable[sub])
            if p.messages["srv"] or p.messages["esp"]:
                rtt.add_metric([p.pair_id], list(zip(rtt_le, p.rtt_buckets)), p.rtt_sum)
            if p.messages["shr"]:
                diff.add_metric([p.pair_id], list(zip(diff_le, p.share_buckets)), p.share_sum)
            if p.best_share_difficulty is not None:
                best.add_metric([p.pair_id], p.best_share_difficulty)
        yield from (msgs, last, bad, rtt, diff, best)
        yield GaugeMetricFamily("mqbtt_broker_connected", "1 while the exporter is connected "
                                "to the broker, else 0.", value=1 if s.connected else 0)
        yield GaugeMetricFamily("mqbtt_pairs", "Pairs tracked now.", value=len(pairs))
        yield GaugeMetricFamily("mqbtt_pairs_max", "The most pairs tracked at once "
                                "(--max-pairs).", value=s.max_pairs)
        yield CounterMetricFamily("mqbtt_dropped_pairs", "Pair ids not tracked because "
                                  "mqbtt_pairs_max pairs were.", value=s.dropped_pairs)
        yield CounterMetricFamily("mqbtt_dropped_messages", "Messages of pairs not tracked "
                                  "because mqbtt_pairs_max pairs were.", value=s.dropped_messages)
        yield CounterMetricFamily("mqbtt_forgotten_pairs", "Pairs forgotten after a long "
                                  "silence to make room for new ones.", value=s.forgotten_pairs)
        yield CounterMetricFamily("mqbtt_ignored_messages", "Messages on topics that are not "
                                  "mqbtt/<pair id>/<subtopic>.", value=s.ignored_messages)


def run_exporter(broker_uri: str | None = None, listen: str = "127.0.0.1:9108", pair_ids=None, *,
                 max_pairs: int = 1000, forget_after: float = 3600.0,
                 connect_timeout: float = 10.0, stop: threading.Event | None = None,
                 ready=None) -> int:
    """Serve every pair's statistics (see :class:`FleetStats`) in the
    Prometheus text format at ``http://<listen>/metrics`` until SIGINT or
    SIGTERM (or *stop* is set); returns 0.

    The metrics are computed from the statistics at each scrape (a
    prometheus_client collector), so memory is bounded by *max_pairs*.
    *ready*, if given, is called with ``(stats, host, port)`` once serving.

    :raises MQbtTError: without prometheus_client (naming the pip command),
      when the broker cannot be reached (:exc:`MQbtTConnectionError`) or
      when *listen* cannot be bound.
    :raises ValueError: for a bad *listen* address."""
    host, port = parse_listen(listen)
    prom = _prometheus()
    from prometheus_client import CollectorRegistry, ProcessCollector
    stats = FleetStats(broker_uri, pair_ids, max_pairs=max_pairs, forget_after=forget_after,
                       role="exporter")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FleetCollector(stats))
    ProcessCollector(registry=registry)
    stop = stop or threading.Event()
    old = _stop_signals(stop)
    server = None
    try:
        try:
            stats.start(connect_timeout)
            try:
                started = prom.start_http_server(port, addr=host, registry=registry)
            except OSError as err:
                raise MQbtTError(f"cannot listen on {listen}: {err.strerror or err}") from None
            server = started[0] if isinstance(started, tuple) else None
            if ready is not None:
                bound = server.server_address[:2] if server is not None else (host, port)
                ready(stats, *bound)
            while not stop.is_set():
                time.sleep(0.2)
        except KeyboardInterrupt:
            if not stop.is_set():
                raise
        finally:
            closer = None
            if server is not None:   # serve_forever notices within its 0.5 s poll: meanwhile disconnect
                closer = threading.Thread(target=server.shutdown, daemon=True)
                closer.start()
            stats.stop()
            if closer is not None:
                closer.join()
                server.server_close()
    finally:
        _restore_signals(old)
    return 0


###############################################################################
# Command line: program names, dependencies, pip scripts, run tracebacks ######
###############################################################################

#: How the program was started (``sys.argv[0]``, or main()'s *prog*), for usage lines.
_ARGV0 = None

#: The :data:`DEPENDENCIES` each command needs, checked before it starts.
_NEEDS = {
    "dump": ("paho", "google.protobuf"),
    "echo": ("paho", "google.protobuf"),
    "record": ("paho",),
    "replay": ("paho",),
    "restart": ("requests",),
    "wslog": ("websocket",),
    "upgrade": ("requests",),
    "export": ("google.protobuf",),
    "top": ("paho", "google.protobuf"),
    "exporter": ("paho", "google.protobuf", "prometheus_client"),
}


def _python_name() -> str:
    """The interpreter's name as typed (``python3``), for usage lines."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            first = os.path.basename(f.read().split(b"\0")[0].decode())
        if first.startswith("python"):
            return first
    except (OSError, UnicodeDecodeError, IndexError):
        pass
    return "python3"


def _invoked_as() -> str:
    """The program as the user typed it: ``mqbtt``, ``./mqbtt.pyz``, ``mqbtt.pyz``
    (found on $PATH), ``python3 mqbtt.py`` (not a path, or not executable)."""
    import shutil
    argv0 = _ARGV0 if _ARGV0 is not None else sys.argv[0]
    name = os.path.basename(argv0 or "")
    if not name.startswith("mqbtt"):   # main() called from elsewhere (tests, -c)
        return "mqbtt"
    if not name.endswith((".py", ".pyz")):
        return name
    if os.sep not in argv0:       # not a path: it was an argument of python
        return f"{_python_name()} {argv0}"
    if shutil.which(name) == argv0:   # found on $PATH
        return name
    if os.access(argv0, os.X_OK):
        return argv0
    return f"{_python_name()} {argv0}"


def _prog(cmd: str) -> str:
    """The program name of *cmd*'s usage line, as the user typed it:
    ``mqbtt_dump`` (a link or console script), ``mqbtt dump``,
    ``./mqbtt.pyz dump``, ``python3 mqbtt.py dump``."""
    argv0 = _ARGV0 if _ARGV0 is not None else sys.argv[0]
    if _command_from_argv0(argv0) == cmd:
        return os.path.basename(argv0)
    return f"{_invoked_as()} {cmd}"


def pip_scripts() -> dict:
    """The console scripts pip made for this mqbtt (``{"mqbtt": path, "mqbtt_dump":
    path, …}``, from the installation's RECORD), or ``{}`` when this ``mqbtt.py`` is
    not the one a pip installation put in place."""
    try:
        from importlib import metadata
        dist = metadata.distribution("mqbtt")
        here = os.path.realpath(__file__)
        if os.path.realpath(str(dist.locate_file("mqbtt.py"))) != here:
            return {}
        names = set(link_names())
        found = {}
        for f in dist.files or ():
            if f.name in names and f.parent.name in ("bin", "Scripts"):
                path = os.path.realpath(str(dist.locate_file(f)))
                if os.path.isfile(path):
                    found[f.name] = path
        return found
    except Exception:  # not installed by pip, or an unreadable RECORD
        return {}


def _print_script_traceback(err: BaseException, filename: str) -> None:
    """Print *err*'s traceback as ``python SCRIPT`` would: from the script's
    first frame on, without mqbtt's and runpy's frames around it."""
    import traceback
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    traceback.print_exception(type(err), err, tb)


###############################################################################
# Command line ################################################################
###############################################################################

#: the documented commands, in the order ``mqbtt --help`` lists them
COMMANDS = {
    "dump": "print the traffic a role of a pair would receive",
    "record": "record the traffic of every pair in a SQLite database",
    "replay": "republish a recorded pair's traffic with its original timing",
    "info": "summarise a recording: its pairs, message counts and times",
    "export": "write a recording's decoded messages as JSON lines or CSV",
    "copy": "copy a recording between databases (SQLite, PostgreSQL)",
    "echo": "fake miner answering every request (for testing optimizers)",
    "upgrade": "upgrade this mqbtt.pyz to the latest release",
    "restart": "restart an AxeOS miner and log the event to OpenObserve",
    "wslog": "store the AxeOS websocket log stream in a file",
    "install-links": "create the mqbtt_* command symlinks in a directory",
    "run": "run a script (e.g. an optimizer) with mqbtt and its dependencies importable",
    "top": "live full-screen table of every pair's traffic",
    "exporter": "serve every pair's traffic statistics to Prometheus",
}


class _UsageError(Exception):
    pass


def _parser(cmd):
    import argparse

    class ArgumentParser(argparse.ArgumentParser):
        def parse_args(self, *args, **kwargs):  # usage errors first, then missing packages
            a = super().parse_args(*args, **kwargs)
            check_dependencies(*_NEEDS.get(cmd, ()))
            return a
    p = ArgumentParser(prog=_prog(cmd), description=COMMANDS[cmd][:1].upper() + COMMANDS[cmd][1:] + ".")
    p.add_argument("--version", action="version", version=f"mqbtt {__version__}",
                   help="Show version and exit.")
    return p


def _arg_type(check, keep_text=False):
    """An argparse type calling *check* on the option's text: its
    ``ValueError`` becomes a usage error (one line, exit status 2).  The
    option's value is what *check* returns, or the text if *keep_text*."""
    import argparse

    def convert(text):
        try:
            value = check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text if keep_text else value
    return convert


def _pair_or_all(text):
    """A pair id, or ``+`` for every pair (``dump``, ``top``, ``exporter``)."""
    return text if text == "+" else check_pair_id(text)


#: argparse types of the options shared by several commands
_broker_arg = _arg_type(BrokerURI.parse, keep_text=True)   # a valid broker URI
_pid_arg = _arg_type(check_pair_id)                        # a valid pair id
_dump_pid_arg = _fleet_pid_arg = _arg_type(_pair_or_all)   # a pair id or +
_time_arg = _arg_type(parse_time)                          # see parse_time()
_share_arg = _arg_type(check_share_group)                  # a shared-subscription group
_db_arg = _arg_type(_check_db_path)                        # a file path (not :memory:) or URL
_listen_arg = _arg_type(parse_listen, keep_text=True)      # HOST:PORT


def _add_broker(p):
    env = os.environ.get("MQBTT_BROKER") or None

    def broker_arg(text):
        if env is not None and text is env:  # the default, from the environment
            try:
                BrokerURI.parse(text)
            except ValueError as err:  # name the variable, not --broker
                p.exit(2, f"{p.prog}: error: $MQBTT_BROKER: {err}\n")
        return _broker_arg(text)

    p.add_argument("--broker", metavar="URI", default=env or DEFAULT_BROKER, type=broker_arg,
                   help=f"MQTT broker (host, mqtt://, mqtts://, ws://, wss://), "
                        f"default: $MQBTT_BROKER or {DEFAULT_BROKER}")


def _cmd_echo(argv):
    p = _parser("echo")
    _add_broker(p)
    p.add_argument("--pid", metavar="TEXT", type=_pid_arg, help="Pair identifier")
    p.add_argument("pair_id", nargs="?", type=_pid_arg, help="Pair identifier (same as --pid)")
    p.add_argument("--count", type=_count_arg, metavar="N", help="exit after answering N requests")
    a = p.parse_args(argv)
    pid = a.pid or a.pair_id
    if not pid:
        p.error("a pair id is required (--pid ID or a positional PAIR_ID)")
    if a.pid and a.pair_id and a.pid != a.pair_id:
        p.error("--pid and PAIR_ID disagree")
    run_echo(a.broker, pid, count=a.count)
    return 0


def _cmd_dump(argv):
    p = _parser("dump")
    _add_broker(p)
    p.add_argument("--pid", metavar="TEXT", required=True, type=_dump_pid_arg,
                   help="Pair id [required]; + watches every pair")
    p.add_argument("--mode", choices=list(DUMP_MODES), default="optimizer",
                   help="Operation mode: log (log lines), miner (requests), optimizer "
                        "(replies with their round-trip time, and shares), all (the four "
                        "subtopics); default: optimizer")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument("--count", type=_count_arg, metavar="N", help="exit after N messages")
    p.add_argument("--duration", metavar="SECONDS", type=_seconds,
                   help="exit after SECONDS (like mosquitto_sub -W; exit status 27 if "
                        "--count was given and not reached)")
    a = p.parse_args(argv)
    what = ", ".join(topic(a.pid, s) for s in DUMP_MODES[a.mode])

    def ready():
        print(f"mqbtt dump: listening to {what} on {BrokerURI.parse(a.broker)} (Ctrl-C to stop)",
              file=sys.stderr, flush=True)

    n = dump(a.broker, a.pid, a.mode, as_json=a.json, count=a.count, ready=ready,
             duration=a.duration)
    if a.count is not None and n < a.count:   # --duration ran out first
        print(f"mqbtt dump: timed out after {a.duration:g} s ({n} of {a.count} messages)",
              file=sys.stderr, flush=True)
        return 27
    return 0


def _cmd_record(argv):
    p = _parser("record")
    _add_broker(p)
    p.add_argument("--db", metavar="PATH", required=True, type=_db_arg,
                   help="Path to the record database. [required]")
    p.add_argument("--exclude", metavar="TEXT", default="",
                   help="Comma separated list of subtopics to exclude (in: esp, log, shr, srv).")
    p.add_argument("--client-id", metavar="ID",
                   help="MQTT client id (default: derived from this host, the broker and the "
                        "absolute database path, so a restarted recorder gets back its session)")
    p.add_argument("--pid", metavar="ID", action="append", type=_pid_arg, dest="pids",
                   help="record only this pair (repeat for several; default: every pair)")
    p.add_argument("--duration", metavar="SECONDS", type=_seconds,
                   help="stop after SECONDS (default: run until Ctrl-C or SIGTERM)")
    p.add_argument("--share", metavar="GROUP", type=_share_arg,
                   help="subscribe as a member of the shared subscription GROUP "
                        "($share/GROUP/mqbtt/+/...): N recorders split the stream")
    a = p.parse_args(argv)
    try:
        exclude = parse_subtopics(a.exclude)
    except ValueError as err:
        p.error(f"--exclude: {err}")
    if set(exclude) == set(SUBTOPICS):
        p.error("--exclude: every subtopic is excluded, nothing to record")
    if a.client_id is not None and not a.client_id.strip():
        p.error("--client-id must not be empty")
    record(a.broker, a.db, exclude=exclude, client_id=a.client_id, status=sys.stderr,
           pair_ids=a.pids, duration=a.duration, share=a.share)
    return 0


def _cmd_replay(argv):
    p = _parser("replay")
    _add_broker(p)
    p.add_argument("--db", metavar="PATH", required=True, type=_db_arg,
                   help="the record database [required]")
    p.add_argument("--pid", metavar="TEXT", required=True, type=_pid_arg,
                   help="the recorded pair id [required]")
    p.add_argument("--to-pid", metavar="TEXT", type=_pid_arg,
                   help="publish as this pair id (default: --pid)")
    p.add_argument("--speed", metavar="X", type=_speed_arg, default=1.0,
                   help="divide the recorded gaps by X (default 1; 0: as fast as possible)")
    _add_time_window(p)
    a = p.parse_args(argv)
    _check_time_window(p, a)
    to = a.to_pid or a.pid
    return _replay_cli(a, to)


def _add_time_window(p):
    p.add_argument("--from", metavar="TIME", type=_time_arg, dest="from_",
                   help="only messages at or after TIME: ISO 8601 (2026-12-01T10:00:00Z; local "
                        "time without Z or offset) or seconds since the epoch")
    p.add_argument("--to", metavar="TIME", type=_time_arg,
                   help="only messages at or before TIME (same forms as --from)")


def _check_time_window(p, a):
    if a.from_ is not None and a.to is not None and a.from_ > a.to:
        p.error(f"--from ({_iso_utc(a.from_)}) is after --to ({_iso_utc(a.to)})")


def _fail(cmd, err) -> int:
    """One line on stderr for a usage error found after parsing (exit status 2)."""
    print(f"mqbtt {cmd}: error: {err}", file=sys.stderr, flush=True)
    return 2


def _hms(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _replay_cli(a, to) -> int:
    """``mqbtt replay``: the checks, the start line, a progress line with ETA
    on a terminal, and a summary line at the end, also after Ctrl-C."""
    tty = sys.stderr.isatty()
    state = {"n": 0, "total": None, "shown": 0.0}
    started = time.monotonic()

    import signal
    stop = threading.Event()
    old = {}

    def connected():
        # from now on Ctrl-C and SIGTERM end the replay between two messages,
        # so that the summary is exact
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda signum, frame: stop.set())
        state["total"] = plan["messages"]
        print(f"mqbtt replay: publishing {plan['messages']} messages of pair {_show_pair(a.pid)} "
              f"of {_redact_db(a.db)} ({_info_time(plan['first']) or '(no time)'} to "
              f"{_info_time(plan['last']) or '(no time)'}) as {_show_pair(to)} at speed {a.speed:g}",
              file=sys.stderr, flush=True)

    def progress(n, total, eta):
        state["n"] = n
        now = time.monotonic()
        if tty and (now - state["shown"] >= 0.2 or n == total):
            state["shown"] = now
            sys.stderr.write(f"\r\x1b[Kmqbtt replay: {n}/{total} messages ({100 * n // total}%), "
                             f"{_hms(now - started)} elapsed, ETA {_hms(eta)}")
            sys.stderr.flush()

    try:
        plan = replay_plan(a.db, a.pid, a.from_, a.to)
    except MQbtTNotFound as err:
        return _fail("replay", err)
    try:
        n = replay(a.db, a.broker, a.pid, a.to_pid, a.speed, min_timestamp=a.from_,
                   max_timestamp=a.to, connected=connected, progress=progress, stop=stop)
    except MQbtTNotFound as err:   # the database changed in between
        return _fail("replay", err)
    except KeyboardInterrupt:      # while connecting
        print("mqbtt replay: interrupted before connecting: nothing published",
              file=sys.stderr, flush=True)
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if tty and state["n"]:
        sys.stderr.write("\n")
    if stop.is_set():
        print(f"mqbtt replay: interrupted after {_hms(time.monotonic() - started)}: "
              f"{n} of {plan['messages']} messages published", file=sys.stderr, flush=True)
    else:
        print(f"mqbtt replay: {n} messages published", file=sys.stderr, flush=True)
    return 0


def _human_size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _cmd_info(argv):
    p = _parser("info")
    p.add_argument("--db", metavar="PATH", required=True, help="the record database [required]")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    a = p.parse_args(argv)
    try:
        db = open_recording(a.db)
    except MQbtTNotFound as err:
        return _fail("info", err)
    with db:
        info = db.info()
    if a.json:
        import json
        info = dict(info, pairs={pid: {k: (_info_time(s[k]) if k in ("first", "last")
                                          else _json_float(v)) for k, v in s.items()}
                                 for pid, s in info["pairs"].items()})
        print(json.dumps(info, ensure_ascii=False))
        return 0
    size = "" if info["size"] is None else f"{_human_size(info['size'])}, "
    if info["wal_size"]:
        size = size[:-2] + f" (+ {_human_size(info['wal_size'])} of write-ahead log), "
    pairs = info["pairs"]
    print(f"{_redact_db(a.db)}: {size}{len(pairs)} pair{'s' * (len(pairs) != 1)}, "
          f"{info['messages']} message{'s' * (info['messages'] != 1)}")
    if pairs:
        names = {pid: _show_pair(pid) for pid in pairs}
        w = max(4, *map(len, names.values()))
        counts = ["messages", *SUBTOPICS]
        cw = {c: max(len(c), *(len(str(s[c])) for s in pairs.values())) for c in counts}
        print(f"{'pair':<{w}}  " + "  ".join(f"{c:>{cw[c]}}" for c in counts)
              + f"  {'first (UTC)':<32}  last (UTC)")
        for pid, s in pairs.items():
            print(f"{names[pid]:<{w}}  " + "  ".join(f"{s[c]:>{cw[c]}}" for c in counts)
                  + f"  {_info_time(s['first']) or '(no time)':<32}  "
                  f"{_info_time(s['last']) or '(no time)'}")
    return 0


def _info_time(when):
    """ISO 8601 of a summary's first/last datetime (None: a bad row's time)."""
    return None if when is None else when.isoformat(timespec="microseconds")


def _cmd_export(argv):
    p = _parser("export")
    p.add_argument("--db", metavar="PATH", required=True, help="the record database [required]")
    p.add_argument("--pid", metavar="ID", type=_pid_arg, help="only this pair")
    p.add_argument("--subtopic", metavar="S", choices=list(SUBTOPICS),
                   help="only this subtopic (srv, esp, shr or log)")
    _add_time_window(p)
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="jsonl",
                   help="jsonl (one JSON object per line, the default) or csv")
    a = p.parse_args(argv)
    _check_time_window(p, a)
    try:
        export(a.db, sys.stdout, a.format, pair_id=a.pid, subtopic=a.subtopic,
               min_timestamp=a.from_, max_timestamp=a.to)
    except MQbtTNotFound as err:
        return _fail("export", err)
    return 0


def _cmd_copy(argv):
    p = _parser("copy")
    p.add_argument("src", metavar="SRC", type=_db_arg,
                   help="the recording to copy: a SQLite file or postgresql://user@host:port/dbname")
    p.add_argument("dst", metavar="DST", type=_db_arg,
                   help="the database to copy into (created if needed); copying again adds "
                        "only rows not copied before")
    a = p.parse_args(argv)
    tty = sys.stderr.isatty()
    t0 = time.monotonic()

    def progress(done, todo):
        if tty:
            sys.stderr.write(f"\r\x1b[Kmqbtt copy: {done}/{todo} rows")
            sys.stderr.flush()

    copied, skipped = copy(a.src, a.dst, progress=progress)
    if tty and copied:
        sys.stderr.write("\n")
    dt = time.monotonic() - t0
    print(f"mqbtt copy: {copied} rows copied from {_redact_db(a.src)} to {_redact_db(a.dst)} "
          f"in {dt:.1f} s ({skipped} copied before)", file=sys.stderr, flush=True)
    return 0


def _seconds(text):
    """argparse type: a positive number of seconds (at most :data:`MAX_SECONDS`)."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.001 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"expected a number of seconds from 0.001 to "
                                         f"{MAX_SECONDS:.0f}, got {text!r}")
    return value


#: the longest duration a command-line option accepts (a year): more is
#: surely a typo, and overflows the system's timers
MAX_SECONDS = 366 * 86400.0


def _count_arg(text):
    """argparse type: a positive integer (``--count``)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _speed_arg(text):
    """argparse type: a replay speed (0, or a finite number >= MIN_SPEED)."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    try:
        _check_speed(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0 (as fast as possible) or a number from "
                                         f"{MIN_SPEED:g}, got {text!r}") from None
    return value


def _cmd_restart(argv):
    p = _parser("restart")
    p.add_argument("--pid", metavar="TEXT", default="test",
                   help="Pair identifier (or device address), default: test")
    p.add_argument("--detail", metavar="TEXT", default="",
                   help="The detail of the reason for which the restart is requested")
    p.add_argument("--wait", metavar="SECONDS", nargs="?", type=_seconds, const=180.0,
                   help="wait until the device answers again (up to SECONDS, default 180) "
                        "and report how long it was down")
    p.add_argument("--no-history", action="store_true",
                   help="do not record the restart in the OpenObserve history stream")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=HTTP_TIMEOUT,
                   help=f"timeout of each HTTP call, default: {HTTP_TIMEOUT:g}")
    a = p.parse_args(argv)
    restart(a.pid, a.detail, wait=a.wait, history=not a.no_history, timeout=a.timeout,
            progress=lambda message: print(f"mqbtt restart: {safe_text(message)}", flush=True))
    return 0


def _cmd_wslog(argv):
    p = _parser("wslog")
    p.add_argument("--pid", metavar="TEXT", default="test",
                   help="Pair identifier (or device address), default: test")
    p.add_argument("--file", metavar="PATH", required=True,
                   help="Path to the file where to store the logs. [required]")
    p.add_argument("--duration", metavar="SECONDS", type=_seconds,
                   help="stop after SECONDS (default: run until Ctrl-C)")
    a = p.parse_args(argv)
    warned = []

    def progress(event, message):
        if event == "connected" and not warned:
            warned.append(True)
            print("mqbtt wslog: warning: while this runs the miner sends no logs over MQTT "
                  "(OpenObserve receives none); with firmware before ESP-Miner v2.14 MQTT "
                  f"logging resumes only after a miner restart ('mqbtt restart --pid {a.pid}')",
                  file=sys.stderr, flush=True)
            message += " (Ctrl-C to stop)"
        print(f"mqbtt wslog: {safe_text(message)}", file=sys.stderr, flush=True)

    n = wslog(a.pid, a.file, duration=a.duration, progress=progress)
    print(f"mqbtt wslog: {n} lines appended to {a.file}", file=sys.stderr, flush=True)
    return 0


def _cmd_upgrade(argv):
    p = _parser("upgrade")
    p.add_argument("--url", metavar="BASE",
                   help=f"release location holding mqbtt.pyz and mqbtt.pyz.sha256, default: "
                        f"${UPGRADE_URL_ENV} or {UPGRADE_URL}")
    p.add_argument("--check", action="store_true",
                   help="only say whether a newer version is available")
    a = p.parse_args(argv)
    target = running_zipapp()
    if target is None:
        raise MQbtTError("not running from mqbtt.pyz, so there is nothing to replace: "
                         "upgrade a copied mqbtt.py by copying the new release over it, "
                         "a pip installation with 'pip install --upgrade' from a new checkout")
    installed, available, replaced = upgrade(target, a.url, check=a.check)
    if replaced:
        print(f"mqbtt upgrade: {target} upgraded from {installed} to {available} "
              f"(previous version kept as {target}.bak)")
    elif _version_key(available) > _version_key(installed):
        print(f"mqbtt upgrade: {available} is available (installed: {installed})")
    else:
        print(f"mqbtt upgrade: {target} is up to date ({installed}; latest release {available})")
    return 0


def _cmd_install_links(argv):
    p = _parser("install-links")
    p.add_argument("directory", metavar="DIR", help="where to create the links, e.g. ~/.local/bin")
    p.add_argument("--force", action="store_true", help="replace existing files of those names")
    p.add_argument("--parents", action="store_true", help="create DIR (and its parents) if missing")
    a = p.parse_args(argv)
    for link in install_links(a.directory, force=a.force, parents=a.parents):
        if os.path.islink(link):
            print(f"{link} -> {os.readlink(link)}")
        else:
            print(f"{link} (made by pip)")
    return 0


def _cmd_run(argv):
    import argparse
    p = _parser("run")
    p.add_argument("script", metavar="SCRIPT", help="the Python script to run (- reads it from stdin)")
    p.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER,
                   help="its arguments, optional (passed as they are, options included)")
    p.usage = f"{p.prog} [-h] [--version] SCRIPT [ARGS ...]"
    a = p.parse_args(argv)
    if a.script != "-" and not os.path.isfile(a.script):
        raise FileNotFoundError(f"no such script: {a.script}")
    try:
        run_script(a.script, a.args)
    except SystemExit as e:  # the script's own exit: as python would treat it
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # the user's bug: show the traceback as python would
        _print_script_traceback(err, "<stdin>" if a.script == "-" else a.script)
        return 1
    return 0


def _add_fleet_args(p):
    _add_broker(p)
    p.add_argument("--pid", metavar="ID", nargs="+", action="extend", type=_fleet_pid_arg,
                   help="watch only these pairs (repeatable; default or +: every pair)")
    p.add_argument("--max-pairs", metavar="N", type=_count_arg, default=1000,
                   help="track at most N pairs; the others are dropped and counted (default 1000)")


def _cmd_top(argv):
    p = _parser("top")
    _add_fleet_args(p)
    p.add_argument("--stale", metavar="SECONDS", type=_seconds, default=60.0,
                   help="dim the pairs silent for longer than this (default 60)")
    p.add_argument("--interval", metavar="SECONDS", type=_seconds, default=10.0,
                   help="when not on a full-screen terminal: print a table every SECONDS "
                        "(default 10)")
    p.add_argument("--sort", choices=list(FLEET_SORT_KEYS), default="p",
                   help="initial sort key: " + ", ".join(
                       f"{k} {c}" for k, (c, _, _) in FLEET_SORT_KEYS.items()) + " (default p)")
    a = p.parse_args(argv)

    def ready(stats):
        if not _full_screen_ok(sys.stdout):
            print(safe_text(f"mqbtt top: watching {', '.join(t for t, _ in stats.subscriptions)} "
                            f"on {stats.broker}, a table every {a.interval:g} s (Ctrl-C to stop)",
                            strip_ansi=False),
                  file=sys.stderr, flush=True)

    run_top(a.broker, a.pid, interval=a.interval, stale=a.stale, max_pairs=a.max_pairs,
            sort=a.sort, ready=ready)
    return 0


def _cmd_exporter(argv):
    p = _parser("exporter")
    _add_fleet_args(p)
    p.add_argument("--listen", metavar="HOST:PORT", type=_listen_arg, default="127.0.0.1:9108",
                   help="where to serve /metrics (default 127.0.0.1:9108; :PORT for every "
                        "interface, port 0 for a free one)")
    p.add_argument("--forget", metavar="SECONDS", type=_seconds, default=3600.0,
                   help="when --max-pairs pairs are tracked, forget a pair silent for longer "
                        "than this to make room for a new one (default 3600)")
    a = p.parse_args(argv)
    _prometheus()   # before connecting: one line naming the pip command

    def ready(stats, host, port):
        shown = f"[{host}]" if ":" in host else host
        print(safe_text(f"mqbtt exporter: serving http://{shown}:{port}/metrics for "
                        f"{', '.join(t for t, _ in stats.subscriptions)} on {stats.broker} "
                        "(Ctrl-C to stop)", strip_ansi=False), file=sys.stderr, flush=True)

    run_exporter(a.broker, a.listen, a.pid, max_pairs=a.max_pairs, forget_after=a.forget,
                 ready=ready)
    return 0


def _not_yet(cmd):
    def run(argv):
        p = _parser(cmd)
        p.parse_args(argv)
        raise MQbtTError(f"the {cmd} command is not implemented yet")
    return run


_HANDLERS = {
    "dump": _cmd_dump,
    "record": _cmd_record,
    "replay": _cmd_replay,
    "info": _cmd_info,
    "export": _cmd_export,
    "copy": _cmd_copy,
    "echo": _cmd_echo,
    "upgrade": _cmd_upgrade,
    "install-links": _cmd_install_links,
    "run": _cmd_run,
    "restart": _cmd_restart,
    "wslog": _cmd_wslog,
    "top": _cmd_top,
    "exporter": _cmd_exporter,
}


def _command_from_argv0(argv0: str):
    name = os.path.basename(argv0 or "")
    for suffix in (".pyz", ".py"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.startswith("mqbtt_") and name[6:] in COMMANDS:
        return name[6:]
    return None


def _top_usage():
    width = max(map(len, COMMANDS))
    me = _invoked_as()
    lines = [f"usage: {me} [--version] [--help] COMMAND [OPTIONS]", "",
             "MQbtT: steer a Bitcoin miner from an optimizer over MQTT.", "", "commands:"]
    lines += [f"  {c:<{width}}  {h}" for c, h in COMMANDS.items()]
    lines += ["", f"Run '{me} COMMAND --help' for a command's options. Invoked through a",
              "symlink named mqbtt_COMMAND, the command runs directly."]
    return "\n".join(lines)


def _cli_logging(cmd):
    """Show the library's warnings and connection events (disconnected,
    reconnected) on stderr, one line each, prefixed with the command."""
    if not any(getattr(h, "_mqbtt_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._mqbtt_cli = True
        log.addHandler(handler)
        log.propagate = False
    for h in log.handlers:
        if getattr(h, "_mqbtt_cli", False):
            h.setFormatter(_SafeFormatter(f"mqbtt {cmd}: %(message)s"))
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def main(argv: list | None = None, prog: str | None = None) -> int:
    """The command-line entry point: ``mqbtt COMMAND [OPTIONS]``, or
    ``mqbtt_COMMAND [OPTIONS]`` when invoked through a symlink of that name.

    Returns the exit status: 0 success, 1 runtime error (one line on
    stderr), 2 usage error."""
    if argv is None:
        argv = sys.argv[1:]
    global _ARGV0
    _ARGV0 = prog if prog is not None else sys.argv[0]
    cmd = _command_from_argv0(prog if prog is not None else sys.argv[0])
    if cmd is None:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(_top_usage(), file=sys.stdout if argv else sys.stderr)
            return 0 if argv else 2
        if argv[0] == "--version":
            print(f"mqbtt {__version__}")
            return 0
        cmd, argv = argv[0], argv[1:]
        if cmd not in _HANDLERS:
            print(_top_usage(), file=sys.stderr)
            print(f"mqbtt: error: unknown command {cmd!r}", file=sys.stderr)
            return 2
    _cli_logging(cmd)
    # "run": the user's script owns its signals
    restore = _sigterm_interrupts() if cmd != "run" else (lambda: None)
    try:
        return _HANDLERS[cmd](list(argv)) or 0
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (MQbtTError, ValueError, OSError) as err:
        print(f"mqbtt {cmd}: error: {safe_text(err)}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:  # a dependency imported without _require()
        key = _dependency_of(err.name)
        if key is None:
            raise
        print(f"mqbtt {cmd}: error: {_missing_dependency(key)}", file=sys.stderr)
        return 1
    finally:
        restore()


def _sigterm_interrupts():
    """Make SIGTERM end a command as Ctrl-C does (``KeyboardInterrupt``, so
    every blocking call is interrupted and cleanup runs); return a function
    restoring the previous handler.  ``record`` installs its own handlers."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, interrupt)
    except (ValueError, OSError):  # pragma: no cover
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
