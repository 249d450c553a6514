"""The deep deformable model: shipped weights on real images, exported fields, training, errors, refinement.

Real data: the brain sample pairs in ``sample_data/`` (ICBM 2009a template slices/volume and known warps of
them, with tissue labels); the model was trained on synthetic label maps only, so these are held-out images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_regtool import qc
from napari_regtool.errors import Cancelled, InputError
from napari_regtool.image import Image
from napari_regtool.io import field_to_sitk_transform, image_to_sitk, read_image
from napari_regtool.space import Space
from napari_regtool.transforms.field import DisplacementFieldTransform, jacobian_determinant, resample
from napari_regtool.transforms.linear import AffineTransform, fit_affine

from napari_regtool.deep import infer
from napari_regtool.deep.hypermorph import HyperMorphModel, equalise, read_model, save_model
from napari_regtool.deep.infer import DEFAULT_REG_WEIGHT, MIN_SIZE, DeepRegistration, register_deep, working_space
from napari_regtool.deep.synth import SynthConfig, synth_pair
from napari_regtool.deep.train import TrainConfig, loss_terms, train
from napari_regtool.transforms.field import warp

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


@pytest.fixture(autouse=True, scope="module")
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _need(*names):
    for n in names:
        if not (SAMPLES / n).exists():
            pytest.skip(f"sample data {n} is missing")


def _need_weights(ndim):
    if not infer.weights_path(ndim).exists():
        pytest.skip(f"no shipped {ndim}D weights")


def _landmarks(path):
    from napari_regtool.landmarks import read_bigwarp_csv

    return read_bigwarp_csv(path).fit_points()


def _sample_pair(name):
    """A shipped sample pair (``brain2d``/``brain3d``) with tissue labels and its landmark-based affine
    pre-alignment (fixed → moving): ``(fixed, moving, fixed_labels, moving_labels, affine, (lf, lm))``."""
    files = [f"{name}_{s}" for s in ("fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz",
                                      "landmarks.csv")]
    _need(*files)
    f, m = (read_image(SAMPLES / n) for n in files[:2])
    fl, ml = (read_image(SAMPLES / n, is_label=True) for n in files[2:4])
    lf, lm = _landmarks(SAMPLES / files[4])
    return f, m, fl, ml, fit_affine(lf, lm), (lf, lm)


@pytest.fixture(scope="module")
def pair2d():
    return _sample_pair("brain2d")


@pytest.fixture(scope="module")
def reg2d(pair2d):
    _need_weights(2)
    f, m, _, _, aff, _ = pair2d
    return DeepRegistration(f, m, initial=aff)


def _warp_labels(ml, tx, space):
    return resample(ml.array, ml.space, tx, space, mode="nearest").numpy()


def _warp(m, tx, space):
    return resample(m.scalar(), m.space, tx, space).numpy()


def _smoothness(tx: DisplacementFieldTransform) -> float:
    """Mean squared spatial derivative of the physical field (dimensionless)."""
    u = tx.u.double()
    sp = tx.space.spacing[::-1]
    return float(sum(((torch.diff(u, dim=k) / sp[k]) ** 2).mean() for k in range(tx.ndim)))


# -------------------------------------------------------------------------------------- model & grids
def test_model_shapes_2d_3d_and_lambda_conditioning():
    for d, shape in ((2, (32, 48)), (3, (32, 32, 16))):
        net = HyperMorphModel(ndim=d, enc=(4, 8, 8), dec=(8,), final=4, work_size=32)
        x = torch.rand(2, 2, *shape)
        mean, logvar = net(x, torch.tensor([0.0, 1.0]))
        assert mean.shape == (2, d, *[s // 2 for s in shape]) and logvar.shape == mean.shape
        # the hypernetwork sees distinct, non-degenerate inputs at both ends of [0, 1]
        f0, f1 = net.modulations(0.0), net.modulations(1.0)
        assert any(not torch.allclose(a, b) for a, b in zip(f0, f1))
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.rand(1, 2, 30, 30, 30), 0.5)


def test_inference_path_matches_the_modulated_convolutions():
    """Without gradients and with one λ for the batch, the network folds each FiLM modulation into its
    convolution and runs channels-last; the result must be the modulated convolutions' (γ ⊙ (W x + c) + β, run
    with gradients on), per image of a batch, and skipping the variance head must leave the mean unchanged."""
    torch.manual_seed(3)
    for d, shape in ((2, (32, 48)), (3, (16, 32, 32))):
        net = HyperMorphModel(ndim=d, enc=(4, 8, 8), dec=(8,), final=4, work_size=32)
        with torch.no_grad():  # modulations far from the identity, so a wrong fold cannot hide
            net.hyper[-1].weight.normal_(0.0, 0.5)
            net.hyper[-1].bias.normal_(0.0, 0.5)
            net.flow.weight.normal_(0.0, 0.1)
            for m in net.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                    m.bias.normal_(0.0, 0.1)
        x = torch.rand(2, 2, *shape)
        ref_mean, ref_lv = (t.detach() for t in net(x, 0.3))  # gradients on: the unfused path
        with torch.no_grad():
            mean, lv = net(x, 0.3)
            mean_nv, lv_nv = net(x, 0.3, variance=False)
            per_image = net(x, torch.tensor([0.3, 0.8]))[0]  # one λ per image: the unfused path again
            second = net(x[1:], 0.8)[0]
        scale = float(ref_mean.abs().max())
        assert scale > 1e-3
        assert float((mean - ref_mean).abs().max()) < 1e-5 * scale
        assert float((lv - ref_lv).abs().max()) < 1e-4
        assert lv_nv is None and torch.equal(mean_nv, mean)
        assert mean.is_contiguous() and lv.is_contiguous()
        assert float((per_image[0] - mean[0]).abs().max()) < 1e-5 * scale
        assert float((per_image[1] - second[0]).abs().max()) < 1e-5 * scale
        assert float((per_image[1] - mean[1]).abs().max()) > 1e-3 * scale  # λ reaches each image


def test_working_space_is_isotropic_centred_and_covers_the_image():
    sp = Space((100, 300), [0.5, 0.8], [10.0, -4.0], np.array([[0.0, -1.0], [1.0, 0.0]]))
    ws = working_space(sp, 128, 16)
    assert np.allclose(ws.spacing, ws.spacing[0])
    assert all(n % 16 == 0 for n in ws.shape) and max(ws.shape) == 128
    lo, hi = sp.physical_bounds()
    wlo, whi = ws.physical_bounds()
    assert np.all(wlo <= lo + 1e-9) and np.all(whi >= hi - 1e-9)
    assert np.allclose((wlo + whi) / 2, (lo + hi) / 2)


# --------------------------------------------------------------------------------------- synthetic data
def test_synthetic_pairs_are_seeded_and_their_truth_aligns_the_labels():
    cfg = SynthConfig(shape=(64, 64))
    a = synth_pair(2, torch.Generator().manual_seed(5), cfg)
    b = synth_pair(2, torch.Generator().manual_seed(5), cfg)
    assert torch.equal(a["fixed"], b["fixed"]) and torch.equal(a["moving_labels"], b["moving_labels"])
    assert a["fixed"].min() >= 0 and a["fixed"].max() <= 1
    for i in range(2):  # the known displacement maps the moving labels onto the fixed ones (hard labels)
        fl, ml = a["fixed_labels"][i], a["moving_labels"][i]
        back = warp(ml[None, None].float(), a["true_disp"][i:i + 1], mode="nearest")[0, 0].long()
        before = qc.dice(fl + 1, ml + 1)["mean"]
        after = qc.dice(fl + 1, back + 1)["mean"]
        assert after > 0.85 and after > before + 0.2, (before, after)
    c3 = synth_pair(1, torch.Generator().manual_seed(1), SynthConfig(shape=(32, 32, 32)))
    assert c3["fixed"].shape == (1, 1, 32, 32, 32) and c3["true_disp"].shape == (1, 3, 32, 32, 32)


# ------------------------------------------------------------------------------------------- training
def test_training_steps_lower_the_loss():
    """Three Adam steps on one fixed synthetic batch (fixed seeds) lower the training loss each time."""
    _need_weights(2)
    import copy

    net = copy.deepcopy(infer.load_model(2)).train()
    dev = next(net.parameters()).device  # the CPU, or the device REGTOOL_FORCE_DEVICE names
    batch = synth_pair(2, torch.Generator().manual_seed(0), SynthConfig(shape=(64, 64)))
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
    lam = torch.tensor([0.2, 0.6], device=dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def loss():
        return loss_terms(net, batch, lam, torch.Generator().manual_seed(1))["loss"]

    values = []
    for _ in range(3):
        value = loss()
        values.append(float(value.detach()))
        opt.zero_grad()
        value.backward()
        opt.step()
    with torch.no_grad():
        values.append(float(loss()))
    assert all(b < a for a, b in zip(values, values[1:])), values


def test_supervised_warmup_term_trains_a_tiny_model():
    torch.manual_seed(0)
    net = HyperMorphModel(ndim=2, enc=(8, 16, 16), dec=(16,), final=8, work_size=32, variance=False)
    batch = synth_pair(4, torch.Generator().manual_seed(0), SynthConfig(shape=(32, 32)))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    lam = torch.zeros(4)
    first = float(loss_terms(net, batch, lam, sup_weight=1.0)["sup"].detach())
    for _ in range(30):
        opt.zero_grad()
        loss_terms(net, batch, lam, sup_weight=1.0)["sup"].backward()
        opt.step()
    assert float(loss_terms(net, batch, lam, sup_weight=1.0)["sup"].detach()) < 0.8 * first


def test_train_writes_resumable_weights_with_metadata(tmp_path):
    out = tmp_path / "m.pt"
    cfg = TrainConfig(ndim=2, steps=3, size=32, batch=1, out=str(out), checkpoint_every=2, log_every=1,
                      enc=(4, 8, 8), dec=(8,))
    logs = []
    train(cfg, log=logs.append)
    model = read_model(out, ndim=2)
    assert model.meta["steps"] == 3 and model.meta["seed"] == 0 and model.meta["work_size"] == 32
    assert "synthetic" in model.meta["data"] and model.meta["final_loss"] is not None
    assert model.intensity == "equalised" and "--intensity equalised" in model.meta["command"]
    cfg.steps, cfg.resume, cfg.intensity = 5, True, "range"
    train(cfg, log=logs.append)
    assert any("Resuming" in line for line in logs)
    # a resumed checkpoint keeps the input mapping it was trained with, and says so when asked for another
    assert any("takes 'equalised' inputs; continuing with those" in line for line in logs)
    again = read_model(out)
    assert again.meta["steps"] == 5 and again.intensity == "equalised"
    # a new model started from it takes the mapping asked for, and the log says it differs from its source
    other = tmp_path / "r.pt"
    logs.clear()
    train(TrainConfig(ndim=2, steps=1, size=32, batch=1, out=str(other), enc=(4, 8, 8), dec=(8,),
                      init_from=str(out), intensity="range"), log=logs.append)
    assert read_model(other).intensity == "range"
    assert any("was trained on 'equalised' inputs; this model takes 'range'" in line for line in logs)


def test_train_command_line(tmp_path):
    import argparse

    from napari_regtool.deep.train import add_train_arguments, run_train

    parser = add_train_arguments(argparse.ArgumentParser())
    out = tmp_path / "cli.pt"
    args = parser.parse_args(["--ndim", "2", "--steps", "2", "--size", "32", "--batch", "1", "--seed", "3",
                              "--out", str(out), "--log-every", "1"])
    lines = []
    assert run_train(args, log=lines.append) == out
    meta = read_model(out).meta
    assert meta["seed"] == 3 and meta["steps"] == 2 and "--size 32" in meta["command"]
    assert any(line.startswith("[") and "2/2" in line for line in lines)  # progress bar lines
    with pytest.raises(InputError, match="multiple of 16"):
        run_train(parser.parse_args(["--size", "40", "--out", str(out)]), log=lines.append)


# ------------------------------------------------------------------------------------------- errors
def test_corrupt_and_mismatched_weight_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(InputError, match="not a readable model weight file .* written by `regtool train`"):
        read_model(bad)
    net = HyperMorphModel(ndim=2, enc=(4, 8, 8), dec=(8,), final=4, work_size=32)
    good = tmp_path / "good.pt"
    save_model(net, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated copy"):
        read_model(cut)
    with pytest.raises(InputError, match="2D model, but the images are 3D"):
        infer.load_model(3, path=good)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(InputError, match="not a napari-regtool HyperMorph"):
        read_model(foreign)
    payload = torch.load(good, weights_only=True)
    payload["state_dict"]["flow.weight"] = torch.zeros(3, 3)
    torch.save(payload, foreign)
    with pytest.raises(InputError, match="do not match"):
        read_model(foreign)
    with pytest.raises(InputError, match="not found"):
        infer.load_model(2, path=tmp_path / "missing.pt")
    # files written before models chose their input mapping take their inputs as given; an unknown mapping is refused
    payload = torch.load(good, weights_only=True)
    assert payload["config"]["intensity"] == "range"
    del payload["config"]["intensity"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    assert read_model(old).intensity == "range"
    payload["config"]["intensity"] = "log"
    torch.save(payload, foreign)
    with pytest.raises(InputError, match="cannot build"):
        read_model(foreign)


def test_equalisation_against_ranks_its_slope_limit_and_its_reference():
    """``equalise`` without a limit is the empirical distribution function (SciPy's ranks); with one, its mapping is
    increasing, never steeper than the limit (plus the spread excess), and still stretches a narrow intensity band;
    a reference restricts the histogram to chosen voxels."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(3)
    x = (0.40 + 0.05 * rng.beta(2.0, 5.0, size=(1, 1, 300, 400))).astype(np.float32)  # a narrow, skewed band
    t = torch.from_numpy(x)
    full = equalise(t, limit=1e9, bins=1024).numpy().ravel()
    ranks = (rankdata(x.ravel()) - 0.5) / x.size
    assert np.abs(full - ranks).max() < 0.01
    grid = torch.linspace(0.0, 1.0, 8193).reshape(1, 1, -1)
    for limit in (2.0, 4.0):
        f = equalise(grid, reference=t, limit=limit, bins=256).numpy().ravel()
        slope = np.diff(f) / np.diff(grid.numpy().ravel())
        assert slope.min() >= 0 and f[0] == 0.0 and abs(f[-1] - 1.0) < 1e-6
        assert slope.max() <= limit + 1.0, (limit, slope.max())
        y = equalise(t, limit=limit).numpy()
        spread = np.percentile(y, 99) - np.percentile(y, 1)
        assert spread > 0.8 * limit * (np.percentile(x, 99) - np.percentile(x, 1)), (limit, spread)
    # padding excluded through the reference: the image's voxels map as if the padding were not there
    padded = np.zeros((1, 1, 300, 500), np.float32)
    padded[..., :400] = x
    inside = torch.from_numpy(padded[..., :400].reshape(1, 1, -1))
    with_ref = equalise(torch.from_numpy(padded), reference=inside).numpy()[..., :400]
    np.testing.assert_allclose(with_ref, equalise(t).numpy(), atol=1e-6)
    assert np.abs(equalise(torch.from_numpy(padded)).numpy()[..., :400] - with_ref).max() > 1e-3
    with pytest.raises(ValueError, match="reference holds"):
        equalise(torch.from_numpy(padded), reference=inside.expand(2, 1, -1))


def test_bad_images_give_clear_errors(monkeypatch):
    net = HyperMorphModel(ndim=2, enc=(4, 8, 8), dec=(8,), final=4, work_size=32)
    sp = Space((40, 40), [1, 1])
    rng = np.random.default_rng(0)
    img = Image(rng.random((40, 40), np.float32), sp, "img")
    small = Image(rng.random((MIN_SIZE - 1, 40), np.float32), Space((MIN_SIZE - 1, 40), [1, 1]), "small")
    with pytest.raises(InputError, match=f"at least {MIN_SIZE} voxels"):
        DeepRegistration(img, small, model=net)
    with pytest.raises(InputError, match="constant"):
        DeepRegistration(img, Image(np.full((40, 40), 3.0, np.float32), sp, "flat"), model=net)
    nan = rng.random((40, 40)).astype(np.float32)
    nan[3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        DeepRegistration(Image(nan, sp, "nan"), img, model=net)
    vol = Image(rng.random((20, 20, 20), np.float32), Space((20, 20, 20), [1, 1, 1]), "vol")
    with pytest.raises(InputError, match="same dimension"):
        DeepRegistration(img, vol, model=net)
    monkeypatch.setattr(infer, "WEIGHTS_DIR", Path("/nonexistent"))
    with pytest.raises(InputError, match="No 3D deep model is available"):
        DeepRegistration(vol, vol)
    with pytest.raises(InputError, match="between 0 and 1"):
        DeepRegistration(img, img, model=net).predict(1.5)


# ---------------------------------------------------------------------------- shipped weights, real data
def test_identical_images_give_a_near_zero_field(pair2d):
    _need_weights(2)
    f, m = pair2d[0], pair2d[1]
    copy = f.with_array(f.array, name="copy")
    # the default, symmetric inference gives exactly the identity by construction (v = (v_fm − v_mf) / 2) …
    tx = DeepRegistration(f, copy).predict(DEFAULT_REG_WEIGHT)
    assert float(tx.u.norm(dim=-1).max()) == 0.0
    # … which hides what the network itself does: one-directional, its field on identical images must still be
    # small next to the field it finds on a real pair (measured: 0.60 mm vs 3.9 mm mean with the single-pass model;
    # 1.22 mm vs 7.5 mm with the 3-pass cascade after 7 GPU minutes: each pass adds its own small drift)
    raw_same = DeepRegistration(f, copy, symmetric=False).predict(DEFAULT_REG_WEIGHT).u.norm(dim=-1)
    raw_pair = DeepRegistration(f, m, symmetric=False).predict(DEFAULT_REG_WEIGHT).u.norm(dim=-1)
    assert float(raw_same.mean()) < 0.25 * float(raw_pair.mean())
    assert float(raw_same.mean()) < 1.5 * float(f.space.spacing.min())


@torch.no_grad()
def test_swapping_the_images_negates_each_step_and_inverts_the_map(pair2d):
    """Symmetric inference: each pass's velocity is v(fixed, moving) = −v(moving, fixed); a single pass gives two
    maps that are exact inverses, and the whole cascade two maps that compose to nearly the identity."""
    _need_weights(2)
    f = pair2d[0]
    rng = np.random.default_rng(1)
    shifted = f.with_array(np.roll(f.scalar(), (3, -2), axis=(0, 1)) + rng.normal(0, 2, f.space.shape).astype(np.float32))
    fwd, bwd = DeepRegistration(f, shifted), DeepRegistration(shifted, f)
    one = [r.model.register(r.x[:, :1], r.x[:, 1:], DEFAULT_REG_WEIGHT, passes=1, symmetric=True)["velocities"][0]
           for r in (fwd, bwd)]
    assert float(one[0].abs().max()) > 0.5  # a real displacement was found (half-grid voxels) …
    assert torch.allclose(one[0], -one[1], atol=1e-5)  # … and it is antisymmetric (by construction)
    # the whole cascade: x ↦ x + a(x) then y ↦ y + b(y) returns to x, up to interpolation and the network's own
    # disagreement, far below the displacement itself (measured against the 3 px roll)
    a, b = fwd.network(DEFAULT_REG_WEIGHT)[0], bwd.network(DEFAULT_REG_WEIGHT)[0]
    from napari_regtool.transforms.field import warp

    loop = a + warp(b, a)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert float(loop[inner].norm(dim=1).mean()) < 0.2 * float(a[inner].norm(dim=1).mean())
    # the network's two directions agree on their own, too: the one-directional first steps roughly negate
    raw = [r.model.register(r.x[:, :1], r.x[:, 1:], DEFAULT_REG_WEIGHT, passes=1)["velocities"][0]
           for r in (DeepRegistration(f, shifted, symmetric=False), DeepRegistration(shifted, f, symmetric=False))]
    assert float((raw[0] + raw[1]).abs().mean()) < 0.5 * float(raw[0].abs().mean())


def test_larger_lambda_gives_smoother_fields_and_fewer_folds(reg2d):
    lams = [0.0, 0.1, 0.3, 0.5, 0.8, 1.0]
    smooth, folds, sdlogj = [], [], []
    for lam in lams:
        tx = reg2d.predict(lam)
        aff = reg2d._affine
        deform = DisplacementFieldTransform(tx.u - aff.field(tx.space), tx.space)  # the deformable part
        smooth.append(_smoothness(deform))
        st = qc.jacobian_stats(jacobian_determinant(tx.u.double(), tx.space) / np.linalg.det(aff.matrix))
        folds.append(st["folding_percent"])
        sdlogj.append(st["std_log_jacobian"])
    assert all(a > b for a, b in zip(smooth, smooth[1:])), smooth
    assert all(a >= b for a, b in zip(folds, folds[1:])), folds
    assert sdlogj[0] > sdlogj[-1]
    assert smooth[-1] < 0.05 * smooth[0]  # measured 0.034 (cascade, 7 GPU minutes); 0.01 single pass


def test_shipped_2d_model_beats_the_affine_prealignment_on_real_labels(pair2d, reg2d):
    f, m, fl, ml, aff, _ = pair2d
    tx = reg2d.predict(DEFAULT_REG_WEIGHT)
    d_aff = qc.dice(fl.array, _warp_labels(ml, aff, f.space))["mean"]
    d_deep = qc.dice(fl.array, _warp_labels(ml, tx, f.space))["mean"]
    assert d_deep > d_aff + 0.08, (d_aff, d_deep)
    n_aff = qc.ncc(f.scalar(), _warp(m, aff, f.space))
    n_deep = qc.ncc(f.scalar(), _warp(m, tx, f.space))
    assert n_deep > n_aff + 0.02
    # the landmarks are exact correspondences of the known warp: an independent error measure
    lf, lm = pair2d[5]
    assert qc.tre(tx, lf, lm).mean() < 0.75 * qc.tre(aff, lf, lm).mean()
    det = jacobian_determinant(tx.u.double(), f.space)
    assert qc.jacobian_stats(det)["folding_percent"] == 0.0


def test_composition_with_an_initial_transform_is_exact(pair2d):
    """moving = fixed seen through a known rotation R. With R as ``initial`` the pre-aligned moving image is the
    fixed image again, so the result must be ``x ↦ R(x + u(x))`` with ``u`` the field the model gives for the
    identical pair — checked against that closed form, and against R itself up to the size of ``u``."""
    _need_weights(2)
    f = pair2d[0]
    lo, hi = f.space.physical_bounds()
    c = (lo + hi) / 2
    a = np.array([[np.cos(0.2), -np.sin(0.2)], [np.sin(0.2), np.cos(0.2)]])
    rot = AffineTransform(a, c - a @ c + np.array([5.0, -3.0]))
    mspace = Space((230, 230), [0.9, 0.9], rot.map_points(c)[0] - 0.9 * 114.5, None)
    moving = Image(resample(f.scalar(), f.space, rot.inverse(), mspace).numpy(), mspace, "rotated")
    tx = DeepRegistration(f, moving, initial=rot).predict(DEFAULT_REG_WEIGHT)
    u_same = DeepRegistration(f, f.with_array(f.array)).predict(DEFAULT_REG_WEIGHT).u
    expected = rot.field(f.space) + u_same @ torch.as_tensor(a, dtype=torch.float32).T
    err = (tx.u - expected).norm(dim=-1)
    # mm, 1 mm voxels; the network's answer to the resampling blur of the pre-aligned image (measured with the
    # cascade: 0.053 mean, 0.31 max)
    assert float(err.mean()) < 0.06 and float(err.max()) < 0.4
    pts = np.array([[0.0, 0.0], [20.0, -30.0]])
    bound = float(u_same.norm(dim=-1).max()) + 0.5
    assert np.all(np.linalg.norm(tx.map_points(pts) - rot.map_points(pts), axis=1) < bound)


def test_exported_field_reproduces_the_warp_in_simpleitk(pair2d, reg2d):
    import SimpleITK as sitk

    f, m = pair2d[0], pair2d[1]
    tx = reg2d.predict(DEFAULT_REG_WEIGHT)
    sitk_tx = field_to_sitk_transform(tx.u.double().numpy(), f.space)
    ref = image_to_sitk(f.scalar(), f.space)
    mov = sitk.Cast(image_to_sitk(m.scalar(), m.space), sitk.sitkFloat32)
    out = sitk.GetArrayFromImage(sitk.Resample(mov, ref, sitk_tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    ours = _warp(m, tx, f.space)
    rng = float(m.scalar().max() - m.scalar().min())
    assert np.abs(out - ours).max() < 1e-3 * rng
    # and it is not trivially the identity warp
    assert np.abs(ours - _warp(m, AffineTransform(np.eye(2), np.zeros(2)), f.space)).max() > 0.1 * rng


def test_uncertainty_map_is_physical_and_lower_on_edges(pair2d, reg2d):
    f = pair2d[0]
    tx = reg2d.predict(DEFAULT_REG_WEIGHT, uncertainty=True)
    unc = tx.uncertainty.numpy()
    assert unc.shape == f.space.shape and np.all(np.isfinite(unc)) and unc.min() > 0
    # physical units: the same pair on a grid with every spacing doubled gives twice the uncertainty
    big = Space(f.space.shape, 2 * f.space.spacing, f.space.origin, f.space.direction)
    f2 = Image(f.array, big, "f2")
    m2 = Image(f.array, big, "m2")
    unc2 = DeepRegistration(f2, m2).predict(DEFAULT_REG_WEIGHT, uncertainty=True).uncertainty.numpy()
    unc1 = DeepRegistration(f, f.with_array(f.array)).predict(DEFAULT_REG_WEIGHT, uncertainty=True).uncertainty.numpy()
    assert np.allclose(unc2, 2 * unc1, rtol=1e-3)
    # edges pin the correspondence down: less uncertain than flat regions
    a = f.scalar()
    g = np.hypot(*np.gradient(a / a.max()))
    edges, flat = g > np.percentile(g, 90), g < np.percentile(g, 30)
    assert np.median(unc[flat]) > 1.1 * np.median(unc[edges]), (np.median(unc[flat]), np.median(unc[edges]))


def test_refinement_improves_similarity_and_honours_landmarks(pair2d, reg2d):
    f, m, fl, ml, aff, (lf, lm) = pair2d
    single = reg2d.predict(DEFAULT_REG_WEIGHT)
    fine = reg2d.refine(DEFAULT_REG_WEIGHT, steps=40)
    fs = f.scalar()
    assert qc.lncc(fs, _warp(m, fine, f.space)) > qc.lncc(fs, _warp(m, single, f.space)) + 0.05
    assert fine.refine_info["lncc_after"] > fine.refine_info["lncc_before"]
    det = jacobian_determinant(fine.u.double(), f.space)
    assert qc.jacobian_stats(det)["folding_percent"] < 0.1
    with_lm = reg2d.refine(DEFAULT_REG_WEIGHT, steps=40, landmarks=(lf, lm), landmark_weight=0.5)
    assert qc.tre(with_lm, lf, lm).mean() < 0.5 * qc.tre(fine, lf, lm).mean()
    assert qc.tre(with_lm, lf, lm).max() < 0.5  # mm


def test_refinement_levels_progress_and_start(pair2d, reg2d):
    """Refinement spreads its steps over the pyramid (coarsest first, most on the finest level: 6:14:30), reports
    progress across all levels, starts from the network's field (its "before" is the single pass's similarity)
    and ends on the fixed grid."""
    f, m, *_ = pair2d
    seen = []
    single = reg2d.predict(DEFAULT_REG_WEIGHT)
    tx = reg2d.refine(DEFAULT_REG_WEIGHT, steps=40, progress=lambda p, msg: seen.append(p))
    info = tx.refine_info
    assert [lv["iterations"] for lv in info["levels"]] == [4, 11, 25]  # 40 · (6, 14, 30) / 50, remainder last
    assert [lv["grid"] for lv in info["levels"]][-1] == list(f.space.shape)
    assert np.all(np.diff(seen) >= 0) and seen[-1] == pytest.approx(1.0)
    fs = f.scalar()
    assert qc.lncc(fs, _warp(m, tx, f.space)) > qc.lncc(fs, _warp(m, single, f.space)) + 0.05
    # zero steps: the network's own field back (the start is its prediction with the pyramid, not the identity)
    same = reg2d.refine(DEFAULT_REG_WEIGHT, steps=0)
    start = reg2d.predict(DEFAULT_REG_WEIGHT, pyramid=True)
    assert float((same.u - start.u).abs().max()) < 1e-3 * float(start.u.abs().max())
    assert float((start.u - single.u).abs().max()) > 0.1  # (and that is not the cascade's field alone)
    for steps in (1, 2, 5):
        lv = reg2d.refine(DEFAULT_REG_WEIGHT, steps=steps).refine_info["levels"]
        assert sum(x["iterations"] for x in lv) == steps and lv[-1]["iterations"] >= 1


def test_register_deep_reports_and_cancels(pair2d):
    _need_weights(2)
    f, m, *_ = pair2d
    seen = []
    tx, info = register_deep(f, m, progress=lambda p, msg: seen.append(p))
    assert isinstance(tx, DisplacementFieldTransform) and tx.kind == "deep" and tx.space == f.space
    assert {"runtime_s", "device", "model", "reg_weight"} <= set(info)
    assert info["model"]["ndim"] == 2 and info["model"]["trained_steps"] > 0
    assert seen[0] == 0.0 and seen[-1] == 1.0
    with pytest.raises(Cancelled):
        register_deep(f, m, refine_steps=20, cancel=lambda: len(seen) > 10 or seen.append(0) is None and False)


def test_shipped_3d_model_on_the_real_volume_pair():
    _need_weights(3)
    f, m, fl, ml, aff, _ = _sample_pair("brain3d")
    tx, info = register_deep(f, m, initial=aff, uncertainty=True)
    assert tx.u.shape == (*f.space.shape, 3) and tx.uncertainty.shape == f.space.shape
    d_aff = qc.dice(fl.array, _warp_labels(ml, aff, f.space))["mean"]
    d_deep = qc.dice(fl.array, _warp_labels(ml, tx, f.space))["mean"]
    assert d_deep > d_aff + 0.04, (d_aff, d_deep)
    det = jacobian_determinant(tx.u.double(), f.space)
    assert qc.jacobian_stats(det)["folding_percent"] < 0.05


def test_pyramid_recovers_a_known_warp_far_better_than_the_working_grid_alone():
    """A real 2D image (the brain sample, upsampled to 512²) through a known smooth warp of up to ~8 px: the network
    on its 128² grid alone cannot resolve better than a few of its voxels; the pyramid (256², 512²) must, against
    the true displacement (built with SciPy, not with this package)."""
    _need_weights(2)
    from scipy import ndimage

    f = _sample_pair("brain2d")[0]
    a = ndimage.zoom(f.scalar().astype(np.float64), 512 / max(f.space.shape), order=3)
    ny, nx = a.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    ux = 6.0 * np.sin(2 * np.pi * yy / ny) * np.cos(np.pi * xx / nx)
    uy = 5.0 * np.cos(2 * np.pi * xx / nx) * np.sin(np.pi * yy / ny)
    moving = ndimage.map_coordinates(a, [yy - uy, xx - ux], order=3, mode="nearest")  # moving(x + u(x)) ≈ fixed(x)
    # the truth for fixed → moving: x ↦ x + u(x) lands on the same content, up to the inverse's second order
    sp = Space(a.shape, [1.0, 1.0])
    fi, mi = Image(a.astype(np.float32), sp, "f"), Image(moving.astype(np.float32), sp, "m")
    inner = (slice(32, -32), slice(32, -32))
    mask = (a > np.percentile(a, 40))[inner]
    errs = {}
    for pyr in (False, True):
        tx = DeepRegistration(fi, mi, pyramid=pyr).predict(DEFAULT_REG_WEIGHT)
        u = tx.u.numpy()
        # truth of the map x ↦ x + t(x) with moving(x + t(x)) = fixed(x): t solves t(x) = u(x + t(x))
        tx_, ty_ = ux.copy(), uy.copy()
        for _ in range(20):
            tx_ = ndimage.map_coordinates(ux, [yy + ty_, xx + tx_], order=1, mode="nearest")
            ty_ = ndimage.map_coordinates(uy, [yy + ty_, xx + tx_], order=1, mode="nearest")
        e = np.hypot(u[..., 0] - tx_, u[..., 1] - ty_)[inner][mask]
        errs[pyr] = float(np.median(e))
    print("median end-point error (px), working grid alone vs pyramid:", errs)
    assert errs[True] < 1.0 and errs[True] < 0.6 * errs[False], errs


def test_shipped_3d_model_recovers_a_translation_along_every_axis():
    """The real sample volume shifted by 2 voxels along each array axis (SciPy): the network alone (working grid,
    no pyramid) must find most of each shift, along the right axis. The shipped 3D weights' own z output never
    learned (inflated from 2D kernels): without ``z_from_swap`` the z shift comes back at about a tenth."""
    _need_weights(3)
    from scipy import ndimage

    f = _sample_pair("brain3d")[0]
    a = f.scalar().astype(np.float32)
    inside = a > np.percentile(a, 50)
    sp = f.space
    recovered = []
    for axis in range(3):  # array axes z, y, x
        shift = [0.0, 0.0, 0.0]
        shift[axis] = 2.0
        moved = ndimage.shift(a, shift, order=1, mode="nearest")  # moved(i + s) = a(i): fixed → moving is x ↦ x + s
        step = np.zeros(3)
        step[2 - axis] = 2.0  # the same shift in ITK index order (x, y, z)
        truth = sp.index_to_physical_matrix @ step  # physical, x, y, z
        u = DeepRegistration(f, f.with_array(moved)).predict(DEFAULT_REG_WEIGHT).u.numpy()[inside].mean(0)
        along = float(u @ truth / (truth @ truth))
        across = float(np.linalg.norm(u - along * truth) / np.linalg.norm(truth))
        recovered.append((round(along, 2), round(across, 2)))
    print("fraction of the shift found along / across it, array axes z, y, x:", recovered)
    assert all(0.6 < along < 1.3 and across < 0.25 for along, across in recovered), recovered


def test_a_thin_stack_of_ten_slices_is_registered():
    """Ten slices of the sample volume, four times as far apart as its pixels (a thin microscopy-like stack), shifted
    in plane (SciPy): the deep model, which resamples onto its own isotropic grid, takes the stack and finds the
    shift within a third of a pixel (median over the brighter half)."""
    _need_weights(3)
    from scipy import ndimage

    f = _sample_pair("brain3d")[0]
    a = np.ascontiguousarray(f.scalar()[30:40].astype(np.float32))
    sp = f.space
    space = Space(a.shape, (sp.spacing[0], sp.spacing[1], 4 * sp.spacing[2]), sp.origin, sp.direction)
    stack = Image(a, space, "stack")
    moved = ndimage.shift(a, (0.0, 2.0, -1.5), order=1, mode="nearest")  # fixed → moving: index x ↦ x + (−1.5, 2, 0)
    tx, _ = register_deep(stack, stack.with_array(moved))
    idx = np.argwhere(a > np.percentile(a, 50))[::5][:, ::-1].astype(float)
    want = space.index_to_physical(idx + np.array([-1.5, 2.0, 0.0]))
    err = np.linalg.norm(tx.map_points(space.index_to_physical(idx)) - want, axis=1) / sp.spacing[0]
    assert np.median(err) < 1 / 3, np.median(err)


def test_z_from_swap_is_exactly_equivariant_and_only_for_3d(tmp_path):
    """With ``z_from_swap`` the velocity of the z ↔ x swapped volume is the swapped velocity (x and z components
    exchanged), to float rounding, whatever the weights; the setting travels in the weight file and training
    turns it off."""
    torch.manual_seed(0)
    net = HyperMorphModel(ndim=3, enc=(4, 8, 8), dec=(8,), final=4, work_size=32, z_from_swap=True).eval()
    for p in list(net.flow.parameters()) + list(net.logvar[-1].parameters()):
        torch.nn.init.normal_(p, 0.0, 0.1)  # the heads start near zero: make the test see something
    x = torch.rand(1, 2, 16, 32, 48)
    with torch.no_grad():
        a, la = net(x, 0.3)
        b, lb = net(x.transpose(2, 4), 0.3)
    swap = [2, 1, 0]
    assert a.abs().max() > 0.1
    assert torch.allclose(a, b.transpose(2, 4)[:, swap], atol=1e-6)
    assert torch.allclose(la, lb.transpose(2, 4)[:, swap], atol=1e-6)
    net.z_from_swap = False  # the plain network has no such symmetry
    with torch.no_grad():
        a0, _ = net(x, 0.3)
        b0, _ = net(x.transpose(2, 4), 0.3)
    assert not torch.allclose(a0, b0.transpose(2, 4)[:, swap], atol=1e-3)
    net.z_from_swap = True
    path = tmp_path / "swap.pt"
    save_model(net, path)
    assert read_model(path).z_from_swap
    with pytest.raises(ValueError, match="3D models only"):
        HyperMorphModel(ndim=2, enc=(4, 8, 8), dec=(8,), final=4, work_size=32, z_from_swap=True)
    payload = torch.load(path, weights_only=True)
    payload["config"]["z_from_swap"] = "yes"
    torch.save(payload, path)
    with pytest.raises(InputError, match="cannot build"):
        read_model(path)
    # resuming a checkpoint with the setting trains the network's own z output, and says so
    out = tmp_path / "t.pt"
    cfg = TrainConfig(ndim=3, steps=1, size=32, batch=1, out=str(out), enc=(4, 8, 8), dec=(8,), warmup=0.0)
    train(cfg, log=lambda m: None)
    ckpt = tmp_path / "t.pt.ckpt"
    payload = torch.load(ckpt, weights_only=False)
    payload["config"]["z_from_swap"] = True
    torch.save(payload, ckpt)
    logs = []
    cfg.steps, cfg.resume = 2, True
    train(cfg, log=logs.append)
    assert any("to teach the network's own z output" in line for line in logs)
    assert not read_model(out).z_from_swap and read_model(out).meta["steps"] == 2


def test_distilling_the_z_output_from_the_swapped_run(tmp_path):
    """``distil_swap`` pulls the plain network's first-pass velocity toward a frozen teacher's answer with
    ``z_from_swap``; a few steps on that term alone lower it, and it refuses to run without such a teacher."""
    import copy

    torch.manual_seed(0)
    net = HyperMorphModel(ndim=3, enc=(4, 8, 8), dec=(8,), final=4, work_size=32)
    for p in net.flow.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    teacher.z_from_swap = True
    batch = synth_pair(2, torch.Generator().manual_seed(1), SynthConfig(shape=(32, 32, 32)))
    lam = torch.full((2,), 0.2)
    with pytest.raises(ValueError, match="frozen teacher"):
        loss_terms(net, batch, lam, distil_swap=1.0)
    first = float(loss_terms(net, batch, lam, distil_swap=1.0, teacher=teacher)["distil"].detach())
    assert first > 0
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        loss_terms(net, batch, lam, distil_swap=1.0, teacher=teacher)["distil"].backward()
        opt.step()
    assert float(loss_terms(net, batch, lam, distil_swap=1.0, teacher=teacher)["distil"].detach()) < 0.5 * first
    # through train(): the run records the term and its teacher; 2D models refuse it
    out = tmp_path / "d.pt"
    logs = []
    train(TrainConfig(ndim=3, steps=2, size=32, batch=1, out=str(out), enc=(4, 8, 8), dec=(8,), warmup=0.0,
                      distil_swap=1.0), log=logs.append)
    meta = read_model(out).meta
    assert meta["distil_swap"] == 1.0 and meta["distil_teacher_step"] == 0 and "--distil-swap 1" in meta["command"]
    assert any("frozen copy of the model at step 0" in line for line in logs)
    with pytest.raises(InputError, match="does not apply to 2D"):
        train(TrainConfig(ndim=2, steps=1, size=32, batch=1, out=str(tmp_path / "e.pt"), enc=(4, 8, 8), dec=(8,),
                          distil_swap=1.0))


def test_refinement_keeps_its_iterations_on_small_images():
    """On an image too small to halve twice the refinement still runs every level (an axis is halved only down to
    the optimiser's smallest size) and the iterations asked for, and reports the number it ran; on an image of that
    smallest size the coarse levels go and their share goes to the remaining one (the optimiser alone: the network
    needs more). The split itself handles 0–2 steps and refuses impossible level counts."""
    from napari_regtool.deep.refine import split_iterations

    assert split_iterations(0) == (0, 0, 0) and split_iterations(1) == (0, 0, 1) and split_iterations(2) == (0, 0, 2)
    assert split_iterations(50, 2) == (15, 35) and split_iterations(50, 1) == (50,)
    with pytest.raises(InputError, match="1 to 3 levels"):
        split_iterations(50, 4)
    rng = np.random.default_rng(0)
    from scipy import ndimage

    a = ndimage.gaussian_filter(rng.random((24, 24)), 2).astype(np.float32)
    sp = Space(a.shape, [1.0, 1.0])
    f = Image(a, sp, "f")
    m = Image(np.roll(a, 1, axis=1), sp, "m")
    tx = DeepRegistration(f, m).refine(DEFAULT_REG_WEIGHT, steps=50)
    levels = tx.refine_info["levels"]
    assert [lv["grid"] for lv in levels] == [[8, 8], [12, 12], [24, 24]]
    assert [lv["iterations"] for lv in levels] == list(split_iterations(50)) and tx.refine_info["steps"] == 50
    from napari_regtool.deformable import MIN_SIZE, register_deformable

    small = Image(a[:MIN_SIZE, :MIN_SIZE], Space((MIN_SIZE, MIN_SIZE), [1.0, 1.0]), "f")
    tx = register_deformable(small, small, iterations=split_iterations(50), keep_total=True)
    assert [lv["grid"] for lv in tx.refine_info["levels"]] == [[MIN_SIZE, MIN_SIZE]]
    assert tx.refine_info["iterations"] == [50]
