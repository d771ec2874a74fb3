"""The log: the app's own records and the engine's, newest at the bottom, with a level filter.  Bounded:
the oldest records go first."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

KEEP = 2000
LEVELS = (("Debug", logging.DEBUG), ("Info", logging.INFO), ("Warning", logging.WARNING),
          ("Error", logging.ERROR))


@dataclass(frozen=True)
class Record:
    at: float
    level: int
    source: str
    message: str

    def line(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.at))
        who = "engine" if self.source.startswith(("shallot.engine", "shallot.core")) else "app"
        return f"{stamp}  {logging.getLevelName(self.level):<7}  {who:<6}  {self.message}"


class LogView(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.records: deque[Record] = deque(maxlen=KEEP)
        self.level = logging.INFO
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        bar = QHBoxLayout()
        title = QLabel("Log")
        title.setObjectName("cardTitle")
        bar.addWidget(title)
        bar.addStretch(1)
        bar.addWidget(QLabel("Show"))
        self.filter = QComboBox()
        self.filter.setAccessibleName("Log level")
        for name, level in LEVELS:
            self.filter.addItem(f"{name} and above" if level < logging.ERROR else name, level)
        self.filter.setCurrentIndex(1)
        self.filter.currentIndexChanged.connect(self._filter_changed)
        bar.addWidget(self.filter)
        clear = QPushButton("Clear")
        clear.clicked.connect(self.clear)
        bar.addWidget(clear)
        lay.addLayout(bar)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setMaximumBlockCount(KEEP)
        self.text.setMinimumHeight(120)
        lay.addWidget(self.text)

    def add(self, level: int, source: str, message: str) -> None:
        rec = Record(time.time(), level, source, message)
        self.records.append(rec)
        if level >= self.level:
            self.text.appendPlainText(rec.line())
            self.text.moveCursor(QTextCursor.MoveOperation.End)

    def set_level(self, level: int) -> None:
        index = next(i for i, (_n, lv) in enumerate(LEVELS) if lv == level)
        self.filter.setCurrentIndex(index)

    def visible_lines(self) -> list[str]:
        return [line for line in self.text.toPlainText().splitlines() if line]

    def clear(self) -> None:
        self.records.clear()
        self.text.clear()

    def _filter_changed(self, index: int) -> None:
        self.level = self.filter.itemData(index)
        self.text.setPlainText("\n".join(r.line() for r in self.records if r.level >= self.level))
        self.text.moveCursor(QTextCursor.MoveOperation.End)
