"""OME-Zarr in the Registration widget (issue 8, items 1 and 5), driven as a user would: a 2-level pair written
with zarr directly, opened through Open… and through napari's reader, registered on the coarse level with pairs
clicked on the canvas, then "Apply at full resolution…" checked against SimpleITK's resampling of the finest level;
Cancel and bad stores."""
from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import SimpleITK as sitk
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog

from napari_regtool import ngff
from napari_regtool.widgets.panels.images import combo_index

from .helpers import smooth_test_image
from .test_gui import canvas_click, open_with_widget, wait_idle

pytestmark = pytest.mark.gui
zarr = pytest.importorskip("zarr")

# level 0 of both images, array order (y, x): the moving image is finer than the fixed one and placed elsewhere
SHAPE = (96, 80)
FIXED0 = {"scale": [0.6, 0.5], "translation": [2.0, -3.0]}
MOVING0 = {"scale": [0.55, 0.45], "translation": [1.0, -2.0]}
# a known fixed → moving map (physical x, y), to give the clicked pairs their partners
A = np.array([[0.97, 0.08], [-0.06, 1.02]])
B = np.array([1.2, -0.8])
#: fixed points (physical x, y) whose partners A·p + B lie in the moving image
TARGETS = np.array([[8.0, 14.0], [26.0, 15.0], [9.0, 42.0], [25.0, 40.0]])


def _level1(level0):
    """Level 1 as a 2×2 mean pyramid places it: twice the spacing, the first voxel half a fine voxel further."""
    s, t = np.asarray(level0["scale"]), np.asarray(level0["translation"])
    return {"scale": list(2 * s), "translation": list(t + s / 2)}


def write_zarr(path, arr, level0, levels=2, scales=None, multiscales=True):
    """An OME-NGFF 0.4 image written with zarr itself: level k is the 2ᵏ×2ᵏ block mean of level 0."""
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets, cur, lv = [], arr.astype(np.float32), dict(level0)
    for k in range(levels):
        if k:
            cur = cur.reshape(cur.shape[0] // 2, 2, cur.shape[1] // 2, 2).mean((1, 3)).astype(np.float32)
            lv = _level1(lv)
        a = g.create_array(str(k), shape=cur.shape, chunks=(32, 32), dtype=cur.dtype)
        a[...] = cur
        lvk = scales[k] if scales else lv
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [float(v) for v in lvk["scale"]]},
            {"type": "translation", "translation": [float(v) for v in lvk["translation"]]}]})
    if multiscales:
        g.attrs["multiscales"] = [{"version": "0.4", "name": path.stem, "datasets": datasets,
                                   "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                                            {"name": "x", "type": "space", "unit": "micrometer"}]}]
    return path


def sitk_image(arr, level):
    img = sitk.GetImageFromArray(np.asarray(arr, np.float32))
    img.SetSpacing([float(v) for v in level["scale"][::-1]])
    img.SetOrigin([float(v) for v in level["translation"][::-1]])
    return img


@pytest.fixture
def pair(tmp_path):
    moving = smooth_test_image(SHAPE, seed=4)
    fixed = smooth_test_image(SHAPE, seed=9)
    return (write_zarr(tmp_path / "fixed.zarr", fixed, FIXED0), write_zarr(tmp_path / "moving.zarr", moving, MOVING0),
            moving)


def open_pair(viewer, qtbot, monkeypatch, fixed_path, moving_path):
    """The fixed image through Open… (its .zattrs picked, as a file dialog picks files), the moving one through
    napari's reader and the Moving combo."""
    w = open_with_widget(viewer, qtbot)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(fixed_path / ".zattrs"), ""))
    qtbot.mouseClick(w.open_fixed_btn, Qt.MouseButton.LeftButton)
    layers = viewer.open(str(moving_path), plugin="napari-regtool")
    assert len(layers) == 1
    w.moving_combo.setCurrentIndex(w.moving_combo.findText(layers[0].name))
    wait_idle(qtbot, w)
    return w


def test_zarr_pair_opens_lazy_registers_coarse_and_applies_at_full_resolution(make_napari_viewer, qtbot, monkeypatch,
                                                                               pair, tmp_path):
    # a live budget below level 0's 7,680 voxels and above level 1's 1,920: registration runs on level 1
    monkeypatch.setitem(ngff.LIVE_VOXELS, 2, 4000)
    fixed_path, moving_path, moving0 = pair
    viewer = make_napari_viewer(show=True)
    w = open_pair(viewer, qtbot, monkeypatch, fixed_path, moving_path)
    fl, ml = viewer.layers["fixed"], viewer.layers["moving"]
    assert w.session.ready and w.images.shown("fixed") is fl and w.images.shown("moving") is ml

    # lazy multiscale layers: every level a dask array, level 0 placed by the layer, level 1 where the file puts it
    from napari_regtool.widgets.panels.fullres import layer_pyramid

    for layer, level0 in ((fl, FIXED0), (ml, MOVING0)):
        assert layer.multiscale and len(layer.data) == 2
        assert all(isinstance(a, da.Array) for a in layer.data)
        assert [tuple(a.shape) for a in layer.data] == [SHAPE, (SHAPE[0] // 2, SHAPE[1] // 2)]
        np.testing.assert_allclose(layer.scale, level0["scale"])
        np.testing.assert_allclose(layer.translate, level0["translation"])
        for k, lv in enumerate((level0, _level1(level0))):
            sp = layer_pyramid(layer).levels[k].space
            np.testing.assert_allclose(sp.spacing[::-1], lv["scale"], atol=1e-12)
            np.testing.assert_allclose(sp.origin[::-1], lv["translation"], atol=1e-12)

    # registration on level 1, and the status says which level and why
    coarse = (SHAPE[0] // 2, SHAPE[1] // 2)
    assert w.session.fixed.space.shape == coarse and w.session.moving.space.shape == coarse
    np.testing.assert_allclose(w.session.moving.space.origin[::-1], _level1(MOVING0)["translation"])
    np.testing.assert_allclose(w.session.moving.array,
                               moving0.reshape(48, 2, 40, 2).mean((1, 3)), rtol=1e-6)
    status = w.status_label.text()
    assert "level 1 of levels 0 … 1" in status and "4,000 voxels" in status

    # pairs clicked on the canvas at a closer zoom, in physical coordinates; partners from the known map
    w.model_combo.setCurrentIndex(w.model_combo.findData("affine"))
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.zoom *= 1.3
    qtbot.wait(20)
    targets = TARGETS
    for p in targets:
        canvas_click(qtbot, viewer, p[::-1], fl)
        got = w.session.pairs.fixed[-1]
        assert np.abs(got - p).max() < 0.5  # a click lands within a screen pixel of the point aimed at
        canvas_click(qtbot, viewer, (A @ got + B)[::-1], ml)
    wait_idle(qtbot, w)
    pairs = w.session.pairs
    assert len(pairs) == 4 and np.all(np.isfinite(pairs.moving))
    np.testing.assert_allclose(pairs.moving, pairs.fixed @ A.T + B, atol=0.5)
    t = w.session.transform
    assert t is not None and w.session.model == "affine"

    # Apply at full resolution: the moving image's level 0 onto the fixed image's level 0, and a label map
    out = tmp_path / "registered.zarr"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    assert w.fullres_combo.currentData() is ml
    w.fullres_block.setValue(32)
    qtbot.mouseClick(w.fullres_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert "Wrote registered.zarr" in w.fullres_status.text()
    attrs = json.loads((out / ".zattrs").read_text())
    ds = attrs["multiscales"][0]["datasets"]
    assert len(ds) == 3  # 96×80 in blocks of 32: a pyramid down to one block
    ct = ds[0]["coordinateTransformations"]
    assert [c["type"] for c in ct] == ["scale", "translation"]
    np.testing.assert_allclose(ct[0]["scale"], FIXED0["scale"], rtol=1e-12)
    np.testing.assert_allclose(ct[1]["translation"], FIXED0["translation"], rtol=1e-12)
    assert attrs["multiscales"][0]["axes"][0]["unit"] == "micrometer"
    got = np.asarray(zarr.open_array(str(out / "0"), mode="r")[...])
    ref_grid = sitk_image(np.zeros(SHAPE), FIXED0)
    ref = sitk.GetArrayFromImage(sitk.Resample(sitk_image(moving0, MOVING0), ref_grid, t.to_sitk(), sitk.sitkLinear,
                                               0.0))
    assert got.shape == SHAPE and (ref > 1).mean() > 0.5
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()

    labels = (moving0 // 20).astype(np.uint8) + 1
    lab = viewer.add_labels(labels, name="regions", scale=MOVING0["scale"], translate=MOVING0["translation"])
    qtbot.wait(5)
    w.fullres_combo.setCurrentIndex(combo_index(w.fullres_combo, lab))
    out2 = tmp_path / "regions.zarr"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out2), ""))
    qtbot.mouseClick(w.fullres_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    got = np.asarray(zarr.open_array(str(out2 / "0"), mode="r")[...])
    lref = sitk.GetImageFromArray(labels)
    lref.CopyInformation(sitk_image(labels, MOVING0))
    ref = sitk.GetArrayFromImage(sitk.Resample(lref, ref_grid, t.to_sitk(), sitk.sitkNearestNeighbor, 0,
                                               sitk.sitkUInt8))
    assert got.dtype == np.uint8 and np.array_equal(got, ref)
    assert "image-label" in json.loads((out2 / ".zattrs").read_text())

    # Export ▸ Apply on the multiscale moving layer reads the level registration runs on (level 1), not level 0
    # whole: the new layer is SimpleITK's resampling of level 1 onto the registration grid
    w.apply_combo.setCurrentIndex(combo_index(w.apply_combo, ml))
    qtbot.mouseClick(w.apply_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    applied = np.asarray(viewer.layers["moving (registered)"].data)
    lv1 = _level1(MOVING0)
    coarse_ref = sitk.GetArrayFromImage(sitk.Resample(sitk_image(moving0.reshape(48, 2, 40, 2).mean((1, 3)), lv1),
                                                      sitk_image(np.zeros(coarse), _level1(FIXED0)), t.to_sitk(),
                                                      sitk.sitkLinear, 0.0))
    assert applied.shape == coarse and np.abs(applied - coarse_ref).max() < 1e-4 * np.abs(coarse_ref).max()
    assert not [m for lvl, m in w.messages if lvl == "error"]


def test_cancel_leaves_nothing_behind(make_napari_viewer, qtbot, monkeypatch, pair, tmp_path):
    fixed_path, moving_path, _ = pair
    viewer = make_napari_viewer()
    w = open_pair(viewer, qtbot, monkeypatch, fixed_path, moving_path)
    w.model_combo.setCurrentIndex(w.model_combo.findData("affine"))
    f = TARGETS
    for p in f:
        w.click(p[::-1], "fixed")
        w.click((A @ p + B)[::-1], "moving")
    wait_idle(qtbot, w)
    t = w.session.transform
    np.testing.assert_allclose(t.map_points(f), f @ A.T + B, atol=1e-9)
    # each block takes a while, so the write is still running when Cancel is clicked
    cls = type(t)
    orig = cls.moving_index_grid

    def slow(self, *a, **k):
        import time

        time.sleep(0.05)
        return orig(self, *a, **k)

    monkeypatch.setattr(cls, "moving_index_grid", slow)
    out = tmp_path / "out" / "cancelled.zarr"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    w.fullres_block.setValue(8)  # 12 × 10 blocks
    qtbot.mouseClick(w.fullres_btn, Qt.MouseButton.LeftButton)
    assert not w.fullres_progress.isHidden() and not w.fullres_cancel_btn.isHidden()
    qtbot.waitUntil(lambda: w.fullres_progress.value() > 0, timeout=20000)
    qtbot.mouseClick(w.fullres_cancel_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.fullres_progress.value() < 90  # stopped during level 0
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == []  # no staging folder, no lock file
    assert "Cancelled" in w.fullres_status.text() and w.fullres_cancel_btn.isHidden()
    assert not [m for lvl, m in w.messages if lvl == "error"]


@pytest.mark.parametrize("fault, words", [
    ("no-multiscales", "without OME-NGFF multiscales metadata"),
    ("inconsistent", "scales are inconsistent"),
    ("shifted", "translations are inconsistent"),
])
def test_bad_zarr_gives_a_message_and_no_layer(make_napari_viewer, qtbot, monkeypatch, tmp_path, fault, words):
    arr = smooth_test_image(SHAPE, seed=2)
    path = tmp_path / "bad.zarr"
    if fault == "no-multiscales":
        write_zarr(path, arr, FIXED0, multiscales=False)
    elif fault == "inconsistent":  # level 1 claims the spacing of level 0: it would cover half the image
        write_zarr(path, arr, FIXED0, scales=[FIXED0, {"scale": FIXED0["scale"], "translation": FIXED0["translation"]}])
    else:  # level 1 placed 30 µm (25 of its voxels) off level 0: registering on it would be off by as much
        lv1 = _level1(FIXED0)
        write_zarr(path, arr, FIXED0, scales=[FIXED0, {"scale": lv1["scale"],
                                                       "translation": [v + 30.0 for v in lv1["translation"]]}])
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(path), ""))
    qtbot.mouseClick(w.open_moving_btn, Qt.MouseButton.LeftButton)
    msgs = [m for lvl, m in w.messages if lvl == "error"]
    assert len(msgs) == 1 and words in msgs[0] and msgs[0].startswith("bad.zarr cannot be the moving image")
    assert "Traceback" not in msgs[0] and len(viewer.layers) == 0
    # napari's reader says the same (napari shows a reader's error message)
    from napari_regtool._reader import get_ngff_reader

    reader = get_ngff_reader(str(path))
    with pytest.raises(ValueError, match=words):
        reader(str(path))


def test_images_in_different_units_are_refused_and_a_unit_symbol_is_its_name(make_napari_viewer, qtbot, monkeypatch,
                                                                             pair, tmp_path):
    """A NIfTI fixed image (millimetres) with a moving store in micrometres would be registered 1000× off: refused
    with one sentence naming both units, the model left as it was; a store whose axes say "µm" pairs with one that
    says "micrometer"."""
    from napari_regtool.io import write_image
    from napari_regtool.space import Space

    fixed_path, moving_path, _ = pair
    write_image(tmp_path / "fixed_mm.nii.gz", smooth_test_image(SHAPE, seed=9), Space(SHAPE, [0.5, 0.6], [-3.0, 2.0]))
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(tmp_path / "fixed_mm.nii.gz"), ""))
    qtbot.mouseClick(w.open_fixed_btn, Qt.MouseButton.LeftButton)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(moving_path / ".zattrs"), ""))
    qtbot.mouseClick(w.open_moving_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    said = [m for lvl, m in w.messages if lvl in ("error", "warning") and "different units" in m]
    assert len(said) == 1 and "µm" in said[0] and "mm" in said[0] and "1000× off" in said[0], w.messages
    assert not w.session.ready  # nothing registered across the units
    # the same store with its axes' unit written as a symbol: one unit with the other store's "micrometer"
    attrs = json.loads((moving_path / ".zattrs").read_text())
    for ax in attrs["multiscales"][0]["axes"]:
        ax["unit"] = "µm"
    (moving_path / ".zattrs").write_text(json.dumps(attrs))
    w2 = open_pair(make_napari_viewer(), qtbot, monkeypatch, fixed_path, moving_path)
    assert w2.session.ready and not [m for lvl, m in w2.messages if "different units" in m]


def test_a_full_resolution_write_that_cannot_be_made_is_said_before_it_starts(make_napari_viewer, qtbot, monkeypatch,
                                                                              pair, tmp_path):
    """An output under a file, or the moving store itself (which the result would replace while it is read): one
    sentence at once, no block computed, the store untouched. A file-system failure during the write reads as the
    file system's own words and what to check, not an exception's name."""
    import errno

    from napari_regtool.errors import user_message

    fixed_path, moving_path, _ = pair
    viewer = make_napari_viewer()
    w = open_pair(viewer, qtbot, monkeypatch, fixed_path, moving_path)
    w.model_combo.setCurrentIndex(w.model_combo.findData("affine"))
    for p in TARGETS:
        w.click(p[::-1], "fixed")
        w.click((A @ p + B)[::-1], "moving")
    wait_idle(qtbot, w)
    assert w.session.transform is not None
    (tmp_path / "afile").write_text("not a folder")
    before = sorted(q.name for q in moving_path.rglob("*"))
    for out, words in ((tmp_path / "afile" / "x.zarr", "is a file, so nothing can be made under it"),
                       (moving_path, "which the result replaces")):
        n = len(w.messages)
        assert w.fullres.apply_fullres(path=out) is False
        said = [m for lvl, m in w.messages[n:] if lvl == "error"]
        assert len(said) == 1 and words in said[0] and "Errno" not in said[0], said
        assert w.fullres_progress.isHidden()
    assert sorted(q.name for q in moving_path.rglob("*")) == before
    # a chunk of the moving store's finest level cut short after it was opened: checked on the worker, said, nothing
    # written
    chunk = moving_path / "0" / "1.1"
    chunk.write_bytes(chunk.read_bytes()[:-5])
    n = len(w.messages)
    assert w.fullres.apply_fullres(path=tmp_path / "out.zarr") is True
    wait_idle(qtbot, w)
    said = [m for lvl, m in w.messages[n:] if lvl == "error"]
    assert len(said) == 1 and "chunk file 0/1.1 holds" in said[0], w.messages[n:]
    assert not (tmp_path / "out.zarr").exists() and "Not written" in w.fullres_status.text()
    msg = user_message(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.zarr")))
    assert msg.startswith("No space left on device (") and "disk is full" in msg and "OSError" not in msg
    msg = user_message(FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/warp.nii.gz"))
    assert msg == "No such file or directory (/data/warp.nii.gz). Check the path: the file or folder is not there."


def test_a_store_with_a_short_chunk_opened_through_napari_is_refused_when_chosen(make_napari_viewer, qtbot,
                                                                                 monkeypatch, pair):
    """A store opened with File ▸ Open (napari's reader; the layer holds only lazy arrays) whose chunk file was cut
    short: drawn, that chunk reads empty (not numbers blosc made up) with one warning naming it, and choosing the
    layer for registration names the chunk instead of registering. The store copied again in good order and opened
    again registers."""
    import warnings

    fixed_path, moving_path, moving = pair
    chunk = moving_path / "0" / "1.1"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-5])
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(fixed_path / ".zattrs"), ""))
    qtbot.mouseClick(w.open_fixed_btn, Qt.MouseButton.LeftButton)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = viewer.open(str(moving_path), plugin="napari-regtool")[0]
        level0 = np.asarray(layer.data[0])  # what drawing level 0 reads
        np.asarray(layer.data[0])
    short = [str(c.message) for c in caught if "chunk file 0/1.1 holds" in str(c.message)]
    assert len(short) == 1 and "reads as empty" in short[0], [str(c.message) for c in caught]
    assert np.all(level0[32:64, 32:64] == 0) and np.abs(moving[32:64, 32:64]).min() > 0  # the chunk, empty
    assert np.array_equal(level0[:32], moving[:32].astype(np.float32))  # the others as written
    n = len(w.messages)
    w.moving_combo.setCurrentIndex(w.moving_combo.findText(layer.name))
    wait_idle(qtbot, w)
    said = [m for lvl, m in w.messages[n:] if lvl == "error"]
    assert len(said) == 1 and "chunk file 0/1.1 holds" in said[0] and "truncated" in said[0], w.messages[n:]
    assert not w.session.ready
    chunk.write_bytes(good)  # copied again
    viewer.layers.remove(layer)
    again = viewer.open(str(moving_path), plugin="napari-regtool")[0]
    n = len(w.messages)
    w.moving_combo.setCurrentIndex(w.moving_combo.findText(again.name))
    wait_idle(qtbot, w)
    assert w.session.ready and not [m for lvl, m in w.messages[n:] if lvl == "error"], w.messages[n:]
