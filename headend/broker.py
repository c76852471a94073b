"""The embedded MQTT broker: amqtt 0.12, run from a config that
headend.brokerconf.write_amqtt wrote.

    python -m headend.broker --config out/broker/amqtt.json [--port N] [--host H]

Prints "broker listening on HOST:PORT" on stdout once it accepts
connections (with --port 0 the port is the one the system chose), logs to
stderr, and stops cleanly on SIGTERM or SIGINT.

The broker is amqtt's, with two repairs of our own (`GuardedBroker`):

- amqtt 0.12 acts on a CONNECT before it checks the password: a clean
  session deletes the stored session of that client id, a persistent one
  overwrites the stored session's Will and username, and a connected client
  with that id is thrown off. So anyone who can reach the port, with no
  password at all, could wipe the head-end's queued messages, or plant a
  Will (any topic, any payload) in a connected DAP's session and then kick
  it off so that the broker publishes that Will. Here the password is
  checked first and a refused CONNECT touches nothing.
- on every connection amqtt sends the retained messages matching *any*
  client's subscriptions, not only the connecting client's own, past its
  subscribe ACL. Here a client only gets retained messages for the filters
  it holds itself.
- amqtt delivers the messages queued for an offline persistent session with
  the RETAIN flag set; here they go out as ordinary messages (RETAIN 0), as
  MQTT 3.1.1 and Mosquitto do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

log = logging.getLogger("headend.broker")

# What a persistent session takes over from the CONNECT that resumes it.
_RESUMED_FIELDS = (
    "will_flag",
    "will_retain",
    "will_qos",
    "will_topic",
    "will_message",
    "keep_alive",
    "username",
    "password",
)


class GuardedBroker(Broker):
    """amqtt's Broker, authenticating before it touches any session state,
    sending retained messages only for a client's own subscriptions, and
    sending a session's offline queue without the RETAIN flag."""

    async def _initialize_client_session(  # type: ignore[override]
        self,
        reader: Any,
        writer: Any,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        peer = f"{remote_address}:{remote_port}"
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except NoDataError as exc:
            raise AMQTTError(f"{peer}: no CONNECT ({exc})") from exc
        except MQTTError:
            await writer.close()
            raise
        if not await self._authenticate(session, None):  # type: ignore[arg-type]
            connack = ConnackPacket.build(0, NOT_AUTHORIZED)
            await connack.to_stream(writer)
            await writer.close()
            raise MQTTError(f"{peer}: CONNECT refused for client id {session.client_id!r}")

        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            stored = self._sessions[session.client_id][0]
            for name in _RESUMED_FIELDS:
                setattr(stored, name, getattr(session, name))
            session = stored
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # amqtt keeps a persistent session's offline queue in a field named
        # `retained_messages`; those are not retained messages.
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        while not session.retained_messages.empty():
            queued = await session.retained_messages.get()
            sends.append(asyncio.ensure_future(
                handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
            ))
        if sends:
            await asyncio.wait(sends)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        holders = self._subscriptions.get(subscription[0], ())
        if any(s.client_id == session.client_id for s, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def load_config(path: Path) -> dict[str, Any]:
    """Read a broker config: JSON (what write_amqtt writes) or YAML."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        import yaml  # amqtt depends on PyYAML

        config = yaml.safe_load(text)
    if not isinstance(config, dict) or not isinstance(config.get("listeners"), dict):
        raise ValueError(f"{path}: not a broker config (no 'listeners' map)")
    return config


def _bind_of(config: dict[str, Any]) -> tuple[str, int]:
    bind = str(config["listeners"]["default"].get("bind", "127.0.0.1:1883"))
    host, _, port = bind.rpartition(":")
    return host or "0.0.0.0", int(port or 1883)


async def serve(config: dict[str, Any], ready: Any = None) -> None:
    """Run the broker until SIGTERM/SIGINT (or cancellation)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    broker = GuardedBroker(config)
    await broker.start()
    try:
        host, port = _bind_of(config)
        server = broker._servers.get("default")
        sockets = getattr(getattr(server, "instance", None), "sockets", None) or ()
        if sockets:
            port = sockets[0].getsockname()[1]
        print(f"broker listening on {host}:{port}", flush=True)
        if ready is not None:
            ready(host, port)
        await stop.wait()
        log.info("stopping")
    finally:
        await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m headend.broker", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True,
                        help="config written by headend.brokerconf.write_amqtt")
    parser.add_argument("--port", type=int, default=None,
                        help="override the config's port (0: any free port)")
    parser.add_argument("--host", default=None, help="override the config's listen address")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # amqtt logs a line per packet at INFO; keep our own INFO, its WARNING.
    if args.log_level != "DEBUG":
        logging.getLogger("amqtt").setLevel(max(logging.WARNING, getattr(logging, args.log_level)))
        logging.getLogger("transitions").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
        if args.port is not None or args.host is not None:
            host, port = _bind_of(config)
            host = args.host if args.host is not None else host
            port = args.port if args.port is not None else port
            if not 0 <= port < 65536:
                raise ValueError(f"--port {port} is out of range")
            config["listeners"]["default"]["bind"] = f"{host}:{port}"
    except (OSError, ValueError) as exc:
        print(f"headend.broker: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # a bad config, a port in use: say so and fail
        log.error("broker failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
