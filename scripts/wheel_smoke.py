"""Smoke test of an installed wheel (run by scripts/wheel-smoke.sh in a clean environment, outside the checkout):
the package and its samples come from site-packages, each sample opens in napari, the Registration widget docks
and fits the sample's landmarks, and `regtool register` writes its files."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import napari

import napari_regtool
from napari_regtool._sample_data import sample_dir

pkg = Path(napari_regtool.__file__).resolve()
assert "site-packages" in pkg.parts, f"napari_regtool was imported from {pkg}, not from an installed wheel"
assert "site-packages" in sample_dir().resolve().parts, f"the samples come from {sample_dir()}, not the wheel"
print("package:", pkg.parent, "samples:", sample_dir())

viewer = napari.Viewer(show=False)
for key in ("brain2d", "brain3d"):
    before = len(viewer.layers)
    viewer.open_sample("napari-regtool", key)
    assert len(viewer.layers) >= before + 3, f"sample {key} added {len(viewer.layers) - before} layers"
    print(f"sample {key}: {[layer.name for layer in viewer.layers][before:]}")
viewer.layers.clear()
viewer.open_sample("napari-regtool", "brain2d")
dock, widget = viewer.window.add_plugin_dock_widget("napari-regtool", "Registration")
assert widget is not None
print("Registration widget docked:", type(widget).__name__)
viewer.close()

with tempfile.TemporaryDirectory() as tmp:
    s = sample_dir()
    cmd = [str(Path(sys.executable).with_name("regtool")), "register", "--fixed", str(s / "brain2d_fixed.nii.gz"),
           "--moving", str(s / "brain2d_moving.nii.gz"), "--landmarks", str(s / "brain2d_landmarks.csv"),
           "--model", "tps", "--out", str(Path(tmp) / "out"), "-q"]
    subprocess.run(cmd, check=True)
    rep = json.loads((Path(tmp) / "out" / "report.json").read_text())
    # the thin-plate spline interpolates the pairs; the warped image matches the fixed one far better than before
    assert rep["model"] == "tps" and rep["residual_mean"] < 1e-3, rep["residual_mean"]
    assert rep["similarity_after"]["ncc"] > rep["similarity_before"]["ncc"] + 0.2, rep["similarity_after"]
    print("regtool register: tps, NCC", round(rep["similarity_before"]["ncc"], 3), "->",
          round(rep["similarity_after"]["ncc"], 3))
print("wheel smoke test passed")
