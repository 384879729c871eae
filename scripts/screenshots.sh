#!/usr/bin/env bash
# Screenshots of every web page into docs/images/ (shown in the README):
#   scripts/screenshots.sh
# Builds the server (the pages are embedded in it), starts `tidings serve --demo` on a free
# port, drives Debian's Chromium with playwright-core (tests/browser/screenshots.mjs), stops.
# Needs what scripts/test.sh installs: chromium and tests/browser/node_modules.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -d tests/browser/node_modules/playwright-core ]]; then
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
cargo build -q -p tidings-cli --bin tidings
TIDINGS_BIN=$PWD/target/debug/tidings node tests/browser/screenshots.mjs
