"""An image in use removed from a shown viewer, side by side: the process keeps drawing.

napari's canvas crashed the whole process (a segmentation fault in ``glDrawArrays`` while drawing the next frame,
under Mesa's software OpenGL) when the plugin removed its warped image and both landmark layers in one turn of the
event loop after the user removed the fixed or moving image from the side-by-side grid, and, with landmark pairs
placed, even one per turn while their number labels were shown. The viewer here is shown
and painted, unlike the other GUI tests; it runs in a child process so that a crash fails this test instead of
ending the test run.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"

SCRIPT = textwrap.dedent("""
    import sys, time
    import napari
    from qtpy.QtWidgets import QApplication

    def pump(sec):
        t = time.time()
        while time.time() - t < sec:
            QApplication.processEvents()
            time.sleep(0.005)

    def idle(w):
        t = time.time()
        while w.busy and time.time() - t < 120:
            pump(0.05)

    def choose(combo, text):
        combo.setCurrentIndex(combo.findText(text))

    fixed_path, moving_path, landmarks_path, side = sys.argv[1:5]
    viewer = napari.Viewer(show=True)
    _, w = viewer.window.add_plugin_dock_widget("napari-regtool", "Registration")
    fl = viewer.open(fixed_path, plugin="napari-regtool")[0]
    ml = viewer.open(moving_path, plugin="napari-regtool")[0]
    choose(w.fixed_combo, fl.name)
    choose(w.moving_combo, ml.name)
    idle(w)
    w.load_landmarks(landmarks_path)  # numbered landmark pairs on both sides (their labels crashed napari too)
    w.set_model("tps")
    idle(w)
    pump(1.0)
    print("pairs", len(w.session.pairs), flush=True)
    print("grid before", viewer.canvas.grid.enabled, len(viewer.layers), flush=True)
    viewer.layers.remove(ml if side == "moving" else fl)
    pump(2.5)
    print("left", "|".join(l.name for l in viewer.layers), "grid", viewer.canvas.grid.enabled, flush=True)
    again = viewer.open(moving_path if side == "moving" else fixed_path, plugin="napari-regtool")[0]
    choose(w.fixed_combo, (fl if side == "moving" else again).name)
    choose(w.moving_combo, (again if side == "moving" else ml).name)
    idle(w)
    pump(1.0)
    print("again", len(viewer.layers), "grid", viewer.canvas.grid.enabled, flush=True)
    viewer.close()
""")


@pytest.mark.parametrize("sample,side", [("brain2d", "moving"), ("brain3d", "fixed")])
def test_removing_an_image_in_use_from_a_shown_grid_does_not_crash(tmp_path, sample, side):
    script = tmp_path / "remove_shown.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(SAMPLES / f"{sample}_fixed.nii.gz"),
                           str(SAMPLES / f"{sample}_moving.nii.gz"), str(SAMPLES / f"{sample}_landmarks.csv"), side],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"the viewer process ended with {proc.returncode}:\n{out}\n{proc.stderr[-3000:]}"
    placed = re.search(r"^pairs (\d+)$", out, re.M)
    assert placed and int(placed.group(1)) >= 3, out  # the sample's landmark pairs, numbered on the canvas
    assert "grid before True 5" in out  # side by side: fixed, warped, two landmark layers, moving
    kept = f"{sample}_{'fixed' if side == 'moving' else 'moving'}"
    # only the image left by the user stays; the plugin's layers went and the grid is off
    assert f"left {kept} grid False" in out, out
    # choosing the image again registers again, side by side
    assert "again 5 grid True" in out, out
