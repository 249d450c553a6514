"""Keyboard shortcuts of the Registration widget (Qt key sequences and the napari keymap's spelling)."""

SHORTCUTS = {
    "undo": "Ctrl+Z",
    "redo": "Ctrl+Shift+Z",
    "add_mode": "Ctrl+Shift+A",
    "view": "Ctrl+Shift+G",
    "flicker": "Ctrl+Shift+F",
    "suggestion": "Ctrl+Shift+N",
}
NAPARI_KEYS = {"undo": "Control-Z", "redo": "Control-Shift-Z", "add_mode": "Control-Shift-A",
               "view": "Control-Shift-G", "flicker": "Control-Shift-F", "suggestion": "Control-Shift-N"}
