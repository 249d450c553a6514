"""npe2 readers: BigWarp landmark CSVs (two points layers) and images through SimpleITK (with spacing, origin
and direction as the layer's scale/translate or affine)."""
from __future__ import annotations

import numpy as np

from .errors import RegtoolError
from .image import Image
from .io import looks_like_label_map, read_image
from .landmarks import LandmarkPairs, bigwarp_csv_text, read_bigwarp_csv
from .space import to_array_order

__all__ = ["get_landmark_reader", "get_image_reader", "image_layer_data", "landmark_layer_data",
           "IMAGE_PATTERNS"]

IMAGE_PATTERNS = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


def image_layer_data(image: Image, path=None, role: str | None = None, sample: bool = False):
    """``(data, kwargs, "image")`` placing ``image`` in world (physical) coordinates."""
    md = {"path": str(path) if path else None}
    if role:
        md["role"] = role
    if sample:
        md["sample"] = True
    kw = dict(name=image.name, metadata={"regtool": md}, **image.space.napari_kwargs())
    rgb = image.is_multichannel and image.n_channels in (3, 4) and image.array.dtype == np.uint8
    if image.is_multichannel and not rgb:
        kw["channel_axis"] = image.ndim
    if rgb:
        kw["rgb"] = True
    return image.array, kw, "labels" if image.is_label else "image"


def landmark_layer_data(pairs: LandmarkPairs, source=None) -> list:
    """Two points layers, ``moving landmarks`` and ``fixed landmarks`` (world coordinates), carrying the pairs
    (names, active flags, half-placed pairs) in their metadata so that the Registration widget can adopt them."""
    text = bigwarp_csv_text(pairs)
    out = []
    for side in ("moving", "fixed"):
        pts = getattr(pairs, side)
        placed = np.nonzero(np.all(np.isfinite(pts), 1))[0]
        data = to_array_order(pts[placed]) if len(placed) else np.zeros((0, pairs.ndim))
        kw = dict(
            name=f"{side} landmarks",
            features={"label": np.array([str(i + 1) for i in placed], dtype=str), "pair": placed.astype(int),
                      "name": np.array([pairs.names[i] for i in placed], dtype=str),
                      "active": pairs.active[placed].astype(bool)},
            text={"string": "{label}", "color": "white", "anchor": "upper_left", "size": 11},
            face_color="orange" if side == "moving" else "cyan", projection_mode="rescale_spherical",
            metadata={"regtool": {"role": "landmarks", "side": side, "pairs_csv": text,
                                  "source": str(source) if source else None}},
        )
        out.append((data, kw, "points"))
    return out


def _one_path(path):
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return str(path)


def get_landmark_reader(path):
    """Reader for BigWarp landmark CSVs; declines (returns None) any other CSV."""
    p = _one_path(path)
    if p is None or not p.lower().endswith(".csv"):
        return None
    try:
        pairs = read_bigwarp_csv(p)
    except (RegtoolError, OSError):
        return None

    def reader(_path):
        return landmark_layer_data(pairs, p)

    return reader


def get_image_reader(path):
    """Reader for NIfTI, MHA/MHD and NRRD images (SimpleITK), keeping their physical placement."""
    p = _one_path(path)
    if p is None or not p.lower().endswith(IMAGE_PATTERNS):
        return None

    def reader(_path):
        try:
            im = read_image(p)
        except RegtoolError as exc:
            # napari shows a reader's exception message in its notification area
            raise ValueError(str(exc)) from None
        if looks_like_label_map(im, p):  # a segmentation opens as labels, so warping keeps its values
            im = im.with_array(im.array, is_label=True)
        return [image_layer_data(im, p)]

    return reader
