"""The live view: the warped image, QC maps, suggested landmark and readouts, refreshed on worker threads
whenever the model's transform changes (:func:`napari_regtool.preview.preview_job` does the work)."""
from __future__ import annotations

import time

import numpy as np

from ..model import LOADED, MODEL_LABELS
from ..image import file_image
from ..preview import Previewer, preview_job
from ..space import to_array_order
from ..transforms import LANDMARK_MODELS
from ..transforms.base import IdentityTransform
from ._layers import META_KEY, image_layer_kwargs, jacobian_colormap, world_matrix
from ._runner import LatestRunner
from ._table import _fmt
from .panels import QC_LAYERS
from .panels._shortcuts import SHORTCUTS

__all__ = ["LiveView"]

#: display of each QC map's layer
_MAP_STYLE = {
    "jacobian": dict(contrast_limits=(-1.0, 3.0), opacity=0.6),
    "grid": dict(colormap="yellow", blending="additive", contrast_limits=(0.0, 1.0)),
    "magnitude": dict(colormap="viridis", opacity=0.7),
    "difference": dict(colormap="PiYG", contrast_limits=(-1.0, 1.0)),
    "checkerboard": dict(colormap="gray", contrast_limits=(0.0, 1.0)),
    "uncertainty": dict(colormap="inferno", opacity=0.6),
}


#: the control that makes each model's transform smoother, as the folding warning names it
_FOLDING_REMEDY = {
    "tps": "increase the thin-plate spline's Smoothing (under the model list)",
    "deep": "move the λ slider (Deep / auto tab) to the right: a larger regularisation weight λ gives a smoother "
            "deformation",
}
_FOLDING_OTHER = "choose a smoother model"


class LiveView:
    """Runs the preview for the model's transform and shows what it returns in the layers the attachment owns.

    ``host`` gives ``notify``, ``set_status``, ``muted()``, ``closing``, ``arrange()``, ``points_size()``,
    ``hooks``, ``shown(gen)`` (a new image is on screen), ``predict()`` and the panels ``qc``, ``landmarks`` and
    ``readout_label``.
    """

    def __init__(self, viewer, attachment, host):
        self.viewer = viewer
        self.att = attachment
        self.model = attachment.model
        self.host = host
        self.previewer: Previewer | None = None
        self.runner = LatestRunner(self.show, host.job_error, "preview")
        self.gen_t0: dict = {}
        self.pending_transforms: dict = {}  # generation → transform of the live updates not shown yet
        self.shown_transform = None  # the transform the warped layer on screen was made with
        self.last_latency_s: float | None = None
        self.last_shown = ""
        self.errors = None  # (residual, loo) per pair of the newest update
        self.stats = None  # Jacobian statistics of the newest update
        self.suggestion = None
        self._was_folding = False

    def reset(self):
        """New images (or none): drop what belongs to the previous pair."""
        self.runner.cancel()
        m = self.model
        # the moving image warped from its file's own grid (not from a copy straightened for the viewer): one
        # interpolation, the image Export writes
        self.previewer = Previewer(m.fixed, file_image(m.moving), device="cpu") if m.ready else None
        self.suggestion = None
        self.shown_transform = None
        self.pending_transforms.clear()
        self._was_folding = False
        self.errors = self.stats = None
        self.update_readouts()

    # ------------------------------------------------------------------ requests
    def schedule(self, *_):
        """Queue a live update for the current transform (coalesced with any update still running)."""
        s = self.model
        if not s.ready or self.previewer is None or self.host.closing:
            return
        t = s.transform or IdentityTransform(s.ndim)
        dragging = s.dragging
        plane = self.plane_on_screen()
        gen = self.runner.request(preview_job, self.previewer, self.runner.generation + 1, t, self.host.qc.wanted(),
                                  s.landmark_fit_points(), s.model, s.smoothing, s.pairs.copy(), not dragging,
                                  s.transform is not None, plane, dragging and plane is not None)
        self.gen_t0[gen] = time.perf_counter()
        self.pending_transforms[gen] = t

    def plane_on_screen(self):
        """Index of the warped layer's plane shown in a 2D view of a 3D registration, when the first array axis
        is the sliced one and maps to world axis 0 alone (else None: the whole volume is computed at once)."""
        layer = self.att.layer("warped")
        if layer is None or self.model.ndim != 3 or self.viewer.dims.ndisplay != 2:
            return None
        nd = self.viewer.dims.ndim
        if list(self.viewer.dims.displayed) != [nd - 2, nd - 1]:
            return None
        m = world_matrix(layer)
        if np.abs(m[0, 1:3]).max() > 1e-9 or np.abs(m[1:3, 0]).max() > 1e-9:
            return None
        k = float(layer.world_to_data(self.viewer.dims.point)[0])
        if not -0.5 <= k <= layer.data.shape[0] - 0.5:
            return None
        return int(round(k))

    # ------------------------------------------------------------------ results
    def _latency(self, gen, keep=False):
        t0 = self.gen_t0.get(gen) if keep else self.gen_t0.pop(gen, None)
        if t0 is not None:
            self.last_latency_s = time.perf_counter() - t0

    def show(self, gen, res):
        m = self.model
        if self.host.closing or not m.ready:
            return
        if res.warped is not None and tuple(res.warped.shape[:m.ndim]) != tuple(m.fixed.space.shape):
            return
        layer = self.att.layer("warped")
        if res.warped_plane is not None:
            k, img = res.warped_plane
            if layer is not None and tuple(layer.data.shape[1:]) == tuple(img.shape) and \
                    isinstance(layer.data, np.ndarray) and layer.data.flags.writeable:
                layer.data[k] = img
                layer.refresh()
                # (strictly only this plane shows it until the volume arrives, tens to hundreds of ms later)
                self.shown_transform = self.pending_transforms.get(gen, self.shown_transform)
                self._latency(gen, keep=True)
                self.last_shown = "plane"
                self.host.shown(gen)
            return
        if res.warped is not None:
            if layer is not None and layer.data.shape == res.warped.shape:
                data = layer.data
                if isinstance(data, np.ndarray) and data.dtype == res.warped.dtype and data.flags.writeable:
                    # same grid: copy into the layer's array and refresh, which skips napari's re-evaluation of
                    # the layer's dimensions and of the viewer's dims that assigning a new array triggers
                    np.copyto(data, res.warped)
                    layer.refresh()
                else:
                    layer.data = res.warped
                ml = self.att.moving_layer
                if ml is not None and not layer.rgb and not ml.rgb:
                    if tuple(layer.contrast_limits) != tuple(ml.contrast_limits):
                        layer.contrast_limits = tuple(ml.contrast_limits)
            self._latency(gen)
            for g in [g for g in self.gen_t0 if g < gen]:
                self.gen_t0.pop(g, None)
            self.shown_transform = self.pending_transforms.pop(gen, self.shown_transform)
            for g in [g for g in self.pending_transforms if g < gen]:
                self.pending_transforms.pop(g, None)
            self.last_shown = "image"
            self.host.shown(gen)
        for key, arr in res.maps.items():
            self.show_map(key, arr)
        if res.suggestion is not None:
            self.show_suggestion(res.suggestion, res.uncertainty_info)
        if res.jacobian_stats is not None:
            self.stats = res.jacobian_stats
            self.check_folding(res.jacobian_stats)
        if res.errors is not None:
            self.errors = res.errors
            self.host.landmarks.show_errors(*res.errors)
            self.update_readouts()

    def check_folding(self, stats):
        fold = float(stats.get("folding_percent") or 0.0)
        t = self.model.transform
        nonlinear = t is not None and not t.is_linear
        if fold > 0 and nonlinear and not self._was_folding:
            if self.model.model == LOADED:  # a file's transform: nothing here changes it
                how = ("It was computed by another tool: rerun it with more regularisation, or compare it with "
                       "another result (transform B).")
            else:
                how = (f"Move or deactivate the pairs near there, or "
                       f"{_FOLDING_REMEDY.get(self.model.model, _FOLDING_OTHER)}.")
            cover = stats.get("coverage_percent")
            where = ("the fixed image" if cover is None else
                     f"the part of the fixed image its field covers ({cover:.3g}%)")
            self.host.notify("warning", f"The transform folds: {fold:.3g}% of {where} has a Jacobian "
                                        f"determinant ≤ 0 (red in the Jacobian layer). {how}")
            if not self.host.qc.is_on("jacobian"):
                self.host.qc.set_overlay("jacobian", True)
        self._was_folding = fold > 0 and nonlinear
        self.update_readouts()

    @property
    def readouts(self) -> dict:
        """The numbers shown under the table: landmark errors and folding percentage."""
        out = {}
        errs = self.errors
        if errs is not None and np.isfinite(errs[0]).any():
            r = errs[0][np.isfinite(errs[0])]
            out["error_mean"], out["error_max"] = float(r.mean()), float(r.max())
            loo = errs[1][np.isfinite(errs[1])]
            if len(loo):
                out["loo_mean"] = float(loo.mean())
        if self.stats is not None:
            out["folding_percent"] = float(self.stats.get("folding_percent") or 0.0)
        return out

    def update_readouts(self):
        r = self.readouts
        parts = []
        if "error_mean" in r:
            parts.append(f"Landmark error: mean {_fmt(r['error_mean'])}, max {_fmt(r['error_max'])}")
            if "loo_mean" in r:
                parts.append(f"leave-one-out mean {_fmt(r['loo_mean'])}")
        if "folding_percent" in r and self.model.transform is not None:
            parts.append(f"folding {r['folding_percent']:.3g}%")
        self.host.readout_label.setText(" · ".join(parts))

    def fit_status(self) -> str:
        """The status line for a successful fit."""
        s = self.model
        if s.model in LANDMARK_MODELS:
            n = int(s.pairs.usable.sum()) if s.pairs is not None else 0
            return f"{MODEL_LABELS[s.model]} from {n} pair(s)."
        return f"{s.model_label} transform."

    # ------------------------------------------------------------------ QC layers
    def show_map(self, key, arr):
        layer = self.att.layer(f"qc-{key}")
        fs = self.model.fixed.space
        if tuple(arr.shape) != tuple(fs.shape):
            return  # a map of images that are no longer registered
        if layer is not None and layer.data.shape != arr.shape:
            with self.host.muted():
                self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            kw = dict(name=QC_LAYERS[key][0], metadata={META_KEY: {"role": "qc", "map": key}},
                      **image_layer_kwargs(fs), **_MAP_STYLE.get(key, {}))
            if key == "jacobian":
                kw["colormap"] = jacobian_colormap()
            elif key == "difference":
                # symmetric limits from the first map shown (99.5th percentile of |difference|), then kept, so a
                # better alignment shows as a paler map; the layer controls change them
                hi = float(np.nanpercentile(np.abs(arr), 99.5)) if arr.size else 0.0
                kw["contrast_limits"] = (-hi, hi) if np.isfinite(hi) and hi > 1e-3 else (-1.0, 1.0)
            with self.host.muted():
                layer = self.viewer.add_image(arr, **kw)
            self.att.own(f"qc-{key}", layer)
            self.hook_qc_layer(key, layer)
            self.host.arrange()
        else:
            layer.data = arr
            if key in ("magnitude", "uncertainty"):
                hi = float(np.nanmax(arr)) if arr.size else 1.0
                layer.contrast_limits = (0.0, hi if hi > 0 else 1.0)
        if not layer.visible and self.host.qc.is_on(key):
            layer.visible = True

    def hook_qc_layer(self, key, layer):
        """The QC box follows its layer's visibility (the layer list's eye)."""
        def on_visible(ev, k=key):
            self.on_qc_layer_visible(k)

        layer.events.visible.connect(on_visible)
        self.host.hooks.append(lambda: layer.events.visible.disconnect(on_visible))

    def on_qc_layer_visible(self, key):
        layer = self.att.layer(f"qc-{key}")
        qc = self.host.qc
        if layer is not None and qc.is_on(key) != layer.visible:
            qc.show_state(key, layer.visible)
            if layer.visible:
                self.schedule()
        if key == "uncertainty":
            sl = self.att.layer("suggestion")
            if sl is not None and layer is not None:
                sl.visible = layer.visible

    def on_qc_toggled(self, key, on):
        t = self.model.transform
        if key == "uncertainty" and on and self.model.model == "deep" and t is not None \
                and getattr(t, "uncertainty", None) is None:
            if "refined" not in t.kind:
                self.host.predict()  # the deep model's map comes with a prediction
            else:
                # a new prediction would replace the refinement on screen: say how to get the map instead
                self.host.notify("info", "The uncertainty map comes with the network's prediction, and this refined "
                                         "deformation was refined from a prediction made without it. Move λ to "
                                         "predict again with the map; a refinement started from that prediction "
                                         "keeps it.")
        layer = self.att.layer(f"qc-{key}")
        if layer is not None:
            layer.visible = on
        if key == "uncertainty":
            sl = self.att.layer("suggestion")
            if sl is not None:
                sl.visible = on
        if on:
            self.schedule()

    def show_suggestion(self, point, info):
        world = to_array_order(np.asarray(point, float)[None])
        layer = self.att.layer("suggestion")
        self.suggestion = np.asarray(point, float)
        if layer is None:
            with self.host.muted():
                layer = self.viewer.add_points(world, name="suggested landmark", symbol="star", face_color="yellow",
                                               border_color="red", size=self.host.points_size() * 1.6,
                                               projection_mode="rescale_spherical",
                                               metadata={META_KEY: {"role": "suggestion"}})
            self.att.own("suggestion", layer)
            self.host.arrange()
        else:
            layer.data = world
        layer.visible = self.host.qc.is_on("uncertainty")
        if info:
            self.host.set_status(f"Largest expected error {info.get('max', float('nan')):.3g} at the star: add a "
                                 f"pair there ({SHORTCUTS['suggestion']} centres it).")
