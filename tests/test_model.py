"""The registration model without Qt: what each typed signal carries, images cleared and checked, parameters,
and the undo history on its own."""
from __future__ import annotations

import numpy as np
import pytest

from napari_regtool.errors import InputError
from napari_regtool.history import History
from napari_regtool.image import Image
from napari_regtool.io import read_image
from napari_regtool.landmarks import LandmarkPairs, read_bigwarp_csv
from napari_regtool.model import PairsChange, RegistrationModel
from napari_regtool.space import Space

from .helpers import SAMPLES

F2, M2, L2 = (SAMPLES / f"brain2d_{s}" for s in ("fixed.nii.gz", "moving.nii.gz", "landmarks.csv"))
M3 = SAMPLES / "brain3d_moving.nii.gz"


@pytest.fixture(scope="module")
def images2d():
    return read_image(F2), read_image(M2)


@pytest.fixture
def model(images2d):
    m = RegistrationModel(autosave=False)
    m.set_images(*images2d)
    return m


def record(model):
    """Every signal of the model, in the order emitted, with its arguments."""
    seen = []
    for name in ("images_changed", "pairs_changed", "model_changed", "params_changed", "transform_changed",
                 "fitted", "computed_changed", "history_changed", "autosave_changed"):
        getattr(model, name).connect(lambda *args, n=name: seen.append((n, *args)))
    return seen


def test_edits_say_which_pair_and_side(model):
    lm = read_bigwarp_csv(L2)
    seen = record(model)
    model.place("moving", lm.moving[0])
    model.place("fixed", lm.fixed[0])
    changes = [e[1] for e in seen if e[0] == "pairs_changed"]
    assert changes == [PairsChange("add", 0, "moving"), PairsChange("complete", 0, "fixed")]
    assert ("history_changed", True, False) in seen
    seen.clear()
    model.move(0, "fixed", lm.fixed[0] + 1.0, transient=True)  # a drag: announced, not recorded
    assert [e[1] for e in seen if e[0] == "pairs_changed"] == [PairsChange("drag", 0, "fixed")]
    assert not any(e[0] == "history_changed" for e in seen)
    model.end_drag()
    assert len(model.history) == 3 and model.undo_label == "move"
    seen.clear()
    model.delete([0])
    assert [e[1] for e in seen if e[0] == "pairs_changed"] == [PairsChange("delete", (0,))]
    model.undo()
    assert [e[1].reason for e in seen if e[0] == "pairs_changed"][-1] == "undo"
    assert seen[-1] == ("history_changed", True, True)


def test_a_new_transform_is_announced_before_the_pairs(model):
    lm = read_bigwarp_csv(L2)
    for k in range(2):
        model.add_pair(lm.fixed[k], lm.moving[k])
    seen = record(model)
    model.add_pair(lm.fixed[2], lm.moving[2])  # the third pair: the first TPS
    names = [e[0] for e in seen]
    assert names[:4] == ["transform_changed", "fitted", "pairs_changed", "history_changed"]
    assert seen[0][1] is model.transform and seen[1] == ("fitted", "")
    np.testing.assert_allclose(model.transform.map_points(lm.fixed[:3]), lm.moving[:3], atol=1e-6)
    seen.clear()
    model.rename(0, "anterior")  # same points: the cached fit, no new transform
    assert "transform_changed" not in [e[0] for e in seen]
    seen.clear()
    model.set_model("affine")
    assert seen[0] == ("model_changed", "affine", 0.0)
    assert seen[1][0] == "transform_changed" and seen[1][1].kind == "affine"


def test_clear_images_empties_everything(model):
    model.load_csv(L2)
    seen = record(model)
    model.clear_images()
    assert not model.ready and model.pairs is None and model.transform is None and not model.can_undo
    names = [e[0] for e in seen]
    assert names[:3] == ["images_changed", "pairs_changed", "history_changed"]
    assert ("transform_changed", None) in seen and model.autosave_path is None
    seen.clear()
    model.clear_images()  # nothing left to clear: silent
    assert seen == []


def test_check_image_refuses_what_cannot_be_registered(model, images2d):
    fixed, moving = images2d
    model.check_image("moving", moving)  # fine
    with pytest.raises(InputError, match="3D but the fixed image"):
        model.check_image("moving", read_image(M3))
    flat = Image(np.full((30, 40), 5.0, np.float32), Space((30, 40), (1.0, 1.0)), name="flat")
    with pytest.raises(InputError, match="constant"):
        model.check_image("moving", flat)
    # against another image than the one in use
    with pytest.raises(InputError, match="2D but the moving image"):
        RegistrationModel(autosave=False).check_image("fixed", fixed, other=read_image(M3))
    assert model.moving is moving  # nothing changed


def test_parameters_are_checked_and_announced(model):
    seen = record(model)
    model.set_reg_weight(0.25)
    model.set_reg_weight(0.25)  # unchanged: silent
    model.set_device("cpu")
    model.set_refine_steps(12)
    assert [e for e in seen if e[0] == "params_changed"] == [("params_changed", "reg_weight"),
                                                             ("params_changed", "device"),
                                                             ("params_changed", "refine_steps")]
    assert (model.reg_weight, model.device, model.refine_steps) == (0.25, "cpu", 12)
    model.set_reg_weight(0.0)  # the ends of the range --reg-weight takes
    model.set_reg_weight(1.0)
    assert model.reg_weight == 1.0
    for bad in (-1e-9, -1.0, 1.5, float("nan")):
        with pytest.raises(InputError):
            model.set_reg_weight(bad)
    with pytest.raises(InputError):
        model.set_refine_steps(0)


def test_history_on_its_own():
    h = History()
    a = LandmarkPairs.empty(2)
    b = a.copy()
    b.add(fixed=np.array([1.0, 2.0]), moving=np.array([3.0, 4.0]))
    assert not h.can_undo and h.undo() is None and h.redo() is None
    h.record("add", a, b)
    b.add(fixed=np.array([5.0, 6.0]), moving=np.array([7.0, 8.0]))  # the record keeps its own copies
    assert len(h) == 1 and h.undo_label == "add"
    cmd = h.undo()
    assert len(cmd.after) == 1 and len(cmd.before) == 0 and h.redo_label == "add" and not h.can_undo
    assert h.redo() is cmd and h.can_undo and not h.can_redo
    h.record("clear", cmd.after, a)
    h.undo()
    h.record("add", a, cmd.after)  # a new edit drops what could be redone
    assert not h.can_redo and len(h) == 2


def test_a_new_pair_of_another_dimension_is_announced_without_the_old_transform(model):
    """A 2D landmark fit, then a 3D pair with a held-out pair among its landmarks: listeners of ``images_changed``
    read held-out errors (the landmark table does), and must not get the 2D fit applied to 3D points; the new pair
    ends with its own 3D fit."""
    lm = read_bigwarp_csv(L2)
    for f, m in zip(lm.fixed[:4], lm.moving[:4]):
        model.place("fixed", f)
        model.place("moving", m)
    assert model.transform is not None and model.transform.ndim == 2
    m3 = read_image(M3)
    f3 = m3.with_array(m3.array, name="fixed3d")
    rng = np.random.default_rng(0)
    lo, hi = f3.space.physical_bounds()
    pts = lo + (hi - lo) * rng.uniform(0.2, 0.8, (6, 3))
    pairs3 = LandmarkPairs(pts, pts + [1.0, -2.0, 0.5], active=np.array([True] * 5 + [False]))
    seen = []
    model.images_changed.connect(lambda: seen.append((model.transform, model.held_out_errors().copy())))
    model.set_images(f3, m3, landmarks=pairs3)
    assert seen and seen[0][0] is None and np.isnan(seen[0][1]).all()
    assert model.transform is not None and model.transform.ndim == 3
    err = model.held_out_errors()
    assert np.isfinite(err[5]) and np.isnan(err[:5]).all()


def test_autosave_of_images_without_a_file_comes_back_only_for_those_images(tmp_path):
    """Layers without a file: the autosaved pairs come back when the same images are chosen again, also under new
    layer names, and not for other images that happen to have the same layer names."""
    rng = np.random.default_rng(3)
    sp = Space((50, 60), [1.0, 1.0])
    a, b = (Image(rng.random((50, 60)).astype(np.float32), sp, n) for n in ("fixed", "moving"))
    m = RegistrationModel(autosave=True, autosave_dir=tmp_path)
    m.set_images(a, b)
    for p in ([10.0, 10.0], [40.0, 12.0], [25.0, 35.0]):
        m.place("fixed", p)
        m.place("moving", [p[0] + 1.0, p[1]])
    assert m.autosave_path.exists() and len(read_bigwarp_csv(m.autosave_path)) == 3
    others = [Image(rng.random((50, 60)).astype(np.float32), sp, n) for n in ("fixed", "moving")]
    m2 = RegistrationModel(autosave=True, autosave_dir=tmp_path)
    msg = m2.set_images(*others)
    assert len(m2.pairs) == 0 and "Restored" not in msg
    renamed = [im.with_array(im.array, name=f"{im.name} (copy)") for im in (a, b)]
    m3 = RegistrationModel(autosave=True, autosave_dir=tmp_path)
    msg = m3.set_images(*renamed)
    assert len(m3.pairs) == 3 and "Restored 3" in msg
    np.testing.assert_allclose(m3.pairs.moving, m.pairs.moving)
    m4 = RegistrationModel(autosave=True, autosave_dir=tmp_path)
    assert "Restored 3" in m4.set_images(a, b) and len(m4.pairs) == 3


def test_an_autosave_written_before_images_were_fingerprinted_is_pointed_out_not_restored(tmp_path):
    """Layers without a file whose landmarks an earlier version autosaved under the layer names alone: the pairs
    are not restored into images that may be other ones, but the message names the file and says how to read it;
    once these images have an autosave of their own, the old file is not mentioned again."""
    from napari_regtool.autosave import _sidecar

    rng = np.random.default_rng(5)
    sp = Space((40, 50), [1.0, 1.0])
    a, b = (Image(rng.random((40, 50)).astype(np.float32), sp, n) for n in ("fixed", "moving"))
    m = RegistrationModel(autosave=True, autosave_dir=tmp_path)
    m.set_images(a, b)
    for p in ([10.0, 10.0], [30.0, 12.0]):
        m.place("fixed", p)
        m.place("moving", [p[0] + 1.0, p[1]])
    new = m.autosave_path
    fp = new.name.split(".")[-3]
    old = new.with_name(new.name.replace(f".{fp}.landmarks.csv", ".landmarks.csv"))
    new.rename(old)  # as an earlier version named it (with its record of what the autosave wrote)
    _sidecar(new).rename(_sidecar(old))
    m2 = RegistrationModel(autosave=True, autosave_dir=tmp_path)
    msg = m2.set_images(a, b)
    assert len(m2.pairs) == 0 and "Restored" not in msg
    assert str(old) in msg and "Load landmarks" in msg
    m2.place("fixed", [20.0, 20.0])
    m2.place("moving", [21.0, 20.0])
    m3 = RegistrationModel(autosave=True, autosave_dir=tmp_path)
    msg = m3.set_images(a, b)
    assert "Restored 1" in msg and str(old) not in msg
