#!/usr/bin/env bash
# Run the whole Tidings test suite: scripts/test.sh [extra cargo-nextest args]
#
# First makes sure everything the integration tests spawn is installed
# (idempotent: a second run only checks, in well under a second), then runs
# the Rust tests with cargo-nextest, then the doc tests if there are any, then the JS
# client unit tests and the browser end-to-end tests (node --test).
#
# Needs: a Debian machine with Rust + cargo-nextest, python3 with pip, node + npm.
# Installs: Debian packages curl, redis-server, openssl and chromium, Python packages into .venv/,
# Node packages into tests/clients/node_modules/ and tests/browser/node_modules/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
CLIENTS=$ROOT/tests/clients

log() { printf 'test.sh: %s\n' "$*" >&2; }

# Time each setup step, so a slow install shows up in CI logs.
step_start() { STEP_T0=$(date +%s%N); }
step_end() { log "$1 ($(( ($(date +%s%N) - STEP_T0) / 1000000 )) ms)"; }

# sha256 of a file, to notice when a lock or requirements file changed.
hash_of() { sha256sum "$1" | cut -d' ' -f1; }

# --- Debian packages -------------------------------------------------------
# curl: used by tests and scripts; redis-server: the Redis broker's tests (openssl makes
# the certificates of its rediss:// test);
# chromium: the browser end-to-end tests (tests/browser, driven by playwright-core);
# nghttp2-client: `nghttp`, the push-accepting HTTP/2 client of the server push tests.
step_start
APT_PACKAGES=(curl redis-server openssl chromium nghttp2-client)
# A Debian python3 can only make a virtualenv with python3-venv installed.
if ! python3 -c 'import ensurepip' 2>/dev/null; then
    APT_PACKAGES+=(python3-venv)
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi
    log "installing Debian packages: ${missing[*]}"
    # update only when something is missing: it is the slow part.
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
step_end "Debian packages ok: ${APT_PACKAGES[*]}"

# --- Python clients: httpx, httpx-sse in .venv/ -----------------------------
# A project-local virtualenv keeps the machine's Python untouched.
step_start
VENV=$ROOT/.venv
REQS=$CLIENTS/requirements.txt
if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf "$VENV"  # missing, or broken (e.g. its python moved)
    python3 -m venv "$VENV"
fi
# Reinstall only when requirements.txt changed since the last install.
if [[ ! -f $VENV/.tidings-reqs ]] || [[ $(cat "$VENV/.tidings-reqs") != "$(hash_of "$REQS")" ]] \
    || ! "$VENV/bin/python" -c 'import httpx, httpx_sse' 2>/dev/null; then
    log "installing Python packages from tests/clients/requirements.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input -r "$REQS"
    hash_of "$REQS" >"$VENV/.tidings-reqs"
fi
export TIDINGS_PYTHON=$VENV/bin/python
step_end "Python packages ok: TIDINGS_PYTHON=$TIDINGS_PYTHON"

# --- Node clients: eventsource, ws in tests/clients/node_modules/ ----------
# Installed exactly as locked; the .mjs clients resolve them from their own folder.
step_start
NODE_MODULES=$CLIENTS/node_modules
LOCK=$CLIENTS/package-lock.json
node_deps_hash() { { cat "$CLIENTS/package.json"; cat "$LOCK" 2>/dev/null || true; } | sha256sum | cut -d' ' -f1; }
# Reinstall only when package.json or the lock changed since the last install.
if [[ ! -f $NODE_MODULES/.tidings-lock ]] || [[ $(cat "$NODE_MODULES/.tidings-lock") != "$(node_deps_hash)" ]]; then
    log "installing Node packages in tests/clients"
    if [[ -f $LOCK ]]; then
        (cd "$CLIENTS" && npm ci --no-audit --no-fund --loglevel=error)
    else
        (cd "$CLIENTS" && npm install --no-audit --no-fund --loglevel=error)
    fi
    node_deps_hash >"$NODE_MODULES/.tidings-lock"
fi
export TIDINGS_NODE_MODULES=$NODE_MODULES
step_end "Node packages ok: TIDINGS_NODE_MODULES=$TIDINGS_NODE_MODULES"

# Where the client programs live, for tests that prefer not to work it out.
export TIDINGS_CLIENTS_DIR=$CLIENTS

# --- Browser tests: playwright-core in tests/browser/node_modules/ -----------
# Pinned and locked; it drives Debian's /usr/bin/chromium (it cannot download browsers here).
step_start
BROWSER_DIR=$ROOT/tests/browser
browser_deps_hash() { cat "$BROWSER_DIR/package.json" "$BROWSER_DIR/package-lock.json" | sha256sum | cut -d' ' -f1; }
if [[ ! -f $BROWSER_DIR/node_modules/.tidings-lock ]] \
    || [[ $(cat "$BROWSER_DIR/node_modules/.tidings-lock") != "$(browser_deps_hash)" ]]; then
    log "installing Node packages in tests/browser"
    (cd "$BROWSER_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    browser_deps_hash >"$BROWSER_DIR/node_modules/.tidings-lock"
fi
step_end "browser test packages ok (chromium: $(command -v chromium || echo missing))"

# --- Rust tests --------------------------------------------------------------
# --no-tests=warn: an empty suite (early in the project) is not a failure.
status=0
cargo nextest run --workspace --no-fail-fast --no-tests=warn "$@" || status=$?

# nextest does not run doc tests; cargo test does. Only bother when a doc
# comment has a code block (```), as compiling doc tests is slow, and not
# when the caller picked tests with extra arguments.
if (($#)); then
    log "extra arguments given; skipping doc tests"
elif grep -rqE '^\s*//[/!].*```' crates/*/src 2>/dev/null; then
    doc_status=0
    cargo test --workspace --doc || doc_status=$?
    if ((status == 0)); then status=$doc_status; fi
else
    log "no doc tests found; skipping cargo test --doc"
fi

# --- JS client unit tests, then the browser end-to-end tests -------------------
# Both start the real server; the browser tests run `tidings serve --demo` (pages and client
# embedded at compile time, so it is built first) and drive Debian's Chromium. Skipped, like the doc
# tests, when the caller picked tests with extra arguments.
if (($#)); then
    log "extra arguments given; skipping the JS and browser tests"
else
    # The client's own tests start the real server too (clients/js/test/server.test.mjs).
    build_status=0
    cargo build -q -p tidings-cli --bin tidings || build_status=$?
    js_status=$build_status
    browser_status=$build_status
    if ((build_status == 0)); then
        TIDINGS_BIN=$ROOT/target/debug/tidings node --test clients/js/test/ || js_status=$?
        TIDINGS_BIN=$ROOT/target/debug/tidings node --test tests/browser/ || browser_status=$?
    fi
    if ((status == 0)); then status=$js_status; fi
    if ((status == 0)); then status=$browser_status; fi
fi

exit "$status"
