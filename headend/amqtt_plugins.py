"""Our amqtt plugin: the session checks that amqtt 0.12 does not make itself.

Loaded by dotted path from the `plugins` map that headend.brokerconf writes:

    "headend.amqtt_plugins.SessionGuardPlugin": {"bind_client_id": true,
                                                 "publish_acl": {...}}

It refuses a CONNECT when
- the client id or the username contains an MQTT wildcard ('+' or '#');
- `bind_client_id` is on and the client id is neither the username nor
  "<username>-<suffix>": in amqtt a persistent session belongs to a client id
  only, so whoever reuses another client's id inherits its subscriptions and
  its queued messages, whatever its own ACL says;
- the Will names a topic outside the user's `publish_acl`: amqtt publishes a
  Will (and retains it) without any topic check.

When nothing is wrong it abstains (returns None) and the password plugin
decides, except with `accept_all` (an open broker), where it accepts. We do
not use amqtt's AnonymousAuthPlugin for open brokers: it marks every session
anonymous, and amqtt neither queues messages for an anonymous persistent
session while it is offline nor keeps the session at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

WILDCARDS = frozenset("+#")


def filter_matches(topic: str, topic_filter: str) -> bool:
    """True if `topic` (no wildcards) matches the MQTT `topic_filter`."""
    t = topic.split("/")
    f = topic_filter.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return i == len(f) - 1
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(t) == len(f)


def session_refusal(
    client_id: str | None,
    username: str | None,
    will_topic: str | None,
    *,
    bind_client_id: bool,
    publish_acl: dict[str, list[str]] | None,
) -> str | None:
    """Why a CONNECT must be refused, or None. Pure, for the plugin and tests."""
    cid = client_id or ""
    if WILDCARDS.intersection(cid):
        return f"client id {cid!r} contains an MQTT wildcard"
    if username is not None and WILDCARDS.intersection(username):
        return f"username {username!r} contains an MQTT wildcard"
    if username is None:
        return None  # anonymous: the password plugin (or allow-anonymous) decides
    if bind_client_id and cid != username and not cid.startswith(username + "-"):
        return f"client id {cid!r} does not belong to user {username!r}"
    if will_topic is not None and publish_acl is not None:
        if WILDCARDS.intersection(will_topic) or not any(
            filter_matches(will_topic, f) for f in publish_acl.get(username, ())
        ):
            return f"user {username!r} may not publish its Will on {will_topic!r}"
    return None


class SessionGuardPlugin(BaseAuthPlugin):
    """Refuses sessions that amqtt's own plugins would let through; see the
    module docstring."""

    @dataclass
    class Config:
        bind_client_id: bool = True
        """Require the client id to be the username or "<username>-<suffix>"."""
        publish_acl: dict[str, list[str]] | None = None
        """The same publish ACL as TopicAccessControlListPlugin's: a Will must fit it."""
        accept_all: bool = False
        """An open broker: accept every session that passes the checks above."""

    async def authenticate(self, *, session: Session) -> bool | None:
        if session is None:
            return False
        reason = session_refusal(
            session.client_id,
            session.username,
            session.will_topic if session.will_flag else None,
            bind_client_id=self.config.bind_client_id,
            publish_acl=self.config.publish_acl,
        )
        if reason is not None:
            self.context.logger.warning("refusing %s: %s", session.client_id, reason)
            return False
        return True if self.config.accept_all else None
