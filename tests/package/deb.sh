#!/usr/bin/env bash
# The Debian package, checked as a user would meet it: tests/package/deb.sh [DEB]
#
# Builds the package (scripts/package-deb.sh) unless DEB is given, then checks its files,
# modes, conffile, control fields, maintainer scripts and unit (dpkg-deb, lintian,
# systemd-analyze verify). As root (CI is), it also installs it, upgrades it over itself, runs
# /usr/bin/tidings, starts it the way the unit does (as the tidings user, with the shipped
# configuration) and purges it, checking the machine is left as it was found.
# Prints "N passed, N failed" at the end; exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

passed=0
failed=0
ok() { printf 'ok   %s\n' "$*"; passed=$((passed + 1)); }
bad() { printf 'FAIL %s\n' "$*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi; }

DEB=${1:-}
if [[ -z $DEB ]]; then
    DEB=$(scripts/package-deb.sh "$(mktemp -d)") || { echo "package build failed"; echo "0 passed, 1 failed"; exit 1; }
fi
LIST=$(dpkg-deb -c "$DEB")
INFO=$(dpkg-deb -I "$DEB")
has() { grep -qE "$1" <<<"$LIST"; }

check "the binary is /usr/bin/tidings, mode 0755, root-owned" has '^-rwxr-xr-x root/root .* \./usr/bin/tidings$'
check "the configuration is /etc/tidings/tidings.toml" has '^-rw-r--r-- root/root .* \./etc/tidings/tidings.toml$'
check "the unit is /lib/systemd/system/tidings.service, 0644" has '^-rw-r--r-- root/root .* \./lib/systemd/system/tidings.service$'
check "copyright and changelog are shipped" has '\./usr/share/doc/tidings/copyright$'
check "every directory is 0755" bash -c "! grep -E '^d' <<<\"\$1\" | grep -vq '^drwxr-xr-x'" _ "$LIST"
check "the configuration is a conffile" bash -c "dpkg-deb --ctrl-tarfile '$DEB' | tar -xO ./conffiles | grep -qx /etc/tidings/tidings.toml"
check "postinst, prerm and postrm are executable" grep -qE '^ +[0-9]+ bytes, +[0-9]+ lines +\* +postinst' <<<"$INFO"
check "control names the package, version and libc dependency" grep -qE '^ Depends: libc6 \(>= [0-9.]+\)' <<<"$INFO"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
dpkg-deb -x "$DEB" "$WORK/root"
dpkg-deb -e "$DEB" "$WORK/DEBIAN"
UNIT=$WORK/root/lib/systemd/system/tidings.service
for key in 'Type=notify' 'ExecReload=/bin/kill -HUP $MAINPID' 'LimitNOFILE=262144' 'NoNewPrivileges=yes' \
    'ProtectSystem=strict' 'ReadWritePaths=/var/lib/tidings' 'PrivateTmp=yes' 'User=tidings'; do
    check "the unit sets $key" grep -qxF "$key" "$UNIT"
done
check "the shipped configuration passes config check" "$WORK/root/usr/bin/tidings" config check "$WORK/root/etc/tidings/tidings.toml"
for script in postinst prerm postrm; do
    check "$script is valid sh" sh -n "$WORK/DEBIAN/$script"
done
if command -v systemd-analyze >/dev/null; then
    # verify resolves ExecStart against the real root: point it at the extracted binary.
    sed "s|/usr/bin/tidings|$WORK/root/usr/bin/tidings|" "$UNIT" >"$WORK/tidings.service"
    out=$(SYSTEMD_LOG_LEVEL=err systemd-analyze verify "$WORK/tidings.service" 2>&1 | grep -v -e 'Failed to' -e 'Cannot' -e 'not running')
    if [[ -z $out ]]; then ok "systemd-analyze verify reports nothing"; else bad "systemd-analyze verify: $out"; fi
else
    echo "skip systemd-analyze verify: not installed"
fi
if command -v lintian >/dev/null; then
    out=$(lintian --no-tag-display-limit "$DEB" 2>&1)
    if grep -q '^E:' <<<"$out"; then bad "lintian errors: $(grep '^E:' <<<"$out")"; else ok "lintian reports no errors"; fi
    grep '^W:' <<<"$out" | sed 's/^/     lintian /'
else
    echo "skip lintian: not installed"
fi

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    if dpkg-query -W tidings >/dev/null 2>&1 || getent passwd tidings >/dev/null; then
        bad "a tidings package or user is already on this machine; not touching it"
    else
        had_lib=$([[ -e /var/lib/tidings ]] && echo yes || echo no)
        cleanup() { DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq tidings >/dev/null 2>&1 || true; }
        trap 'cleanup; rm -rf "$WORK"' EXIT
        check "apt installs the package" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$DEB"
        check "tidings --version runs from /usr/bin" bash -c '/usr/bin/tidings --version | grep -q "^tidings "'
        check "the tidings system user exists" getent passwd tidings
        check "/var/lib/tidings belongs to tidings, 0750" bash -c '[[ $(stat -c "%U:%G %a" /var/lib/tidings) == "tidings:tidings 750" ]]'
        check "the configuration is root:tidings 0640" bash -c '[[ $(stat -c "%U:%G %a" /etc/tidings/tidings.toml) == "root:tidings 640" ]]'
        # The service as the unit runs it: the tidings user, the shipped configuration.
        log=$WORK/serve.log
        setpriv --reuid=tidings --regid=tidings --init-groups --inh-caps=-all \
            /usr/bin/tidings --config /etc/tidings/tidings.toml serve --listen 127.0.0.1:0 2>"$log" &
        pid=$!
        for _ in $(seq 1 100); do grep -q 'tidings listening on' "$log" && break; sleep 0.1; done
        url=$(sed -n 's/^tidings listening on //p' "$log" | head -n1)
        check "the service user can start the shipped configuration" test -n "$url"
        if [[ -n $url ]]; then
            check "it publishes and keeps history" bash -c "curl -sf -X POST '$url/publish/pkg' -H 'content-type: text/plain' -d hi | grep -q '\"offset\":1'"
        fi
        kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
        # An edited conffile survives an upgrade over the same version.
        echo '# edited by the administrator' >>/etc/tidings/tidings.toml
        check "apt reinstalls (upgrades) over itself" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall -o Dpkg::Options::=--force-confold "$DEB"
        check "the administrator's edit survived the upgrade" grep -q 'edited by the administrator' /etc/tidings/tidings.toml
        check "apt purges the package" env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq tidings
        check "purge removed the binary" test ! -e /usr/bin/tidings
        check "purge removed /etc/tidings" test ! -e /etc/tidings
        check "purge removed the tidings user" bash -c '! getent passwd tidings'
        if [[ $had_lib == no ]]; then check "purge removed /var/lib/tidings" test ! -e /var/lib/tidings; fi
        trap 'rm -rf "$WORK"' EXIT
    fi
else
    echo "skip install/upgrade/purge: needs root and apt"
fi

echo
echo "$passed passed, $failed failed"
((failed == 0))
