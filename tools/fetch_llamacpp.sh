#!/usr/bin/env bash
# llama.cpp's CPU libraries for tests/test_gguf_llamacpp.py and tools/check_llamacpp.py: the npm package
# @node-llama-cpp/linux-x64@3.22.1 (one 10 MB tarball, no dependencies; libllama + ggml CPU variants of
# ggml-org/llama.cpp release v0.5.0, built on Ubuntu 22.04, GLIBC <= 2.34), checked against a pinned sha256.
#   tools/fetch_llamacpp.sh DEST      ->  DEST/libllama.v0.5.0.so ...; then export STREAMQ_LLAMACPP_LIB=DEST
set -euo pipefail
dest=${1:?usage: tools/fetch_llamacpp.sh DEST}
sha=0d953e1503d5ab4608d8ed5b739132308c81ac05ffeb760d2a7f30e08a9f90e0
if [ -f "$dest/libllama.v0.5.0.so" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent @node-llama-cpp/linux-x64@3.22.1 >/dev/null)
echo "$sha  $tmp/node-llama-cpp-linux-x64-3.22.1.tgz" | sha256sum -c --quiet -
tar -xzf "$tmp/node-llama-cpp-linux-x64-3.22.1.tgz" -C "$tmp" package/bins/linux-x64
mkdir -p "$dest"
cp "$tmp"/package/bins/linux-x64/*.so "$dest"/
