"""The settings dialog: every value is checked before it is kept, and a problem is named in one line under
the form (the dialog stays open until it is fixed or cancelled)."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from shallot.app.settings import THEMES, Settings, SettingsError, parse_peers
from shallot.core.discovery.directory import load_directory
from shallot.core.errors import ShallotError


def validate(form: dict[str, object], base: Settings) -> Settings:
    """Settings from the dialog's values; raises SettingsError naming the first problem."""
    source = str(form["source"])
    directory = str(form["directory"]).strip()
    peers_text = str(form["bootstrap"])
    if source == "bootstrap":
        peers = parse_peers(peers_text) if peers_text.strip() else ()
    else:  # not in use: keep what was typed if it is valid, else what was there
        try:
            peers = parse_peers(peers_text)
        except SettingsError:
            peers = base.bootstrap
    if source == "directory":
        if not directory:
            raise SettingsError("choose a directory file (or switch to bootstrap peers)")
        path = Path(directory).expanduser()
        try:
            relays = load_directory(path)
        except ShallotError as exc:
            raise SettingsError(str(exc)) from None
        if not any(d.is_exit for d in relays):
            raise SettingsError(f"{path} lists no exit relay: no circuit could end anywhere")
        directory = str(path.resolve())
    elif not peers:
        raise SettingsError("add at least one bootstrap peer as host:port (or use a directory file)")
    return base.replace(source=source, directory=directory, bootstrap=peers,
                        route_all=bool(form["route_all"]), kill_switch=bool(form["kill_switch"]),
                        dns_through_tunnel=bool(form["dns_through_tunnel"]),
                        start_minimized=bool(form["start_minimized"]),
                        connect_on_start=bool(form["connect_on_start"]), theme=str(form["theme"]))


class SettingsDialog(QDialog):
    def __init__(self, settings: Settings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Shallot settings")
        self.setMinimumWidth(520)
        self.base = settings
        self.result_settings: Settings | None = None
        lay = QVBoxLayout(self)
        form = QFormLayout()
        form.setVerticalSpacing(10)

        self.use_directory = QRadioButton("Directory file")
        self.use_bootstrap = QRadioButton("Bootstrap peers (DHT)")
        group = QButtonGroup(self)
        group.addButton(self.use_directory)
        group.addButton(self.use_bootstrap)
        (self.use_directory if settings.source == "directory" else self.use_bootstrap).setChecked(True)
        src = QHBoxLayout()
        src.addWidget(self.use_directory)
        src.addWidget(self.use_bootstrap)
        src.addStretch(1)
        form.addRow("Relays from", src)

        self.directory = QLineEdit(settings.directory)
        self.directory.setPlaceholderText("a file made by 'shallot directory'")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.directory, 1)
        row.addWidget(browse)
        form.addRow("Directory file", row)

        self.bootstrap = QLineEdit(", ".join(settings.bootstrap))
        self.bootstrap.setPlaceholderText("host:port, host:port")
        form.addRow("Bootstrap peers", self.bootstrap)

        self.route_all = QCheckBox("Route all traffic through the circuit (VPN)")
        self.route_all.setChecked(settings.route_all)
        self.route_all.setToolTip("Needs Shallot's privileged helper; without it, probe mode builds a circuit "
                                  "but leaves your system's routes alone.")
        self.kill_switch = QCheckBox("Kill switch: block traffic outside the tunnel")
        self.kill_switch.setChecked(settings.kill_switch)
        self.dns = QCheckBox("Send name lookups (DNS) through the tunnel")
        self.dns.setChecked(settings.dns_through_tunnel)
        for box in (self.route_all, self.kill_switch, self.dns):
            form.addRow("" if box is not self.route_all else "Connection", box)
        self.route_all.toggled.connect(self._sync)

        self.start_minimized = QCheckBox("Start minimized to the tray")
        self.start_minimized.setChecked(settings.start_minimized)
        self.connect_on_start = QCheckBox("Connect when the app starts")
        self.connect_on_start.setChecked(settings.connect_on_start)
        form.addRow("Start", self.start_minimized)
        form.addRow("", self.connect_on_start)

        self.theme = QComboBox()
        for t in THEMES:
            self.theme.addItem({"system": "Follow the system", "light": "Light", "dark": "Dark"}[t], t)
        self.theme.setCurrentIndex(THEMES.index(settings.theme))
        form.addRow("Appearance", self.theme)
        lay.addLayout(form)

        self.error = QLabel("")
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        lay.addWidget(self.error)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
        self.use_directory.toggled.connect(self._sync)
        self._sync()

    def values(self) -> dict[str, object]:
        return {"source": "directory" if self.use_directory.isChecked() else "bootstrap",
                "directory": self.directory.text(), "bootstrap": self.bootstrap.text(),
                "route_all": self.route_all.isChecked(), "kill_switch": self.kill_switch.isChecked(),
                "dns_through_tunnel": self.dns.isChecked(), "start_minimized": self.start_minimized.isChecked(),
                "connect_on_start": self.connect_on_start.isChecked(), "theme": self.theme.currentData()}

    def accept(self) -> None:
        try:
            self.result_settings = validate(self.values(), self.base)
        except SettingsError as exc:
            self.error.setText(str(exc)[0].upper() + str(exc)[1:])
            return
        super().accept()

    def _sync(self) -> None:
        by_dir = self.use_directory.isChecked()
        self.directory.setEnabled(by_dir)
        self.bootstrap.setEnabled(not by_dir)
        self.kill_switch.setEnabled(self.route_all.isChecked())
        self.dns.setEnabled(self.route_all.isChecked())

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Directory file", self.directory.text() or str(Path.home()))
        if path:
            self.directory.setText(path)
