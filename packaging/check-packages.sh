#!/usr/bin/env bash
# Builds the .deb and the .rpm, installs the .deb and checks what it put where, runs
# `config check` as the service user, removes and purges the package, inspects the .rpm and
# runs `systemd-analyze verify` on the unit. One PASS/FAIL line per check; exits non-zero on
# any failure. Meant for CI (root, Debian, CI=true); installs what it needs itself and can be
# run again on the same machine.
#
# It installs and PURGES the lark-service package, which deletes /etc/lark-service and
# /var/lib/lark-service: never run it on a machine that holds a real store. Outside CI it
# therefore asks for --yes.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export CARGO_TERM_COLOR=never

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
PKG=lark-service
BIN=/usr/bin/lark-service
CONFIG=/etc/lark-service/config.toml
UNIT=/usr/lib/systemd/system/lark-service.service
# Every path the packages ship (files only), sorted; the man pages are added once they are
# generated (one per command, from the binary's own command line).
EXPECTED_FILES="/etc/lark-service/config.toml
/usr/bin/lark-service
/usr/lib/systemd/system/lark-service.service
/usr/lib/sysusers.d/lark-service.conf
/usr/lib/tmpfiles.d/lark-service.conf
/usr/share/bash-completion/completions/lark-service
/usr/share/doc/lark-service/README.md
/usr/share/doc/lark-service/config.example.toml
/usr/share/fish/vendor_completions.d/lark-service.fish
/usr/share/lark-service/monitoring/alert-rules.test.yaml
/usr/share/lark-service/monitoring/alert-rules.yaml
/usr/share/lark-service/monitoring/grafana-dashboard.json
/usr/share/zsh/vendor-completions/_lark-service"

started=$SECONDS
passed=0
failed=0
pass() { printf 'PASS: %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf 'FAIL: %s\n' "$*"; failed=$((failed + 1)); }
info() { printf 'INFO: %s\n' "$*"; }
step() { printf '\n=== %s\n' "$*"; }
# check DESCRIPTION COMMAND...: PASS if the command succeeds.
check() {
  local desc=$1
  shift
  if "$@"; then pass "$desc"; else fail "$desc"; fi
}
finish() {
  printf '\ncheck-packages: %d passed, %d failed (%ds)\n' "$passed" "$failed" "$((SECONDS - started))"
  [ "$failed" -eq 0 ]
  exit $?
}
# abort DESCRIPTION: a failure after which nothing else can be checked.
abort() {
  fail "$*"
  finish
}
# has_stat PATH MODE OWNER GROUP
has_stat() {
  local got
  got=$(stat -c '%a %U %G' "$1" 2>/dev/null) || {
    echo "  $1: missing"
    return 1
  }
  [ "$got" = "$2 $3 $4" ] || {
    echo "  $1: got '$got', want '$2 $3 $4'"
    return 1
  }
}
deb_state() { dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null || echo not-installed; }

if [ "$(id -u)" -ne 0 ]; then
  echo "check-packages.sh must run as root (it installs packages)" >&2
  exit 2
fi
if [ "${CI:-}" != true ] && [ "${1:-}" != --yes ]; then
  echo "check-packages.sh installs and purges $PKG (deleting /etc/lark-service and" >&2
  echo "/var/lib/lark-service). Run it with CI=true or --yes on a throwaway machine only." >&2
  exit 2
fi

TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
OUT="$TARGET_DIR/check-packages"
WORK=$(mktemp -d /tmp/check-packages.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
rm -rf "$OUT"
mkdir -p "$OUT"

step "tools"
apt_updated=false
apt_install() {
  if [ "$apt_updated" = false ]; then
    apt-get update -qq || return 1
    apt_updated=true
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
missing=()
command -v rpm >/dev/null 2>&1 || missing+=(rpm)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v lintian >/dev/null 2>&1 || missing+=(lintian)
command -v rpmlint >/dev/null 2>&1 || missing+=(rpmlint)
command -v man >/dev/null 2>&1 || missing+=(man-db)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}" || abort "apt-get install ${missing[*]}"
fi
# cargo install VERSIONED-CRATE unless that version is installed.
cargo_tool() {
  local crate=$1 version=$2
  if cargo install --list | grep -qx "$crate v$version:"; then
    return 0
  fi
  cargo install --locked "$crate" --version "$version"
}
cargo_tool cargo-deb "$CARGO_DEB_VERSION" || abort "cargo install cargo-deb $CARGO_DEB_VERSION"
cargo_tool cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION" ||
  abort "cargo install cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION"
pass "tools: rpm $(rpm --version | awk '{print $3}'), $(systemd-analyze --version | head -1), cargo-deb $CARGO_DEB_VERSION, cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION"

step "build"
cargo build --release || abort "cargo build --release"
# The man pages and completions come from the release binary's own command line; both
# package formats take them from target/assets (see Cargo.toml's asset lists).
ASSETS="$PWD/target/assets"
rm -rf "$ASSETS"
"$TARGET_DIR/release/lark-service" manual --out "$ASSETS" || abort "lark-service manual --out $ASSETS"
mkdir -p "$ASSETS/man1"
mv "$ASSETS"/*.1 "$ASSETS/man1/" && gzip -9n "$ASSETS"/man1/*.1 || abort "compress the man pages"
MAN_PAGES=$(cd "$ASSETS/man1" && ls ./*.1.gz | sed 's#^\./#/usr/share/man/man1/#')
[ -n "$MAN_PAGES" ] || abort "no man page generated"
EXPECTED_FILES=$(printf '%s\n%s\n' "$EXPECTED_FILES" "$MAN_PAGES" | sort)
pass "manual: $(echo "$MAN_PAGES" | wc -l) man pages, bash/zsh/fish completions"
cargo deb --no-build --output "$OUT/" || abort "cargo deb"
DEB=$(find "$OUT" -maxdepth 1 -name "*.deb" | head -1)
[ -n "$DEB" ] || abort "cargo deb wrote no .deb into $OUT"
pass "cargo deb: $(basename "$DEB")"
cargo generate-rpm --output "$OUT/" || abort "cargo generate-rpm"
RPM=$(find "$OUT" -maxdepth 1 -name "*.rpm" | head -1)
[ -n "$RPM" ] || abort "cargo generate-rpm wrote no .rpm into $OUT"
pass "cargo generate-rpm: $(basename "$RPM")"
check "packaging/config.example.toml is what \`lark-service config example\` prints" \
  sh -c "'$TARGET_DIR/release/lark-service' config example | cmp -s - packaging/config.example.toml"

step "deb contents"
dpkg-deb -c "$DEB" | awk '$1 !~ /^d/ {sub(/^\./, "", $6); print $6}' |
  sed -E 's#^/usr/lib/debug/\.build-id/[0-9a-f]{2}/[0-9a-f]+\.debug$#/usr/lib/debug/.build-id/ID.debug#' |
  sort >"$WORK/deb.files"
# The deb also has the copyright file Debian requires, a lintian override and the binary's
# symbols split off by cargo-deb (separate-debug-symbols).
check "deb ships exactly the expected files" diff -u \
  <(printf '%s\n' "$EXPECTED_FILES" /usr/share/doc/lark-service/copyright /usr/share/doc/lark-service/changelog.Debian.gz \
    /usr/share/lintian/overrides/lark-service /usr/lib/debug/.build-id/ID.debug | sort) "$WORK/deb.files"
dpkg-deb -e "$DEB" "$WORK/deb-control"
check "deb conffiles lists $CONFIG" grep -qx "$CONFIG" "$WORK/deb-control/conffiles"
for s in postinst prerm postrm; do
  check "deb $s: present, #DEBHELPER# expanded, valid sh" sh -c \
    "[ -x '$WORK/deb-control/$s' ] && ! grep -q '#DEBHELPER#' '$WORK/deb-control/$s' && sh -n '$WORK/deb-control/$s'"
done
# cargo-deb's "dont-enable" fragment re-enables only a unit the admin had enabled before.
check "deb postinst neither enables nor starts the unit" sh -c \
  "grep -q 'deb-systemd-helper debian-installed' '$WORK/deb-control/postinst' && ! grep -Eq 'deb-systemd-invoke start|_dh_action=start|systemctl .*(enable|start|preset)' '$WORK/deb-control/postinst'"

step "install the .deb"
# A previous run may have left it installed or half-removed.
if [ "$(deb_state)" != not-installed ]; then
  info "purging a previous $PKG ($(deb_state))"
  dpkg --purge "$PKG" >/dev/null || abort "dpkg --purge $PKG (left over from an earlier run)"
fi
if rpm -q "$PKG" >/dev/null 2>&1; then
  info "erasing a previous $PKG rpm"
  rpm -e --nodeps "$PKG" >/dev/null 2>&1 || abort "rpm -e $PKG (left over from an earlier run)"
fi
rm -rf /etc/lark-service /var/lib/lark-service
dpkg -i "$DEB" || abort "dpkg -i $(basename "$DEB")"
pass "dpkg -i $(basename "$DEB")"
check "binary $BIN 0755 root:root" has_stat "$BIN" 755 root root
check "binary is stripped (symbols in /usr/lib/debug)" sh -c "! readelf -S '$BIN' | grep -q '[.]symtab'"
check "binary runs (--version)" sh -c "'$BIN' --version | grep -q '^lark-service '"
check "config $CONFIG 0640 root:lark-service" has_stat "$CONFIG" 640 root lark-service
check "config is the shipped example" cmp -s "$CONFIG" packaging/config.example.toml
check "doc config.example.toml installed" cmp -s /usr/share/doc/lark-service/config.example.toml packaging/config.example.toml
check "monitoring files installed under /usr/share/lark-service/monitoring" sh -c \
  'for f in alert-rules.yaml alert-rules.test.yaml grafana-dashboard.json; do cmp -s /usr/share/lark-service/monitoring/$f packaging/monitoring/$f || exit 1; done'
check "man lark-service renders (NAME and SUBCOMMANDS)" sh -c \
  "MANWIDTH=80 man -P cat lark-service 2>/dev/null | grep -q 'lark-service-serve(1)'"
check "man lark-service-serve documents --sandbox" sh -c \
  "MANWIDTH=80 man -P cat lark-service-serve 2>/dev/null | grep -q -- '--sandbox'"
check "bash completion completes the subcommands" bash -c \
  'source /usr/share/bash-completion/completions/lark-service; COMP_WORDS=(lark-service se); COMP_CWORD=1; _lark__service lark-service se lark-service; printf "%s\n" "${COMPREPLY[@]}" | grep -qx serve'
check "unit $UNIT 0644 root:root, same as systemd/lark-service.service" \
  sh -c "cmp -s '$UNIT' systemd/lark-service.service && stat -c '%a %U' '$UNIT' | grep -qx '644 root'"
check "sysusers.d and tmpfiles.d entries installed" \
  sh -c 'cmp -s /usr/lib/sysusers.d/lark-service.conf systemd/lark-service.sysusers && cmp -s /usr/lib/tmpfiles.d/lark-service.conf systemd/lark-service.tmpfiles'
user_line=$(getent passwd lark-service || true)
check "system user lark-service exists (home /var/lib/lark-service, nologin): ${user_line:-none}" \
  sh -c "echo '$user_line' | awk -F: '\$3 < 1000 && \$6 == \"/var/lib/lark-service\" && \$7 ~ /nologin\$/ {ok=1} END {exit !ok}'"
check "group lark-service exists" sh -c "getent group lark-service >/dev/null"
check "state dir /var/lib/lark-service 0700 lark-service:lark-service" has_stat /var/lib/lark-service 700 lark-service lark-service
check "credentials dir /etc/lark-service/credentials 0700 root:root" has_stat /etc/lark-service/credentials 700 root root
# Without a running systemd (CI sandbox) systemctl cannot answer; the enablement symlinks
# under /etc/systemd/system are what `systemctl enable` would create.
links=$(find /etc/systemd/system -name 'lark-service.service' 2>/dev/null)
check "unit not enabled (no symlink under /etc/systemd/system)" test -z "$links"
if [ -d /run/systemd/system ]; then
  check "unit not active" sh -c '! systemctl is-active --quiet lark-service.service'
  check "unit not enabled (systemctl)" sh -c '! systemctl is-enabled --quiet lark-service.service'
else
  info "no running systemd here: the service cannot have been started"
fi

step "config check as user lark-service"
app_secret="pkgcheck-app-secret-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
install -d -m 0700 -o lark-service -g lark-service "$WORK/secrets"
install -m 0600 -o lark-service -g lark-service /dev/null "$WORK/secrets/app_secret"
printf '%s\n' "$app_secret" >"$WORK/secrets/app_secret"
chmod 0711 "$WORK"
setpriv --reuid=lark-service --regid=lark-service --init-groups \
  "$BIN" keys generate --out "$WORK/secrets/token_encryption_key" >/dev/null ||
  fail "lark-service keys generate --out (as lark-service)"
token_key=$(cat "$WORK/secrets/token_encryption_key" 2>/dev/null)
run_check() {
  (cd / && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    APP_ID=cli_a0000000000000aa \
    APP_SECRET_FILE="$WORK/secrets/app_secret" \
    LARK_TOKEN_ENCRYPTION_KEY_FILE="$WORK/secrets/token_encryption_key" \
    setpriv --reuid=lark-service --regid=lark-service --init-groups \
    "$BIN" config check --config "$CONFIG")
}
run_check >"$WORK/check.out" 2>&1
rc=$?
sed 's/^/  | /' "$WORK/check.out"
check "config check exits 0" test "$rc" -eq 0
check "config check says the configuration is valid" grep -q '^# configuration is valid' "$WORK/check.out"
check "config check uses the packaged store path" grep -q '/var/lib/lark-service/lark-service.redb' "$WORK/check.out"
check "no secret value in the config check output" sh -c \
  "[ -n '$token_key' ] && ! grep -qF -e '$app_secret' -e '$token_key' '$WORK/check.out'"
chmod 0640 "$WORK/secrets/app_secret"
run_check >"$WORK/check-bad.out" 2>&1
rc=$?
check "config check refuses a group-readable secret file (exit 64, got $rc)" test "$rc" -eq 64
check "no secret value in the refusal" sh -c "! grep -qF -e '$app_secret' -e '$token_key' '$WORK/check-bad.out'"

step "systemd-analyze (with the package installed)"
# verify needs the ExecStart binary at /usr/bin/lark-service. On this Debian 12 sandbox (no
# running systemd) it prints nothing for a good unit, so any output at all is a failure; should
# a future host add noise about things outside this unit, filter exactly those lines here.
systemd-analyze verify systemd/lark-service.service >"$WORK/verify.out" 2>&1
rc=$?
sed 's/^/  | /' "$WORK/verify.out"
check "systemd-analyze verify: exit 0 (got $rc)" test "$rc" -eq 0
check "systemd-analyze verify: no warnings" test ! -s "$WORK/verify.out"
# Exposure score of the hardening, 0 (locked down) to 10 (unsandboxed); 1.4 when written.
systemd-analyze security --offline=true systemd/lark-service.service 2>&1 | tail -1 | sed 's/^/  | /'
check "systemd-analyze security: exposure at most 2.0" \
  sh -c 'systemd-analyze security --offline=true --threshold=20 systemd/lark-service.service >/dev/null 2>&1'

step "reinstall the .deb over itself (the upgrade path)"
echo '# local change by check-packages.sh' >>"$CONFIG"
dpkg -i --force-confold "$DEB" >"$WORK/reinstall.out" 2>&1 || { cat "$WORK/reinstall.out"; fail "dpkg -i again"; }
check "after reinstall: local config change kept" grep -q 'local change by check-packages.sh' "$CONFIG"
check "after reinstall: config still 0640 root:lark-service" has_stat "$CONFIG" 640 root lark-service
check "after reinstall: unit still not enabled" test -z "$(find /etc/systemd/system -name 'lark-service.service' 2>/dev/null)"

step "remove and purge the .deb"
apt-get remove -y -qq "$PKG" >"$WORK/remove.out" 2>&1 || { cat "$WORK/remove.out"; fail "apt-get remove -y $PKG"; }
check "after remove: binary gone" test ! -e "$BIN"
check "after remove: config kept ($CONFIG)" test -f "$CONFIG"
check "after remove: state dir kept" test -d /var/lib/lark-service
check "after remove: package in state config-files" test "$(deb_state)" = config-files
apt-get purge -y -qq "$PKG" >"$WORK/purge.out" 2>&1 || { cat "$WORK/purge.out"; fail "apt-get purge -y $PKG"; }
check "after purge: /etc/lark-service gone" test ! -e /etc/lark-service
check "after purge: /var/lib/lark-service gone" test ! -e /var/lib/lark-service
check "after purge: package not installed" test "$(deb_state)" = not-installed
check "after purge: unit gone" test ! -e "$UNIT"

step "rpm contents"
rpm -qlp "$RPM" 2>/dev/null | sort >"$WORK/rpm.files"
check "rpm ships exactly the expected files (same as the deb)" diff -u <(echo "$EXPECTED_FILES") "$WORK/rpm.files"
rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]' "$RPM" \
  2>/dev/null >"$WORK/rpm.attrs"
sed 's/^/  | /' "$WORK/rpm.attrs"
check "rpm: binary -rwxr-xr-x root root" grep -qx -- '-rwxr-xr-x root root  /usr/bin/lark-service' "$WORK/rpm.attrs"
check "rpm: config -rw-r----- root lark-service, %config(noreplace)" \
  grep -qx -- '-rw-r----- root lark-service cn /etc/lark-service/config.toml' "$WORK/rpm.attrs"
check "rpm: unit, sysusers, tmpfiles -rw-r--r-- root root" sh -c \
  "[ \$(grep -cE -- '^-rw-r--r-- root root  /usr/lib/(systemd/system|sysusers.d|tmpfiles.d)/lark-service\.(service|conf)\$' '$WORK/rpm.attrs') -eq 3 ]"
check "rpm --configfiles shows $CONFIG" sh -c "rpm -qp --configfiles '$RPM' 2>/dev/null | grep -qx '$CONFIG'"
rpm -qp --scripts "$RPM" 2>/dev/null >"$WORK/rpm.scripts"
for s in preinstall postinstall preuninstall postuninstall; do
  check "rpm --scripts has $s" grep -q "^$s scriptlet" "$WORK/rpm.scripts"
done
for s in pre post preun postun; do
  check "rpm scriptlet packaging/rpm/$s is valid sh" sh -n "packaging/rpm/$s"
done
check "rpm scriptlets neither enable nor start the unit" sh -c \
  "! grep -v '^[[:space:]]*#' '$WORK/rpm.scripts' | grep -E 'systemctl' | grep -Eq '[[:space:]](enable|start|preset)([[:space:]]|\$)'"

step "install and erase the .rpm (rpm on Debian, --nodeps)"
# Debian's rpm keeps its own database; dependencies are Debian's, hence --nodeps. This runs
# the scriptlets for real: %pre creates the user, %post the directories.
if rpm -q "$PKG" >/dev/null 2>&1; then
  info "erasing a previous $PKG rpm"
  rpm -e --nodeps "$PKG" >/dev/null 2>&1 || abort "rpm -e $PKG (left over from an earlier run)"
fi
rm -rf /etc/lark-service /var/lib/lark-service
rpm -i --nodeps "$RPM" >"$WORK/rpm-install.out" 2>&1
rc=$?
grep -v -e 'should not be used directly' -e 'assuming you know what you are doing' "$WORK/rpm-install.out" | sed 's/^/  | /'
check "rpm -i $(basename "$RPM")" test "$rc" -eq 0
check "rpm: binary $BIN 0755 root:root" has_stat "$BIN" 755 root root
check "rpm: config $CONFIG 0640 root:lark-service" has_stat "$CONFIG" 640 root lark-service
check "rpm: unit installed" cmp -s "$UNIT" systemd/lark-service.service
check "rpm: user lark-service exists" sh -c "getent passwd lark-service >/dev/null"
check "rpm: state dir 0700 lark-service:lark-service" has_stat /var/lib/lark-service 700 lark-service lark-service
check "rpm: credentials dir 0700 root:root" has_stat /etc/lark-service/credentials 700 root root
check "rpm: unit not enabled" test -z "$(find /etc/systemd/system -name 'lark-service.service' 2>/dev/null)"
chmod 0600 "$WORK/secrets/app_secret"
run_check >"$WORK/rpm-check.out" 2>&1
check "rpm: config check as lark-service exits 0 (got $?)" grep -q '^# configuration is valid' "$WORK/rpm-check.out"
echo '# local change by check-packages.sh' >>"$CONFIG"
rpm -e "$PKG" >"$WORK/rpm-erase.out" 2>&1
rc=$?
check "rpm -e $PKG" test "$rc" -eq 0
check "after rpm -e: binary gone" test ! -e "$BIN"
check "after rpm -e: changed config kept as $CONFIG.rpmsave" test -f "$CONFIG.rpmsave"
check "after rpm -e: state dir kept (rpm has no purge)" test -d /var/lib/lark-service
rm -rf /etc/lark-service /var/lib/lark-service

step "lintian and rpmlint"
# Errors fail the check; warnings and notes are shown for the maintainers.
lintian --tag-display-limit 0 "$DEB" >"$WORK/lintian.out" 2>&1
sed 's/^/  | /' "$WORK/lintian.out"
check "lintian: no errors ($(grep -c '^E:' "$WORK/lintian.out") E: lines)" sh -c "! grep -q '^E:' '$WORK/lintian.out'"
rpmlint --config packaging/rpm/rpmlint.toml "$RPM" >"$WORK/rpmlint.out" 2>&1
sed 's/^/  | /' "$WORK/rpmlint.out"
check "rpmlint: no errors ($(grep -c ': E: ' "$WORK/rpmlint.out") errors)" sh -c "! grep -q ': E: ' '$WORK/rpmlint.out'"

finish
