import numpy as np
import pytest

from napari_regtool.errors import InputError
from napari_regtool.landmarks import (LandmarkPairs, read_bigwarp_csv, read_landmarks, read_napari_points_csv,
                                      write_bigwarp_csv, write_napari_points_csv)
from napari_regtool.space import Space

from .helpers import SAMPLES


@pytest.mark.parametrize("d", [2, 3])
def test_bigwarp_round_trip(tmp_path, d):
    rng = np.random.default_rng(d)
    pairs = LandmarkPairs(rng.normal(0, 50, (5, d)), rng.normal(0, 50, (5, d)), [f"P{i}" for i in range(5)],
                          [True, False, True, True, False])
    pairs.add(fixed=rng.normal(0, 5, d))  # half-placed pair
    p = tmp_path / "lm.csv"
    write_bigwarp_csv(p, pairs)
    text = p.read_text().splitlines()
    assert len(text) == 6
    assert all(line.startswith('"') and line.count('","') == 2 * d + 1 for line in text)
    assert '"Infinity"' in text[-1]
    back = read_bigwarp_csv(p)
    assert back == pairs
    assert back.usable.tolist() == [True, False, True, True, False, False]


def test_bigwarp_column_order_is_moving_then_fixed():
    pairs = read_bigwarp_csv('"Pt-0","true","1.5","2.5","10.0","20.0"\n', from_text=True)
    np.testing.assert_array_equal(pairs.moving, [[1.5, 2.5]])
    np.testing.assert_array_equal(pairs.fixed, [[10.0, 20.0]])


@pytest.mark.parametrize("text", [
    '"Pt-0", "true", "1.5", "2.5", "10.0", "20.0"\n"Pt-1", "false", 3, 4, 5, 6\n',  # a space after each comma
    '"Pt-0","true","1.5","2.5","10.0","20.0",\n"Pt-1","false","3","4","5","6",\n',  # a comma ending each row
])
def test_bigwarp_csv_written_by_hand(text):
    """Files written by hand or by a spreadsheet read as BigWarp's own (csv module as the reference)."""
    pairs = read_bigwarp_csv(text, from_text=True)
    assert pairs.names == ["Pt-0", "Pt-1"] and pairs.active.tolist() == [True, False]
    np.testing.assert_array_equal(pairs.moving, [[1.5, 2.5], [3, 4]])
    np.testing.assert_array_equal(pairs.fixed, [[10.0, 20.0], [5, 6]])


@pytest.mark.parametrize("text,match", [
    ('"a","true","1","2","3"\n', "6 \\(2D\\) or 8 \\(3D\\) columns"),
    ('"a","true","1","2","x","4"\n', "'x' is not a number"),
    ('"a","true","1","2","3","4"\n"b","true","1","2","3"\n', "row 2 has 5 columns"),
    ('"a","true","NaN","2","3","4"\n', "NaN"),
    ('"a","true","Infinity","2","3","4"\n', "partly infinite"),
    ('"a","maybe","1","2","3","4"\n', "active flag"),
    ("\n\n", "no landmarks"),
    ('name,active,mx,my,fx,fy\n"a","true","1","2","3","4"\n', "is a header; BigWarp landmark files have none"),
])
def test_bad_bigwarp_csv(text, match):
    with pytest.raises(InputError, match=match):
        read_bigwarp_csv(text, from_text=True)


def test_napari_points_csv(tmp_path):
    pts = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    write_napari_points_csv(tmp_path / "m.csv", pts)
    head = (tmp_path / "m.csv").read_text().splitlines()[0]
    assert head == "index,axis-0,axis-1,axis-2"
    np.testing.assert_array_equal(read_napari_points_csv(tmp_path / "m.csv"), pts)
    write_napari_points_csv(tmp_path / "f.csv", pts + 1)
    pairs = read_landmarks(tmp_path / "m.csv", tmp_path / "f.csv")
    np.testing.assert_array_equal(pairs.fixed, pts + 1)
    with pytest.raises(InputError, match="napari points file"):
        read_landmarks(tmp_path / "m.csv")


def test_sample_landmarks_lie_inside_their_images():
    from napari_regtool.io import read_image

    for stem in ("brain2d", "brain3d"):
        pairs = read_bigwarp_csv(SAMPLES / f"{stem}_landmarks.csv")
        f = read_image(SAMPLES / f"{stem}_fixed.nii.gz")
        m = read_image(SAMPLES / f"{stem}_moving.nii.gz")
        pairs.check_inside(f.space, m.space)


def test_pairs_outside_the_image_are_named():
    space = Space((10, 10), [1.0, 1.0])
    pairs = LandmarkPairs([[1, 1], [50, 3]], [[2, 2], [3, 3]], ["in", "out"])
    with pytest.raises(InputError, match="out \\(fixed\\)"):
        pairs.check_inside(space, space)


def test_editing():
    p = LandmarkPairs.empty(2)
    i = p.add(moving=[1, 2])
    assert not p.complete[i]
    p.fixed[i] = [3, 4]
    assert p.complete[i]
    p.add([0, 0], [1, 1])
    assert p.names == ["Pt-0", "Pt-1"]
    p.remove(0)
    assert p.names == ["Pt-1"] and p.next_name() == "Pt-2"
