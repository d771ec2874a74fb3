"""Settings through the window: saved per user, the same after a restart, validated with clear messages;
a corrupt file is reported, kept aside and replaced by defaults.  No engine is needed here."""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDialogButtonBox

from shallot.app.settings import Settings, SettingsStore, config_dir
from tests.integration.conftest import RunningNetwork


def save_button(dialog) -> object:
    box = dialog.findChild(QDialogButtonBox)
    return box.button(QDialogButtonBox.StandardButton.Save)


def test_settings_dialog_saves_and_a_restart_shows_the_same(qtbot, make_app, network: RunningNetwork,
                                                            xdg: Path) -> None:
    app = make_app()
    dialog = app.window.open_settings()
    qtbot.waitUntil(dialog.isVisible)
    dialog.use_directory.setChecked(True)
    dialog.directory.setText(str(network.directory))
    dialog.route_all.setChecked(True)
    dialog.kill_switch.setChecked(False)
    dialog.dns.setChecked(False)
    dialog.connect_on_start.setChecked(True)
    dialog.start_minimized.setChecked(True)
    dialog.theme.setCurrentIndex(dialog.theme.findData("dark"))
    qtbot.mouseClick(save_button(dialog), Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not dialog.isVisible())

    path = config_dir() / "settings.json"
    assert path.is_relative_to(xdg)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    on_disk = json.loads(path.read_text())
    assert on_disk["directory"] == str(network.directory.resolve()) and on_disk["route_all"] is True

    again = make_app(save=False)  # a restart: a new controller reads the file
    s = again.controller.settings
    assert (s.directory, s.route_all, s.kill_switch, s.dns_through_tunnel, s.connect_on_start,
            s.start_minimized, s.theme) == (str(network.directory.resolve()), True, False, False, True, True, "dark")
    assert again.window.theme.name == "dark"
    assert again.window.mode_badge.text() == "VPN mode"  # what the next connection will use
    dialog2 = again.window.open_settings()
    assert dialog2.directory.text() == str(network.directory.resolve())
    assert dialog2.route_all.isChecked() and not dialog2.kill_switch.isChecked()
    exits = [again.window.exit_choice.itemText(i) for i in range(again.window.exit_choice.count())]
    assert exits[0] == "Automatic" and len(exits) == 1 + len(network.exits)
    dialog2.reject()


def test_settings_dialog_names_the_problem_and_stays_open(qtbot, make_app, tmp_path: Path) -> None:
    app = make_app()
    dialog = app.window.open_settings()
    dialog.use_bootstrap.setChecked(True)
    dialog.bootstrap.setText("192.0.2.1:7001, not-a-peer")
    qtbot.mouseClick(save_button(dialog), Qt.MouseButton.LeftButton)
    assert dialog.isVisible()
    assert "'not-a-peer'" in dialog.error.text() and "host:port" in dialog.error.text()
    dialog.bootstrap.setText("192.0.2.1:70000")
    qtbot.mouseClick(save_button(dialog), Qt.MouseButton.LeftButton)
    assert dialog.isVisible() and "1 to 65535" in dialog.error.text()
    dialog.use_directory.setChecked(True)
    dialog.directory.setText(str(tmp_path / "missing"))
    qtbot.mouseClick(save_button(dialog), Qt.MouseButton.LeftButton)
    assert dialog.isVisible() and "does not exist" in dialog.error.text()
    assert not (config_dir() / "settings.json").exists()  # nothing invalid was saved
    dialog.reject()


def test_corrupt_settings_are_reported_kept_aside_and_replaced_by_defaults(qtbot, make_app) -> None:
    path = config_dir() / "settings.json"
    path.parent.mkdir(parents=True)
    garbage = b'{"directory": "/x", "route_all": tru'  # cut off mid-write
    path.write_bytes(garbage)
    app = make_app(save=False)
    assert app.controller.settings == Settings()
    kept = list(path.parent.glob("settings.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == garbage
    assert not path.exists()
    note = app.window.settings_note
    assert note.isVisible() and "not valid JSON" in note.text() and kept[0].name in note.text()
    assert any("not valid JSON" in line for line in app.window.log_view.visible_lines())
    app.controller.apply_settings(Settings(theme="light"))  # the next save writes a good file again
    assert SettingsStore().load().settings.theme == "light"


def test_a_bad_value_falls_back_alone(qtbot, make_app) -> None:
    path = config_dir() / "settings.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"kill_switch": "yes", "theme": "dark", "bootstrap": ["192.0.2.1:7001"]}))
    app = make_app(save=False)
    s = app.controller.settings
    assert s.kill_switch is True and s.theme == "dark" and s.bootstrap == ("192.0.2.1:7001",)
    assert any("kill_switch" in p for p in app.controller.load_problems)
    assert path.exists()  # not corrupt: kept in place
