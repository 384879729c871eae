#!/usr/bin/env bash
# Build the fuzz targets and run each for a while: scripts/fuzz.sh [SECONDS]  (default 20)
#
# Each target starts from a temporary copy of its committed seed corpus (fuzz/corpus/TARGET),
# so a run never grows the repo, and with its dictionary (fuzz/dicts/TARGET.dict). Exits 1
# if any target finds a crash (a panic, a failed property, a timeout or running out of
# memory); the input is kept under fuzz/artifacts/TARGET/ and the log's tail is printed.
# See docs/fuzzing.md for what each target checks and for long runs by hand.
#
# Environment:
#   FUZZ_TARGETS    targets to run (default: all eleven)
#   FUZZ_BUILD      release (default; optimized, with debug assertions) or dev (unoptimized:
#                   a cheaper build, ~2.5 CPU-minutes against ~4, fuzzes ~20x slower; CI's)
#   FUZZ_SANITIZER  none (default: the project forbids unsafe code) or address
#   FUZZ_KEEP       a directory to keep the grown corpora in (default: thrown away)
#   TIDINGS_FUZZ_STRICT=1  also assert the properties that fail today (docs/fuzzing.md)
#
# Needs: cargo-fuzz (installed from crates.io if missing). cargo-fuzz passes nightly-only
# flags; the stable toolchain accepts them with RUSTC_BOOTSTRAP=1, set here.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

budget=${1:-20}
if ! [[ $budget =~ ^[0-9]+$ ]] || ((budget < 1)); then
    echo "usage: scripts/fuzz.sh [SECONDS]  (SECONDS per target, default 20)" >&2
    exit 2
fi
read -r -a targets <<<"${FUZZ_TARGETS:-cursor_decode ws_request config_parse h1_head ws_frames pusher_frames publish_body ws_session jwt redis_resp tls}"
build=${FUZZ_BUILD:-release}
sanitizer=${FUZZ_SANITIZER:-none}

export RUSTC_BOOTSTRAP=1
log() { printf 'fuzz.sh: %s\n' "$*" >&2; }
now() { date +%s; }

t0=$(now)
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version '^0.13'
fi
log "$(cargo fuzz --version)"

flags=(--sanitizer "$sanitizer")
case $build in
    release) ;;
    dev) flags+=(--dev) ;;
    *) log "FUZZ_BUILD must be release or dev, not $build"; exit 2 ;;
esac
t_build=$(now)
cargo fuzz build "${flags[@]}"
log "built (${build}, sanitizer ${sanitizer}) in $(($(now) - t_build)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
summary=()
for t in "${targets[@]}"; do
    corpus=$work/$t
    mkdir -p "$corpus"
    cp -R "$ROOT/fuzz/corpus/$t/." "$corpus/"
    seeds=$(find "$corpus" -type f | wc -l)
    args=(-max_total_time="$budget" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    if [[ -f $ROOT/fuzz/dicts/$t.dict ]]; then
        args+=(-dict="$ROOT/fuzz/dicts/$t.dict")
    fi
    log "$t: ${budget} s from ${seeds} seeds"
    status=0
    cargo fuzz run "${flags[@]}" "$t" "$corpus" -- "${args[@]}" >"$work/$t.log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$t.log" | tail -n1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+(b|Kb|Mb)' "$work/$t.log" | tail -n1 || true)
    line="$t: ${execs:-?} execs, ${rate:-?} exec/s, ${cov:-no coverage line}"
    if ((status != 0)); then
        failed+=("$t")
        line="$line: FAILED (exit $status)"
        log "$t failed; the log's tail:"
        tail -n 80 "$work/$t.log" >&2
    fi
    summary+=("$line")
    log "$line"
    if [[ -n ${FUZZ_KEEP:-} ]]; then
        mkdir -p "$FUZZ_KEEP/$t"
        cp -R "$corpus/." "$FUZZ_KEEP/$t/"
    fi
done

printf '\nfuzz summary (%s s per target, %s build, %s s in all):\n' \
    "$budget" "$build" "$(($(now) - t0))"
printf '  %s\n' "${summary[@]}"
if ((${#failed[@]})); then
    printf 'fuzz: %s failed; inputs under fuzz/artifacts/\n' "${failed[*]}"
    exit 1
fi
