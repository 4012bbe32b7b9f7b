"""Where a `streamq compress` run's resident memory goes, phase by phase and block by block (not in CI).

    .venv/bin/python tools/measure_rss.py [--interval 0.02] [--detail] [--smaps LABEL] \
        -- compress MODEL OUT --bits 4 ... --no-progress

Runs the CLI in this process with a sampler thread reading /proc/self/status every --interval seconds, and
labels the samples by phase: imports, checkpoint, skeleton, tokenizing, output folder, capture (block-0
inputs), block i (--detail: also its passes, solves and tails), finish. Each phase's row:
VmRSS at its (last) end, the largest VmRSS seen during it, its RssAnon / RssFile at that moment (anonymous heap vs.
file-backed pages such as shared libraries'), and VmHWM at its end. The phases are found by wrapping
the pipeline's stage functions here (this tool only; the package has no measuring hooks).
"""
from __future__ import annotations

import re
import sys
import threading
import time

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def status() -> dict[str, int]:
    """The FIELDS of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                out[key] = int(rest.split()[0]) * 1024
    return out


class Sampler:
    """Keeps, per phase label, the sample with the largest VmRSS and the last sample."""

    def __init__(self, interval: float):
        self.interval, self.label, self.rows, self.order = interval, "imports", {}, ["imports"]
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def sample(self) -> None:
        s = status()
        with self.lock:
            row = self.rows.setdefault(self.label, {"max": s, "end": s})
            if s["VmRSS"] > row["max"]["VmRSS"]:
                row["max"] = s
            row["end"] = s

    def loop(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def enter(self, label: str) -> None:
        self.sample()  # closes the phase before
        with self.lock:
            self.label = label
            if label not in self.order:
                self.order.append(label)
        self.sample()

    def table(self) -> str:
        mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
        lines = ["| phase | VmRSS end | VmRSS max | RssAnon at max | RssFile at max | VmHWM end |",
                 "|---|---|---|---|---|---|"]
        for label in self.order:
            row = self.rows.get(label)
            if row:
                m, e = row["max"], row["end"]
                lines.append(f"| {label} | {mb(e['VmRSS'])} | {mb(m['VmRSS'])} | {mb(m['RssAnon'])} | "
                             f"{mb(m['RssFile'])} | {mb(e['VmHWM'])} |")
        return "\n".join(lines) + "\n(MiB)"


def wrap(module, name: str, sampler: Sampler, label) -> None:
    """module.name(...) runs under the phase label(args) (a str or a function of the call's arguments)."""
    inner = getattr(module, name)

    def wrapped(*args, **kwargs):
        sampler.enter(label(*args, **kwargs) if callable(label) else label)
        return inner(*args, **kwargs)

    setattr(module, name, wrapped)


def smaps_top(n: int = 12) -> str:
    """The n mappings of this process with the most resident memory: kB resident, kB anonymous, name."""
    rows, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                cur = [0, 0, head[5] if len(head) > 5 else "[anon]"]
                rows.append(cur)
            elif head[0] == "Rss:":
                cur[0] = int(head[1])
            elif head[0] == "Anonymous:":
                cur[1] = int(head[1])
    merged: dict[str, list[int]] = {}
    for rss, anon, name in rows:
        m = merged.setdefault(name, [0, 0, 0])
        m[0], m[1], m[2] = m[0] + rss, m[1] + anon, m[2] + 1
    top = sorted(merged.items(), key=lambda kv: -kv[1][0])[:n]
    return "\n".join(f"  {rss:>8} kB rss {anon:>8} kB anon  {k} maps  {name}" for name, (rss, anon, k) in top)


def main() -> int:
    """Options before `--`: --interval S (sampling period), --detail (phases inside each block: its passes,
    each Linear's solve), --smaps LABEL (print the top mappings when phase LABEL starts and at the end)."""
    argv = sys.argv[1:]
    interval, detail, smaps = 0.02, False, None
    while argv and argv[0] != "--":
        if argv[0] == "--interval":
            interval, argv = float(argv[1]), argv[2:]
        elif argv[0] == "--detail":
            detail, argv = True, argv[1:]
        elif argv[0] == "--smaps":
            smaps, argv = argv[1], argv[2:]
        else:
            raise SystemExit(f"unknown option {argv[0]}")
    if argv[:1] == ["--"]:
        argv = argv[1:]
    sampler = Sampler(interval)
    sampler.thread.start()
    from streamq import cli, pipeline

    sampler.enter("checkpoint")
    wrap(pipeline, "build_layout", sampler, "skeleton")
    wrap(pipeline, "open_output", sampler, "output folder")
    wrap(pipeline, "load_tokenizer", sampler, "tokenizing")
    wrap(pipeline, "prepare_store", sampler, "capture")
    wrap(pipeline, "block_work", sampler, lambda layout, ckpt, i, *a, **k: f"block {i + 1}")
    wrap(pipeline, "finish", sampler, "finish")
    if detail:
        from streamq.quant import block

        wrap(block, "run_pass", sampler, lambda b, t, p, j, *a, **k: f"{sampler.label.split(':')[0]}: pass {j}")
        wrap(block, "quantize_linear", sampler, lambda *a, **k: f"{sampler.label.split(':')[0]}: solve")
        wrap(block, "build_tails", sampler, lambda *a, **k: f"{sampler.label.split(':')[0]}: tails")
    if smaps:
        inner_enter = sampler.enter

        def enter(label):
            inner_enter(label)
            if label == smaps:
                print(f"top mappings at the start of {label}:\n{smaps_top()}", file=sys.stderr)
        sampler.enter = enter
    try:
        rc = cli.main(argv)
    finally:
        sampler.done.set()
        sampler.thread.join()
        sampler.sample()
        print(sampler.table(), file=sys.stderr)
        if smaps:
            print(f"top mappings at the end:\n{smaps_top()}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"wall {time.perf_counter() - start:.1f} s", file=sys.stderr)
    sys.exit(code)
