"""One head-end ingest worker (headend.service.HeadEnd) in a process of its
own, driven by JSON lines (see bench.fleetproc):

    python -m bench.worker DB KEYFILE HOST PORT CLIENT_ID

Builds the HeadEnd (scheduled collection off), emits {"built"}, waits for
"go", connects (persistent session, manual acks after commit, as `serve`),
emits {"subscribed"} once HeadEnd.start() saw the SUBACK, and stops on
"stop".
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from headend.config import SHARED_UPLINKS
from headend.service import HeadEnd
from shared.hostmqtt import BrokerSettings


def emit(**ev) -> None:
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def main() -> None:
    db, keyfile, host, port, cid = sys.argv[1:6]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    he = HeadEnd(Path(db), Path(keyfile).read_bytes(),
                 BrokerSettings(host=host, port=int(port), keepalive=120),
                 client_id=cid, subscriptions=SHARED_UPLINKS)
    emit(built=True)
    started = False
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "go" and not started:
            started = True
            he.start(timeout=30)  # returns once the SUBACK granted the subscription
            emit(subscribed=True)
        elif cmd == "stats":
            emit(stats={"received": he.received, "acked": he.acked, **he.ingest.totals})
        elif cmd == "stop":
            break
    if started:
        he.stop()
    emit(stopped=True)


if __name__ == "__main__":
    main()
