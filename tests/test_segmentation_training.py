"""Networks, training data, augmentation, training, checkpoints and fine-tuning."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import tifffile
import torch

from atlasbuilder.errors import InputError, InvalidImageError, MissingFileError
from atlasbuilder.segmentation.data import (
    IGNORE,
    Augmentation,
    PatchSampler,
    augment,
    check_sections,
    context_input,
    grid_window,
    hemisphere_swap,
    mirror,
    overview_canvas,
)
from atlasbuilder.segmentation.networks import UNet, resize, resize_matrix
from atlasbuilder.segmentation.prediction import open_prediction, predict_array, predict_file
from atlasbuilder.segmentation.training import (
    ModelEnsemble,
    SegmentationModel,
    TrainingConfig,
    _loss,
    dice_scores,
    load_checkpoint,
    save_checkpoint,
    train,
)

torch.set_num_threads(1)

MAPPING = {0: "background", 10: "area A", 20: "area B", 255: None}
CLASSES = ["background", "area A", "area B"]


def toy_brain(n: int = 4, size: int = 48, seed: int = 0):
    """Sections with a bright disc split into a left (area A, stripes) and right (area B, dots) half;
    255 = not annotated in a corner."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        yy, xx = np.mgrid[0:size, 0:size]
        cy, cx = size / 2 + rng.normal(0, 2, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.4 * size) ** 2
        left = xx < cx
        img = np.full((size, size), 230.0)
        img[disc & left] = 100 + 40 * np.sin(yy[disc & left] / 1.5)
        img[disc & ~left] = 100 + 40 * ((yy[disc & ~left] % 4 < 2) & (xx[disc & ~left] % 4 < 2))
        img += rng.normal(0, 5, img.shape)
        lab = np.where(disc, np.where(left, 10, 20), 0).astype(np.uint8)
        lab[:4, :4] = 255
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(lab)
    return images, labels


FAST = TrainingConfig(patch_size=16, batch_size=4, max_iterations=12, eval_every=6, width=4, depth=2,
                      context_size=8, learning_rate=1e-2)


# -------------------------------------------------------------------------------------------------
# networks


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("depth", [1, 3])
def test_unet_shapes_for_any_size(norm, depth):
    net = UNet(2, 5, depth=depth, width=4, norm=norm, dropout=0.1).eval()
    for h, w in [(37, 50), (8, 8), (3, 5), (64, 33)]:
        assert net(torch.randn(2, 2, h, w)).shape == (2, 5, h, w)


def test_unet_context_branch():
    net = UNet(1, 3, depth=3, width=4, context_channels=3, context_size=16).eval()
    out = net(torch.randn(2, 1, 24, 24), torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 3, 24, 24)
    # the context changes the output: it is used
    assert not torch.allclose(out, net(torch.randn(2, 1, 24, 24) * 0 + 0, torch.randn(2, 3, 16, 16)))
    with pytest.raises(InputError, match="context"):
        net(torch.randn(1, 1, 24, 24))
    with pytest.raises(InputError, match="norm"):
        UNet(1, 2, norm="layer")
    with pytest.raises(InputError, match="depth"):
        UNet(1, 2, depth=0)


@pytest.mark.parametrize("mode,align_corners", [("bilinear", False), ("bicubic", True), ("bicubic", False)])
def test_resize_is_interpolate_forwards_and_backwards(mode, align_corners):
    """The U-Net's and the augmentation's resizes, two matrix products on the CPU: the values and
    the gradients of ``interpolate``, up and down, odd sizes, one-pixel axes, the same size."""
    g = torch.Generator().manual_seed(0)
    for (h, w), size in [((32, 32), (128, 128)), ((4, 4), (128, 128)), ((5, 7), (10, 14)), ((1, 3), (4, 11)),
                         ((9, 9), (9, 9)), ((12, 10), (5, 3))]:
        x = torch.randn(2, 3, h, w, generator=g, requires_grad=True)
        ref = torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=align_corners)
        got = resize(x, size, mode, align_corners)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
        up = torch.randn(ref.shape, generator=g)
        (want,) = torch.autograd.grad(ref, x, up)
        (have,) = torch.autograd.grad(got, x, up)
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)  # float32 sums of up to 32 x 32 terms
        # predicting (no gradient) and large sizes: interpolate itself, bit for bit
        assert torch.equal(resize(x.detach(), size, mode, align_corners),
                           torch.nn.functional.interpolate(x.detach(), size=size, mode=mode,
                                                           align_corners=align_corners))
    big = torch.randn(1, 1, 70, 80, requires_grad=True)
    assert torch.equal(resize(big, (280, 320), mode, align_corners),
                       torch.nn.functional.interpolate(big, size=(280, 320), mode=mode,
                                                       align_corners=align_corners))
    m = resize_matrix(4, 9, mode, align_corners)
    assert m.shape == (9, 4) and m is resize_matrix(4, 9, mode, align_corners)  # cached
    torch.testing.assert_close(m.sum(1), torch.ones(9))  # weights of a resize sum to one


def test_loss_is_cross_entropy_plus_the_soft_dice_of_the_classes_present():
    """Against the definition with a one-hot target: values and gradients; ignored pixels count
    nowhere; a class absent from the batch adds nothing to the Dice term."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 5, 17, 9, generator=g) * 3).requires_grad_(True)
    target = torch.randint(0, 5, (3, 17, 9), generator=g)
    target[target == 3] = 0  # class 3 absent
    target[:, :2] = IGNORE

    def reference(lg, t, w):
        ce = torch.nn.functional.cross_entropy(lg, t, ignore_index=IGNORE)
        valid = (t != IGNORE)[:, None].float()
        prob = torch.softmax(lg, 1) * valid
        onehot = torch.nn.functional.one_hot(t.clamp_min(0), lg.shape[1]).permute(0, 3, 1, 2) * valid
        inter = (prob * onehot).sum((0, 2, 3))
        dice = (2 * inter + 1) / (prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
        return ce + w * (1 - dice[onehot.sum((0, 2, 3)) > 0].mean())

    for w in (0.0, 0.5, 2.0):
        want = reference(logits, target, w)
        have = _loss(logits, target, w)
        torch.testing.assert_close(have, want, atol=1e-6, rtol=1e-6)
        (gw,) = torch.autograd.grad(want, logits)
        (gh,) = torch.autograd.grad(have, logits)
        torch.testing.assert_close(gh, gw, atol=1e-8, rtol=1e-5)
    # an ignored pixel's logits do not matter; w 0 is the cross-entropy alone
    moved = logits.detach().clone()
    moved[:, :, :2] += 5
    torch.testing.assert_close(_loss(moved, target, 0.5), _loss(logits.detach(), target, 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loss_on_a_gpu_is_the_loss_on_the_cpu():
    """On a GPU the own class's probability comes from a one-hot target, not a gather."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 16, 12, generator=g) * 3
    target = torch.randint(0, 4, (2, 16, 12), generator=g)
    target[:, :3] = IGNORE
    cpu = logits.clone().requires_grad_(True)
    gpu = logits.cuda().requires_grad_(True)
    lc, lg = _loss(cpu, target, 0.5), _loss(gpu, target.cuda(), 0.5)
    torch.testing.assert_close(lg.cpu(), lc.detach(), atol=1e-5, rtol=1e-5)
    (gc,) = torch.autograd.grad(lc, cpu)
    (gg,) = torch.autograd.grad(lg, gpu)
    torch.testing.assert_close(gg.cpu(), gc, atol=1e-6, rtol=1e-4)


# -------------------------------------------------------------------------------------------------
# data


def test_check_sections_maps_labels_and_names_bad_input():
    images, labels = toy_brain(2)
    secs = check_sections(images, labels, MAPPING, CLASSES, names=["a.tif", "b.tif"])
    assert secs[0].image.shape == (1, 48, 48) and secs[0].image.dtype == np.float32
    assert set(np.unique(secs[0].target)) == {IGNORE, 0, 1, 2}
    bad = labels[1].copy()
    bad[10, 10] = 7
    with pytest.raises(InputError, match=r"b\.tif.*\[7\].*not in the label mapping"):
        check_sections(images, [labels[0], bad], MAPPING, CLASSES, names=["a.tif", "b.tif"])
    with pytest.raises(InvalidImageError, match=r"b\.tif.*annotation has shape \(48, 47\)"):
        check_sections(images, [labels[0], labels[1][:, :47]], MAPPING, CLASSES, names=["a.tif", "b.tif"])
    with pytest.raises(InvalidImageError, match=r"b\.tif.*constant"):
        check_sections([images[0], np.zeros_like(images[1])], labels, MAPPING, CLASSES,
                       names=["a.tif", "b.tif"])
    with pytest.raises(InvalidImageError, match="empty"):
        check_sections([np.zeros((0, 4))], [np.zeros((0, 4))], MAPPING, CLASSES)
    with pytest.raises(InvalidImageError, match="channels"):
        check_sections([images[0], np.stack([images[1]] * 2)], labels, MAPPING, CLASSES)
    with pytest.raises(InputError, match="pair up"):
        check_sections(images, labels[:1], MAPPING, CLASSES)
    with pytest.raises(InputError, match="not in the class list"):
        train(images, labels, {**MAPPING, 30: "area C"}, classes=CLASSES, config=FAST)


def test_patch_sampler_balances_classes_and_pads_outside():
    img = np.random.default_rng(0).random((1, 40, 50)).astype(np.float32)
    target = np.zeros((40, 50), np.int64)
    target[5, 7] = 2  # one pixel of class 2
    target[20:30, 20:30] = 1
    secs = check_sections([img], [target], {0: "bg", 1: "a", 2: "b"}, ["bg", "a", "b"])
    sampler = PatchSampler(secs, 1, np.random.default_rng(1))
    _, tgt, which, origins = sampler.sample(3000)
    counts = np.bincount(tgt.ravel(), minlength=3) / 3000
    np.testing.assert_allclose(counts, 1 / 3, atol=0.04)
    assert (which == 0).all()
    big = PatchSampler(secs, 64, np.random.default_rng(2))  # larger than the section
    images, targets, _, origins = big.sample(5)
    assert images.shape == (5, 1, 64, 64) and targets.shape == (5, 64, 64)
    for k in range(5):
        y0, x0 = origins[k]
        inside = np.zeros((64, 64), bool)
        inside[max(0, -y0):40 - y0, max(0, -x0):50 - x0] = True
        assert (targets[k][~inside] == IGNORE).all() and (targets[k][inside] != IGNORE).all()
        np.testing.assert_array_equal(images[k][0][inside].reshape(40, 50), img[0])


def test_augmentation_keeps_image_and_labels_aligned_and_is_seeded():
    y = torch.from_numpy(np.random.default_rng(0).integers(0, 4, (6, 1, 8, 8))).repeat_interleave(4, 2)
    y = y.repeat_interleave(4, 3)[:, 0]  # blocky labels, (6, 32, 32)
    x = y[:, None].float()
    ctx = torch.zeros(6, 3, 8, 8)
    ctx[:, 2, 0, 1] = 1  # a window mark, to follow the flips
    flips_only = Augmentation(rotation_deg=0, scale=0, elastic_px=0, contrast=0, brightness=0, gamma=0,
                              noise=0)
    xa, ya, ca = augment(x, y, ctx, flips_only, torch.Generator().manual_seed(0))
    assert torch.equal(xa[:, 0], ya.float())
    assert ca is ctx  # the overview and the window's true place are never mirrored
    assert not torch.equal(xa, x)
    geometric = Augmentation(contrast=0, brightness=0, gamma=0, noise=0)
    xg, yg, _ = augment(x, y, None, geometric, torch.Generator().manual_seed(0))
    assert set(yg.unique().tolist()) <= set(y.unique().tolist())
    assert (xg[:, 0].round() == yg.float()).float().mean() > 0.85  # bilinear vs nearest, blocky labels
    full = Augmentation()
    a = augment(x, y, ctx, full, torch.Generator().manual_seed(3))
    b = augment(x, y, ctx, full, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], augment(x, y, ctx, full, torch.Generator().manual_seed(4))[0])


def test_grid_window_is_the_bilinear_value_at_each_pixel():
    """Against the definition, pixel by pixel: grid point (i, j) at pixel (i s + (s-1)/2, j s +
    (s-1)/2), bilinear between points, edge values beyond; windows inside, across and beyond the
    grid, odd sizes, one-point grids."""
    rng = np.random.default_rng(3)
    for _ in range(60):
        hc, wc = (int(v) for v in rng.integers(1, 9, 2))
        step = int(rng.integers(1, 6))
        grid = torch.from_numpy(rng.normal(size=(2, hc, wc)).astype(np.float32))
        r0, c0 = (int(v) for v in rng.integers(-12, hc * step + 12, 2))
        h, w = (int(v) for v in rng.integers(1, 14, 2))
        got = grid_window(grid, step, r0, c0, h, w)
        assert got.shape == (2, h, w)
        g = grid.numpy().astype(np.float64)
        for r in range(h):
            u = min(max((r0 + r - (step - 1) / 2) / step, 0), hc - 1)
            i = min(int(u), hc - 1)
            fi = u - i
            for c in range(w):
                v = min(max((c0 + c - (step - 1) / 2) / step, 0), wc - 1)
                j = min(int(v), wc - 1)
                fj = v - j
                i1, j1 = min(i + 1, hc - 1), min(j + 1, wc - 1)
                want = ((1 - fi) * ((1 - fj) * g[:, i, j] + fj * g[:, i, j1])
                        + fi * ((1 - fj) * g[:, i1, j] + fj * g[:, i1, j1]))
                np.testing.assert_allclose(got[:, r, c].numpy(), want, atol=1e-5)


def test_hemisphere_swap_trades_left_and_right_classes():
    classes = ["background", "hOc1_left", "hOc1_right", "hOc5_left", "gap", "x_right"]
    assert hemisphere_swap(classes) == [0, 2, 1, 3, 4, 5]  # hOc5_left and x_right have no partner


def test_mirrored_patch_is_the_patch_of_the_mirrored_section():
    """A mirrored patch, its prior planes and its context equal what the same window gives on the
    section mirrored left-right with left and right classes swapped (width a multiple of the
    overview block, so the overview mirrors exactly)."""
    from atlasbuilder.segmentation.data import block_mean

    classes = ["background", "a_left", "a_right", "b"]
    swap = hemisphere_swap(classes)
    rng = np.random.default_rng(5)
    h, w, p, size = 40, 64, 16, 16
    image = rng.normal(size=(1, h, w)).astype(np.float32)
    labels = rng.integers(-1, 4, (h, w))
    prior = rng.normal(size=(4, h, w)).astype(np.float32)  # per-pixel class scores
    m_image, m_prior = image[:, :, ::-1].copy(), prior[swap][:, :, ::-1].copy()
    m_labels = np.where(labels >= 0, np.asarray(swap)[labels.clip(0)], labels)[:, ::-1].copy()
    f = 4  # overview block: 64 / 4 = 16 columns, the whole canvas width

    def patch(img, lab, pri, r0, c0):
        x = torch.from_numpy(np.concatenate([img, pri])[:, r0:r0 + p, c0:c0 + p].copy())
        canvas = torch.from_numpy(overview_canvas(block_mean(img, f), size, (0.3,)))
        ctx = context_input(canvas, f, torch.tensor([[r0, c0]]), (p, p))
        return x, torch.from_numpy(lab[r0:r0 + p, c0:c0 + p].copy()), ctx

    origins = [(0, 0), (10, 7), (24, 48)]
    xs, ys, cs = zip(*(patch(image, labels, prior, r, c) for r, c in origins), strict=True)
    x, y, ctx = torch.stack(xs), torch.stack(ys), torch.cat(cs)
    which = torch.tensor([True, True, False])
    mx, my, mc = mirror(x, y, ctx, which, swap, widths=[w // f] * 3, bias_channels=4)
    for i, (r, c) in enumerate(origins):
        if which[i]:
            wx, wy, wc = patch(m_image, m_labels, m_prior, r, w - c - p)
        else:
            wx, wy, wc = xs[i], ys[i], cs[i]
        assert torch.equal(mx[i], wx) and torch.equal(my[i], wy) and torch.allclose(mc[i], wc[0])
    assert torch.equal(x[2], mx[2]) and not torch.equal(x[0], mx[0])  # inputs untouched
    with pytest.raises(InputError, match="mirror cannot be used with positions"):
        from atlasbuilder.segmentation.stage import StageSettings

        StageSettings(positions=True)  # mirror is on by default


def test_context_input_marks_the_window():
    canvas = torch.zeros(2, 10, 10)
    ctx = context_input(canvas, 4, torch.tensor([[0, 0], [8, 20]]), (8, 12))
    assert ctx.shape == (2, 3, 10, 10)
    assert ctx[0, 2].sum() == 2 * 3 and ctx[0, 2, :2, :3].all()
    assert ctx[1, 2, 2:4, 5:8].all() and ctx[1, 2].sum() == 6


def test_dice_scores_ignore_unannotated_pixels():
    target = np.array([[0, 1, 1, IGNORE]])
    pred = np.array([[0, 1, 0, 1]])
    assert dice_scores(pred, target, 3) == {0: 2 / 3, 1: 2 / 3}


# -------------------------------------------------------------------------------------------------
# training, determinism, checkpoints, fine-tuning


@pytest.fixture(scope="module")
def trained():
    images, labels = toy_brain(4)
    model, history = train(images, labels, MAPPING, config=FAST, seed=0, names=[f"s{i}" for i in range(4)])
    return images, labels, model, history


def test_train_returns_a_model_and_its_history(trained):
    images, _, model, history = trained
    assert model.classes == CLASSES and not model.training
    assert [h["iteration"] for h in history] == [6, 12]
    assert all(h["val_dice"] is not None and np.isfinite(h["loss"]) for h in history)
    assert model.meta["training"]["validation"] and model.meta["training"]["seed"] == 0
    out = predict_array(images[0], model, window=model.window())
    assert out.shape == (3, 48, 48) and np.isfinite(out).all()


def test_training_is_deterministic_for_a_seed(trained):
    images, labels, model, _ = trained
    state = torch.get_rng_state()
    again, _ = train(images, labels, MAPPING, config=FAST, seed=0, names=[f"s{i}" for i in range(4)])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    for (k, a), b in zip(model.net.state_dict().items(), again.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other, _ = train(images, labels, MAPPING, config=FAST, seed=1)
    assert not torch.equal(model.net.head.weight, other.net.head.weight)


def test_training_reads_no_unwritten_memory_and_restores_torch_switches(trained, monkeypatch):
    """Training turns off torch's filling of new tensors (which deterministic mode turns on): the
    weights are the same as with every new tensor filled with NaN first, and torch's switches are
    as they were afterwards."""
    import torch.utils.deterministic as det

    from atlasbuilder.segmentation import training as tr

    images, labels, model, _ = trained
    names = [f"s{i}" for i in range(4)]
    assert det.fill_uninitialized_memory and not torch.are_deterministic_algorithms_enabled()
    seen = []
    fill = tr._fill_uninitialized_memory

    def keep_filling(value=None):
        seen.append(value)
        return fill()  # reads, never sets: new tensors stay NaN-filled while training

    monkeypatch.setattr(tr, "_fill_uninitialized_memory", keep_filling)
    filled, _ = train(images, labels, MAPPING, config=FAST, seed=0, names=names)
    assert seen == [None, False, True]
    for (k, a), b in zip(model.net.state_dict().items(), filled.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert det.fill_uninitialized_memory and not torch.are_deterministic_algorithms_enabled()


def test_training_mirrors_only_classes_with_a_left_right_pair(trained):
    """With ``mirror``, a class set with a left/right pair trains on mirrored patches too (other
    weights, same seed); one without a pair trains exactly as without ``mirror``."""
    from dataclasses import replace

    images, labels, model, _ = trained
    names = [f"s{i}" for i in range(4)]
    mirrored = replace(FAST, augmentation=replace(FAST.augmentation, mirror=True))
    same, _ = train(images, labels, MAPPING, config=mirrored, seed=0, names=names)
    for (k, a), b in zip(model.net.state_dict().items(), same.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    paired = {0: "background", 10: "A_left", 20: "A_right", 255: None}
    plain, _ = train(images, labels, paired, config=FAST, seed=0, names=names)
    turned, _ = train(images, labels, paired, config=mirrored, seed=0, names=names)
    assert not torch.equal(plain.net.head.weight, turned.net.head.weight)


def test_training_learns_the_toy_problem():
    images, labels = toy_brain(5, seed=3)
    cfg = TrainingConfig(patch_size=32, batch_size=8, max_iterations=80, eval_every=40, width=8, depth=3,
                         context=False, learning_rate=1e-2, augmentation=Augmentation(elastic_px=0))
    model, _ = train(images[:4], labels[:4], MAPPING, config=cfg, validation=[3], seed=0)
    out = predict_array(images[4], model, window=model.window()).argmax(0)
    target = check_sections(images[4:], labels[4:], MAPPING, CLASSES)[0].target
    d = dice_scores(out, target, 3)
    assert min(d.values()) > 0.8, d


def test_checkpoint_round_trip_is_weights_only(tmp_path, trained):
    images, _, model, _ = trained
    path = save_checkpoint(model, tmp_path / "ckpt" / "model.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["meta"]["classes"] == CLASSES
    json.dumps(raw["meta"])  # metadata is plain JSON
    assert {"torch", "numpy"} <= set(raw["meta"]["versions"])
    assert raw["meta"]["normalisation"]["mean"] and raw["meta"]["history"]
    loaded = load_checkpoint(path, classes=CLASSES)
    a = predict_array(images[1], model, window=model.window())
    b = predict_array(images[1], loaded, window=loaded.window())
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(InputError, match=r"model\.pt.*trained for classes"):
        load_checkpoint(path, classes=["background", "area B", "area A"])
    with pytest.raises(MissingFileError):
        load_checkpoint(tmp_path / "none.pt")


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/atlasbuilder-pwned-by-checkpoint", "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_never_executes_pickled_code(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "atlasbuilder-segmentation-checkpoint/1", "meta": _Evil()}, evil)
    marker = "/tmp/atlasbuilder-pwned-by-checkpoint"
    import os

    if os.path.exists(marker):
        os.unlink(marker)
    with pytest.raises(InputError, match=r"evil\.pt.*weights_only"):
        load_checkpoint(evil)
    assert not os.path.exists(marker)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(InputError, match=r"junk\.pt"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(InputError, match="not an atlasbuilder segmentation checkpoint"):
        load_checkpoint(other)


def test_fine_tuning_from_a_checkpoint(tmp_path, trained):
    images, labels, model, _ = trained
    path = save_checkpoint(model, tmp_path / "m.pt")
    tuned, hist = train(images, labels, MAPPING, config=FAST, init=path, seed=5)
    assert tuned.classes == CLASSES and hist and tuned.meta["training"]["init"] == str(path)
    assert tuned.net.config == model.net.config
    mapping3 = {0: "background", 10: "area A", 20: "area C", 255: None}
    with pytest.raises(InputError, match=r"m\.pt.*trained for classes.*new_classes"):
        train(images, labels, mapping3, config=FAST, init=path)
    new, _ = train(images, labels, mapping3, config=FAST, init=path, new_classes=True)
    assert new.classes == ["background", "area A", "area C"]
    with pytest.raises(InputError, match="input channels"):
        train([np.stack([i, i]) for i in images], labels, MAPPING, config=FAST, init=path)


def test_segmentation_model_with_context_through_predict_file(tmp_path, trained):
    images, _, model, _ = trained
    assert model.needs_origins and model.overview_size == FAST.context_size
    tif = tmp_path / "sec.tif"
    tifffile.imwrite(tif, images[2], tile=(16, 16), compression="zlib")
    out = predict_file(tif, tmp_path / "out", model, window=model.window())
    labels, probs, attrs = open_prediction(out)
    assert attrs["classes"] == CLASSES and probs.shape == (3, 48, 48)
    expected = predict_array(images[2], model, window=model.window()).argmax(0)
    np.testing.assert_array_equal(labels[:], expected)
    fresh = SegmentationModel(UNet(1, 3, depth=2, width=4, context_channels=3, context_size=8), CLASSES,
                              [0.0], [1.0], patch_size=16)
    with pytest.raises(InputError, match="sliding-window engine"):
        fresh(torch.zeros(1, 1, 16, 16))


def test_an_ensemble_predicts_the_mean_of_its_models_scores(trained):
    images, labels, model, _ = trained
    model = copy.deepcopy(model)  # the fixture's model is shared: its normalisation is changed below
    other, _ = train(images, labels, MAPPING, config=FAST, seed=1)
    ens = ModelEnsemble([model, other])
    assert ens.classes == CLASSES and len(ens) == 2
    assert ens.needs_origins and ens.overview_size == FAST.context_size
    window = model.window()
    a, b = (predict_array(images[2], m, window=window) for m in (model, other))
    both = predict_array(images[2], ens, window=window)
    assert not np.allclose(a, b)  # another seed, another network
    # the mean of the scores, through the sliding window (blending is linear)
    np.testing.assert_allclose(both, (a + b) / 2, atol=1e-5)
    # the normalisation reaches every member
    ens.set_normalisation([100.0], [50.0])
    assert all(float(m.mean) == 100.0 and float(m.std) == 50.0 for m in (model, other))
    mixed = SegmentationModel(UNet(1, 2, depth=2, width=4), ["background", "area A"], [0.0], [1.0],
                              patch_size=16)
    with pytest.raises(InputError, match="model 2 of the ensemble has classes"):
        ModelEnsemble([model, mixed])
    with pytest.raises(InputError, match="at least one model"):
        ModelEnsemble([])


def test_overview_canvas_adds_a_plane_per_section_value():
    ov = np.ones((1, 3, 5), np.float32)
    canvas = overview_canvas(ov, 6, (0.25, 0.75))
    assert canvas.shape == (4, 6, 6)
    assert canvas[0].sum() == 15 and (canvas[1] == 0.25).all() and (canvas[2] == 0.75).all()
    assert canvas[3].sum() == 15 and canvas[3, :3, :5].all()  # the footprint stays the last plane
    np.testing.assert_array_equal(overview_canvas(ov, 6), canvas[[0, 3]])


def test_section_values_tell_apart_sections_that_look_the_same(tmp_path):
    """Two identical images, labelled area A in one and area B in the other: only the section value
    (e.g. the place along the series) tells them apart, and the trained model uses it."""
    images, labels = toy_brain(1, seed=2)
    disc = labels[0] > 0
    lab_a = np.where(disc & (labels[0] != 255), 10, labels[0]).astype(np.uint8)
    lab_b = np.where(disc & (labels[0] != 255), 20, labels[0]).astype(np.uint8)
    cfg = TrainingConfig(patch_size=16, batch_size=8, max_iterations=120, eval_every=120, width=8, depth=2,
                         context_size=8, learning_rate=1e-2, val_fraction=0.0,
                         augmentation=Augmentation(flips=False, contrast=0, brightness=0, noise=0))
    model, _ = train([images[0]] * 2, [lab_a, lab_b], MAPPING, config=cfg, section_values=[(0.0,), (1.0,)],
                     seed=0)
    assert model.section_values == 1
    target = check_sections(images, [lab_a], MAPPING, CLASSES)[0].target
    inside = target == 1
    with pytest.raises(InputError, match="set_section_values"):
        predict_array(images[0], model, window=model.window())
    model.set_section_values([0.0])
    out0 = predict_array(images[0], model, window=model.window()).argmax(0)
    model.set_section_values([1.0])
    out1 = predict_array(images[0], model, window=model.window()).argmax(0)
    assert (out0[inside] == 1).mean() > 0.9 and (out1[inside] == 2).mean() > 0.9
    # the count travels with the checkpoint; a wrong count or a missing value is refused
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "v.pt"))
    assert loaded.section_values == 1
    with pytest.raises(InputError, match="1 finite section value"):
        loaded.set_section_values([0.0, 1.0])
    with pytest.raises(InputError, match="1 finite section value"):
        loaded.set_section_values([float("nan")])
    with pytest.raises(InputError, match=r"v\.pt.*1 section value.*have 0"):
        train([images[0]] * 2, [lab_a, lab_b], MAPPING, config=cfg, init=tmp_path / "v.pt")
    with pytest.raises(InputError, match=r"s1: 2 section values, but the first section has 1"):
        check_sections([images[0]] * 2, [lab_a, lab_b], MAPPING, CLASSES, ["s0", "s1"], [(0.0,), (1.0, 2.0)])
    with pytest.raises(InputError, match="must be finite"):
        check_sections([images[0]], [lab_a], MAPPING, CLASSES, ["s0"], [(float("inf"),)])
    with pytest.raises(InputError, match="context"):
        train([images[0]] * 2, [lab_a, lab_b], MAPPING, config=TrainingConfig(context=False),
              section_values=[(0.0,), (1.0,)])


def test_training_settings_are_checked():
    with pytest.raises(InputError, match="patch_size"):
        TrainingConfig(patch_size=30, depth=3)
    with pytest.raises(InputError, match="val_fraction"):
        TrainingConfig(val_fraction=1.0)
    images, labels = toy_brain(3)
    with pytest.raises(InputError, match="validation"):
        train(images, labels, MAPPING, config=FAST, validation=[0, 1, 2])


@pytest.mark.slow
def test_smoke_on_synthetic_histology():
    histology = pytest.importorskip("atlasbuilder.synthetic.histology")
    tissue, area, keys = histology.ribbon_phantom(0.4)
    profiles = histology.profiles_for([*keys.values(), "cortex"])
    images = [histology.render_section(tissue, area, profiles, keys, 0.4, rng=s) for s in range(3)]
    labels = [np.where(tissue == 2, np.where(area > 0, area + 1, 1), np.where(tissue == 0, 0, 1))
              for _ in images]
    mapping = {0: "background", 1: "other tissue"} | {k + 1: v for k, v in keys.items()}
    cfg = TrainingConfig(patch_size=64, batch_size=8, max_iterations=60, eval_every=30, width=8, depth=3)
    model, _history = train(images[:2], labels[:2], mapping, config=cfg, validation=[1], seed=0)
    out = predict_array(images[2], model, window=model.window()).argmax(0)
    d = dice_scores(out, labels[2], len(model.classes))
    assert d[0] > 0.8, d  # background is easy


def test_pretraining_then_fine_tuning(tmp_path):
    from atlasbuilder.segmentation.pretraining import PretrainingConfig, pretrain

    images, labels = toy_brain(4)
    cfg = PretrainingConfig(patch_size=16, batch_size=4, max_iterations=6, width=4, depth=2, context_size=8)
    model, history = pretrain(images, config=cfg, seed=0)
    assert history and np.isfinite(history[-1]["loss"]) and model.meta["kind"] == "pretrained"
    path = save_checkpoint(model, tmp_path / "pre.pt")
    with pytest.raises(InputError, match="pretrained"):
        load_checkpoint(path)
    tuned, _ = train(images, labels, MAPPING, config=FAST, init=path, seed=0)
    assert tuned.classes == CLASSES and tuned.meta["kind"] == "segmentation"
    pre = torch.load(path, weights_only=True)["state_dict"]
    assert pre["down.0.0.weight"].shape == tuned.net.state_dict()["down.0.0.weight"].shape
    with pytest.raises(InputError, match="mask_fraction"):
        PretrainingConfig(mask_fraction=0)


def test_pretraining_keeps_blocks_as_channels(tmp_path):
    """A pretrained network at the stage's input_pool/input_mode is fine-tuned as such."""
    from atlasbuilder.segmentation.pretraining import PretrainingConfig, pretrain

    images, labels = toy_brain(4)
    cfg = PretrainingConfig(patch_size=16, batch_size=4, max_iterations=4, width=4, depth=2,
                            context_size=8, input_pool=2, input_mode="unshuffle")
    model, _ = pretrain(images, config=cfg, seed=0)
    assert model.net.config["input_pool"] == 2 and model.net.config["input_mode"] == "unshuffle"
    assert model.net.state_dict()["down.0.0.weight"].shape[1] == 4  # 2 x 2 blocks as channels
    path = save_checkpoint(model, tmp_path / "pre.pt")
    tuned, _ = train(images, labels, MAPPING, config=FAST, init=path, seed=0)
    assert tuned.net.config["input_pool"] == 2 and tuned.net.config["input_mode"] == "unshuffle"
    with pytest.raises(InputError, match="input_mode"):
        PretrainingConfig(input_mode="max")
    with pytest.raises(InputError, match="multiple"):
        PretrainingConfig(patch_size=20, depth=2, input_pool=4)


def test_a_prior_added_while_learning_is_learnt_around(tmp_path):
    """``section_bias`` (an atlas prior) is added to the logits while the network learns: a constant
    push towards area A is learnt around (the raw logits move the other way by about as much), and
    with the prior added again the model maps the held-out section as well as one trained without."""
    from atlasbuilder.segmentation.prior import prior_predictor

    images, labels = toy_brain(5, seed=3)
    cfg = TrainingConfig(patch_size=32, batch_size=8, max_iterations=80, eval_every=40, width=8, depth=3,
                         context=False, learning_rate=1e-2, augmentation=Augmentation(elastic_px=0))
    grid = np.zeros((3, 2, 2), np.float32)
    grid[1] = 4.0
    plain, _ = train(images[:4], labels[:4], MAPPING, config=cfg, validation=[3], seed=0)
    biased, history = train(images[:4], labels[:4], MAPPING, config=cfg, validation=[3], seed=0,
                            section_bias=[(grid, 24)] * 4)
    assert biased.meta["prior_bias"] is True and "prior_bias" not in plain.meta
    target = check_sections(images[4:], labels[4:], MAPPING, CLASSES)[0].target
    shift = []
    for model in (plain, biased):
        raw = predict_array(images[4], model, window=model.window())
        shift.append(float((raw[1] - raw[0]).mean()))
    assert shift[1] < shift[0] - 2.0, shift
    out = predict_array(images[4], prior_predictor(biased, grid, 24), window=biased.window()).argmax(0)
    assert min(dice_scores(out, target, 3).values()) > 0.8
    assert history[-1]["val_dice"] > 0.8  # validation adds the prior too
    assert load_checkpoint(save_checkpoint(biased, tmp_path / "b.pt")).meta["prior_bias"] is True


def test_a_prior_added_while_learning_turns_with_the_patch():
    """A prior that tells the labels exactly, on an image that tells nothing: rotated, zoomed and
    elastically displaced patches keep it aligned with their labels, so the loss stays near zero."""
    rng = np.random.default_rng(0)
    _, labels = toy_brain(3, seed=4)
    images = [rng.integers(0, 255, lab.shape).astype(np.uint8) for lab in labels]
    sections = check_sections(images, labels, MAPPING, CLASSES)
    grids = []
    for sec in sections:
        onehot = np.stack([sec.target == c for c in range(3)]).astype(np.float32)
        grids.append((8.0 * (onehot - 1.0), 1))
    cfg = TrainingConfig(patch_size=32, batch_size=8, max_iterations=40, eval_every=20, width=4, depth=2,
                         context=False, learning_rate=1e-3, val_fraction=0.0,
                         augmentation=Augmentation(rotation_deg=45, scale=0.2, elastic_px=3))
    _, history = train(images, labels, MAPPING, config=cfg, seed=0, section_bias=grids)
    assert history[-1]["loss"] < 0.1, history


def test_section_bias_is_checked():
    images, labels = toy_brain(2)
    with pytest.raises(InputError, match="2 sections and 1 bias"):
        train(images, labels, MAPPING, config=FAST, section_bias=[None])
    with pytest.raises(InputError, match=r"s1: the bias grid has shape \(2, 3, 3\)"):
        train(images, labels, MAPPING, config=FAST, names=["s0", "s1"],
              section_bias=[None, (np.zeros((2, 3, 3)), 4)])
    with pytest.raises(InputError, match="s0: the bias grid needs a step >= 1 and finite"):
        train(images, labels, MAPPING, config=FAST, names=["s0", "s1"],
              section_bias=[(np.full((3, 3, 3), np.nan), 4), None])
