"""A small widget that applies a saved transform file to a layer — ``regtool apply`` inside napari."""

from pathlib import Path
from typing import Sequence

from magicgui import magic_factory

__all__ = ["apply_transform_file"]

#: layer names of results being computed (two quick clicks must not pick the same free name)
_IN_FLIGHT: set = set()


@magic_factory(
    call_button="Apply",
    transform_file={"label": "Transform(s)", "mode": "rm",
                    "filter": "Transforms (*.tfm *.h5 *.hdf5 *.txt *.mat *.nii *.nii.gz *.mha *.nrrd)"},
    invert={"label": "Invert (moving ← fixed)"},
)
def apply_transform_file(layer: "napari.layers.Layer", reference: "napari.layers.Image",
                         transform_file: Sequence[Path] = (), invert: bool = False, viewer: "napari.Viewer" = None
                         ) -> "napari.qt.threading.FunctionWorker[napari.types.LayerDataTuple]":
    """Warp ``layer`` (image, labels, points, shapes in moving space) into ``reference``'s grid through an ITK
    transform or displacement-field file (or elastix's and Greedy's files), the same as ``regtool apply``. Several
    files are one chain, displacement fields first (Greedy's ``warp.nii.gz`` then ``affine.mat``; see
    :func:`~napari_regtool.widgets.panels.loaded.chain_order`), as ``regtool apply`` chains repeated ``--transform``.

    The file is read and checked here; inverting a field and resampling run on a worker thread (napari's
    activity indicator shows it), and the new layer is added when done — under a name no layer has yet, so that
    applying another file adds a layer instead of replacing the last result. Problems are notifications, not
    tracebacks."""
    from napari.qt.threading import thread_worker
    from napari.utils.notifications import show_error, show_info, show_warning
    from qtpy.QtCore import QTimer

    from ..errors import RegtoolError, user_message
    from ..io import read_transform_any
    from ..qc import field_reach
    from ..transforms.base import chain_label, chain_of
    from .panels.loaded import chain_order
    from .panels.fullres import layer_unit
    from ._layers import layer_space, prepare_layer, warp_prepared

    failure = []

    def work(t, space, prepared, name):
        try:
            if invert:
                t = t.inverse()
            data, kw, kind = warp_prepared(prepared, t, space)
            return data, dict(kw, name=name), kind
        except Exception as exc:  # noqa: BLE001 — a message in the notification area, never a traceback
            failure.append(user_message(exc))
            return None

    files = [transform_file] if isinstance(transform_file, (str, Path)) else list(transform_file or ())
    files = chain_order([Path(f) for f in files if str(f) not in ("", ".")])
    try:
        if not files or not all(f.is_file() for f in files):
            missing = [f.name for f in files if not f.is_file()]
            raise RegtoolError((f"{', '.join(missing)}: no such file. " if missing else "") + "Choose a transform "
                               "file (.tfm, .h5, a displacement field image, an elastix TransformParameters file or a "
                               "Greedy matrix), or several that chain.")
        space = layer_space(reference)
        # ITK's files (in millimetres, converted to the unit of an OME-Zarr image's layers), else elastix's
        # TransformParameters and Greedy's/c3d's matrices, as regtool apply reads them
        parts = []
        for f in files:
            part, notes, warnings = read_transform_any(f, space, unit=layer_unit(reference))
            for m in notes:
                show_info(m)
            for m in warnings:
                show_warning(m)
            parts.append(part)
        names = [f.name for f in files]
        t = chain_of(parts, names, ndim=space.ndim, image=repr(reference.name))
        chain_name = chain_label(names)
        # a field elsewhere is refused (the inverse's reach is not known before it is computed, on the worker)
        reach = None if invert else field_reach(t, space, chain_name)
        if reach is not None and reach < 99.5:
            show_warning(f"A displacement field in {chain_name} reaches about {reach:.0f}% of {reference.name!r}; "
                         "beyond its grid it moves nothing. Check that the field belongs to this image.")
        prepared = prepare_layer(layer, space)  # read from the layer here, on the GUI thread
        name = prepared[2].get("name", f"{layer.name} (registered)")
        # napari would update a layer of that name in place; names of results still being computed are taken too
        taken = _IN_FLIGHT | (set() if viewer is None else {lay.name for lay in viewer.layers})
        k = 0
        while (f"{name} [{k}]" if k else name) in taken:
            k += 1
        name = f"{name} [{k}]" if k else name
    except (RegtoolError, MemoryError, OSError, ValueError) as exc:
        show_error(user_message(exc))
        worker = thread_worker(lambda: None)()  # napari expects a worker; this one adds nothing
    else:
        worker = thread_worker(work, progress={"total": 0, "desc": f"Applying {' + '.join(f.name for f in files)}"})(
            t, space, prepared, name)
        _IN_FLIGHT.add(name)
        worker.finished.connect(lambda: _IN_FLIGHT.discard(name))
    worker.finished.connect(lambda: [show_error(m) for m in failure])
    # started from the event loop, after napari has connected the layer-adding slot to ``returned``
    QTimer.singleShot(0, worker.start)
    return worker
