"""Shared fixtures. The suite tests the INSTALLED package: run it with
``--import-mode=importlib`` (pyproject's default) from any directory; the
sources in python/attention_echo are never on sys.path."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np
import pytest

import attention_echo


def pytest_report_header(config):
    return f"attention_echo {attention_echo.__version__} from {os.path.dirname(attention_echo.__file__)}"


def _reference(q, k, v, scale=None, causal=True, prefix_length=0):
    """float64 naive attention, (H, T, D) / (Hkv, T, D) or (T, D)."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    squeeze = q.ndim == 2
    if squeeze:
        q = q[None]
    if k.ndim == 2:
        k, v = k[None], v[None]
    H, T, D = q.shape
    group = H // k.shape[0]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    if causal:
        allowed = j <= i
    else:
        allowed = np.where(i < prefix_length, j < prefix_length, True)
    out = np.empty_like(q)
    for h in range(H):
        s = scale * q[h] @ k[h // group].T
        s = np.where(allowed, s, -np.inf)
        s = np.exp(s - s.max(axis=1, keepdims=True))
        out[h] = (s / s.sum(axis=1, keepdims=True)) @ v[h // group]
    return out[0] if squeeze else out


@pytest.fixture
def reference():
    return _reference


@pytest.fixture
def make_qkv():
    """make_qkv(seed, H=4, Hkv=2, T=96, D=32) -> q, k, v float32 (H, T, D)/(Hkv, T, D)."""

    def make(seed=0, H=4, Hkv=2, T=96, D=32, dtype=np.float32):
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((H, T, D)).astype(dtype)
        k = rng.standard_normal((Hkv, T, D)).astype(dtype)
        v = rng.standard_normal((Hkv, T, D)).astype(dtype)
        return q, k, v

    return make


@pytest.fixture
def make_emb():
    """make_emb(seed, P=64, E=48, like=None, noise=0.0): prefix embeddings,
    optionally a slightly perturbed copy of another set."""

    def make(seed=0, P=64, E=48, like=None, noise=0.0):
        rng = np.random.default_rng(seed)
        if like is not None:
            return (like + noise * rng.standard_normal(like.shape)).astype(np.float32)
        return rng.standard_normal((P, E)).astype(np.float32)

    return make


@pytest.fixture
def redis_url():
    """A real redis-server (127.0.0.1, a free port, no persistence) for the
    test, as a store_url; skipped where it is not installed (tools/setup.sh
    installs it)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", d, "--loglevel", "warning", "--logfile", f"{d}/redis.log"])
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.025)
            yield f"redis://127.0.0.1:{port}?deadline_ms=5000&write_timeout_ms=5000"
        finally:
            server.kill()
            server.wait()
