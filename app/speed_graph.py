"""Live up/down speed over the last minute, drawn with QPainter (no QtCharts: that would pull 150 MB of
PySide6-Addons for one graph)."""

from __future__ import annotations

from collections import deque

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFont, QPainter, QPainterPath, QPaintEvent, QPen
from PySide6.QtWidgets import QWidget

from shallot.app.presenter import format_rate
from shallot.app.theme import LIGHT, Theme

KEEP = 60


class SpeedGraph(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.up: deque[float] = deque(maxlen=KEEP)
        self.down: deque[float] = deque(maxlen=KEEP)
        self.theme: Theme = LIGHT
        self.setMinimumHeight(96)

    def sizeHint(self) -> QSize:
        return QSize(420, 120)

    def add(self, up: float, down: float) -> None:
        self.up.append(up)
        self.down.append(down)
        self.update()

    def clear(self) -> None:
        self.up.clear()
        self.down.clear()
        self.update()

    def set_theme(self, theme: Theme) -> None:
        self.theme = theme
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        t = self.theme
        area = QRectF(0, 6, self.width() - 1, self.height() - 8)
        peak = max([1.0, *self.up, *self.down])
        top = _nice_ceiling(peak)
        p.setPen(QPen(QColor(t.grid), 1))
        for i in range(4):
            y = area.top() + area.height() * i / 3
            p.drawLine(QPointF(area.left(), y), QPointF(area.right(), y))
        small = QFont(self.font())
        small.setPointSizeF(max(7.0, small.pointSizeF() * 0.82))
        p.setFont(small)
        p.setPen(QColor(t.muted))
        p.drawText(area.adjusted(4, 0, -4, 0), Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop,
                   format_rate(top))
        if not self.up:
            p.drawText(area, Qt.AlignmentFlag.AlignCenter, "Speed appears here once connected")
            p.end()
            return
        for series, colour in ((self.down, t.graph_down), (self.up, t.graph_up)):
            self._draw_series(p, area, list(series), top, QColor(colour))
        p.end()

    @staticmethod
    def _draw_series(p: QPainter, area: QRectF, values: list[float], top: float, colour: QColor) -> None:
        if len(values) == 1:
            values = values * 2  # one sample: a flat stretch rather than a dot
        step = area.width() / (KEEP - 1)
        x0 = area.right() - step * (len(values) - 1)
        points = [QPointF(x0 + i * step, area.bottom() - area.height() * min(v, top) / top)
                  for i, v in enumerate(values)]
        line = QPainterPath(points[0])
        for pt in points[1:]:
            line.lineTo(pt)
        fill = QPainterPath(line)
        fill.lineTo(points[-1].x(), area.bottom())
        fill.lineTo(points[0].x(), area.bottom())
        fill.closeSubpath()
        shade = QColor(colour)
        shade.setAlphaF(0.16)
        p.fillPath(fill, shade)
        p.setPen(QPen(colour, 2))
        p.drawPath(line)


def _nice_ceiling(x: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``x``: round numbers on the axis."""
    mag = 1.0
    while mag * 10 <= x:
        mag *= 10
    for m in (1, 2, 5, 10):
        if m * mag >= x:
            return m * mag
    return 10 * mag
