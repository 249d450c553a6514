"""Background work of the Registration widget — the deep model, auto-align, file writes, layer warps — with the
progress bar and the Cancel button. The work itself is :mod:`napari_regtool.jobs` (no Qt); this runs it on
worker threads and hands the results to the model."""
from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QHBoxLayout, QProgressBar, QPushButton, QWidget

from ..errors import Cancelled, RegtoolError, user_message
from ..jobs import auto_job, deep_predict_job, deep_refine_job
from ..model import MODEL_LABELS, autoreg_available, deep_available
from ._runner import LatestRunner, ProgressBridge, QueueRunner

__all__ = ["Jobs"]


class Jobs(QWidget):
    """Runners for the on-demand models and files, and the progress row (bar and Cancel) shown while they run.

    ``host`` gives ``notify``, ``set_status``, ``add_applied`` and the panels ``deep`` (λ, device, status line)
    and ``qc`` (whether the uncertainty overlay is on).
    """

    def __init__(self, model, host, parent=None):
        super().__init__(parent)
        self.model = model
        self.host = host
        self._far_said = None  # the pair of images whose distance was said (deep model from the files' placement)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setVisible(False)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setVisible(False)
        row.addWidget(self.progress, 1)
        row.addWidget(self.cancel_btn)
        self.cancel_btn.clicked.connect(self.cancel)
        self._deep_cache: dict = {}
        self.deep_initial = None  # the auto-aligned start of the deep model, when there is one
        self._deep_initial_name = ""  # how it was found ("auto-affine" …), as `regtool register --global` says it
        self._auto_from_landmarks = False  # the running auto-align started from the landmark fit
        self._deep_start = "identity"  # the start of the deep run last requested, as report.json says it
        self._start_warning = None  # last message about landmark pairs unusable as a linear start
        self._deep_long = False
        self._auto_refining = False  # the running deep job is the automatic refinement after a prediction
        self._refining = False  # a refinement (automatic or asked for) is running
        self._auto_running = False  # auto-align is running (the deep tab says so)
        self._auto_chosen: dict = {}  # request (generation) → the model chosen when that auto-align was asked for
        # what waits for the refinement in flight (an export): called with "refined", "stopped" or None (new images)
        self._after_refinement: list = []
        # runners are not Qt children of the widget: a job finishing after the widget is gone must find them alive
        self.deep_runner = LatestRunner(self._deep_result, self._deep_error, "deep")
        self.jobs = LatestRunner(self._job_result, self._auto_error, "job")
        # file writes and layer warps: each request runs, none replaces another
        self.files = QueueRunner(self._job_result, self.job_error, "files")
        # layers resampled into fixed space: in order too, but Cancel drops them (nothing is half-written)
        self.resample = QueueRunner(self._job_result, self.job_error, "resample")
        self.runners = (self.deep_runner, self.jobs, self.files, self.resample)
        self._progress = ProgressBridge(self)
        self._progress.progressed.connect(self._on_progress)
        for r in self.runners:
            r.idle_changed.connect(self._update_busy)

    @property
    def busy(self) -> bool:
        return any(r.busy for r in self.runners)

    def close(self):
        for r in self.runners:
            r.close()
        return super().close()

    def after_refinement(self, callback) -> bool:
        """While a refinement runs, keep ``callback`` for when it ends (``callback("refined")`` after its result is
        the model's, ``callback("stopped")`` when it was cancelled, failed or another model was chosen,
        ``callback(None)`` when the images changed) and return True; else False (nothing to wait for)."""
        if not (self._refining and self.deep_runner.busy):
            return False
        self._after_refinement.append(callback)
        return True

    def _settle(self, outcome):
        waiting, self._after_refinement = self._after_refinement, []
        for callback in waiting:
            callback(outcome)

    def reset(self):
        """New images (or none): results in flight belong to the previous pair, and so does what the deep tab
        says."""
        self._settle(None)
        self.deep_runner.cancel()
        self._deep_cache.clear()
        self.deep_initial = None
        self._auto_refining = self._refining = self._deep_long = False
        self.host.deep.set_status("")
        self._update_busy()

    def model_changed(self, model: str, _smoothing=None):
        """Another model was chosen: a deep refinement in flight is no longer wanted; it is stopped at its next check
        and its result dropped (a prediction in flight finishes: it is the deep model's result for the current λ
        when the user comes back to it)."""
        if model == "deep" or not (self._refining and self.deep_runner.busy):
            return
        self.deep_runner.cancel()
        self._auto_refining = self._refining = False
        self.host.deep.set_status("Refinement stopped: another model was chosen.")
        self._deep_long = False
        self._update_busy()
        self._settle("stopped")

    def device_changed(self):
        self._deep_cache.clear()
        _, _, warns = self.host.deep.device()
        for w in warns:
            self.host.notify("warning", w)

    def _auto_error(self, exc):
        """Auto-align failed or was cancelled: the deep tab stops saying "Auto-align … running…"."""
        if self._auto_running:
            self._auto_running = False
            self.host.deep.set_status("Auto-align cancelled." if isinstance(exc, Cancelled) else
                                      f"Auto-align failed: {user_message(exc)}")
        self.job_error(exc)

    def job_error(self, exc):
        """A background job (file write, layer warp, preview, auto-align …) failed or was dropped by Cancel: said.
        A refinement running meanwhile goes on (only the deep model's own errors end it, see ``_deep_error``)."""
        if isinstance(exc, Cancelled):
            self.host.set_status("Cancelled.")
            return
        self.host.notify("error", user_message(exc))

    def _deep_error(self, exc):
        """The deep model's run failed or was cancelled: the deep tab stops saying "Predicting…"/"Refining…"."""
        if not self._refining:
            self.host.deep.set_status("Cancelled." if isinstance(exc, Cancelled) else
                                      f"No prediction: {user_message(exc)}")
        self._refinement_stopped(failed=not isinstance(exc, Cancelled))
        self._settle("stopped")  # a prediction that failed: writes still waiting write the result shown
        self.job_error(exc)

    def _refinement_stopped(self, failed: bool = False):
        """A refinement ended without a result (cancelled or failed): the deep tab stops saying "Refining…"."""
        if self._refining:
            self._refining = False
            self.host.deep.set_status(f"Refinement {'failed' if failed else 'cancelled'}; the network's prediction "
                                      "is shown.")
            self._settle("stopped")

    # ------------------------------------------------------------------ deep model and auto-align
    def _landmark_start(self, kind: str):
        """The linear start from the active pairs for the deep model or auto-align; degenerate pairs are
        said once (a notification, repeated only when the reason changes) and the run goes on without them."""
        from ..transforms import initial_from_landmarks

        f, m = self.model.landmark_fit_points()
        try:
            init = initial_from_landmarks(kind, f, m, self.model.ndim)
            self._start_warning = None
        except RegtoolError as exc:
            msg = f"The landmark pairs are not used as a starting {kind} alignment: {exc}"
            if msg != self._start_warning:
                self.host.notify("warning", msg)
            self._start_warning = msg
            init = None
        return init

    def _deep_setup(self):
        dev, desc, _ = self.host.deep.device()
        init = self.deep_initial if self.deep_initial is not None else self._landmark_start("affine")
        self._deep_start = (self._deep_initial_name if self.deep_initial is not None else
                            "identity" if init is None else "landmark affine")
        m = self.model
        key = (id(m.fixed), id(m.moving), str(dev), None if init is None else np.round(init.homogeneous, 9).tobytes())
        return dev, desc, init, key

    def predict(self):
        """Run the deep model for the current λ (network only, fast once the pair is prepared)."""
        ok, why = deep_available(self.model.ndim)
        if not ok:
            self.host.notify("error", why)
            return
        m = self.model
        if not m.ready:
            return
        if self._refining:  # a new λ, new pairs: the refinement of the old prediction is no longer wanted
            if not self._auto_refining and not self.model.auto_refine:
                self.host.notify("info", "The refinement was stopped for a new prediction (λ, the landmark pairs, the "
                                         "device or the uncertainty map asked for it). Press Refine to refine the new "
                                         "prediction.")
            self.deep_runner.cancel()
            self._auto_refining = False
            self._refining = False
            self._deep_long = False
            self._update_busy()
            # writes waiting for it go on waiting: for the new prediction's refinement (Refine automatically), else
            # for the new prediction itself (see _deep_result), never for the old prediction
        dev, desc, init, key = self._deep_setup()
        lam = self.host.deep.reg_weight
        self.host.deep.set_status(f"Predicting (λ = {lam:.3g}) on {desc}…")
        # the uncertainty map costs several extra network samples: computed while its overlay is shown
        self.deep_runner.request(deep_predict_job, self._deep_cache, key, m.fixed, m.moving, str(dev), init, lam,
                                 self.host.qc.is_on("uncertainty"))

    def _deep_result(self, gen, value):
        kind, t, info = value
        far = info.pop("far_apart", None)
        if far and self._far_said != (id(self.model.fixed), id(self.model.moving)):
            self._far_said = (id(self.model.fixed), id(self.model.moving))  # once per pair of images
            self.host.notify("warning", far)
        self.model.set_computed("deep", t, **dict(info, start=self._deep_start))
        inverted = (getattr(t, "refine_info", None) or {}).get("contrast") == "inverted"
        self.host.deep.set_status(f"{'Refined' if kind == 'refine' else 'Predicted'} with λ = "
                                  f"{info['reg_weight']:.3g} in {info.get('runtime_s', 0):.2f} s." + (
                                      " The moving image's contrast is the inverse of the fixed image's: its "
                                      "negative was registered." if inverted else ""))
        if kind == "refine":
            self._auto_refining = self._refining = False
            self._settle("refined")
        elif self.model.auto_refine and self.model.model == "deep" and gen == self.deep_runner.generation:
            self.refine(auto=True)  # the accurate result follows in the background (writes waiting wait for it)
        elif gen == self.deep_runner.generation:
            self._settle("stopped")  # writes that waited for a refinement stopped by this prediction write it

    def refine(self, auto: bool = False):
        """Optimise the deep deformation for this pair (cancellable, with progress); ``auto``: started by itself
        after a prediction (a new λ cancels it)."""
        ok, why = deep_available(self.model.ndim)
        if not ok:
            self.host.notify("error", why)
            return
        m = self.model
        if m.model != "deep" or not m.ready:
            self.host.notify("warning", "Choose the deep deformable model first.")
            return
        dev, desc, init, key = self._deep_setup()
        steps = m.refine_steps
        prev = m.computed.get("deep", {}).get("transform")
        self.host.deep.set_status(f"Refining ({steps} steps) on {desc}…" + (
            " The prediction is shown meanwhile; Cancel keeps it." if auto else ""))
        self._auto_refining = bool(auto)
        self._refining = True
        self._deep_long = True
        self.show_progress(True)
        # the active pairs are soft constraints, as in `regtool register --model deep --refine N --landmarks L`
        lms = m.pairs.fit_points() if m.pairs is not None and m.pairs.usable.any() else None
        self.deep_runner.request(deep_refine_job, self._deep_cache, key, m.fixed, m.moving, str(dev), init,
                                 self.host.deep.reg_weight, steps, lms, self._progress,
                                 getattr(prev, "uncertainty", None) is not None, cancellable=True)

    def auto_align(self, kind: str | None = None):
        """Intensity-based linear alignment (rigid for the rigid model, else affine), in the background."""
        ok, why = autoreg_available()
        if not ok:
            self.host.notify("error", why)
            return
        m = self.model
        if not m.ready:
            self.host.notify("warning", "Choose a fixed and a moving image first.")
            return
        kind = kind or ("rigid" if m.model in ("rigid", "auto-rigid") else "affine")
        init = self._landmark_start(kind)
        self._auto_from_landmarks = init is not None
        self.host.deep.set_status(f"Auto-align ({kind}) running…")
        self._auto_running = True
        self.show_progress(True)
        gen = self.jobs.request(auto_job, m.fixed, m.moving, kind, init, self._progress, cancellable=True)
        self._auto_chosen[gen] = m.model  # the model chosen when asked: another choice since wins over the result

    # ------------------------------------------------------------------ files and layers
    def start(self, status: str, func, *args, resample: bool = False):
        """Run a file write (or, with ``resample``, a layer warp) in the background, in order; the progress bar
        shows while it runs."""
        self.show_progress(True)
        self.host.set_status(status)
        (self.resample if resample else self.files).request(func, *args)

    def _job_result(self, gen, value):
        kind = value[0]
        if kind == "auto":
            chosen = self._auto_chosen.pop(gen, None)
            if gen >= self.jobs.generation:  # the last one asked for
                self._auto_running = False
            _, model, t, runtime = value
            self.model.set_computed(model, t, runtime_s=runtime)  # shown at once when its model is the current one
            done = f"Auto-align ({model.split('-')[1]}) done in {runtime:.1f} s"
            current = self.model.model
            if current == model:
                self.host.deep.set_status(done + ".")
            elif current != chosen:  # the user chose another model meanwhile: that choice stays
                self.host.deep.set_status(f"{done}; not shown, another model was chosen since (choose "
                                          f"{MODEL_LABELS.get(model, model)} to see it).")
            elif current == "deep":
                self.host.deep.set_status(done + ".")
                self.deep_initial = t
                self._deep_initial_name = model + (" from the landmark affine" if self._auto_from_landmarks else "")
                self.predict()
            else:
                self.host.deep.set_status(done + ".")
                self.model.set_model(model)
        elif kind == "export":
            _, paths, out = value
            self.host.notify("info", f"Wrote {len(paths)} files to {out}: {', '.join(p.name for p in paths)}.")
            self.host.set_status(f"Exported to {out}.")
        elif kind == "saved":
            self.host.set_status(f"Saved {value[1]}.")
            for note in (value[2] if len(value) > 2 else []):
                self.host.notify("warning", note)  # what the file could not keep
        elif kind == "applied":
            self.host.add_applied(*value[1])

    # ------------------------------------------------------------------ progress and cancel
    def cancel(self):
        """Stop the running computation (refinement, auto-align, …) and drop the layers being resampled (no layer
        is added). File writes are not stopped half-way: they finish and report, so a saved file is never left
        half-written or unreported."""
        self.jobs.cancel()
        if self._auto_running:
            self._auto_running = False
            self.host.deep.set_status("Auto-align cancelled.")
        self.deep_runner.cancel()
        self._auto_refining = False
        self.resample.cancel()  # first: an Apply waiting for the refinement starts when it stops, and is kept
        self._refinement_stopped()
        if self.files.busy:
            self.host.set_status("Cancelled. Files already being saved are finished first.")
        else:
            self.show_progress(False)
            self.host.set_status("Cancelled.")

    def show_progress(self, on: bool):
        self.progress.setVisible(on)
        self.cancel_btn.setVisible(on)
        if on:
            self.progress.setRange(0, 0)

    def _on_progress(self, frac, message):
        self.progress.setRange(0, 100)
        self.progress.setValue(int(round(100 * frac)))
        if message:
            self.progress.setFormat(f"{message} %p%")

    def _update_busy(self, _=None):
        if not self.deep_runner.busy:
            self._deep_long = False
        if not (self.jobs.busy or self.files.busy or self.resample.busy or self._deep_long):
            self.show_progress(False)
