"""The layers a registration made, found by the identity recorded when they were made (never by name).

One :class:`Attachment` per viewer holds the registration model, the fixed and moving image layers in use and
the layers the plugin made for them (warped image, landmark layers, QC maps, suggestion). It outlives the dock
widget: a widget closed and opened again attaches to the same model and adopts the same layers instead of making
copies.
"""
from __future__ import annotations

import weakref

__all__ = ["Attachment", "attachment_for"]


def _contains(layers, layer) -> bool:
    return any(l is layer for l in layers)


class Attachment:
    """The registration of one viewer: model, image layers in use and owned layers by role key.

    Keys: ``"warped"``, ``"landmarks-fixed"``, ``"landmarks-moving"``, ``"qc-<map>"``, ``"suggestion"``.
    """

    def __init__(self, viewer, model):
        self._viewer = weakref.ref(viewer)
        self.model = model
        self.fixed_layer = None
        self.moving_layer = None
        self._owned: dict = {}

    @property
    def viewer(self):
        return self._viewer()

    def layer(self, key):
        """The owned layer ``key`` if it is still in the viewer (else forgotten and ``None``)."""
        l = self._owned.get(key)
        viewer = self.viewer
        if l is not None and (viewer is None or not _contains(viewer.layers, l)):
            del self._owned[key]
            return None
        return l

    def own(self, key, layer):
        self._owned[key] = layer

    def forget(self, layer) -> str | None:
        """Stop owning ``layer`` (it was removed). Returns its key, or ``None`` for a layer not owned."""
        for key, l in list(self._owned.items()):
            if l is layer:
                del self._owned[key]
                return key
        return None

    def key_of(self, layer) -> str | None:
        for key, l in self._owned.items():
            if l is layer:
                return key
        return None

    def keys(self):
        return list(self._owned)

    def pop(self, key):
        return self._owned.pop(key, None)

    def owns(self, layer) -> bool:
        return self.key_of(layer) is not None

    def role_of(self, layer) -> str | None:
        """``"fixed"``/``"moving"`` for the image layers in use, the owned key for owned layers, else None."""
        if layer is not None and layer is self.fixed_layer:
            return "fixed"
        if layer is not None and layer is self.moving_layer:
            return "moving"
        return self.key_of(layer)


_ATTACHMENTS: dict = {}


def attachment_for(viewer, model_factory, model=None) -> Attachment:
    """The viewer's attachment, made (with ``model_factory()``) the first time it is asked for. With ``model``
    (a model of the caller's), a new attachment of that model replaces the viewer's unless it holds it already."""
    key = id(viewer)
    att = _ATTACHMENTS.get(key)
    if att is not None and att.viewer is viewer and (model is None or att.model is model):
        return att
    if att is None or att.viewer is not viewer:
        weakref.finalize(viewer, _ATTACHMENTS.pop, key, None)
    att = Attachment(viewer, model if model is not None else model_factory())
    _ATTACHMENTS[key] = att
    return att
