"""Many Python threads on one cache; the GIL is released during C++ work."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from attention_echo import AttentionEchoCache, EchoConfig, attention


def test_many_threads_share_one_cache(make_qkv, make_emb, reference):
    cache = AttentionEchoCache(EchoConfig(capacity=8))
    requests = []
    for i in range(12):
        q, k, v = make_qkv(i % 4, T=64)
        requests.append((q, k, v, make_emb(100 + i % 6, P=32), np.arange(32) + i % 3))
    expected = [reference(q, k, v) for q, k, v, _, _ in requests]

    def work(n):
        errors = []
        for r in range(40):
            i = (n * 7 + r) % len(requests)
            q, k, v, emb, toks = requests[i]
            out, meta = cache.attention_with_echo(q, k, v, 32, emb, layer_id=i % 2,
                                                  prefix_tokens=toks if r % 2 else None)
            err = np.linalg.norm(out - expected[i]) / np.linalg.norm(expected[i])
            if err > cache.config.max_error + 1e-4:
                errors.append((i, meta, err))
            if r % 10 == 0:
                len(cache), cache.stats, repr(cache)
        return errors

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(work, range(16)))
    assert [e for r in results for e in r] == []
    s = cache.stats
    assert s["total_lookups"] == 16 * 40
    assert s["hits"] + s["misses"] == s["total_lookups"]
    assert 0 < len(cache) <= 8


def test_gil_is_released_during_cpp_work():
    # Calls of ~50-100 ms each on this machine class (longer under load): with
    # the GIL held the ticking thread below could run only between calls.
    rng = np.random.default_rng(0)
    q = rng.standard_normal((8, 4096, 64), dtype=np.float32)
    k = rng.standard_normal((8, 4096, 64), dtype=np.float32)
    done = threading.Event()
    calls = []

    def run():
        t0 = time.perf_counter()
        while len(calls) < 2 or time.perf_counter() - t0 < 0.25:
            attention(q, k, k)
            calls.append(1)
        done.set()

    worker = threading.Thread(target=run)
    ticks = 0
    worker.start()
    t0 = time.perf_counter()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)  # a Python thread that needs the GIL about 1000 times a second
    worker.join()
    total = time.perf_counter() - t0
    # Released, the loop keeps ticking at a good fraction of its free-running
    # rate; held, it would tick about once per call.
    assert ticks > max(3 * len(calls), 0.05 * total / 0.0011), (ticks, len(calls), total)
