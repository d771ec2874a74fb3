"""The app icon (resources/shallot.svg, rendered crisp at any size and device pixel ratio) and its state
variants for the tray: the icon with a coloured dot in the corner."""

from __future__ import annotations

from importlib import resources

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QIcon, QPainter, QPixmap
from PySide6.QtSvg import QSvgRenderer

from shallot.app.theme import state_colour
from shallot.core.control.api import EngineState

ICON_SIZES = (16, 22, 24, 32, 48, 64, 128, 256)


def svg_bytes() -> bytes:
    return resources.files("shallot.resources").joinpath("shallot.svg").read_bytes()


def render(size: int, dpr: float = 1.0, dot: QColor | None = None) -> QPixmap:
    px = max(1, round(size * dpr))
    pm = QPixmap(px, px)
    pm.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pm)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    QSvgRenderer(svg_bytes()).render(painter, QRectF(0, 0, px, px))
    if dot is not None:  # a state dot with a light rim so it reads on dark and light panels
        d = px * 0.42
        rect = QRectF(px - d - px * 0.02, px - d - px * 0.02, d, d)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor("#ffffff"))
        painter.drawEllipse(rect)
        painter.setBrush(dot)
        painter.drawEllipse(rect.adjusted(d * 0.14, d * 0.14, -d * 0.14, -d * 0.14))
    painter.end()
    pm.setDevicePixelRatio(dpr)
    return pm


def app_icon() -> QIcon:
    icon = QIcon()
    for size in ICON_SIZES:
        icon.addPixmap(render(size))
    return icon


_state_icons: dict[EngineState, QIcon] = {}


def state_icon(phase: EngineState) -> QIcon:
    if phase in _state_icons:  # rendering SVGs takes milliseconds: once per state is enough
        return _state_icons[phase]
    icon = _state_icons[phase] = QIcon()
    for size in (16, 22, 24, 32, 48, 64):
        icon.addPixmap(render(size, dot=state_colour(phase)))
    return icon
