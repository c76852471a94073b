"""The DAP's exceptions. Operational failures (bad configuration, the disk
queue, a broker) derive from DapError and stop the process with a clear
message. Bad input from the network never raises out of the service: it is
counted by its `reason` and dropped; the reasons the DAP adds to the
protocol's own (shared/errors.py) are the ProtocolError subclasses here."""

from __future__ import annotations

from shared.errors import DecodeError


class DapError(Exception):
    """Base of the DAP's operational errors."""

    reason = "dap"


class ConfigError(DapError):
    """The configuration file is missing, unreadable or has a wrong value.
    The message names the file, the key and what to do."""

    reason = "config"


class QueueError(DapError):
    """The disk queue cannot be opened or written (state_dir missing or not
    writable, database damaged, disk full)."""

    reason = "queue"


class BrokerError(DapError):
    """A broker could not be reached or refused the connection."""

    reason = "broker"


class BadTopic(DecodeError):
    """A message on a topic outside this DAP's part of the layout."""

    reason = "topic"


class WrongKind(DecodeError):
    """A well-formed message of a kind that does not belong on its topic
    (a group item sent uplink, a bundle sent as a request, ...)."""

    reason = "kind"
