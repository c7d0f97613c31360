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

_pb_classes = None


def _pb():
    """The protobuf message classes (``Request``, ``Reply``, ``Share``), built
    on first use from :data:`_DESCRIPTOR` (protobuf is imported lazily)."""
    global _pb_classes
    if _pb_classes is None:
        import base64
        from google.protobuf import descriptor_pool, message_factory
        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(base64.b64decode(_DESCRIPTOR))
        fd = pool.FindFileByName("mqbtt.proto")
        _pb_classes = {
            name: message_factory.GetMessageClass(fd.message_types_by_name[name])
            for name in ("Request", "Reply", "Share")
        }
    return _pb_classes


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
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise MQbtTDecodeError(f"cannot decode {cls.__name__} from {type(b).__name__}: bytes expected")
    m = _pb()[cls.__name__]()
    try:
        m.ParseFromString(b)
    except Exception as err:  # google.protobuf.message.DecodeError, RuntimeWarning, ...
        raise _decode_error(cls, b, err) from None
    return m


def _serialize(self, pbname, **fields):
    try:
        return _pb()[pbname](**fields).SerializeToString()
    except (ValueError, TypeError) as err:
        raise ValueError(f"cannot serialize {self!r}: {err}") from None


class Kind(enum.IntEnum):
    """The kind of a :class:`Reply`."""
    HELLO = 0
    RESULT = 1
    RESET = 2
    BYE = 3


@dataclass(frozen=True, kw_only=True)
class Request:
    """Request message sent by the optimizer to the miner.

    :param timestamp_min: Minimum timestamp.
    :param timestamp_max: Maximum timestamp.
    :param nonce_start: Minimum nonce.
    :param nonce_size: Maximum nonce.
    :param reset: Whether to reset the state.

    Integers are unsigned 32-bit on the wire (a ``ValueError`` is raised by
    :meth:`to_bytes` otherwise).
    """
    timestamp_min: int = 0
    timestamp_max: int = 0
    nonce_start: int = 0
    nonce_size: int = 0
    reset: bool = False

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
    """
    kind: Kind = Kind.RESULT
    num_shares: int = 0
    new_block: bool = False

    def to_bytes(self) -> bytes:
        """Serialize the Reply to bytes using protobuf.

        :returns: The serialized protobuf representation of the reply.
        :raises ValueError: if a field is out of range or of the wrong type."""
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

    def to_bytes(self) -> bytes:
        """Serialize the Share to bytes using protobuf.

        :returns: The serialized protobuf representation of the share.
        :raises ValueError: if a field is out of range or of the wrong type."""
        return _serialize(self, "Share", version=self.version, prev_block=self.prev_block,
                          merkle_root=self.merkle_root, time=self.time,
                          pool_time=self.pool_time, bits=self.bits, nonce=self.nonce,
                          pool_diff=self.pool_diff, job_id=self.job_id,
                          extranonce2=self.extranonce2, diff=self.diff, zeroes=self.zeroes)

    @classmethod
    def from_bytes(cls, b: bytes) -> "Share":
        """Deserialize bytes into a Share object.

        :param b: The bytes to deserialize.
        :returns: The deserialized Share object.
        :raises MQbtTDecodeError: if *b* is not a serialized Share."""
        m = _parse(cls, b)
        obj = object.__new__(cls)
        obj.__dict__.update(
            version=m.version, prev_block=m.prev_block, merkle_root=m.merkle_root,
            time=m.time, pool_time=m.pool_time, bits=m.bits, nonce=m.nonce,
            pool_diff=m.pool_diff, job_id=m.job_id, extranonce2=m.extranonce2,
            diff=m.diff, zeroes=m.zeroes)
        return obj


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
            raise ValueError(f"invalid broker URI {_redact(uri)!r}: {err}") from None
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
    """*uri* with any password replaced by ``***``."""
    import re
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", str(uri))


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


def _tcp_nodelay(client, userdata, sock):
    """paho ``on_socket_open`` callback: turn Nagle's algorithm off (Nagle +
    delayed ACKs stall QoS>=1 exchanges by ~40 ms)."""
    import socket
    raw = getattr(sock, "_socket", sock)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


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
        self._queues = {sub: queue.Queue(max_queue) for sub, _ in subs}
        self._topics = {topic(self.pair_id, sub): sub for sub, _ in subs}
        self._cond = threading.Condition()
        self._connected = False
        self._subscribed = False
        self._sub_mid = None
        self._error = None        # fatal error (auth refused, subscription refused)
        self._stopped = False
        self._pending = deque()   # MQTTMessageInfo of non-blocking QoS>0 sends
        self._connected_at = 0.0
        self._short_sessions = deque(maxlen=4)
        self._takeover_warned = 0.0
        #: number of (re)connections so far
        self.connections = 0
        self._client = self._make_client()
        self._start(connect_timeout)

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
    def _make_client(self):
        c = _paho_client(self.broker, self.client_id, self.clean_session, **self._client_kwargs())
        c.on_socket_open = self._on_socket_open
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        return c

    def _client_kwargs(self) -> dict:
        return {}

    def _start(self, connect_timeout):
        c = self._client
        try:
            # the first connection is synchronous, so that its failure is reported
            # with its real cause (refused, unknown host, TLS, websocket handshake)
            c.connect(self.broker.host, self.broker.port, self.keepalive)
        except Exception as err:  # OSError, ssl.SSLError, WebsocketConnectionError, ValueError
            self._shutdown(wait=False)
            raise MQbtTConnectionError(f"cannot connect to {self.broker}: {_describe(err)}") from None
        c.loop_start()
        deadline = time.monotonic() + connect_timeout
        with self._cond:
            while not (self._subscribed or self._error):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            ok = self._subscribed and not self._error
            err = self._error
        if not ok:
            self._shutdown(wait=False)
            if err is None:
                err = MQbtTConnectionError(
                    f"cannot connect to {self.broker}: no answer within {connect_timeout:g} s")
            raise err

    def _on_socket_open(self, client, userdata, sock):
        _tcp_nodelay(client, userdata, sock)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            err = MQbtTConnectionError(
                f"broker {self.broker} refused the connection of client id "
                f"{self.client_id!r}: {reason_code}")
            with self._cond:
                fatal = self._error is None
                self._error = err
                self._cond.notify_all()
            if fatal:
                log.error("%s; giving up (no retry on refused credentials)", err)
                self._wake_receivers()
            client.disconnect()
            return
        with self._cond:
            self._connected = True
            self._connected_at = time.monotonic()
            self.connections += 1
            self._cond.notify_all()
        if self.connections > 1:
            log.info("reconnected to %s (session present: %s)", self.broker, flags.session_present)
        self._subscribe(client)

    def _subscribe(self, client):
        if not self.receive_subtopics:
            with self._cond:
                self._subscribed = True
                self._cond.notify_all()
            return
        subs = [(topic(self.pair_id, s), q) for s, q in self.receive_subtopics]
        rc, mid = client.subscribe(subs)
        with self._cond:
            self._sub_mid = mid

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        bad = [(s, rc) for (s, _), rc in zip(self.receive_subtopics, reason_codes) if rc.is_failure]
        with self._cond:
            if bad:
                err = MQbtTSubscribeError(
                    f"broker {self.broker} refused subscription(s) "
                    + ", ".join(f"{topic(self.pair_id, s)} ({rc})" for s, rc in bad)
                    + " — do these credentials have access to this pair?")
                self._error = err
            self._subscribed = True
            self._cond.notify_all()
        if bad:
            log.error("%s", err)
            self._wake_receivers()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        now = time.monotonic()
        with self._cond:
            was = self._connected
            self._connected = False
            if self._stopped or not was:
                return
            lasted = now - self._connected_at
        log.info("disconnected from %s (%s); reconnecting", self.broker, reason_code)
        if lasted < 10:
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
        sub = self._topics.get(msg.topic)
        if sub is None:
            return
        try:
            self._queues[sub].put_nowait(msg.payload)
        except queue.Full:
            self.dropped[sub] += 1

    def _wake_receivers(self):
        for q in self._queues.values():
            try:
                q.put_nowait(_FATAL)
            except queue.Full:
                pass

    # -- receiving ----------------------------------------------------------------
    def _receive(self, subtopic, blocking=True, timeout=None):
        """Next raw payload of *subtopic* with the documented semantics, or None."""
        q = self._queues[subtopic]
        if timeout is not None:
            if timeout < 0:
                raise ValueError("timeout must be a non-negative number")
            item = q.get(True, timeout)
        elif blocking:
            item = q.get()
        else:
            try:
                item = q.get_nowait()
            except Empty:
                return None
        if item is _FATAL:
            q.put_nowait(_FATAL)
            raise self._error
        return item

    def _has(self, subtopic) -> bool:
        return not self._queues[subtopic].empty()

    # -- sending --------------------------------------------------------------------
    def _publish(self, subtopic, payload: bytes, blocking=True, timeout=None):
        if self._stopped:
            raise MQbtTSendError("cannot send: the client is stopped")
        if self._error is not None:
            raise MQbtTSendError(f"cannot send: {self._error}")
        qos = SUBTOPICS[subtopic]
        info = self._client.publish(topic(self.pair_id, subtopic), payload, qos)
        if qos == 0:
            return
        pending = self._pending
        while pending and pending[0].is_published_safe():
            pending.popleft()
        if not blocking:
            pending.append(_Pending(info))
            return
        if timeout is None:
            timeout = self.send_timeout
        if not _wait_published(info, timeout):
            pending.append(_Pending(info))
            raise MQbtTSendTimeout(
                f"the broker {self.broker} did not acknowledge the message on "
                f"{topic(self.pair_id, subtopic)} within {timeout:g} s; it stays queued "
                "and will be delivered once the connection is back")

    # -- life cycle -------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether the client is connected to the broker right now."""
        return self._connected

    def wait_sent(self, timeout: float | None = None) -> bool:
        """Wait until every message sent with ``blocking=False`` has been
        acknowledged by the broker; return False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            p = self._pending[0]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _wait_published(p.info, left):
                return False
            self._pending.popleft()
        return True

    def stop(self, timeout: float = 5.0):
        """Stop the MQTT client and disconnect from the broker.

        Messages sent with ``blocking=False`` are given up to *timeout*
        seconds to reach the broker first.  Calling it twice is harmless."""
        if self._stopped:
            return
        if self._connected and self._error is None:
            self.wait_sent(timeout)
        self._shutdown()

    def _shutdown(self, wait=True):
        with self._cond:
            self._stopped = True
        try:
            self._client.disconnect()
        except Exception:  # pragma: no cover - paho raises nothing here normally
            pass
        self._client.loop_stop()

    close = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        state = "stopped" if self._stopped else ("connected" if self._connected else "disconnected")
        return (f"<{type(self).__name__} pair_id={self.pair_id!r} broker='{self.broker}' "
                f"client_id={self.client_id!r} {state}>")


class _Pending:
    __slots__ = ("info",)

    def __init__(self, info):
        self.info = info

    def is_published_safe(self):
        return self.info._published


def _wait_published(info, timeout) -> bool:
    """Wait for the broker's acknowledgement of *info*.

    Unlike ``MQTTMessageInfo.wait_for_publish`` this does not raise when the
    message was queued while disconnected (paho sends it after reconnecting),
    and it reports a timeout instead of returning silently."""
    cond = info._condition
    deadline = None if timeout is None else time.monotonic() + timeout
    with cond:
        while not info._published:
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
        :raises MQbtTSendTimeout: if the broker did not acknowledge in time."""
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

# (issue 4: MQbtTRecord, MQbtTDataBase / MQbtTDatabase, record, dump, replay)


###############################################################################
# External services: AxeOS and OpenObserve ####################################
###############################################################################

# (issue 5: pid2url, axeos_info, axeos_restart, o2_history, restart, wslog)


###############################################################################
# Distribution: zipapp, symlinks and upgrade ##################################
###############################################################################

# (issue 3: upgrade, install-links)


###############################################################################
# Command line ################################################################
###############################################################################

#: the documented commands, in the order ``mqbtt --help`` lists them
COMMANDS = {
    "dump": "print the traffic a role of a pair would receive",
    "record": "record the traffic of every pair in a SQLite database",
    "echo": "fake miner answering every request (for testing optimizers)",
    "upgrade": "upgrade this mqbtt.pyz to the latest release",
    "restart": "restart an AxeOS miner and log the event to OpenObserve",
    "wslog": "store the AxeOS websocket log stream in a file",
}


class _UsageError(Exception):
    pass


def _parser(cmd):
    import argparse
    p = argparse.ArgumentParser(prog=f"mqbtt_{cmd}", description=COMMANDS[cmd].capitalize() + ".")
    p.add_argument("--version", action="version", version=f"mqbtt {__version__}",
                   help="Show version and exit.")
    return p


def _add_broker(p):
    p.add_argument("--broker", metavar="URI", default=default_broker(),
                   help=f"MQTT broker (host, mqtt://, mqtts://, ws://, wss://), "
                        f"default: $MQBTT_BROKER or {DEFAULT_BROKER}")


def _cmd_echo(argv):
    p = _parser("echo")
    _add_broker(p)
    p.add_argument("--pid", metavar="TEXT", help="Pair identifier")
    p.add_argument("pair_id", nargs="?", help="Pair identifier (same as --pid)")
    p.add_argument("--count", type=int, metavar="N", help="exit after answering N requests")
    a = p.parse_args(argv)
    pid = a.pid or a.pair_id
    if not pid:
        p.error("a pair id is required (--pid ID or a positional PAIR_ID)")
    if a.pid and a.pair_id and a.pid != a.pair_id:
        p.error("--pid and PAIR_ID disagree")
    run_echo(a.broker, pid, count=a.count)
    return 0


def _not_yet(cmd):
    def run(argv):
        p = _parser(cmd)
        p.parse_args(argv)
        raise MQbtTError(f"the {cmd} command is not implemented yet")
    return run


_HANDLERS = {
    "dump": _not_yet("dump"),
    "record": _not_yet("record"),
    "echo": _cmd_echo,
    "upgrade": _not_yet("upgrade"),
    "restart": _not_yet("restart"),
    "wslog": _not_yet("wslog"),
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
    lines = [f"usage: mqbtt [--version] [--help] COMMAND [OPTIONS]", "",
             "MQbtT: steer a Bitcoin miner from an optimizer over MQTT.", "", "commands:"]
    lines += [f"  {c:<{width}}  {h}" for c, h in COMMANDS.items()]
    lines += ["", "Run 'mqbtt COMMAND --help' for a command's options. Invoked through a",
              "symlink named mqbtt_COMMAND, the command runs directly."]
    return "\n".join(lines)


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
            print(_top_usage())
            return 0 if argv else 2
        if argv[0] == "--version":
            print(f"mqbtt {__version__}")
            return 0
        cmd, argv = argv[0], argv[1:]
        if cmd not in _HANDLERS:
            print(_top_usage(), file=sys.stderr)
            print(f"mqbtt: error: unknown command {cmd!r}", file=sys.stderr)
            return 2
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


if __name__ == "__main__":
    sys.exit(main())
