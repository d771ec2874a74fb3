"""The circuit: you → guard → middle → exit → internet, each relay with nickname, short id, address and the
round trip measured to it (the engine measures the guard's link handshake and the echo from the exit; the
middle cannot be timed alone without showing it who we are, so it shows a dash)."""

from __future__ import annotations

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPen, QPolygonF
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

from shallot.app.presenter import format_ms
from shallot.app.theme import state_colour
from shallot.core.control.api import ROLES, EngineState, HopStatus

LATENCY_TIP = {
    "guard": "Round trip to the guard: its link handshake, one datagram each way.",
    "middle": "The middle relay answers only its neighbours; timing it alone would show it who you are.",
    "exit": "Round trip through the whole circuit to the exit's echo service and back.",
}


class Arrow(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.colour = state_colour(EngineState.DISCONNECTED)
        self.dashed = True
        self.setMinimumWidth(22)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def sizeHint(self) -> QSize:
        return QSize(28, 20)

    def set_state(self, colour: QColor, dashed: bool) -> None:
        self.colour, self.dashed = colour, dashed
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        y = self.height() / 2
        pen = QPen(self.colour, 2, Qt.PenStyle.DashLine if self.dashed else Qt.PenStyle.SolidLine)
        pen.setCapStyle(Qt.PenCapStyle.RoundCap)
        p.setPen(pen)
        p.drawLine(QPointF(3, y), QPointF(self.width() - 8, y))
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(self.colour)
        w = self.width()
        p.drawPolygon(QPolygonF([QPointF(w - 2, y), QPointF(w - 9, y - 4.5), QPointF(w - 9, y + 4.5)]))
        p.end()


class Glyph(QWidget):
    """A small line drawing: a laptop for "you", a globe for "internet"."""

    def __init__(self, kind: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.kind = kind
        self.setFixedSize(34, 30)

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        pen = QPen(self.palette().text().color(), 1.8)
        pen.setJoinStyle(Qt.PenJoinStyle.RoundJoin)
        p.setPen(pen)
        if self.kind == "you":
            p.drawRoundedRect(QRectF(7, 5, 20, 14), 2, 2)
            p.drawLine(QPointF(3, 23), QPointF(31, 23))
        else:
            r = QRectF(5, 2, 24, 24)
            p.drawEllipse(r)
            p.drawEllipse(r.adjusted(6, 0, -6, 0))
            p.drawLine(QPointF(r.left(), r.center().y()), QPointF(r.right(), r.center().y()))
        p.end()


class Endpoint(QFrame):
    """"You" and "Internet": a glyph and a caption."""

    def __init__(self, kind: str, caption: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 4, 2, 4)
        lay.setSpacing(4)
        lay.addWidget(Glyph(kind), 0, Qt.AlignmentFlag.AlignHCenter)
        text = QLabel(caption)
        text.setObjectName("hopRole")
        text.setAlignment(Qt.AlignmentFlag.AlignCenter)
        lay.addWidget(text)


class HopCard(QFrame):
    def __init__(self, role: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("hop")
        self.role = role
        lay = QVBoxLayout(self)
        lay.setContentsMargins(10, 8, 10, 8)
        lay.setSpacing(1)
        self.role_label = QLabel(role.upper())
        self.role_label.setObjectName("hopRole")
        self.nickname = QLabel("\u2013")
        f = self.nickname.font()
        f.setWeight(f.Weight.DemiBold)
        f.setPointSizeF(f.pointSizeF() * 1.08)
        self.nickname.setFont(f)
        self.short_id = QLabel("")
        self.address = QLabel("")
        self.latency = QLabel("")
        self.latency.setToolTip(LATENCY_TIP[role])
        for label in (self.short_id, self.address, self.latency):
            label.setObjectName("muted")
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        mono = self.short_id.font()
        mono.setFamily("monospace")
        mono.setStyleHint(mono.StyleHint.Monospace)
        self.short_id.setFont(mono)
        self.address.setFont(mono)
        for w in (self.role_label, self.nickname, self.short_id, self.address, self.latency):
            lay.addWidget(w)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.show_hop(None)

    def show_hop(self, hop: HopStatus | None, *, yours: str = "") -> None:
        """``yours``: this hop is the user's entry guard, and what that means (the card says so)."""
        self.role_label.setText(f"YOUR {self.role.upper()}" if yours else self.role.upper())
        if hop is None:
            self.nickname.setText("—")
            self.short_id.setText("not chosen")
            self.address.setText(" ")
            self.latency.setText(" ")
            self.setToolTip("")
            return
        self.nickname.setText(hop.nickname or "(no name)")
        self.short_id.setText(hop.short_id)
        self.address.setText(hop.address)
        self.latency.setText(f"rtt {format_ms(hop.rtt_ms)}")
        self.setToolTip(f"{hop.role}: {hop.nickname}\nid {hop.id}\n{hop.address}" + (f"\n\n{yours}" if yours else ""))


class CircuitView(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(4)
        self.cards = {role: HopCard(role) for role in ROLES}
        self.arrows = [Arrow() for _ in range(4)]
        items: list[QWidget] = [Endpoint("you", "YOU"), self.arrows[0], self.cards["guard"], self.arrows[1],
                                self.cards["middle"], self.arrows[2], self.cards["exit"], self.arrows[3],
                                Endpoint("internet", "INTERNET")]
        for w in items:
            lay.addWidget(w, 3 if isinstance(w, HopCard) else 1 if isinstance(w, Arrow) else 0)
        self.hops: tuple[HopStatus, ...] = ()

    def show_circuit(self, hops: tuple[HopStatus, ...], phase: EngineState, *, guard_tip: str = "") -> None:
        """``guard_tip``: the guard is the user's entry guard (presenter.guard_tip), shown as "YOUR GUARD"."""
        self.hops = hops
        by_role = {h.role: h for h in hops}
        for role, card in self.cards.items():
            card.show_hop(by_role.get(role), yours=guard_tip if role == "guard" else "")
        live = phase is EngineState.CONNECTED and bool(hops)
        for arrow in self.arrows:
            arrow.set_state(state_colour(phase), dashed=not live)

    def shown(self) -> list[tuple[str, str, str]]:
        """(nickname, short id, address) as the cards display them (for tests and accessibility)."""
        return [(c.nickname.text(), c.short_id.text(), c.address.text()) for c in self.cards.values()]
