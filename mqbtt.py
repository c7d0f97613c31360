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
    "APIException",
    # external services (AxeOS, OpenObserve)
    "pid2url", "axeos_info", "axeos_restart", "o2_history", "restart", "wslog",
    "config_path", "HTTP_TIMEOUT", "AXEOS_PRIVATE_NETWORKS",
    # recording and analysis
    "MQbtTRecord", "MQbtTDataBase", "MQbtTDatabase", "Recorder", "record",
    "recorder_client_id", "dump", "format_dump", "replay", "request_reply_pairs", "MIN_SPEED",
    # distribution: zipapp, symlinks and upgrade
    "upgrade", "install_links", "link_names", "run_script", "running_zipapp", "UPGRADE_URL",
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


###############################################################################
# Messages and wire format ####################################################
###############################################################################

# mqbtt.proto compiled by protoc (a serialized FileDescriptorProto), so that
# this file works alone, with no generated *_pb2.py beside it.  test_mqbtt.py
# checks that it is exactly what `protoc --descriptor_set_out` makes of
# mqbtt.proto; regenerate it with `python build_zipapp.py --descriptor`.
_DESCRIPTOR = (
    "CgttcWJ0dC5wcm90bxIFbXFidHQiqQEKB1JlcXVlc3QSIwoNdGltZXN0YW1wX21pbhgBIAEoDVIM"
    "dGltZXN0YW1wTWluEiMKDXRpbWVzdGFtcF9tYXgYAiABKA1SDHRpbWVzdGFtcE1heBIfCgtub25j"
    "ZV9zdGFydBgDIAEoDVIKbm9uY2VTdGFydBIdCgpub25jZV9zaXplGAQgASgNUglub25jZVNpemUS"
    "FAoFcmVzZXQYBSABKAhSBXJlc2V0ImQKBVJlcGx5Eh8KBGtpbmQYASABKA4yCy5tcWJ0dC5LaW5k"
    "UgRraW5kEh0KCm51bV9zaGFyZXMYAiABKARSCW51bVNoYXJlcxIbCgluZXdfYmxvY2sYAyABKAhS"
    "CG5ld0Jsb2NrIr4CCgVTaGFyZRIYCgd2ZXJzaW9uGAEgASgNUgd2ZXJzaW9uEh0KCnByZXZfYmxv"
    "Y2sYAiABKAxSCXByZXZCbG9jaxIfCgttZXJrbGVfcm9vdBgDIAEoDFIKbWVya2xlUm9vdBISCgR0"
    "aW1lGAQgASgNUgR0aW1lEhsKCXBvb2xfdGltZRgFIAEoDVIIcG9vbFRpbWUSEgoEYml0cxgGIAEo"
    "DVIEYml0cxIUCgVub25jZRgHIAEoDVIFbm9uY2USGwoJcG9vbF9kaWZmGAggASgBUghwb29sRGlm"
    "ZhIVCgZqb2JfaWQYCSABKAlSBWpvYklkEiAKC2V4dHJhbm9uY2UyGAogASgJUgtleHRyYW5vbmNl"
    "MhISCgRkaWZmGAsgASgBUgRkaWZmEhYKBnplcm9lcxgMIAEoDVIGemVyb2VzKjEKBEtpbmQSCQoF"
    "SEVMTE8QABIKCgZSRVNVTFQQARIJCgVSRVNFVBACEgcKA0JZRRADYgZwcm90bzM="
)

_PB = {}


def _pb():
    """The protobuf message classes (``Request``, ``Reply``, ``Share``), built
    on first use from :data:`_DESCRIPTOR` (protobuf is imported lazily)."""
    if not _PB:
        import base64
        from google.protobuf import descriptor_pool, message_factory
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
    try:
        return (_PB.get(cls.__name__) or _pb()[cls.__name__]).FromString(b)
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

    Integers are unsigned 32-bit on the wire: the constructor raises
    ``TypeError`` for a value that is not an ``int`` (``reset``: not a
    ``bool``) and ``ValueError`` for one out of range.
    """
    timestamp_min: int = 0
    timestamp_max: int = 0
    nonce_start: int = 0
    nonce_size: int = 0
    reset: bool = False

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
                          nonce_size=self.nonce_size, reset=self.reset)

    @classmethod
    def from_bytes(cls, b: bytes) -> "Request":
        """Deserialize bytes into a Request object.

        :param b: The bytes to deserialize.
        :returns: The deserialized Request object.
        :raises MQbtTDecodeError: if *b* is not a serialized Request."""
        m = _parse(cls, b)
        obj = object.__new__(cls)
        obj.__dict__.update(timestamp_min=m.timestamp_min, timestamp_max=m.timestamp_max,
                            nonce_start=m.nonce_start, nonce_size=m.nonce_size, reset=m.reset)
        return obj


@dataclass(frozen=True, kw_only=True)
class Reply:
    """Reply message from the miner to the optimizer.

    :param kind: The kind of reply (e.g., RESULT).
    :param num_shares: Number of shares in the reply (unsigned 64-bit).
    :param new_block: Whether a new block was found.

    The constructor raises ``TypeError`` for a value of the wrong type (e.g.
    ``kind=1.0``) and ``ValueError`` for one out of range; an int *kind* is
    converted to :class:`Kind`.
    """
    kind: Kind = Kind.RESULT
    num_shares: int = 0
    new_block: bool = False

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
                          new_block=self.new_block)

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
        obj.__dict__.update(kind=kind, num_shares=m.num_shares, new_block=m.new_block)
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
    ``?insecure=1`` skips certificate checks), ``ws://…`` and ``wss://…``
    (MQTT over websockets, default ports 80/443, path default ``/mqtt``).
    The password never appears in ``str()`` or ``repr()``.
    """
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    path: str = "/mqtt"
    cafile: str | None = None
    insecure: bool = False

    _PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}

    @classmethod
    def parse(cls, uri: str) -> "BrokerURI":
        """Parse *uri*; raise ValueError with a one-line reason if it is not valid."""
        from urllib.parse import urlsplit, parse_qs, unquote
        if not isinstance(uri, str) or not uri.strip():
            raise ValueError("invalid broker URI: empty")
        text = uri.strip()
        if "://" not in text:
            text = "mqtt://" + text
        try:
            u = urlsplit(text)
            port = u.port
        except ValueError as err:
            # urllib's message may quote part of a password: never show it
            reason = ("port out of range 1-65535" if "out of range" in str(err) else
                      "invalid port or address (percent-encode / ? # @ in a password)")
            raise ValueError(f"invalid broker URI {_redact(uri)!r}: {reason}") from None
        if port == 0:
            raise ValueError(f"invalid broker URI {_redact(uri)!r}: port out of range 1-65535")
        scheme = u.scheme.lower()
        if scheme in ("tcp",):
            scheme = "mqtt"
        if scheme in ("ssl", "tls"):
            scheme = "mqtts"
        if scheme not in cls._PORTS:
            raise ValueError(f"invalid broker URI {_redact(uri)!r}: unknown scheme {u.scheme!r} "
                             "(use mqtt, mqtts, ws or wss)")
        if not u.hostname:
            raise ValueError(f"invalid broker URI {_redact(uri)!r}: no host")
        query = parse_qs(u.query)
        unknown = set(query) - {"cafile", "insecure"}
        if unknown:
            raise ValueError(f"invalid broker URI {_redact(uri)!r}: unknown option(s) {', '.join(sorted(unknown))}")
        path = u.path or "/mqtt"
        return cls(scheme=scheme, host=u.hostname, port=port or cls._PORTS[scheme],
                   username=unquote(u.username) if u.username is not None else None,
                   password=unquote(u.password) if u.password is not None else None,
                   path=path, cafile=query.get("cafile", [None])[-1],
                   insecure=query.get("insecure", ["0"])[-1].lower() in ("1", "true", "yes"))

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "wss")

    @property
    def transport(self) -> str:
        return "websockets" if self.scheme in ("ws", "wss") else "tcp"

    def __str__(self):
        user = ""
        if self.username is not None:
            user = self.username + (":***" if self.password is not None else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = self.path if self.transport == "websockets" else ""
        return f"{self.scheme}://{user}{host}:{self.port}{path}"


def _redact(uri: str) -> str:
    """*uri* with any password replaced by ``***``: everything between the
    first ``:`` of the user information and its last ``@`` (a password may
    itself contain ``/``, ``@``, ``#`` or ``?``)."""
    uri = str(uri)
    scheme, sep, rest = uri.partition("//")
    if not sep:
        scheme, rest = "", uri
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return uri
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{hostpart}"


def default_broker() -> str:
    """``$MQBTT_BROKER`` if set, else :data:`DEFAULT_BROKER`."""
    return os.environ.get("MQBTT_BROKER") or DEFAULT_BROKER


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
    import paho.mqtt.client as mqtt
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
        import ssl
        ctx = ssl.create_default_context(cafile=b.cafile)
        if b.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        c.tls_set_context(ctx)
    if b.username is not None:
        c.username_pw_set(b.username, b.password)
    c.reconnect_delay_set(1, 30)
    c.connect_timeout = 5.0
    c.max_queued_messages_set(0)
    c.on_socket_open = _tcp_nodelay
    return c


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
    :param kwargs: more :class:`paho.mqtt.client.Client` arguments (``manual_ack``).
    """

    def __init__(self, broker: BrokerURI, client_id: str, clean_session: bool,
                 subscriptions: list, on_message, keepalive=60, notify=None, *,
                 on_fatal=None, on_drop=None, **kwargs):
        self.broker = broker
        self.notify = notify or log.info
        self.on_fatal = on_fatal
        self.on_drop = on_drop
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
        c.on_message = on_message

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
            client.disconnect()
            self._fail(MQbtTConnectionError(
                f"broker {self.broker} refused the connection of client id "
                f"{self.client_id!r}: {reason_code} (not retrying)"))
            return
        with self.cond:
            self.generation += 1
            self.connected = True
            self.connected_at = time.monotonic()
            self.cond.notify_all()
        if self.generation > 1:
            self.notify(f"reconnected to {self.broker} (session present: {flags.session_present})")
        if self.subscriptions:
            client.subscribe(self.subscriptions)
        else:
            self._on_subscribe(client, userdata, 0, [], None)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
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
    signal handler may wait for ever.  There the wait is cut into slices of
    at most 0.1 s during which the calling thread holds asynchronous signals
    back (they are delivered as soon as the slice ends, or handled by another
    thread's C handler meanwhile): a signal costs at most 0.1 s of latency and
    an arriving message none."""
    if _SIGNAL_SAFE_GET or not isinstance(q, queue.SimpleQueue):
        return q.get(True, timeout)
    try:
        return q.get_nowait()
    except Empty:
        if timeout <= 0:
            raise
    import signal
    sigs = _timed_get.sigs
    if sigs is None:
        sigs = _timed_get.sigs = {getattr(signal, n) for n in _ASYNC_SIGNALS if hasattr(signal, n)}
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
    broker queued while it was away.
    """
    _role = "opt"

    def __init__(self, broker_uri: str, pair_id: str, keepalive: int = 60,
                 clean_session: bool = False, **kwargs):
        super().__init__(broker_uri, pair_id, [("esp", SUBTOPICS["esp"]), ("shr", SUBTOPICS["shr"])],
                         keepalive, clean_session, **kwargs)

    def send_request(self, request: Request, blocking: bool = True, timeout: float | None = None):
        """Send a request to the miner.

        :param request: the :class:`Request` to send.
        :param blocking: whether to block until the broker acknowledged it.
        :param timeout: seconds to wait when blocking (default :attr:`send_timeout`).
        :raises MQbtTSendTimeout: if the broker did not acknowledge in time.
        :raises MQbtTSendError: if the client is stopped, also by :meth:`stop` in another
          thread while this send waits (the message may or may not have been delivered)."""
        self._publish("srv", request.to_bytes(), blocking, timeout)

    def has_reply(self) -> bool:
        """Check if there is a reply from the miner.

        :returns: True if there is a reply, False otherwise."""
        return self._has("esp")

    def receive_reply(self, blocking: bool = True, timeout: float | None = None) -> Reply | None:
        """Receive a reply from the miner.

        :param blocking: Whether to block until the queue becomes not empty.
        :param timeout: The maximum time to wait for the queue to become not empty.
        :returns: the :class:`Reply`, or None (non-blocking, nothing there).
        :raises Empty: if *timeout* is given and no reply arrived in time.
        :raises MQbtTDecodeError: if the received payload is not a Reply."""
        b = self._receive("esp", blocking, timeout)
        return None if b is None else Reply.from_bytes(b)

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
    ``mqbtt-esp-<pair_id>``.
    """
    _role = "esp"

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
        return None if b is None else Request.from_bytes(b)

    def send_reply(self, reply: Reply, blocking: bool = True, timeout: float | None = None):
        """Send a reply to the optimizer."""
        self._publish("esp", reply.to_bytes(), blocking, timeout)

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


def _sqlite_open(path: str, create: bool):
    """``(connection, read_only)`` for the SQLite database *path*.

    A database that exists but cannot be written (read-only file, directory
    or medium) is opened read-only: ``mode=ro``, or ``immutable=1`` when even
    that fails (a WAL database whose ``-shm`` file cannot be created).  Else
    it is opened (created if *create*) in WAL mode with the schema."""
    import sqlite3
    from urllib.parse import quote
    writable = os.access(path, os.W_OK) and os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
    if not create and not writable:
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

    :param path: the database file.
    :param batch_size: :meth:`insert` commits after this many records...
    :param batch_timeout: ...or when the oldest uncommitted record is this many
      seconds old, whichever comes first (a timer commits even if no further
      record is inserted).  :meth:`close` commits what is left.

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

    def __init__(self, path: str, batch_size: int = 100, batch_timeout: float = 10.0):
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
        if os.path.exists(self.path):
            self._conn, self.read_only = _sqlite_open(self.path, create=False)
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

    def _select(self, pair_id, subtopic, min_timestamp, max_timestamp, text, desc):
        where, params = [], []
        if pair_id is not None:
            where.append("pair_id = ?")
            params.append(pair_id)
        if subtopic is not None:
            if subtopic not in SUBTOPICS:
                raise ValueError(f"unknown subtopic {subtopic!r} (expected one of esp, log, shr, srv)")
            where.append("subtopic = ?")
            params.append(subtopic)
        if min_timestamp is not None:
            where.append("timestamp >= ?")
            params.append(_epoch(min_timestamp, "min_timestamp"))
        if max_timestamp is not None:
            where.append("timestamp <= ?")
            params.append(_epoch(max_timestamp, "max_timestamp"))
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
            cur = self._conn.execute(sql, params)
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
        where, params = [], []
        if pair_id is not None:
            where.append("pair_id = ?")
            params.append(pair_id)
        if subtopic is not None:
            where.append("subtopic = ?")
            params.append(subtopic)
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
    (e.g. ``db.records(pair_id=...)``); other subtopics are ignored.  A
    ``srv`` request is answered by the next ``esp`` reply; a request followed
    by another request before any reply is unanswered.

    :returns: a generator of ``(request_record, reply_record, latency_seconds)``,
      with ``reply_record`` and ``latency_seconds`` None for unanswered requests
      (``latency_seconds`` also None when a record has no usable timestamp).
    """
    pending = None
    for r in records:
        if r.subtopic == "srv":
            if pending is not None:
                yield pending, None, None
            pending = r
        elif r.subtopic == "esp" and pending is not None:
            t0, t1 = pending.timestamp, r.timestamp
            yield pending, r, (None if t0 is None or t1 is None else (t1 - t0).total_seconds())
            pending = None
    if pending is not None:
        yield pending, None, None


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


def recorder_client_id(broker_uri: str, db_path: str) -> str:
    """The client id ``mqbtt record`` uses: ``mqbtt-rec-`` plus a hash of this
    host and user, the broker and the absolute database path — the same when
    the same recorder is restarted, different for recorders writing
    different databases."""
    import hashlib
    key = f"{_host_tag()}|{BrokerURI.parse(broker_uri)}|{os.path.realpath(os.fspath(db_path))}"
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
    :param db_path: the SQLite database (created if needed).
    :param exclude: subtopics not to record (list, or ``"log,shr"``).
    :param client_id: the MQTT client id (default :func:`recorder_client_id`).
    :param status: a text stream for progress (None: silent).  On a terminal,
      a live status line; otherwise one summary line every *status_interval* s.
    """

    def __init__(self, broker_uri: str, db_path: str, exclude=(), client_id: str | None = None, *,
                 batch_size: int = 100, batch_timeout: float = 10.0, window: int = 20,
                 keepalive: int = 60, connect_timeout: float = 10.0, status=None,
                 status_interval: float = 60.0):
        self.broker = BrokerURI.parse(broker_uri if broker_uri is not None else default_broker())
        excluded = parse_subtopics(exclude)
        self.subtopics = [s for s in SUBTOPICS if s not in excluded]
        if not self.subtopics:
            raise ValueError("every subtopic is excluded: nothing to record")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, not {window!r}")
        self.db_path = _check_db_path(db_path)
        self.client_id = client_id or recorder_client_id(str(self.broker), self.db_path)
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

    @property
    def total(self) -> int:
        """Messages stored so far."""
        return sum(self.counts.values())

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
        subs = [(f"mqbtt/+/{s}", min(SUBTOPICS[s], 1)) for s in self.subtopics]
        self._claim = _claim_recorder(self.db_path, self.client_id)
        created = not os.path.exists(self.db_path)
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
            self._say(f"recording {', '.join('mqbtt/+/' + s for s in self.subtopics)} "
                      f"from {self.broker} into {self.db_path} (client id {self.client_id})",
                      line=True)
            try:
                self._loop()
            except BaseException:
                self._conn.stop()
                self._close_db()
                raise
            self._conn.stop()
            self._close_db()
        finally:
            self._claim.release()
        if self._conn.error is not None:   # credentials refused on a reconnect: stored, then fail
            raise self._conn.error
        self._say(f"stopped: {self.total} messages recorded ({self._per_subtopic()})", line=True)
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
        while not self._stopping:
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
                          f"({self._per_subtopic()}){state}", line=not tty)
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
        stored = []
        rows = []
        for gen, mid, qos, t, payload, ts in batch:
            where = _recorded_topic(t)
            if where is None:
                self.skipped += 1   # the schema cannot take it: acknowledged, counted, shown
            elif where[1] in self.counts:   # else: a subtopic excluded now, subscribed by an old run
                rows.append((ts, where[0], where[1], payload))
                stored.append(where[1])
        try:
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

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
    try:
        return rec.run()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


#: what each ``mqbtt dump --mode`` receives
DUMP_MODES = {"log": ["log"], "miner": ["srv"], "optimizer": ["esp", "shr"]}


def _jsonable(message):
    if dataclasses.is_dataclass(message):
        out = {}
        for f in dataclasses.fields(message):
            v = getattr(message, f.name)
            if isinstance(v, enum.Enum):
                v = v.name
            elif isinstance(v, bytes):
                v = v.hex()
            out[f.name] = v
        return out
    return message


def format_dump(ts: float, subtopic: str, payload: bytes, rtt: float | None = None,
                as_json: bool = False, pair_id: str | None = None) -> str:
    """One ``mqbtt dump`` output line (without newline) for a message
    received at *ts* (seconds since the epoch)."""
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
        obj["subtopic"] = subtopic
        obj["type"] = None if message is None else (
            "log" if subtopic == "log" else type(message).__name__)
        obj["message"] = _jsonable(message)
        obj["payload"] = bytes(payload).hex()
        if err is not None:
            obj["error"] = err
        if rtt is not None:
            obj["rtt"] = rtt
        if isinstance(obj["message"], dict):   # JSON has no NaN or infinity: say it as text
            obj["message"] = {k: (str(v) if isinstance(v, float) and v != v or v in (
                float("inf"), float("-inf")) else v) for k, v in obj["message"].items()}
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)
    stamp = when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}" + when.strftime("%z")
    if message is None:
        text = f"undecodable {len(payload)} bytes: {bytes(payload).hex()}"
    elif subtopic == "log":
        # one line per message: no terminal escapes or line breaks from the wire
        text = message if message.isprintable() else repr(message)[1:-1]
    else:
        text = repr(message)
    if rtt is not None:
        text += f"  rtt={rtt * 1000:.1f} ms"
    return f"{stamp} {subtopic} {text}"


def dump(broker_uri: str, pair_id: str, mode: str, out=None, as_json: bool = False,
         count: int | None = None, keepalive: int = 60, connect_timeout: float = 10.0,
         ready=None) -> int:
    """Print what a role of a pair would receive, one line per message,
    flushed after every line (see :func:`format_dump`).

    *mode* ``log`` receives ``log``, ``miner`` receives ``srv``,
    ``optimizer`` receives ``esp`` and ``shr``; in optimizer mode dump also
    listens to ``srv`` (without printing it) to show each reply's round-trip
    time from the latest unanswered request.  It subscribes at QoS 1 (receive
    times are those of the PUBLISH packets).  It uses a random client id and
    a clean session, so it never kicks the real optimizer or miner off the
    broker and leaves nothing behind.  Returns after *count* messages (never
    if None) with the number printed; *ready* (a callable) is called once
    subscribed.
    """
    if mode not in DUMP_MODES:
        raise ValueError(f"unknown mode {mode!r} (expected log, miner or optimizer)")
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
    pending_request = None
    try:
        if ready is not None:
            ready()
        while count is None or n < count:
            try:
                ts, t, payload = _timed_get(q, 0.5)
            except Empty:
                continue
            where = _parse_topic(t)
            if where is None:
                continue
            sub = where[1]
            rtt = None
            if mode == "optimizer":
                if sub == "srv":
                    pending_request = ts
                    continue
                if sub == "esp" and pending_request is not None:
                    rtt, pending_request = ts - pending_request, None
            print(format_dump(ts, sub, payload, rtt, as_json), file=out, flush=True)
            n += 1
    finally:
        conn.stop()
    return n


def replay(db_path: str, broker_uri: str, pair_id: str, to_pid: str | None = None,
           speed: float = 1.0, *, min_timestamp=None, max_timestamp=None,
           keepalive: int = 60, connect_timeout: float = 10.0, send_timeout: float = 60.0,
           connected=None) -> int:
    """Republish a recorded pair's messages with their original timing.

    The messages of *pair_id* in *db_path* (optionally between *min_timestamp*
    and *max_timestamp*) are published in recording order to
    ``mqbtt/<to_pid>/<subtopic>`` (*to_pid* defaults to *pair_id*) at the QoS
    of their subtopic, the gaps between them divided by *speed* (``0``: as
    fast as possible).  Returns the number of messages published, once the
    broker acknowledged all of them.  *connected*, if given, is called once
    the broker accepted the connection.
    """
    _check_speed(speed)
    check_pair_id(pair_id)
    to_pid = check_pair_id(to_pid or pair_id)
    db_path = _check_db_path(db_path)
    if not os.path.exists(db_path):
        raise MQbtTError(f"no such database: {db_path}")
    # opened before connecting: a file that is not a database is reported first
    db = MQbtTDataBase(db_path)
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
        if not _wait_published(info, send_timeout):
            raise MQbtTSendTimeout(f"the broker {broker} did not acknowledge a replayed "
                                   f"message within {send_timeout:g} s")

    try:
        with db:
            t0 = m0 = None
            for rec in db.records(pair_id=pair_id, min_timestamp=min_timestamp,
                                  max_timestamp=max_timestamp):
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
                        time.sleep(min(delay, _MAX_SLEEP))
                        delay = m0 + (ts - t0) / speed - time.monotonic()
                if len(pending) >= MQbtTBase.max_pending:   # paho's ids are 16-bit
                    wait(pending.popleft())
                info = conn.client.publish(topic(to_pid, rec.subtopic), rec.payload, qos)
                if info.rc == _MQTT_ERR_QUEUE_SIZE:
                    raise MQbtTSendError("cannot replay: too many messages wait for the "
                                         "broker's acknowledgement")
                n += 1
                if qos == 2:
                    # the broker forwards a QoS 2 message only on PUBREL: without
                    # this wait a following QoS 1 message could overtake it
                    wait(info)
                elif qos == 1:
                    pending.append(info)
                    while pending and pending[0]._published:
                        pending.popleft()
        while pending:
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

    :raises ValueError: if ``$MQBTT_CONFIG`` names a missing file or the file
      is not valid INI (the message gives line numbers, never line contents,
      which may hold a password)."""
    import configparser
    path = config_path()
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # pair ids are case-sensitive
    try:
        with open(path, encoding="utf-8") as f:
            cp.read_file(f, source=path)
    except FileNotFoundError:
        if os.environ.get("MQBTT_CONFIG"):
            raise ValueError(f"configuration file {path} (from $MQBTT_CONFIG) does not exist") from None
    except configparser.ParsingError as err:
        lines = ", ".join(str(n) for n, _ in err.errors) or str(getattr(err, "lineno", "?"))
        raise ValueError(f"invalid configuration file {path} (line {lines}): "
                         "expected [section] headers and 'key = value' lines") from None
    except configparser.Error as err:  # duplicate section/option: names only
        raise ValueError(f"invalid configuration file {path}: {' '.join(str(err).split())}") from None
    return cp


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
            or any(c.isspace() for c in u.netloc)):
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
    import requests
    timeout = HTTP_TIMEOUT if timeout is None else float(timeout)
    where = f"{method} {_redact(url)}"
    hint = ("; the device may restart anyway: check it with 'axeos_info' before trying again"
            if no_retry_hint else "")
    try:
        return requests.request(method, url, timeout=timeout, auth=auth, json=json_body,
                                allow_redirects=False,
                                headers={"Accept": "application/json, text/plain;q=0.9, */*;q=0.5",
                                         "User-Agent": f"mqbtt/{__version__}"})
    except requests.exceptions.ConnectTimeout:
        raise APIException(f"{what}: {where}: cannot connect within {timeout:g} s") from None
    except requests.exceptions.Timeout:
        raise APIException(f"{what}: {where}: no answer within {timeout:g} s{hint}") from None
    except requests.exceptions.ConnectionError as err:
        connected, reason = _net_reason(err)
        if connected:
            raise APIException(f"{what}: {where}: connection lost before an answer "
                               f"({reason}){hint}") from None
        raise APIException(f"{what}: {where}: cannot connect ({reason})") from None
    except requests.exceptions.RequestException as err:
        raise APIException(f"{what}: {where}: {type(err).__name__}: "
                           f"{' '.join(str(err).split())[:200]}") from None


def _snippet(r, limit: int = 200) -> str:
    """The start of a response body, on one line (empty if there is none)."""
    try:
        text = " ".join(r.text.split())
    except Exception:  # pragma: no cover - undecodable body
        text = ""
    return text[:limit] + ("..." if len(text) > limit else "")


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
    raise APIException(f"{what}: {where}: HTTP {r.status_code} {r.reason or ''}".rstrip()
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
        raise APIException(f"{what}: {where}: HTTP {r.status_code} {r.reason or ''}".rstrip()
                           + f" ({' '.join(str(detail).split())[:200] if detail else _snippet(r)})")
    if not isinstance(answer, dict):
        raise APIException(f"{what}: {where}: the answer is not a JSON object "
                           f"({_snippet(r, 80) or 'empty'})")
    if answer.get("error"):
        raise APIException(f"{what}: {where}: OpenObserve reports an error: "
                           f"{' '.join(str(answer['error']).split())[:200]}")
    if answer.get("code", 200) != 200:
        raise APIException(f"{what}: {where}: OpenObserve answered code {answer.get('code')}"
                           + (f" ({answer['message']})" if answer.get("message") else ""))
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
                f"{entry.get('name', s.stream)!r}: {successful} successful, {failed} failed"
                + (f": {' '.join(str(error).split())[:200]}" if error else "") + ")")
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


def _ws_url(base: str) -> str:
    return ("wss" if base.startswith("https:") else "ws") + base[base.index(":"):] + "/api/ws"


def wslog(pid: str, path: str, *, duration: float | None = None, stop=None,
          timeout: float | None = None, backoff: tuple = (1.0, 60.0), progress=None) -> int:
    """Append the AxeOS websocket log stream (``ws://<host>/api/ws``) to the
    file *path*, one clean line at a time.

    Frames are plain text; they may split a line or join several, and carry
    ANSI colour codes: complete lines are reassembled, stripped of escape
    sequences and ``\\r``, appended and flushed one by one.  A dropped
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
    import re
    import websocket
    ansi = re.compile(_ANSI_PATTERN)
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
            f.write(ansi.sub("", text).replace("\r", "") + "\n")
            f.flush()
            count += 1

        decoder = None
        try:
            while not stopping():
                ws = None
                try:
                    ws = websocket.create_connection(url, timeout=connect_timeout,
                                                     suppress_origin=True,
                                                     skip_utf8_validation=True)
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
                    if first:
                        raise APIException(f"{where}: cannot connect ({reason[:1].lower() + reason[1:]})") from None
                else:
                    first = False
                    say("connected", f"connected to {_redact(url)}, appending to {path}")
                    got_data = False
                    decoder = codecs.getincrementaldecoder("utf-8")("replace")
                    reason = "closed by the device"
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
                            pending += decoder.decode(data if isinstance(data, bytes) else data.encode())
                            *lines, pending = pending.split("\n")
                            for line in lines:
                                emit(line)
                    except (OSError, websocket.WebSocketException) as err:
                        reason = " ".join(str(err).split())[:200] or type(err).__name__
                    finally:
                        pending += decoder.decode(b"", final=True)
                        decoder = None
                        try:
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
    """The names :func:`install_links` creates: ``mqbtt_<command>`` for every
    command (``mqbtt_dump``, ``mqbtt_record``, …)."""
    return [f"mqbtt_{c}" for c in COMMANDS if c not in _NO_LINK]


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


def install_links(directory: str, target: str | None = None, force: bool = False) -> list:
    """Create the ``mqbtt_*`` symlinks (see :func:`link_names`) in *directory*,
    each pointing at *target*, so that ``mqbtt_dump …`` runs ``mqbtt dump …``.

    :param directory: where to create the links (created if missing)
    :param target: the program the links point at (default: the running
      ``mqbtt.pyz``, else this ``mqbtt.py``), made absolute
    :param force: replace existing files or links of those names
    :returns: the paths of the links
    :raises FileExistsError: if a name is taken and *force* is false"""
    target = os.path.abspath(target or running_zipapp() or os.path.realpath(__file__))
    os.makedirs(directory, exist_ok=True)
    made = []
    for name in link_names():
        link = os.path.join(directory, name)
        if os.path.lexists(link):
            if os.path.islink(link) and os.readlink(link) == target:
                made.append(link)
                continue
            if not force:
                raise FileExistsError(f"{link} exists (use --force to replace it)")
        tmp = f"{link}.tmp-{os.getpid()}"
        os.symlink(target, tmp)
        os.replace(tmp, link)
        made.append(link)
    return made


def run_script(path: str, args: list = ()) -> None:
    """Run the Python script *path* as ``__main__`` with ``sys.argv = [path, *args]``,
    as ``python path args…`` would, but with mqbtt and (in the zipapp) its bundled
    dependencies importable: this is how ``mqbtt.pyz run optimizer.py`` works."""
    import runpy
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such script: {path}")
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    runpy.run_path(path, run_name="__main__")


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


def _fetch(url: str, timeout: float, out=None) -> bytes:
    """GET *url*; write the body to the binary file *out* (return b"") or return it."""
    import requests
    try:
        with requests.get(url, timeout=timeout, stream=out is not None,
                          headers={"User-Agent": f"mqbtt/{__version__}"}) as r:
            if r.status_code != 200:
                raise MQbtTError(f"cannot download {_redact(url)}: HTTP {r.status_code} {r.reason}")
            if out is None:
                return r.content
            for chunk in r.iter_content(1 << 16):
                out.write(chunk)
            return b""
    except requests.Timeout:
        raise MQbtTError(f"cannot download {_redact(url)}: no answer within {timeout:g} s") from None
    except requests.RequestException as err:
        raise MQbtTError(f"cannot download {_redact(url)}: {_net_reason(err)[1]}") from None


def _zipapp_version(path: str, timeout: float = 120) -> str:
    """The version the zipapp *path* reports with ``--version`` (run by this Python,
    with a throw-away shiv cache so no stray cache directory is left behind)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory(prefix="mqbtt-upgrade-") as root:
        env = dict(os.environ, SHIV_ROOT=root)
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
                         f"(exit {r.returncode}: {(r.stdout + r.stderr).strip()[-200:]!r})")
    return words[1]


def upgrade(target: str, url: str | None = None, check: bool = False,
            timeout: float = 60.0, progress=None) -> tuple:
    """Replace the zipapp *target* by the newest release, if newer.

    Downloads ``<url>/mqbtt.pyz.sha256`` (``sha256sum`` format) and
    ``<url>/mqbtt.pyz`` into a temporary file beside *target*, and checks that
    the download has that SHA-256, is a zip file with a ``#!`` line, runs and
    reports a newer version than *target*.  Only then is the previous file
    kept as ``<target>.bak`` and *target* atomically replaced (``os.replace``;
    a symlink is resolved first, so the link stays and its target changes;
    the file mode is kept).  Any failure leaves *target* untouched.

    :param target: the installed ``mqbtt.pyz`` (symlinks are followed)
    :param url: the base URL (default: ``$MQBTT_UPGRADE_URL``, else :data:`UPGRADE_URL`)
    :param check: only find out whether a newer version exists; change nothing
    :param timeout: timeout of each HTTP request, in seconds
    :param progress: called with a one-line message at each step, if given
    :returns: ``(installed_version, available_version, replaced)``
    :raises MQbtTError: on a download, checksum or validation failure
    :raises OSError: if the target cannot be read or replaced"""
    import hashlib
    import shutil
    import tempfile
    import zipfile
    say = progress or (lambda message: None)
    base = (url or os.environ.get(UPGRADE_URL_ENV) or UPGRADE_URL).rstrip("/")
    target = os.path.realpath(target)
    directory = os.path.dirname(target)
    installed = __version__ if running_zipapp() == target else _zipapp_version(target)
    text = _fetch(f"{base}/mqbtt.pyz.sha256", timeout).decode("utf-8", "replace")
    words = text.split()
    expected = words[0].lower() if words else ""
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise MQbtTError(f"{base}/mqbtt.pyz.sha256 is not in sha256sum format")
    if not os.access(directory, os.W_OK | os.X_OK) and not check:
        raise MQbtTError(f"cannot replace {target}: directory {directory} is not writable")
    say(f"downloading {base}/mqbtt.pyz")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".download",
                               dir=None if check else directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _fetch(f"{base}/mqbtt.pyz", timeout, out=f)
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            head = f.read(2)
            f.seek(0)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != expected:
            raise MQbtTError(f"checksum mismatch for {base}/mqbtt.pyz: "
                             f"got {h.hexdigest()}, published {expected}; nothing changed")
        if head != b"#!" or not zipfile.is_zipfile(tmp):
            raise MQbtTError(f"{base}/mqbtt.pyz is not a zipapp (no #! line or not a zip file)")
        available = _zipapp_version(tmp)
        if check or _version_key(available) <= _version_key(installed):
            return installed, available, False
        os.chmod(tmp, os.stat(target).st_mode & 0o7777)
        backup = target + ".bak"
        shutil.copy2(target, tmp + ".bak")
        os.replace(tmp + ".bak", backup)
        os.replace(tmp, target)
        return installed, available, True
    finally:
        for path in (tmp, tmp + ".bak"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


###############################################################################
# Command line ################################################################
###############################################################################

#: the documented commands, in the order ``mqbtt --help`` lists them
COMMANDS = {
    "dump": "print the traffic a role of a pair would receive",
    "record": "record the traffic of every pair in a SQLite database",
    "replay": "republish a recorded pair's traffic with its original timing",
    "echo": "fake miner answering every request (for testing optimizers)",
    "upgrade": "upgrade this mqbtt.pyz to the latest release",
    "restart": "restart an AxeOS miner and log the event to OpenObserve",
    "wslog": "store the AxeOS websocket log stream in a file",
    "install-links": "create the mqbtt_* command symlinks in a directory",
    "run": "run a script (e.g. an optimizer) with mqbtt and its dependencies importable",
}


class _UsageError(Exception):
    pass


def _parser(cmd):
    import argparse
    p = argparse.ArgumentParser(prog=f"mqbtt_{cmd}", description=COMMANDS[cmd][:1].upper() + COMMANDS[cmd][1:] + ".")
    p.add_argument("--version", action="version", version=f"mqbtt {__version__}",
                   help="Show version and exit.")
    return p


def _broker_arg(text):
    """argparse type: a valid broker URI (else a usage error, exit 2)."""
    import argparse
    try:
        BrokerURI.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _pid_arg(text):
    """argparse type: a valid pair id (else a usage error, exit 2)."""
    import argparse
    try:
        return check_pair_id(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_broker(p):
    p.add_argument("--broker", metavar="URI", default=default_broker(), type=_broker_arg,
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
    p.add_argument("--pid", metavar="TEXT", required=True, type=_pid_arg, help="Pair id [required]")
    p.add_argument("--mode", choices=list(DUMP_MODES), default="optimizer",
                   help="Operation mode: log (log lines), miner (requests), optimizer "
                        "(replies with their round-trip time, and shares); default: optimizer")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument("--count", type=_count_arg, metavar="N", help="exit after N messages")
    a = p.parse_args(argv)
    what = ", ".join(topic(a.pid, s) for s in DUMP_MODES[a.mode])

    def ready():
        print(f"mqbtt dump: listening to {what} on {BrokerURI.parse(a.broker)} (Ctrl-C to stop)",
              file=sys.stderr, flush=True)

    dump(a.broker, a.pid, a.mode, as_json=a.json, count=a.count, ready=ready)
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
    a = p.parse_args(argv)
    try:
        exclude = parse_subtopics(a.exclude)
    except ValueError as err:
        p.error(f"--exclude: {err}")
    if set(exclude) == set(SUBTOPICS):
        p.error("--exclude: every subtopic is excluded, nothing to record")
    if a.client_id is not None and not a.client_id.strip():
        p.error("--client-id must not be empty")
    record(a.broker, a.db, exclude=exclude, client_id=a.client_id, status=sys.stderr)
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
    a = p.parse_args(argv)
    to = a.to_pid or a.pid
    n = replay(a.db, a.broker, a.pid, a.to_pid, a.speed, connected=lambda: print(
        f"mqbtt replay: publishing pair {a.pid!r} of {a.db} as {to!r} at speed {a.speed:g}",
        file=sys.stderr, flush=True))
    print(f"mqbtt replay: {n} messages published", file=sys.stderr, flush=True)
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


def _db_arg(text):
    """argparse type: a database file path (not empty, not ``:memory:``)."""
    import argparse
    try:
        return _check_db_path(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
            progress=lambda message: print(f"mqbtt restart: {message}", flush=True))
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
        print(f"mqbtt wslog: {message}", file=sys.stderr, flush=True)

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
    a = p.parse_args(argv)
    for link in install_links(a.directory, force=a.force):
        print(f"{link} -> {os.readlink(link)}")
    return 0


def _cmd_run(argv):
    import argparse
    p = _parser("run")
    p.add_argument("script", metavar="SCRIPT", help="the Python script to run")
    p.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER,
                   help="its arguments (passed as they are, options included)")
    a = p.parse_args(argv)
    if not os.path.isfile(a.script):
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
    except BaseException:  # the user's bug: show the traceback as python would
        import traceback
        traceback.print_exc()
        return 1
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
    "echo": _cmd_echo,
    "upgrade": _cmd_upgrade,
    "install-links": _cmd_install_links,
    "run": _cmd_run,
    "restart": _cmd_restart,
    "wslog": _cmd_wslog,
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
    lines = ["usage: mqbtt [--version] [--help] COMMAND [OPTIONS]", "",
             "MQbtT: steer a Bitcoin miner from an optimizer over MQTT.", "", "commands:"]
    lines += [f"  {c:<{width}}  {h}" for c, h in COMMANDS.items()]
    lines += ["", "Run 'mqbtt COMMAND --help' for a command's options. Invoked through a",
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
            h.setFormatter(logging.Formatter(f"mqbtt {cmd}: %(message)s"))
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def main(argv: list | None = None, prog: str | None = None) -> int:
    """The command-line entry point: ``mqbtt COMMAND [OPTIONS]``, or
    ``mqbtt_COMMAND [OPTIONS]`` when invoked through a symlink of that name.

    Returns the exit status: 0 success, 1 runtime error (one line on
    stderr), 2 usage error."""
    if argv is None:
        argv = sys.argv[1:]
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
        print(f"mqbtt {cmd}: error: {err}", file=sys.stderr)
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
