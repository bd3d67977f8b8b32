#!/bin/sh
# Install tcmu-py's system files (run as root from the checkout): the udev rules, the systemd
# unit, the D-Bus policy that lets `tcmu-py serve` own org.kernel.TCMUService1 on the system
# bus (targetcli lists user:<subtype> backstores from it) and the D-Bus activation file that
# starts the daemon when a client (targetcli) calls that name and no daemon runs.
# DESTDIR for packaging; TCMU_PY: the tcmu-py the activation file runs (default: the one on
# PATH; dbus-daemon's launch helper runs it with an empty environment, so the path is absolute).
set -eu
cd "$(dirname "$0")/.."
D="${DESTDIR:-}"
TCMU_PY="${TCMU_PY:-$(command -v tcmu-py || true)}"
case "$TCMU_PY" in
    /*) ;;
    *) echo "install-system.sh: TCMU_PY=$TCMU_PY: expected the absolute path of tcmu-py" \
            "(install tcmu-py first, or set TCMU_PY)" >&2; exit 2 ;;
esac
install -D -m 0644 udev/60-tcmu-py.rules "$D/etc/udev/rules.d/60-tcmu-py.rules"
install -D -m 0644 udev/tcmu-py.service "$D/etc/systemd/system/tcmu-py.service"
install -D -m 0644 dbus/tcmu-py.conf "$D/etc/dbus-1/system.d/tcmu-py.conf"
# /usr/local/share/dbus-1/system-services comes before /usr/share/dbus-1/system-services (where
# tcmu-runner's package puts its file for the same name) in the bus's service directories.
ACT="$D/usr/local/share/dbus-1/system-services/org.kernel.TCMUService1.service"
install -d -m 0755 "$(dirname "$ACT")"
sed "s|@TCMU_PY@|$TCMU_PY|g" dbus/org.kernel.TCMUService1.service > "$ACT.tmp"
chmod 0644 "$ACT.tmp"
mv "$ACT.tmp" "$ACT"
if [ -z "$D" ]; then
    udevadm control --reload 2>/dev/null || true
    systemctl daemon-reload 2>/dev/null || true
    # the bus daemon reads policy and service files again on this signal (dbus-daemon and
    # dbus-broker)
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig \
        2>/dev/null || true
fi
