"""The peer the Redis bench compares with: Powertools for AWS Lambda's idempotency utility on
redis-py, against the same Redis, measured by the same clock as idem's rounds.

    python powertools_redis.py CASE SECONDS PREFIX

CASE is `first1`, `first16` (fresh keys, 1 or 16 threads) or `replay1` (1,000 completed
records read back at random, local cache off; idem's bench reads its own in turn, also from
Redis). Prints one line: the
calls per second. Every key it writes expires within ten minutes, and it deletes its own.
"""

import os
import random
import sys
import threading
import time
import warnings

import redis
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
    RedisCachePersistenceLayer,
)


def main() -> None:
    # Outside Lambda it warns that it cannot read the remaining time, and its Redis layer's
    # client protocol is marked deprecated: both expected here.
    warnings.simplefilter("ignore")
    case, seconds, prefix = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    url = os.environ.get("IDEM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    client = redis.Redis.from_url(url)
    layer = RedisCachePersistenceLayer(client=client)
    config = IdempotencyConfig(expires_after_seconds=600, use_local_cache=False)

    @idempotent_function(
        data_keyword_argument="order",
        persistence_store=layer,
        config=config,
        key_prefix=prefix,
    )
    def handle(order: dict) -> dict:
        return {"n": 42}

    if case == "replay1":
        for k in range(1_000):
            handle(order={"k": k})
        threads, key = 1, lambda n: {"k": random.randrange(1_000)}
    elif case in ("first1", "first16"):
        threads = 1 if case == "first1" else 16
        round_id = random.getrandbits(32)
        key = lambda n: {"r": round_id, "n": n}
    else:
        sys.exit(f"unknown case {case!r}: first1, first16 or replay1")

    counter = iter(range(1 << 62))
    lock = threading.Lock()
    counts = [0] * threads

    failures: list[BaseException] = []

    def worker(i: int) -> None:
        end = start + seconds
        try:
            while time.monotonic() < end:
                with lock:
                    n = next(counter)
                handle(order=key(n))
                counts[i] += 1
        except BaseException as e:  # a failed call fails the round, not just its thread
            failures.append(e)

    try:
        start = time.monotonic()
        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if failures:
            raise failures[0]
        print(f"{sum(counts) / (time.monotonic() - start):.1f}")
    finally:
        keys = list(client.scan_iter(f"{prefix}*", count=1_000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])


if __name__ == "__main__":
    main()
