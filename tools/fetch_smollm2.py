"""Fetch SmolLM2-135M-Instruct into streamq's cache and print its folder: python tools/fetch_smollm2.py [--cache DIR]"""
import argparse
from pathlib import Path

from streamq.fetch import ensure_smollm2

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--cache", type=Path, default=None, help="cache root (default: $STREAMQ_CACHE or ~/.cache/streamq)")
print(ensure_smollm2(parser.parse_args().cache))
