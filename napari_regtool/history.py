"""Undo/redo of landmark edits: each command keeps the pairs before and after it (pairs are small)."""
from __future__ import annotations

from dataclasses import dataclass

from .landmarks import LandmarkPairs

__all__ = ["Command", "History"]


@dataclass(frozen=True)
class Command:
    """One undoable edit: its label (``"add"``, ``"move"``, ``"delete"``, …) and the pairs before and after."""

    label: str
    before: LandmarkPairs
    after: LandmarkPairs


class History:
    """Two stacks of :class:`Command`. ``len(history)`` is the number of steps that can be undone."""

    def __init__(self):
        self._undo: list[Command] = []
        self._redo: list[Command] = []

    def __len__(self) -> int:
        return len(self._undo)

    def record(self, label: str, before: LandmarkPairs, after: LandmarkPairs):
        """A new edit: undoable, and nothing left to redo."""
        self._undo.append(Command(label, before.copy(), after.copy()))
        self._redo.clear()

    def clear(self):
        self._undo.clear()
        self._redo.clear()

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def undo_label(self) -> str:
        return self._undo[-1].label if self._undo else ""

    @property
    def redo_label(self) -> str:
        return self._redo[-1].label if self._redo else ""

    def undo(self) -> Command | None:
        """The command to undo (moved to the redo stack), or ``None``."""
        if not self._undo:
            return None
        cmd = self._undo.pop()
        self._redo.append(cmd)
        return cmd

    def redo(self) -> Command | None:
        """The command to redo (moved back to the undo stack), or ``None``."""
        if not self._redo:
            return None
        cmd = self._redo.pop()
        self._undo.append(cmd)
        return cmd
