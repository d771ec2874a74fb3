"""Light and dark palettes, the state colours and one style sheet.  "system" follows the desktop's colour
scheme (Qt 6.5+ ``QStyleHints.colorScheme``) and changes with it."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

from shallot.core.control.api import EngineState


@dataclass(frozen=True)
class Theme:
    name: str
    window: str
    card: str
    border: str
    text: str
    muted: str
    accent: str
    graph_up: str
    graph_down: str
    grid: str


LIGHT = Theme("light", window="#f4f2f9", card="#ffffff", border="#e2ddef", text="#1d1a26", muted="#6b6679",
              accent="#7d3fc8", graph_up="#8b5cf6", graph_down="#10b981", grid="#ece9f3")
DARK = Theme("dark", window="#15131b", card="#201d29", border="#332e40", text="#eceaf3", muted="#a29cb3",
             accent="#a77bf0", graph_up="#a78bfa", graph_down="#34d399", grid="#2a2634")

STATE_COLOURS = {
    EngineState.DISCONNECTED: "#8b8798",
    EngineState.CONNECTING: "#e3a008",
    EngineState.RECONNECTING: "#e3a008",
    EngineState.CONNECTED: "#16a34a",
    EngineState.ERROR: "#e5484d",
}


def state_colour(phase: EngineState) -> QColor:
    return QColor(STATE_COLOURS[phase])


def system_is_dark() -> bool:
    hints = QGuiApplication.styleHints()
    scheme = getattr(hints, "colorScheme", None)
    return scheme is not None and scheme() == Qt.ColorScheme.Dark


def resolve(choice: str) -> Theme:
    if choice == "dark" or (choice == "system" and system_is_dark()):
        return DARK
    return LIGHT


def apply(app: QApplication, theme: Theme) -> None:
    app.setStyle("Fusion")  # the same look on every desktop, and palettes that it honours fully
    p = QPalette()
    c = QColor
    p.setColor(QPalette.ColorRole.Window, c(theme.window))
    p.setColor(QPalette.ColorRole.WindowText, c(theme.text))
    p.setColor(QPalette.ColorRole.Base, c(theme.card))
    p.setColor(QPalette.ColorRole.AlternateBase, c(theme.window))
    p.setColor(QPalette.ColorRole.Text, c(theme.text))
    p.setColor(QPalette.ColorRole.Button, c(theme.card))
    p.setColor(QPalette.ColorRole.ButtonText, c(theme.text))
    p.setColor(QPalette.ColorRole.ToolTipBase, c(theme.card))
    p.setColor(QPalette.ColorRole.ToolTipText, c(theme.text))
    p.setColor(QPalette.ColorRole.PlaceholderText, c(theme.muted))
    p.setColor(QPalette.ColorRole.Highlight, c(theme.accent))
    p.setColor(QPalette.ColorRole.HighlightedText, c("#ffffff"))
    p.setColor(QPalette.ColorRole.Link, c(theme.accent))
    for role in (QPalette.ColorRole.WindowText, QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText):
        p.setColor(QPalette.ColorGroup.Disabled, role, c(theme.muted))
    app.setPalette(p)
    app.setStyleSheet(style_sheet(theme))


def style_sheet(t: Theme) -> str:
    return f"""
    QFrame#card {{ background: {t.card}; border: 1px solid {t.border}; border-radius: 14px; }}
    QLabel#cardTitle {{ font-weight: 600; font-size: 11pt; }}
    QLabel#muted, QLabel#hopRole, QLabel#statName {{ color: {t.muted}; }}
    QLabel#hopRole {{ font-size: 8pt; font-weight: 600; letter-spacing: 1px; }}
    QLabel#headline {{ font-size: 16pt; font-weight: 600; }}
    QLabel#detail {{ color: {t.muted}; font-size: 10pt; }}
    QLabel#advice {{ font-size: 9.5pt; }}
    QLabel#statValue {{ font-size: 12pt; font-weight: 600; }}
    QLabel#brand {{ font-size: 14pt; font-weight: 700; }}
    QLabel#badge {{ border-radius: 9px; padding: 2px 10px; font-size: 8.5pt; font-weight: 600;
                    background: {t.window}; border: 1px solid {t.border}; color: {t.muted}; }}
    QFrame#hop {{ background: {t.window}; border: 1px solid {t.border}; border-radius: 10px; }}
    QPushButton {{ border: 1px solid {t.border}; border-radius: 8px; padding: 5px 12px; background: {t.card}; }}
    QPushButton:hover {{ border-color: {t.accent}; }}
    QPushButton:disabled {{ color: {t.muted}; }}
    QPushButton#action {{ background: {t.accent}; color: white; border: none; font-weight: 600; }}
    QToolButton {{ border: none; border-radius: 8px; padding: 4px; }}
    QToolButton:hover {{ background: {t.border}; }}
    QComboBox {{ border: 1px solid {t.border}; border-radius: 8px; padding: 4px 8px; background: {t.card}; }}
    QPlainTextEdit {{ border: none; background: {t.card}; font-family: monospace; font-size: 9pt; }}
    QLabel#error {{ color: {STATE_COLOURS[EngineState.ERROR]}; }}
    """
