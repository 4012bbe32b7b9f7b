"""peak_rss_bytes: a child's own peak, not the RSS it inherits from its parent at fork (what ru_maxrss reports)."""
from __future__ import annotations

import subprocess
import sys

from streamq.memstat import peak_rss_bytes

CHILD = "from streamq.memstat import peak_rss_bytes; print(peak_rss_bytes())"


def test_child_peak_is_its_own_not_its_parents():
    ballast = bytearray(1 << 30)  # 1 GiB touched in this (parent) process
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    assert peak_rss_bytes() >= 1 << 30
    child = int(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert 0 < child < (1 << 30) - (256 << 20), child  # a fresh interpreter (+ streamq's imports) is far smaller
