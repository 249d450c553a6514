"""The model registry against what the code really does: the fits' minimum pairs and degrees of freedom (measured
from the fits themselves and compared with SimpleITK's transform classes), the CLI's choices, the session's and
the widget's model lists."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import SimpleITK as sitk

from napari_regtool import registry
from napari_regtool.errors import FitError, InputError
from napari_regtool.transforms import LANDMARK_MODELS, MODELS, fit_landmarks, min_pairs

from .helpers import rotation

LANDMARK = [s.name for s in registry.MODELS.values() if s.kind == "landmark"]
LINEAR = [n for n in LANDMARK if registry.get(n).params_2d is not None]


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _model_consistent_moving(model, fixed, rng):
    """Moving points that ``model`` maps exactly (a transform of the model's own family)."""
    d = fixed.shape[1]
    r = rotation(d, rng.uniform(-0.8, 0.8, 3))
    a = {"rigid": r, "similarity": 1.3 * r, "affine": r @ np.diag(rng.uniform(0.6, 1.5, d)) @ rotation(d, [0.3, -0.4, 0.2]),
         "tps": r}[model]
    moving = fixed @ a.T + rng.uniform(-10, 10, d)
    if model == "tps":  # a non-linear bend on top
        moving = moving + 3.0 * np.sin(fixed[:, ::-1] / 17.0)
    return moving


# ------------------------------------------------------------------------------------------------ the table
def test_every_entry_is_complete_and_consistent():
    assert list(registry.MODELS) == list(registry.names()) and len(set(registry.names())) == len(registry.MODELS)
    for name, s in registry.MODELS.items():
        assert s.name == name and s.label and s.kind in registry.KINDS
        if s.kind == "landmark":
            assert 0 < s.min_pairs_2d <= s.min_pairs_3d and not s.on_demand
        else:
            assert s.min_pairs_2d == s.min_pairs_3d == 0 and s.on_demand and s.action
        assert callable(s.resolve()), name
        if s.params_2d is not None:
            assert 0 < s.params_2d < s.params_3d
    # the deep model, the optimiser and the intensity-based linear models run on demand; landmark models live
    assert set(registry.on_demand_names()) == {"deep", "deformable", "auto-rigid", "auto-affine"}
    assert registry.get("deformable").label == "Deformable (optimised)"
    with pytest.raises(KeyError, match="choose one of rigid"):
        registry.get("bspline")


def test_old_names_are_read_from_the_registry():
    from napari_regtool.model import MODEL_LABELS, ON_DEMAND_MODELS

    assert MODELS == registry.names() and LANDMARK_MODELS == tuple(LANDMARK)
    assert MODEL_LABELS == {n: s.label for n, s in registry.MODELS.items() if s.in_gui}
    assert ON_DEMAND_MODELS == registry.on_demand_names()
    for n in LANDMARK:
        assert min_pairs(n, 2) == registry.min_pairs(n, 2) and min_pairs(n, 3) == registry.min_pairs(n, 3)
    with pytest.raises(ValueError, match="not a landmark model"):
        min_pairs("deep", 2)
    with pytest.raises(FitError, match="not a landmark model"):
        fit_landmarks("auto-affine", np.zeros((5, 2)), np.zeros((5, 2)))


# ---------------------------------------------------------------------------------------- minimum pairs
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("model", LANDMARK)
def test_min_pairs_is_the_fewest_pairs_the_fit_accepts(model, d):
    """With non-degenerate random points, ``min_pairs`` pairs fit (and reproduce a model-consistent map) and one
    pair fewer is refused with the plain message — for several layouts."""
    n = registry.min_pairs(model, d)
    for trial in range(5):
        rng = _rng(model, d, trial)
        fixed = rng.uniform(-50, 50, (n, d))
        moving = _model_consistent_moving(model, fixed, rng)
        t = fit_landmarks(model, fixed, moving)
        np.testing.assert_allclose(t.map_points(fixed), moving, atol=1e-6)
        with pytest.raises(FitError, match=f"at least {n}"):
            fit_landmarks(model, fixed[:-1], moving[:-1])


# ------------------------------------------------------------------------------------ degrees of freedom
def _fitted_points_jacobian(model, fixed, moving, eps=1e-5):
    """``(N·D, N·D)`` Jacobian of ``moving ↦ T_fit(moving)(fixed)``: the fitted points as a function of the targets.

    At targets the model maps exactly, a least-squares fit is the projection onto the set of point clouds the model
    can produce, so this Jacobian's rank is the dimension of that set — the model's degrees of freedom, whatever
    its parameterisation."""
    y0 = moving.ravel()
    cols = []
    for k in range(len(y0)):
        e = np.zeros_like(y0)
        e[k] = eps
        plus = fit_landmarks(model, fixed, (y0 + e).reshape(moving.shape)).map_points(fixed).ravel()
        minus = fit_landmarks(model, fixed, (y0 - e).reshape(moving.shape)).map_points(fixed).ravel()
        cols.append((plus - minus) / (2 * eps))
    return np.stack(cols, 1)


def _rank(j):
    s = np.linalg.svd(j, compute_uv=False)
    return int(np.sum(s > 1e-6 * s[0]))


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("model", LANDMARK)
def test_parameter_count_is_the_fits_degrees_of_freedom(model, d):
    rng = _rng("dof", model, d)
    n_params = registry.n_parameters(model, d)
    ranks = []
    for n in (8, 11):
        fixed = rng.uniform(-50, 50, (n, d))
        ranks.append(_rank(_fitted_points_jacobian(model, fixed, _model_consistent_moving(model, fixed, rng))))
    if n_params is None:  # TPS interpolates: as many degrees of freedom as coordinates, no fixed number
        assert ranks == [8 * d, 11 * d]
    else:
        assert ranks == [n_params, n_params]


@pytest.mark.parametrize("d", [2, 3])
def test_parameter_counts_match_simpleitk_transform_classes(d):
    from napari_regtool.autoreg import _sitk_transform  # the ITK transform each auto-* model optimises

    itk = {"rigid": sitk.Euler2DTransform() if d == 2 else sitk.Euler3DTransform(),
           "similarity": sitk.Similarity2DTransform() if d == 2 else sitk.Similarity3DTransform(),
           "affine": sitk.AffineTransform(d)}
    for model, tx in itk.items():
        assert registry.n_parameters(model, d) == tx.GetNumberOfParameters(), model
    for name, spec in registry.MODELS.items():
        if name.startswith("auto-"):
            kind = name.split("-", 1)[1]
            assert spec.n_parameters(d) == _sitk_transform(kind, d).GetNumberOfParameters() \
                == itk[kind].GetNumberOfParameters()
    for dense in ("tps", "deep", "deformable"):
        assert registry.n_parameters(dense, d) is None


# ------------------------------------------------------------------------------------------------ readers
def test_cli_model_choices_are_the_registry(capsys):
    import argparse

    from napari_regtool.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["register"]
    model = next(a for a in sub._actions if "--model" in a.option_strings)
    assert tuple(model.choices) == registry.names()
    base = ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out", "out"]
    assert "{" + ",".join(registry.names()) + "}" in sub.format_help()
    for name in registry.names():
        assert parser.parse_args(base + ["--model", name]).model == name
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--model", "bspline"])
    assert "invalid choice" in capsys.readouterr().err


def test_session_offers_the_gui_models_and_names_the_action_of_on_demand_ones():
    from napari_regtool.io import read_image
    from napari_regtool.model import RegistrationModel as Session

    from .helpers import SAMPLES

    s = Session(autosave=False)
    s.set_images(read_image(SAMPLES / "brain2d_fixed.nii.gz"), read_image(SAMPLES / "brain2d_moving.nii.gz"))
    s.load_csv(SAMPLES / "brain2d_landmarks.csv")
    for name in registry.gui_names():
        spec = registry.get(name)
        s.set_model(name)
        assert s.model == name
        if spec.on_demand:  # nothing computed yet: the message says which command computes it
            assert s.transform is None and s.fit_message.startswith(f"Press {spec.action} ")
            assert spec.label.lower() in s.fit_message
        else:
            assert s.transform is not None and not s.fit_message
    for name, spec in registry.MODELS.items():
        if not spec.in_gui:
            with pytest.raises(InputError, match=f"regtool register --model {name}"):
                s.set_model(name)
    with pytest.raises(InputError, match="Unknown model"):
        s.set_model("bspline")


@pytest.mark.gui
def test_the_widget_lists_the_registry_gui_models(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-regtool", "Registration")
    qtbot.waitUntil(lambda: not w.busy, timeout=60000)
    combo = w.model_combo
    listed = [(combo.itemData(i), combo.itemText(i)) for i in range(combo.count())]
    assert listed == [(n, s.label) for n, s in registry.MODELS.items() if s.in_gui]
