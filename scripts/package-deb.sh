#!/usr/bin/env bash
# Builds the Debian package: scripts/package-deb.sh [OUT_DIR]
#
#   target/debian/tidings_<version>_<arch>.deb (or OUT_DIR/…), from the release binary
#   (built here unless TIDINGS_BIN names one), the unit and maintainer scripts in
#   packaging/deb/, and a configuration file generated from `tidings config default`.
#
# Plain dpkg-deb, no debhelper: the package is one static-ish binary, a unit, a conffile and
# three short maintainer scripts, and this keeps the build to tools every Debian has.
# Prints the path of the .deb on stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${1:-$ROOT/target/debian}

log() { printf 'package-deb: %s\n' "$*" >&2; }

BIN=${TIDINGS_BIN:-}
if [[ -z $BIN ]]; then
    log "cargo build --release -p tidings-cli"
    cargo build --release --quiet -p tidings-cli
    BIN=$ROOT/target/release/tidings
fi
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
ARCH=$(dpkg --print-architecture)
STAGE=$(mktemp -d)
chmod 0755 "$STAGE"
trap 'rm -rf "$STAGE"' EXIT

install -d -m 0755 "$STAGE/DEBIAN" "$STAGE/usr/bin" "$STAGE/etc/tidings" \
    "$STAGE/lib/systemd/system" "$STAGE/usr/share/doc/tidings"
install -m 0755 "$BIN" "$STAGE/usr/bin/tidings"
strip --strip-unneeded "$STAGE/usr/bin/tidings"
install -m 0644 packaging/deb/tidings.service "$STAGE/lib/systemd/system/tidings.service"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/deb/$script" "$STAGE/DEBIAN/$script"
done

# The configuration: every key commented with its default, history kept on disk.
CONF=$STAGE/etc/tidings/tidings.toml
{
    echo "# /etc/tidings/tidings.toml: read by tidings.service (\`systemctl reload tidings\` after"
    echo "# editing [auth], cors_origins, limits or channel policies; restart for the rest)."
    echo "# \`tidings config check /etc/tidings/tidings.toml\` validates it."
    echo
    "$BIN" config default | sed 's|^# data_dir = "/var/lib/tidings"    # durable history with the memory broker|data_dir = "/var/lib/tidings"      # durable history (created by the package)|'
} >"$CONF"
chmod 0644 "$CONF"   # postinst makes it root:tidings 0640 once the group exists
if ! grep -q '^data_dir = "/var/lib/tidings"' "$CONF"; then
    log "the default configuration has no data_dir line to enable"; exit 1
fi
if ! "$BIN" config check "$CONF" >/dev/null 2>&1; then
    # A build without durable history refuses data_dir; ship memory-only rather than a
    # configuration the service cannot start with.
    log "this binary refuses broker.data_dir; the package keeps history in memory"
    sed -i 's|^data_dir = "/var/lib/tidings" .*|# data_dir = "/var/lib/tidings"    # durable history with the memory broker|' "$CONF"
    "$BIN" config check "$CONF" >/dev/null
fi
echo "/etc/tidings/tidings.toml" >"$STAGE/DEBIAN/conffiles"

DOC=$STAGE/usr/share/doc/tidings
install -m 0644 README.md "$DOC/README.md"
cat >"$DOC/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tidings
Source: the Tidings repository

Files: *
Copyright: 2026 the Tidings authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 can be found in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
printf 'tidings (%s) unstable; urgency=medium\n\n  * Package built from the repository.\n\n -- Tidings developers <packages@tidings.dev>  %s\n' \
    "$VERSION" "$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" \
    | gzip -9n >"$DOC/changelog.gz"
chmod 0644 "$DOC"/*

# Shared libraries the binary links, as Depends (glibc and libgcc only; TLS is built in).
GLIBC=$(objdump -T "$STAGE/usr/bin/tidings" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1 | cut -d_ -f2)
DEPENDS="libc6 (>= $GLIBC), adduser"
if objdump -p "$STAGE/usr/bin/tidings" | grep -q 'NEEDED.*libgcc_s'; then
    DEPENDS="$DEPENDS, libgcc-s1"
fi
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat >"$STAGE/DEBIAN/control" <<CONTROL
Package: tidings
Version: $VERSION
Architecture: $ARCH
Maintainer: Tidings developers <packages@tidings.dev>
Installed-Size: $SIZE
Depends: $DEPENDS
Section: net
Priority: optional
Description: real-time push server (WebSocket, SSE, streaming, long and short polling)
 Tidings pushes messages published over HTTP to subscribers of named
 channels over WebSocket, Server-Sent Events, HTTP streaming, long polling
 and short polling, with resume from a cursor and explicit gap notices.
 History can be kept on disk, and several nodes can share channels
 through Redis.
CONTROL
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles" "$STAGE/DEBIAN/md5sums"

mkdir -p "$OUT"
DEB=$OUT/tidings_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
log "built $DEB"
echo "$DEB"
