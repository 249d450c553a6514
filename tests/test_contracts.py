"""The architecture's rules, checked: the import-linter contracts in pyproject.toml hold, cover every module of
the package, and really catch a breach; the SimpleITK conversion of transforms exists once, outside io, and
still maps points as the transforms do."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from napari_regtool.space import Space

from .helpers import rotation

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "napari_regtool"
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {c["id"]: c for c in CONFIG["contracts"]}
#: the views and the entry points that may import napari/Qt (the npe2 writer and `regtool gui`'s launcher)
GUI_MODULES = {"napari_regtool.widgets", "napari_regtool.launch", "napari_regtool._writer"}


def _top_level_modules() -> set[str]:
    out = set()
    for p in PACKAGE.iterdir():
        if p.suffix == ".py" and p.stem != "__init__":
            out.add(f"napari_regtool.{p.stem}")
        elif p.is_dir() and (p / "__init__.py").is_file():
            out.add(f"napari_regtool.{p.name}")
    return out


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter")
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# ------------------------------------------------------------------------------------------------ coverage
def test_every_module_is_held_to_the_engine_contract_or_is_a_view():
    """A new module must be added to the engine contract's list (or be a view): nothing escapes it silently."""
    engine = set(CONTRACTS["engine-without-gui"]["source_modules"])
    modules = _top_level_modules()
    missing = modules - engine - GUI_MODULES
    assert not missing, (f"{sorted(missing)} are in neither the engine contract ([tool.importlinter] "
                         "'engine-without-gui' source_modules in pyproject.toml) nor the views; add them there")
    assert not engine - modules, f"the engine contract names modules that do not exist: {sorted(engine - modules)}"
    assert GUI_MODULES <= set(CONTRACTS["engine-without-gui"]["forbidden_modules"])
    # the npe2 hooks the manifest names are either views or held to the engine contract
    manifest = (PACKAGE / "napari.yaml").read_text()
    hooks = {line.split("python_name:")[1].strip().split(":")[0] for line in manifest.splitlines()
             if "python_name:" in line}
    assert hooks and hooks <= engine | GUI_MODULES


def test_the_contracts_hold():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"{len(CONTRACTS)} kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("transforms/tps.py", "from ..io import read_image", "sitk-layers"),
    ("qc.py", "import qtpy", "engine-without-gui"),
    ("session.py", "from .widgets import _layers", "engine-without-gui"),
    ("widgets/_table.py", "import torch", "views-without-torch"),
    ("widgets/panels/qc.py", "import numpy", "panels-without-numerics"),
])
def test_a_breach_breaks_its_contract(tmp_path, module, line, contract):
    """The contracts bite: one forbidden import added to a copy of the package breaks that contract (only)."""
    shutil.copytree(PACKAGE, tmp_path / "napari_regtool", ignore=shutil.ignore_patterns("*.pt", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "napari_regtool" / module
    target.write_text(target.read_text() + f"\n\ndef _breach():\n    {line}\n")
    r = _lint_imports(tmp_path, pythonpath=tmp_path)
    out = " ".join(r.stdout.split())
    assert r.returncode != 0
    for cid, c in CONTRACTS.items():
        assert f"{c['name']} {'BROKEN' if cid == contract else 'KEPT'}" in out, (cid, r.stdout[-3000:])


def test_transforms_do_not_import_io():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("napari_regtool")
    assert not graph.chain_exists("napari_regtool.transforms", "napari_regtool.io", as_packages=True)
    assert not graph.chain_exists("napari_regtool.sitk_convert", "napari_regtool.transforms", as_packages=True)
    assert graph.chain_exists("napari_regtool.transforms", "napari_regtool.sitk_convert", as_packages=True)


# -------------------------------------------------------------------------------- one SimpleITK conversion
def test_io_re_exports_the_one_conversion():
    from napari_regtool import io, sitk_convert

    for name in ("image_to_sitk", "field_to_sitk_image", "field_to_sitk_transform"):
        assert getattr(io, name) is getattr(sitk_convert, name)
        assert name in io.__all__


def _space(d):
    return Space((9, 11, 13)[:d], [0.8, 1.3, 2.0][:d], [-4.0, 7.5, 20.0][:d], rotation(d, [0.2, -0.1, 0.3]))


@pytest.mark.parametrize("d", [2, 3])
def test_every_transform_kind_exports_the_map_it_computes(d):
    """``to_sitk`` of each kind maps points as ``map_points`` does (exactly for linear maps; at the grid's voxels,
    where the exported field is sampled, for the others)."""
    from napari_regtool.io import affine_from_sitk
    from napari_regtool.transforms import (AffineTransform, CompositeTransform, DisplacementFieldTransform,
                                           IdentityTransform, fit_tps)

    rng = np.random.default_rng(7 + d)
    space = _space(d)
    grid_pts = space.index_to_physical(np.stack(np.meshgrid(*[np.arange(n) for n in space.size_xyz],
                                                            indexing="ij"), -1).reshape(-1, d).astype(float))
    aff = AffineTransform(rotation(d, [0.3, 0.1, -0.2]) * 1.1, rng.uniform(-3, 3, d))
    ctrl = space.index_to_physical(rng.uniform(0, 8, (8, d)))
    tps = fit_tps(ctrl, ctrl + rng.normal(0, 1.0, ctrl.shape))
    u = torch.as_tensor(rng.normal(0, 0.5, (*space.shape, d)))
    field = DisplacementFieldTransform(u, space)
    cases = [(aff, None), (IdentityTransform(d), None), (CompositeTransform([aff, aff.inverse(), aff]), None),
             (tps, space), (field, None), (CompositeTransform([aff, tps]), space)]
    for t, grid in cases:
        tx = t.to_sitk(grid)
        got = np.array([tx.TransformPoint([float(v) for v in p]) for p in grid_pts])
        np.testing.assert_allclose(got, t.map_points(grid_pts), atol=1e-5, err_msg=t.kind)
        if t.is_linear:
            assert tx.GetName() == "AffineTransform"
            back = affine_from_sitk(tx)
            np.testing.assert_allclose(back.matrix, t.as_affine().matrix, atol=1e-12)
    with pytest.raises(ValueError, match="needs a grid"):
        tps.to_sitk()


def test_written_transforms_read_back(tmp_path):
    from napari_regtool.io import read_transform, write_transform
    from napari_regtool.transforms import AffineTransform, fit_tps

    space = _space(3)
    rng = np.random.default_rng(3)
    aff = AffineTransform(rotation(3, [0.3, 0.1, -0.2]), rng.uniform(-3, 3, 3))
    ctrl = space.index_to_physical(rng.uniform(0, 8, (8, 3)))
    tps = fit_tps(ctrl, ctrl + rng.normal(0, 1.0, ctrl.shape))
    voxels = space.index_to_physical(rng.integers(0, 9, (20, 3)).astype(float))  # where a field is sampled
    for t, name in ((aff, "a.tfm"), (tps, "t.h5"), (tps, "t.nii.gz")):
        write_transform(tmp_path / name, t, space)
        back = read_transform(tmp_path / name)
        np.testing.assert_allclose(back.map_points(voxels), t.map_points(voxels), atol=1e-5, err_msg=name)


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages the wheel carries; a sub-package missing there installs without it (an
    editable checkout hides that; the wheel smoke test in CI does not)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "napari_regtool").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_the_command_line_is_built_without_torch():
    """`regtool --help` (and every error in the options) must not wait for torch to import (seconds on a busy
    machine): building the parser, the `train` options included, imports no torch."""
    code = ("import sys; from napari_regtool.cli import build_parser; p = build_parser(); "
            "p.parse_args(['train', '--ndim', '3', '--steps', '5']); print(sorted(m for m in ('torch', 'napari', "
            "'qtpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
