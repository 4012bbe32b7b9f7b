"""Bytes and seconds of the kept block intermediates' scratch IO (quant/kept.py) in one compress run (not in CI).

    python tools/measure_spill.py [--fresh-files] -- compress MODEL OUT --calib ... [compress flags]

Runs the CLI in-process with SpilledList's write and read timed; --fresh-files gives every list a new temporary
file (as before io/scratch.py's pool) instead of the pool's reused ones. Prints one JSON line on stderr at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from streamq.io.scratch import ScratchFiles
from streamq.quant import kept


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh-files", action="store_true", help="a new file per kept list (no reuse)")
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the streamq command line")
    args = ap.parse_args()
    stats = {"written_gb": 0.0, "write_s": 0.0, "read_gb": 0.0, "read_s": 0.0, "lists": 0}
    write, read, init = kept.SpilledList._write, kept.SpilledList._read, kept.SpilledList.__init__

    def timed_write(self, data):
        start = time.perf_counter()
        write(self, data)
        stats["write_s"] += time.perf_counter() - start
        stats["written_gb"] += len(data) / 1e9

    def timed_read(self, offset, shape, dtype, device):
        start = time.perf_counter()
        t = read(self, offset, shape, dtype, device)
        stats["read_s"] += time.perf_counter() - start
        stats["read_gb"] += t.numel() * t.element_size() / 1e9
        return t

    def counted_init(self, where):
        stats["lists"] += 1
        init(self, where)

    kept.SpilledList._write, kept.SpilledList._read, kept.SpilledList.__init__ = timed_write, timed_read, counted_init
    if args.fresh_files:
        ScratchFiles.take = lambda self: tempfile.TemporaryFile(dir=self.folder)
        ScratchFiles.give = lambda self, f, used: f.close()
    from streamq.cli import main as cli

    sys.argv = ["streamq", *[a for a in args.cli if a != "--"]]
    try:
        rc = cli()
    finally:
        print(json.dumps({k: round(v, 3) for k, v in stats.items()}), file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
