#!/bin/sh
# Install tcmu-py's system files (run as root from the checkout): the udev rules, the systemd
# unit and the D-Bus policy that lets `tcmu-py serve` own org.kernel.TCMUService1 on the system
# bus (targetcli lists user:<subtype> backstores from it). DESTDIR for packaging.
set -eu
cd "$(dirname "$0")/.."
D="${DESTDIR:-}"
install -D -m 0644 udev/60-tcmu-py.rules "$D/etc/udev/rules.d/60-tcmu-py.rules"
install -D -m 0644 udev/tcmu-py.service "$D/etc/systemd/system/tcmu-py.service"
install -D -m 0644 dbus/tcmu-py.conf "$D/etc/dbus-1/system.d/tcmu-py.conf"
if [ -z "$D" ]; then
    udevadm control --reload 2>/dev/null || true
    systemctl daemon-reload 2>/dev/null || true
    # the bus daemon reads policy files again on this signal (dbus-daemon and dbus-broker)
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig \
        2>/dev/null || true
fi
