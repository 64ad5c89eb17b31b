#!/bin/bash
# Create (once) and cache the Debian root that the system tests boot with
# systemd-nspawn.  Idempotent: a ready-marker holding the recipe says the
# cached root is complete and was built from this exact recipe; anything
# else is rebuilt in a temp dir and moved into place, so a killed run never
# leaves a half root that looks ready.
#
# Usage: prepare.sh            prints the root's path on stdout, exit 0
# Exit 77 (the automake "skip" code) with the reason on stderr when this
# machine cannot build it (not root, tools missing, no network).
#
# Environment: PSPROBE_TEST_CACHE (default /var/cache/psprobe-test),
#              PSPROBE_TEST_MIRROR (default: debootstrap's own default).
set -euo pipefail

CACHE=${PSPROBE_TEST_CACHE:-/var/cache/psprobe-test}
SUITE=bookworm
INCLUDE=systemd,systemd-sysv,dbus,python3,python3-pika,python3-requests,python3-click
ROOT=$CACHE/$SUITE-root
MARKER=$ROOT.ready
RECIPE="v1 $SUITE minbase $INCLUDE"

skip() { echo "prepare.sh: SKIP: $*" >&2; exit 77; }

if [[ -f $MARKER && $(cat "$MARKER") == "$RECIPE" && -x $ROOT/lib/systemd/systemd ]]; then
    echo "$ROOT"
    exit 0
fi

[[ $(id -u) == 0 ]] || skip "needs root to debootstrap and boot a container"
for tool in debootstrap systemd-nspawn nsenter; do
    command -v "$tool" >/dev/null || skip "$tool is not installed (apt-get install -y systemd-container debootstrap)"
done

mkdir -p "$CACHE"
# One builder at a time; the others wait and then find the marker.
exec 9>"$CACHE/.lock"
flock 9
if [[ -f $MARKER && $(cat "$MARKER") == "$RECIPE" ]]; then
    echo "$ROOT"
    exit 0
fi

TMP=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
LOG=$CACHE/debootstrap.log
echo "prepare.sh: building $ROOT (log: $LOG)" >&2
# shellcheck disable=SC2086  # the mirror is optional: empty means debootstrap's default
if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$TMP/root" \
        ${PSPROBE_TEST_MIRROR:-} >"$LOG" 2>&1; then
    tail -5 "$LOG" >&2
    skip "debootstrap failed (offline?); see $LOG"
fi

R=$TMP/root
# Each booted copy gets its own machine id at first boot.
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
echo psprobe-test >"$R/etc/hostname"
# Nothing in the container needs a login prompt or periodic housekeeping;
# masking them makes boot faster and the journal quieter.
for u in console-getty.service getty@.service systemd-timesyncd.service \
         apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
         e2scrub_all.timer fstrim.timer systemd-tmpfiles-clean.timer; do
    ln -sf /dev/null "$R/etc/systemd/system/$u"
done
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*

rm -rf "$ROOT" "$MARKER"
mv "$R" "$ROOT"
echo "$RECIPE" >"$MARKER"
echo "$ROOT"
