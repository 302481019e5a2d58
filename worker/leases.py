"""``LeaseKeeper``: keeps the messages this worker holds from being handed to another worker.

Over Redis, Celery's messages are acknowledged late: one in hand sits in kombu's
``unacked`` hash, indexed in the ``unacked_index`` sorted set by the time it was
delivered, and any worker's periodic sweep puts it back on the queue once that time is
older than ``visibility_timeout``.  With Redis' default hour, a whole worker killed (an OOM
kill, a lost host) stranded its chunk for an hour; with a short timeout alone, a live
worker's long chunk would be handed out twice.

So the timeout is short (30 s) and each worker holds a *lease*: a thread in the worker's
main process (the one that fetched the messages, whatever the pool) sets the index score
of every message it holds to now, every ``visibility_timeout / 6`` seconds.  A live
worker's messages never look old; a dead worker's stop being renewed and come back after
``visibility_timeout`` plus one sweep.  ``ZADD XX`` only touches messages still in the
index, so a lease never resurrects an acknowledged message.  A worker cut off from Redis
for longer than the timeout loses its leases; its chunk may then run twice, which is
harmless (idempotent writes) and counted in the job's status.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import worker_ready
from celery.worker import state as worker_state

from encoder.settings import process_settings
from jobs.registry import connect

log = logging.getLogger("imgenc.worker")


def held_delivery_tags() -> list[str]:
    """Delivery tags of every message this worker process holds (reserved, running or
    waiting for a retry's countdown)."""
    requests = worker_state.requests.copy()
    tags = []
    for request in requests.values():
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag:
            tags.append(tag)
    return tags


class LeaseKeeper:
    def __init__(self, broker_url: str, transport_options: dict[str, Any], interval: float):
        prefix = transport_options.get("global_keyprefix", "")
        self.key = prefix + transport_options.get("unacked_index_key", "unacked_index")
        self.interval = interval  # s
        self.client = connect(broker_url)
        self.renewals = 0
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def renew(self) -> int:
        tags = held_delivery_tags()
        if tags:
            now = time.time()
            self.client.zadd(self.key, {tag: now for tag in tags}, xx=True)
            self.renewals += 1
        return len(tags)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.renew()
            except Exception as exc:  # Redis down: keep trying; the lease may lapse
                log.warning("could not renew message leases: %s", exc)


@worker_ready.connect
def _start_lease_keeper(sender: Any = None, **_: Any) -> None:
    app = sender.app
    LeaseKeeper(
        app.conf.broker_url,
        dict(app.conf.broker_transport_options or {}),
        process_settings().lease_interval,
    ).start()
    log.info("message leases renewed every %.0f s", process_settings().lease_interval)
