"""footprint.bound_heap: which glibc malloc parameters it sets, and that an explicit setting in the environment wins."""
from __future__ import annotations

import ctypes

import pytest

from streamq import footprint

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: fake)  # no process-wide change in the test session
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    return fake


def test_sets_the_mmap_threshold_and_keeps_a_heap_top(libc):
    assert footprint.bound_heap()
    assert dict(libc.calls) == {M_MMAP_THRESHOLD: footprint.MMAP_THRESHOLD, M_TRIM_THRESHOLD: footprint.TRIM_THRESHOLD}
    assert footprint.TRIM_THRESHOLD > 128 << 10  # glibc's own, which a fixed mmap threshold would leave in force


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "1"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}])
def test_an_explicit_trim_threshold_wins(libc, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert footprint.bound_heap()
    assert libc.calls == [(M_MMAP_THRESHOLD, footprint.MMAP_THRESHOLD)]


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_an_explicit_mmap_threshold_leaves_everything_alone(libc, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert not footprint.bound_heap()
    assert libc.calls == []
