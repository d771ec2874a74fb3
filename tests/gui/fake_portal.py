"""A desktop's colour-scheme setting, served the way desktops serve it to Qt: the Settings interface of
xdg-desktop-portal (org.freedesktop.portal.Desktop) on a session bus (a private one the test starts).  Qt's
xdgdesktopportal platform theme reads "color-scheme" with ReadAll and follows the SettingChanged signal.

Runs in a thread of the test process (jeepney, blocking I/O): ``FakePortal(address, scheme)``, then
``set(scheme)`` is the user switching the desktop between light and dark."""

from __future__ import annotations

import contextlib
import socket
import threading

from jeepney import DBusAddress, HeaderFields, MessageType, new_error, new_method_return, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

NAME = "org.freedesktop.portal.Desktop"
SETTINGS = DBusAddress("/org/freedesktop/portal/desktop", interface="org.freedesktop.portal.Settings")
APPEARANCE = "org.freedesktop.appearance"
NO_PREFERENCE, PREFER_DARK, PREFER_LIGHT = 0, 1, 2  # the values of org.freedesktop.appearance color-scheme


class FakePortal:
    def __init__(self, address: str, scheme: int) -> None:
        self.scheme = scheme
        self.conn = open_dbus_connection(bus=address)
        self.lock = threading.Lock()  # one writer at a time on the connection
        owned = self.conn.send_and_get_reply(message_bus.RequestName(NAME, 4), timeout=10)  # 4: do not queue
        if owned.body != (1,):  # 1: the primary owner
            raise RuntimeError(f"cannot own {NAME}: {owned.body}")
        self.thread = threading.Thread(target=self._serve, name="fake-portal", daemon=True)
        self.thread.start()

    def set(self, scheme: int) -> None:
        with self.lock:
            self.scheme = scheme
            self.conn.send(new_signal(SETTINGS, "SettingChanged", "ssv", (APPEARANCE, "color-scheme", ("u", scheme))))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's receive (a close would not)
        self.thread.join(5)
        self.conn.close()

    def _serve(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # ends when the connection or the bus closes
            while True:
                self._answer(self.conn.receive())

    def _answer(self, msg) -> None:  # type: ignore[no-untyped-def]
        if msg.header.message_type is not MessageType.method_call:
            return
        member = msg.header.fields.get(HeaderFields.member)
        with self.lock:
            value = ("u", self.scheme)
            if member == "ReadAll":
                reply = new_method_return(msg, "a{sa{sv}}", ({APPEARANCE: {"color-scheme": value}},))
            elif member == "ReadOne" and msg.body == (APPEARANCE, "color-scheme"):
                reply = new_method_return(msg, "v", (value,))
            elif member == "Read" and msg.body == (APPEARANCE, "color-scheme"):  # the old form: a variant in a variant
                reply = new_method_return(msg, "v", (("v", value),))
            else:  # the other portals (FileChooser, ...) do not exist here
                reply = new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (f"no {member}",))
            self.conn.send(reply)
