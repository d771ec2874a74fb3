"""The large round Connect button: a ring in the state's colour (spinning while a circuit is built), a power
symbol and the action as a word.  Painted with QPainter, so it is sharp at any scale."""

from __future__ import annotations

import math

from PySide6.QtCore import QPointF, QRectF, QSize, Qt, QTimer
from PySide6.QtGui import QColor, QFont, QPainter, QPainterPath, QPaintEvent, QPen
from PySide6.QtWidgets import QAbstractButton, QWidget

from shallot.app.theme import state_colour
from shallot.core.control.api import EngineState

SPIN_INTERVAL_MS = 33  # ~30 frames a second, and only while busy


class ConnectButton(QAbstractButton):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setCursor(Qt.CursorShape.PointingHandCursor)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setMinimumSize(188, 188)
        self.phase = EngineState.DISCONNECTED
        self.busy = False
        self._angle = 0.0
        self._spin = QTimer(self)
        self._spin.setInterval(SPIN_INTERVAL_MS)
        self._spin.timeout.connect(self._step)
        self.setText("Connect")
        self.setAccessibleName("Connect")

    def sizeHint(self) -> QSize:
        return QSize(200, 200)

    def show_state(self, phase: EngineState, text: str, busy: bool) -> None:
        self.phase, self.busy = phase, busy
        self.setText(text)
        self.setAccessibleName(text)
        self.setToolTip(f"{text} (Ctrl+Return)")
        if busy and not self._spin.isActive():
            self._spin.start()
        elif not busy:
            self._spin.stop()
        self.update()

    def _step(self) -> None:
        self._angle = (self._angle + 9.0) % 360.0
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        side = min(self.width(), self.height()) - 8
        rect = QRectF((self.width() - side) / 2, (self.height() - side) / 2, side, side)
        colour = state_colour(self.phase)
        pal = self.palette()
        hovered = self.underMouse() or self.hasFocus()

        # soft halo, then the disc
        halo = QColor(colour)
        halo.setAlphaF(0.16 if self.phase is EngineState.CONNECTED else 0.10)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(halo)
        p.drawEllipse(rect)
        inner = rect.adjusted(side * 0.07, side * 0.07, -side * 0.07, -side * 0.07)
        disc = QColor(colour) if self.phase is EngineState.CONNECTED else pal.base().color()
        if self.isDown():
            disc = disc.darker(110)
        p.setBrush(disc)
        ring = QPen(colour, max(3.0, side * 0.028))
        ring.setCapStyle(Qt.PenCapStyle.RoundCap)
        p.setPen(ring if not self.busy else QPen(QColor(colour).lighter(170), ring.widthF()))
        p.drawEllipse(inner)
        if self.busy:  # a quarter arc chasing round the ring
            p.setPen(ring)
            p.setBrush(Qt.BrushStyle.NoBrush)
            p.drawArc(inner, int(-self._angle * 16), 100 * 16)
        if hovered and not self.busy:
            focus = QPen(QColor(colour), 1.5, Qt.PenStyle.DotLine)
            p.setPen(focus)
            p.setBrush(Qt.BrushStyle.NoBrush)
            p.drawEllipse(rect.adjusted(2, 2, -2, -2))

        # power symbol
        fg = QColor("#ffffff") if self.phase is EngineState.CONNECTED else colour
        centre = QPointF(inner.center().x(), inner.center().y() - side * 0.08)
        r = side * 0.14
        pen = QPen(fg, max(3.0, side * 0.035))
        pen.setCapStyle(Qt.PenCapStyle.RoundCap)
        p.setPen(pen)
        p.setBrush(Qt.BrushStyle.NoBrush)
        path = QPainterPath()
        start = 60.0
        path.arcMoveTo(QRectF(centre.x() - r, centre.y() - r, 2 * r, 2 * r), 90 + start / 2 + 30 - 30)
        path.arcTo(QRectF(centre.x() - r, centre.y() - r, 2 * r, 2 * r), 90 + start / 2, 360 - start)
        p.drawPath(path)
        p.drawLine(QPointF(centre.x(), centre.y() - r * 1.25), QPointF(centre.x(), centre.y() - r * 0.15))

        # the word
        font = QFont(self.font())
        font.setPointSizeF(max(9.0, side * 0.062))
        font.setWeight(QFont.Weight.DemiBold)
        p.setFont(font)
        p.setPen(QColor("#ffffff") if self.phase is EngineState.CONNECTED else pal.text().color())
        text_rect = QRectF(inner.left(), centre.y() + r * 1.5, inner.width(), side * 0.16)
        p.drawText(text_rect, Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop, self.text())
        p.end()

    def hitButton(self, pos: QPointF) -> bool:  # only the disc is clickable
        c = QPointF(self.width() / 2, self.height() / 2)
        return math.hypot(pos.x() - c.x(), pos.y() - c.y()) <= min(self.width(), self.height()) / 2
