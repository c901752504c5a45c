"""A rollout's write to Redis whose reply is lost: Redis ran it, the connection dropped before the reply
arrived, and the rollout's client (proto.redis_conn.connect: retries on connection loss) sent it again.
Every group and dead letter must still be in its stream once and counted once in ``produced`` — the
counter a synchronous trainer compares to know its request for more groups was served.

The loss is real: a TCP proxy between the client and a real Redis forwards every request and, once armed,
closes the client's connection instead of passing the next reply on."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlparse

import pytest
import redis
from trainer_data import tiny_group

from proto import DeadLetter
from proto.config import RedisConfig
from proto.deadletter import read_dead_letters
from proto.keys import RedisKeys
from proto.redis_conn import connect
from proto.stream import produced_count
from rollout_service.producer import Producer

pytestmark = pytest.mark.integration
KEYS = RedisKeys("lost-reply")


class ReplyDropper:
    """127.0.0.1 proxy to Redis. ``arm()``: the next reply Redis sends is withheld and that client
    connection closed (the request itself was forwarded whole, so Redis has run it)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = 0
        self._armed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self) -> None:
        self._armed.set()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self._armed.is_set():
                    self._armed.clear()
                    self.dropped += 1
                    break  # the reply never reaches the client
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


def letter(group_id: str) -> DeadLetter:
    return DeadLetter(
        kind="reward_failed",
        reason="r",
        source="rollout",
        dead_at=0.0,
        group_id=group_id,
        failed_rewards=["a"],
    )


def test_a_write_redis_ran_but_whose_reply_was_lost_is_not_applied_twice(redis_url: str) -> None:
    url = urlparse(redis_url)
    proxy = ReplyDropper((url.hostname, url.port))
    direct = redis.Redis.from_url(redis_url)
    client = connect(RedisConfig(url=f"redis://127.0.0.1:{proxy.port}{url.path or '/0'}"))
    try:
        direct.delete(KEYS.groups, KEYS.deadletter, KEYS.published, KEYS.dead, KEYS.produced)
        producer = Producer(client, KEYS)
        producer.publish([tiny_group("g0")])  # a first write, whose reply arrives
        producer.dead_letter([letter("d0")])

        proxy.arm()
        producer.publish([tiny_group("g1"), tiny_group("g2")])  # run by Redis, reply lost, sent again
        proxy.arm()
        producer.dead_letter([letter("d1")])
        assert proxy.dropped == 2

        ids = [fields for _, fields in direct.xrange(KEYS.groups)]
        assert len(ids) == 3, f"{len(ids)} stream entries for 3 groups"
        assert [entry.group_id for _, entry in read_dead_letters(direct, KEYS)] == ["d0", "d1"]
        assert produced_count(direct, KEYS) == 5  # 3 groups + 2 dead letters, each counted once

        producer.publish([tiny_group("g1")])  # a repeat the caller itself makes is absorbed the same way
        assert direct.xlen(KEYS.groups) == 3 and produced_count(direct, KEYS) == 5
    finally:
        client.close()
        direct.close()
        proxy.close()
