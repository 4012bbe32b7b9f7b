"""stop_on_signals(): the first SIGINT/SIGTERM only sets the flag, a second acts as before; handlers restored."""
from __future__ import annotations

import importlib
import signal
import threading

import pytest

import streamq.interrupt
from streamq.interrupt import stop_on_signals


def handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_first_signal_sets_the_flag_second_acts_as_before():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))  # a known "before"
    try:
        before = handlers()
        with stop_on_signals() as stop:
            assert not stop() and handlers() != before
            signal.raise_signal(signal.SIGTERM)  # would end the process without the handler
            assert stop() and stop.signum == signal.SIGTERM and stop.exit_code == 143 and not seen
            signal.raise_signal(signal.SIGINT)  # second signal: the handler from before gets it
            assert seen == [signal.SIGINT]
        assert handlers() == before
    finally:
        signal.signal(signal.SIGINT, previous)


def test_handlers_restored_after_an_exception_and_none_at_import():
    before = handlers()
    importlib.reload(streamq.interrupt)
    assert handlers() == before
    with pytest.raises(RuntimeError), stop_on_signals():
        raise RuntimeError
    assert handlers() == before


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def worker():
        with stop_on_signals() as stop:
            seen.append((handlers(), stop()))

    before = handlers()
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [(before, False)]
