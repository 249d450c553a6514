"""Sample data: the 2D and 3D brain pairs of ``sample_data/`` (fixed, moving and their landmark pairs)."""
from __future__ import annotations

import warnings
from pathlib import Path

from .errors import InputError

__all__ = ["sample_dir", "brain2d", "brain3d", "sample_files"]


def sample_dir() -> Path:
    """The folder of the sample pairs: the installed ``napari_regtool.samples`` package (a wheel carries them),
    which in a source checkout or an editable install is the repository's ``sample_data`` folder."""
    try:
        from importlib.resources import files

        folder = Path(str(files("napari_regtool.samples")))
        if (folder / "brain2d_fixed.nii.gz").is_file():
            return folder
    except (ImportError, TypeError, ValueError):
        pass
    return Path(__file__).resolve().parents[1] / "sample_data"


def sample_files(prefix: str) -> dict:
    folder = sample_dir()
    files = {"fixed": folder / f"{prefix}_fixed.nii.gz", "moving": folder / f"{prefix}_moving.nii.gz",
             "landmarks": folder / f"{prefix}_landmarks.csv"}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise InputError(f"The napari-regtool sample data is missing ({', '.join(missing)}); the installation is "
                         "incomplete: reinstall the plugin (pip install --force-reinstall napari-regtool).")
    return files


def _sample(prefix: str) -> list:
    from ._reader import image_layer_data, landmark_layer_data
    from .io import read_image
    from .landmarks import read_bigwarp_csv
    from .pipeline import straighten_for_display

    files = sample_files(prefix)
    # the 3D moving image lies on a tilted grid, which napari would draw off its place: shown straightened, said
    fixed, moving = (straighten_for_display(im) for im in (read_image(files["fixed"]), read_image(files["moving"])))
    for im in (fixed, moving):
        for note in im.meta.get("notices") or []:
            warnings.warn(note, UserWarning, stacklevel=2)
    pairs = read_bigwarp_csv(files["landmarks"])
    fd, fk, ft = image_layer_data(fixed, files["fixed"], role="fixed", sample=True)
    md, mk, mt = image_layer_data(moving, files["moving"], role="moving", sample=True)
    fk["name"], mk["name"] = f"{prefix} fixed", f"{prefix} moving"
    return [(fd, fk, ft), (md, mk, mt), *landmark_layer_data(pairs, files["landmarks"])]


def brain2d():
    """2D pair: an axial MRI slice and a rotated, scaled, bent copy on another grid, with 12 landmark pairs."""
    return _sample("brain2d")


def brain3d():
    """3D pair: an MRI volume (2 mm) and a warped copy on a rotated 2.2×1.9×2.5 mm grid, with 14 pairs."""
    return _sample("brain3d")
