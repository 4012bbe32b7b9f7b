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


# A child that touches file-backed pages (torch's libraries, and a private copy-on-write map of a file it then
# writes to), releases the clean ones, and checks what is left: RSS of file pages down, the written copy intact,
# torch still computing the same product.
RELEASE_CHILD = r"""
import mmap, sys
import torch
from streamq.memstat import release_clean_file_pages

def file_kb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssFile:"))

with open(sys.argv[1], "r+b") as f:
    private = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # a writable private map: its copies are ours
private[:4] = b"mine"
a = torch.arange(64.0).reshape(8, 8)
before_product = (a @ a).sum().item()
before = file_kb()
released = release_clean_file_pages()
after = file_kb()
print(before, after, released, bytes(private[:4]).decode(), (a @ a).sum().item() == before_product)
"""


def test_release_clean_file_pages_drops_library_pages_and_keeps_private_copies(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"file" * 4096)
    out = subprocess.run([sys.executable, "-c", RELEASE_CHILD, str(data)], capture_output=True, text=True,
                         check=True).stdout.split()
    before, after, released = map(int, out[:3])
    assert before > 40_000, before  # torch's libraries alone map more than this (kB)
    assert after < before / 2 and released > (before - after) * 1024 / 2, out
    assert out[3] == "mine" and out[4] == "True", out  # the written private page and the code still work
