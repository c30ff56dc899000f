"""The segmentation stage entry points on a tiny synthetic cohort (a few small sections)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tifffile = pytest.importorskip("tifffile")
iio = pytest.importorskip("imageio.v3")

from atlasbuilder.errors import InputError, InvalidImageError  # noqa: E402
from atlasbuilder.manifest import load_manifest  # noqa: E402
from atlasbuilder.segmentation.stage import (  # noqa: E402
    StageSettings,
    load_area_probabilities,
    load_section_labels,
    load_section_probabilities,
    position_channels,
    segment,
    segment_subject,
    tissue_frame,
    train_cohort_model,
)

H, W = 48, 64
NUMBERS = (1, 11, 21, 31)
ANNOTATED = (1, 21)

MANIFEST = """\
format_version: 1
atlas: {{name: tiny, version: "0.1"}}
hierarchy: juelich
areas: [hOc1, hOc2]
spaces:
  reference: [MNI152NLin2009cAsym]
subjects:
{subjects}
"""

SUBJECT = """\
  - id: {sid}
    hemispheres: [left]
    sections:
      files: sections/{sid}/*.tif
      plane: coronal
      thickness_um: 20
      pixel_size_um: 200
      spacing: 10
    annotations:
      files: annotations/{sid}/*.png
      labels: {{1: hOc1_left, 2: hOc2_left}}
"""

# transfer_iterations: these tests exercise the per-brain fine-tuning (off by default)
TINY = StageSettings(cohort_iterations=60, finetune_iterations=20, scratch_iterations=60,
                     transfer_iterations=20, patch_size=32,
                     batch_size=4, width=4, depth=2, input_pool=1, context=True, predict_batch=4,
                     cohort_lr=1e-2, finetune_lr=3e-3, scratch_lr=1e-2, threads=1)


def _section(rng: np.random.Generator, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright background, a dark tissue box; area 1 in its left half (fine texture), 2 in the right."""
    img = np.full((H, W), 230.0) + rng.normal(0, 3, (H, W))
    labels = np.zeros((H, W), np.uint8)
    r0, r1, c0, c1 = 8, 40, 6 + shift, 58 + shift - 4
    mid = (c0 + c1) // 2
    img[r0:r1, c0:c1] = 90 + rng.normal(0, 10, (r1 - r0, c1 - c0))
    img[r0:r1, c0:mid:2] -= 40  # stripes in area 1
    labels[r0:r1, c0:mid] = 1
    labels[r0:r1, mid:c1] = 2
    return np.clip(img, 0, 255).astype(np.uint8), labels


def _cohort(root: Path, subjects: tuple[str, ...] = ("B01", "B02")) -> Path:
    rng = np.random.default_rng(0)
    for k, sid in enumerate(subjects):
        (root / "sections" / sid).mkdir(parents=True)
        (root / "annotations" / sid).mkdir(parents=True)
        (root / "truth" / sid).mkdir(parents=True)
        for n in NUMBERS:
            img, lab = _section(rng, shift=k + n // 20)
            tifffile.imwrite(root / "sections" / sid / f"{sid}_s{n:04d}.tif", img)
            iio.imwrite(root / "truth" / sid / f"{sid}_s{n:04d}.png", lab)
            if n in ANNOTATED:
                iio.imwrite(root / "annotations" / sid / f"{sid}_s{n:04d}.png", lab)
    text = MANIFEST.format(subjects="".join(SUBJECT.format(sid=s) for s in subjects))
    (root / "manifest.yaml").write_text(text)
    return root / "manifest.yaml"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cohort(tmp_path_factory.mktemp("tiny-cohort"))


@pytest.fixture(scope="module")
def segmented_root(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``atlasbuilder segment`` does: a cohort model on both brains, fine-tuned per brain."""
    out = tmp_path_factory.mktemp("seg")
    assert segment(cohort, out, device="cpu", settings=TINY, progress=False) == out
    return out


@pytest.fixture(scope="module")
def cohort_models(segmented_root: Path) -> list[Path]:
    """The cohort models ``segment`` trained (StageSettings.cohort_models: 2 by default)."""
    paths = [segmented_root / "cohort_model.pt", segmented_root / "cohort_model-2.pt"]
    assert all(p.is_file() for p in paths)
    return paths


@pytest.fixture(scope="module")
def cohort_model(cohort_models: list[Path]) -> Path:
    return cohort_models[0]


@pytest.fixture(scope="module")
def segmented(segmented_root: Path) -> Path:
    return segmented_root / "B01"


def test_train_cohort_model_excludes(cohort: Path, tmp_path: Path) -> None:
    from atlasbuilder.segmentation.training import _read_checkpoint

    st = StageSettings(**{**TINY.as_dict(), "cohort_iterations": 2})
    path = train_cohort_model(cohort, tmp_path / "c.pt", exclude=["B02"], settings=st, progress=False)
    meta = _read_checkpoint(path)["meta"]
    assert meta["stage"]["subjects"] == ["B01"]
    assert meta["classes"] == ["background", "hOc1_left", "hOc2_left"]
    with pytest.raises(InputError, match="no subjects left"):
        train_cohort_model(cohort, tmp_path / "d.pt", exclude=["B01", "B02"], settings=st, progress=False)
    assert not (tmp_path / "d.pt").exists()


def test_tissue_frame_and_position_channels() -> None:
    img = np.full((1, 100, 200), 250.0)
    img[0, 20:60, 50:150] = 40.0
    cy, cx, hy, hx = tissue_frame(img, 1)
    assert cy == pytest.approx(40, abs=1) and cx == pytest.approx(100, abs=1)
    assert hy == pytest.approx(20, abs=1) and hx == pytest.approx(50, abs=1)
    # the same frame measured on a 4x coarser overview
    coarse = img[0].reshape(25, 4, 50, 4).mean((1, 3))
    assert np.allclose(tissue_frame(coarse, 4), (cy, cx, hy, hx), atol=4)
    pos = position_channels((100, 200), (cy, cx, hy, hx), 0.25)
    assert pos.shape == (3, 100, 200) and pos.dtype == np.float32
    assert abs(pos[0, 20, 0] + 1) < 0.06 and abs(pos[0, 59, 0] - 1) < 0.06
    assert abs(pos[1, 0, 50] + 1) < 0.03 and abs(pos[1, 0, 149] - 1) < 0.03
    assert np.all(pos[2] == 0.25)
    window = position_channels((10, 20), (cy, cx, hy, hx), 0.25, origin=(30, 40))
    assert np.array_equal(window, pos[:, 30:40, 40:60])


def test_tissue_frame_rejects_constant() -> None:
    with pytest.raises(InvalidImageError, match="constant"):
        tissue_frame(np.ones((10, 10)), 1)


def test_segment_subject_outputs(cohort: Path, segmented: Path) -> None:
    info = json.loads((segmented / "segmentation.json").read_text())
    assert info["protocol"] == "transfer" and info["subject"] == "B01"
    assert [c["key"] for c in info["classes"]] == ["background", "hOc1_left", "hOc2_left"]
    tree = load_manifest(cohort).load_hierarchy()
    ids = {"hOc1_left": tree.get("hOc1_left").id, "hOc2_left": tree.get("hOc2_left").id}
    assert [c["region_id"] for c in info["classes"]] == [0, ids["hOc1_left"], ids["hOc2_left"]]
    assert [s["number"] for s in info["sections"]] == list(NUMBERS)
    assert (segmented.parent / "B02" / "segmentation.json").is_file()
    assert [s["annotated"] for s in info["sections"]] == [n in ANNOTATED for n in NUMBERS]
    assert all(0 < s["mean_confidence"] <= 1 for s in info["sections"])
    labels = load_section_labels(segmented)
    assert sorted(labels) == list(NUMBERS)
    lut = np.array([0, ids["hOc1_left"], ids["hOc2_left"]], np.uint16)
    for n in NUMBERS:
        lab = labels[n]
        assert lab.dtype == np.uint16 and lab.shape == (H, W)
        assert set(np.unique(lab)) <= {0, *ids.values()}
        truth = lut[iio.imread(cohort.parent / "truth" / "B01" / f"B01_s{n:04d}.png")]
        if n in ANNOTATED:  # the expert labels are kept
            assert np.array_equal(lab, truth)
        else:  # the network learnt the two areas (texture + position)
            for r in ids.values():
                p, t = lab == r, truth == r
                assert 2 * (p & t).sum() / (p.sum() + t.sum()) > 0.6
    keys, probs = load_section_probabilities(segmented, 11)
    assert keys == ["background", "hOc1_left", "hOc2_left"]
    assert probs.shape == (3, H, W) and probs.dtype == np.uint8
    assert np.all(np.abs(probs.astype(int).sum(0) - 100) <= 3)
    with pytest.raises(InputError, match="no section number 12"):
        load_section_probabilities(segmented, 12)
    # the areas' maps for soft aggregation: the CNN's on predicted sections, the expert's on
    # annotated ones (100 % in the labelled area)
    keys, maps = load_area_probabilities(segmented)
    assert keys == ["hOc1_left", "hOc2_left"] and sorted(maps) == list(NUMBERS)
    for n in NUMBERS:
        assert maps[n].shape == (2, H, W) and maps[n].dtype == np.uint8
        if n in ANNOTATED:
            want = np.stack([labels[n] == ids[k] for k in keys]).astype(np.uint8) * 100
            assert np.array_equal(maps[n], want)
        else:
            assert np.array_equal(maps[n], load_section_probabilities(segmented, n)[1][1:])


def test_segment_subject_resumes(cohort: Path, cohort_models: list[Path], segmented: Path) -> None:
    stamp = {p: p.stat().st_mtime_ns for p in segmented.rglob("*") if p.is_file()}
    info = segment_subject(cohort, "B01", segmented, init_checkpoint=cohort_models, settings=TINY,
                           progress=False)
    assert info == json.loads((segmented / "segmentation.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in segmented.rglob("*") if p.is_file()} == stamp


def test_segment_trains_an_ensemble_of_cohort_models(segmented_root: Path, segmented: Path,
                                                    cohort_models: list[Path]) -> None:
    from atlasbuilder.segmentation.training import _read_checkpoint

    # two models alike from the seeds 0 and 1: different weights
    a, b = (_read_checkpoint(p)["state_dict"] for p in cohort_models)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert json.loads((segmented_root / "cohort_model-2.json").read_text())["seed"] == 1
    # each brain fine-tuned both (transfer_iterations) and kept both
    info = json.loads((segmented / "segmentation.json").read_text())
    assert info["init_checkpoint"] == [str(p) for p in cohort_models]
    assert info["models"] == ["model.pt", "model-2.pt"] and info["model"] == "model.pt"
    assert all((segmented / f).is_file() for f in info["models"])


def test_an_ensemble_of_one_model_twice_maps_as_the_model(cohort: Path, cohort_models: list[Path],
                                                          tmp_path: Path) -> None:
    st = StageSettings(**{**TINY.as_dict(), "transfer_iterations": 0})
    one = segment_subject(cohort, "B02", tmp_path / "one", init_checkpoint=cohort_models[0], settings=st,
                          progress=False)
    twice = segment_subject(cohort, "B02", tmp_path / "twice", init_checkpoint=[cohort_models[0]] * 2,
                            settings=st, progress=False)
    both = segment_subject(cohort, "B02", tmp_path / "both", init_checkpoint=cohort_models, settings=st,
                           progress=False)
    assert one["models"] == ["model.pt"] and twice["models"] == ["model.pt", "model-2.pt"]
    assert one["dice_annotated"] == twice["dice_annotated"]
    differs = False
    for n in NUMBERS:
        p1 = load_section_probabilities(tmp_path / "one", n)[1]
        assert np.array_equal(p1, load_section_probabilities(tmp_path / "twice", n)[1])
        differs = differs or not np.array_equal(p1, load_section_probabilities(tmp_path / "both", n)[1])
    assert differs  # the second model does change the maps
    assert both["inputs_key"] != twice["inputs_key"] != one["inputs_key"]
    with pytest.raises(InputError, match="empty list of checkpoints"):
        segment_subject(cohort, "B02", tmp_path / "none", init_checkpoint=[], settings=st, progress=False)
    with pytest.raises(InputError, match="cohort_models must be 1 to 8"):
        StageSettings(cohort_models=0)


def test_scratch_is_deterministic(cohort: Path, tmp_path: Path) -> None:
    st = StageSettings(**{**TINY.as_dict(), "protocol": "scratch", "scratch_iterations": 5})
    a = segment_subject(cohort, "B02", tmp_path / "a", settings=st, progress=False)
    segment_subject(cohort, "B02", tmp_path / "b", settings=st, progress=False)
    assert a["protocol"] == "scratch" and a["init_checkpoint"] is None
    la, lb = load_section_labels(tmp_path / "a"), load_section_labels(tmp_path / "b")
    assert all(np.array_equal(la[n], lb[n]) for n in NUMBERS)


def _break(root: Path, what: str) -> Path:
    manifest = _cohort(root, ("B01",))
    if what == "label":
        lab = iio.imread(root / "annotations/B01/B01_s0021.png").copy()
        lab[0, 0] = 7
        iio.imwrite(root / "annotations/B01/B01_s0021.png", lab)
    elif what == "size":
        iio.imwrite(root / "annotations/B01/B01_s0021.png", np.zeros((H, W + 2), np.uint8))
    elif what == "constant":
        tifffile.imwrite(root / "sections/B01/B01_s0031.tif", np.full((H, W), 7, np.uint8))
    return manifest


@pytest.mark.parametrize(("what", "error", "match"), [
    ("label", InputError, r"B01_s0021\.png: label values \[7\]"),
    ("size", InvalidImageError, r"B01_s0021\.png: the annotation is 48 x 66 px"),
    ("constant", InvalidImageError, r"B01_s0031\.tif: the section is constant"),
])
def test_bad_input_names_the_file(tmp_path: Path, what: str, error: type, match: str) -> None:
    manifest = _break(tmp_path / "c", what)
    st = StageSettings(**{**TINY.as_dict(), "protocol": "scratch", "scratch_iterations": 2})
    with pytest.raises(error, match=match):
        segment_subject(manifest, "B01", tmp_path / "out", settings=st, progress=False)
    assert not (tmp_path / "out" / "segmentation.json").exists()
    assert not list((tmp_path / "out").glob("sections/*31.zarr"))


def test_checkpoint_of_another_class_set(cohort: Path, cohort_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "other"
    manifest = _cohort(root, ("B01",))
    text = manifest.read_text().replace("{1: hOc1_left, 2: hOc2_left}", "{1: hOc2_left, 2: hOc1_left}")
    manifest.write_text(text)
    with pytest.raises(InputError, match=r"cohort_model\.pt: the checkpoint was trained for classes"):
        segment_subject(manifest, "B01", tmp_path / "out", init_checkpoint=cohort_model, settings=TINY,
                        progress=False)
    assert not (tmp_path / "out" / "segmentation.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="(?i)cuda"):
        segment_subject(cohort, "B01", tmp_path / "out", settings=TINY, device="cuda", progress=False)


def test_protocol_needs_checkpoint(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="needs init_checkpoint"):
        segment_subject(cohort, "B01", tmp_path, settings=StageSettings(protocol="transfer"), progress=False)
    with pytest.raises(InputError, match="protocol must be one of"):
        StageSettings(protocol="magic")


def test_unet_input_pool_keeps_shape() -> None:
    from atlasbuilder.segmentation.networks import UNet

    net = UNet(2, 3, depth=2, width=4, input_pool=2).eval()
    for h, w in ((32, 32), (37, 29), (5, 3)):
        assert net(torch.zeros(1, 2, h, w)).shape == (1, 3, h, w)
    assert net.multiple == 4


def test_unet_unshuffle_sees_texture_finer_than_a_block(tmp_path: Path) -> None:
    from atlasbuilder.segmentation.networks import UNet
    from atlasbuilder.segmentation.training import SegmentationModel, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    flat = torch.full((1, 1, 16, 16), 0.5)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]).remainder(2).float()[None, None]
    assert torch.equal(torch.nn.functional.avg_pool2d(checker, 4), torch.nn.functional.avg_pool2d(flat, 4))
    avg = UNet(1, 3, depth=2, width=4, input_pool=4).eval()
    assert torch.allclose(avg(flat), avg(checker))  # block means hide the pattern
    net = UNet(1, 3, depth=2, width=4, input_pool=4, input_mode="unshuffle").eval()
    assert net(checker).shape == (1, 3, 16, 16) and net(torch.zeros(1, 1, 13, 7)).shape == (1, 3, 13, 7)
    assert not torch.allclose(net(flat), net(checker))
    # the mode travels with the checkpoint
    model = SegmentationModel(net, ["background", "a", "b"], [0.0], [1.0], patch_size=16)
    again = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt"))
    assert again.net.config["input_mode"] == "unshuffle"
    assert torch.allclose(again.net(checker), net(checker))
    with pytest.raises(InputError, match="input_mode"):
        UNet(1, 3, input_mode="max")
    with pytest.raises(InputError, match="input_mode"):
        StageSettings(input_mode="max").training_config(10, 1e-3)


def test_augment_leaves_position_channels() -> None:
    from atlasbuilder.segmentation.data import Augmentation, augment

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16)
    y = torch.zeros(3, 16, 16, dtype=torch.long)
    out, _, _ = augment(x.clone(), y, None, Augmentation(flips=False, intensity_channels=1), g)
    assert torch.equal(out[:, 1:], x[:, 1:])
    assert not torch.equal(out[:, :1], x[:, :1])


def test_settings_from_manifest_takes_width_and_quick_caps_it() -> None:
    from atlasbuilder.manifest import QUICK_WIDTH, builtin_manifest_path
    from atlasbuilder.segmentation.stage import settings_from_manifest

    m = load_manifest(builtin_manifest_path("demo"))
    assert settings_from_manifest(m).width == m.stages.segmentation.width == 32
    assert settings_from_manifest(m.quick()).width == QUICK_WIDTH
    wide = m.model_copy(update={"stages": m.stages.model_copy(update={
        "segmentation": m.stages.segmentation.model_copy(update={"width": 64})})})
    assert settings_from_manifest(wide).width == 64
    assert settings_from_manifest(wide.quick()).width == QUICK_WIDTH


def test_the_cohort_model_is_told_each_sections_place_along_the_series(cohort: Path,
                                                                        cohort_model: Path) -> None:
    from atlasbuilder.manifest import builtin_manifest_path
    from atlasbuilder.segmentation.prediction import predict_array
    from atlasbuilder.segmentation.stage import settings_from_manifest
    from atlasbuilder.segmentation.training import load_checkpoint

    assert TINY.stack_position and StageSettings().stack_position
    model = load_checkpoint(cohort_model)
    assert model.section_values == 1
    image = tifffile.imread(cohort.parent / "sections/B01" / "B01_s0011.tif")
    outs = []
    for z in (0.0, 1.0):
        model.set_section_values([z])
        outs.append(predict_array(image, model, window=model.window()))
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # the place reaches the prediction
    m = load_manifest(builtin_manifest_path("demo"))
    assert settings_from_manifest(m).stack_position
    off = m.model_copy(update={"stages": m.stages.model_copy(update={
        "segmentation": m.stages.segmentation.model_copy(update={"stack_position": False})})})
    assert not settings_from_manifest(off).stack_position


def test_finetune_from_a_pretrained_checkpoint(cohort: Path, tmp_path: Path) -> None:
    """Protocol (b): a self-supervised checkpoint (no segmentation head) is fine-tuned per brain."""
    from dataclasses import replace

    from atlasbuilder.segmentation.pretraining import PretrainingConfig, pretrain
    from atlasbuilder.segmentation.training import save_checkpoint

    m = load_manifest(cohort)
    images = [np.asarray(tifffile.imread(p)) for p in m.section_files("B01").values()]
    cfg = PretrainingConfig(patch_size=TINY.patch_size, batch_size=4, max_iterations=4,
                            width=TINY.width, depth=TINY.depth)
    model, _ = pretrain(images, config=cfg, seed=0)
    ck = save_checkpoint(model, tmp_path / "pre.pt")
    st = replace(TINY, protocol="finetune")
    info = segment_subject(m, "B01", tmp_path / "out", init_checkpoint=ck, settings=st, progress=False)
    assert info["protocol"] == "finetune" and len(info["sections"]) == len(images)
    assert info["dice_annotated"]["before_finetuning"] is None
    assert len(load_section_labels(tmp_path / "out")) == len(images)
    with pytest.raises(InputError, match="pretrained checkpoint"):
        segment_subject(m, "B01", tmp_path / "none", init_checkpoint=ck,
                        settings=replace(st, finetune_iterations=0), progress=False)
    assert not (tmp_path / "none" / "segmentation.json").exists()


def test_tile_and_tta_reach_the_prediction_and_a_change_redoes_it(cohort: Path, cohort_model: Path,
                                                                   tmp_path: Path, monkeypatch) -> None:
    """``tile`` is the prediction window, ``tta`` flips each window (and trains with flips);
    outputs made with other settings are neither returned as complete nor kept section by section."""
    from dataclasses import replace

    import zarr

    def attrs(info: dict) -> dict:
        return dict(zarr.open_group(out / info["sections"][1]["prediction"], mode="r").attrs["atlasbuilder"])

    out = tmp_path / "B01"
    plain = segment_subject(cohort, "B01", out, init_checkpoint=cohort_model, settings=TINY, progress=False)
    assert attrs(plain)["window"]["roi_size"] == [TINY.patch_size] * 2 and attrs(plain)["tta"] is False
    before = load_section_labels(out)

    # another window, the same model (same seed, same fine-tuning): close, not equal
    info = segment_subject(cohort, "B01", out, init_checkpoint=cohort_model, settings=replace(TINY, tile=16),
                           progress=False)
    assert info["settings"]["tile"] == 16 and attrs(info)["window"]["roi_size"] == [16, 16]
    after = load_section_labels(out)
    held_out = [n for n in NUMBERS if n not in ANNOTATED]
    assert any(not np.array_equal(before[n], after[n]) for n in held_out)
    assert np.mean([np.mean(before[n] == after[n]) for n in held_out]) > 0.8

    from atlasbuilder.segmentation import prediction

    seen = []
    real = prediction.predict_array

    def spy(*args, **kwargs):
        seen.append(kwargs.get("tta"))
        return real(*args, **kwargs)

    monkeypatch.setattr(prediction, "predict_array", spy)
    info = segment_subject(cohort, "B01", out, init_checkpoint=cohort_model,
                           settings=replace(TINY, flips=True, tta=True), progress=False)
    assert info["settings"]["tta"] is True and info["settings"]["flips"] is True
    # the Dice on the annotated sections is scored with TTA too: before fine-tuning in memory,
    # after it on their stored predictions (made with TTA like every section's)
    assert seen == [True] * len(ANNOTATED)
    assert attrs(info)["tta"] is True and attrs(info)["window"]["roi_size"] == [TINY.patch_size] * 2
    for rec in info["sections"]:
        if rec["annotated"]:
            stored = zarr.open_group(out / rec["prediction"], mode="r").attrs["atlasbuilder"]
            assert stored["tta"] is True


def test_transfer_by_default_maps_the_brain_with_the_cohort_model_as_it_is(
        cohort: Path, cohort_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from atlasbuilder.segmentation import training
    from atlasbuilder.segmentation.training import _read_checkpoint

    assert StageSettings().transfer_iterations == 0
    calls = []
    monkeypatch.setattr(training, "train", lambda *a, **k: calls.append(1))
    info = segment_subject(cohort, "B01", tmp_path, init_checkpoint=cohort_model,
                           settings=replace(TINY, transfer_iterations=0), progress=False)
    assert calls == [] and info["protocol"] == "transfer"
    assert info["dice_annotated"]["before_finetuning"] is None
    mine, theirs = (_read_checkpoint(p) for p in (tmp_path / "model.pt", cohort_model))
    assert mine["state_dict"].keys() == theirs["state_dict"].keys()
    assert all(torch.equal(v, theirs["state_dict"][k]) for k, v in mine["state_dict"].items())
    # ... with the brain's own intensity statistics, as a fine-tuning would set them
    own = np.concatenate([tifffile.imread(cohort.parent / "sections/B01" / f"B01_s{n:04d}.tif").ravel()
                          for n in ANNOTATED]).astype(np.float64)
    norm = mine["meta"]["normalisation"]
    assert norm["mean"] == pytest.approx([own.mean()]) and norm["std"] == pytest.approx([own.std()])
    assert len(load_section_labels(tmp_path)) == len(NUMBERS)


def test_tta_needs_flips_and_flips_no_positions() -> None:
    with pytest.raises(InputError, match="tta needs a network trained with flips"):
        StageSettings(tta=True)
    with pytest.raises(InputError, match="flips cannot be used with positions"):
        StageSettings(flips=True, positions=True, mirror=False)
    assert StageSettings(flips=True, tta=True).training_config(10, 1e-3).augmentation.flips
    assert not StageSettings().training_config(10, 1e-3).augmentation.flips


def test_geometric_augmentation_reaches_training_and_is_checked() -> None:
    aug = StageSettings(rotation_deg=20, scale=0.15, elastic_px=3).training_config(10, 1e-3).augmentation
    assert (aug.rotation_deg, aug.scale, aug.elastic_px) == (20.0, 0.15, 3.0)
    off = StageSettings(rotation_deg=0, scale=0, elastic_px=0).training_config(10, 1e-3).augmentation
    assert (off.rotation_deg, off.scale, off.elastic_px) == (0.0, 0.0, 0.0)
    for bad in ({"rotation_deg": -1}, {"scale": 1.0}, {"elastic_px": float("nan")}):
        with pytest.raises(InputError, match="augmentation needs"):
            StageSettings(**bad)


@pytest.mark.parametrize("tile", [0, 33, 3])
def test_tile_must_fit_the_network(tile: int) -> None:
    with pytest.raises(InputError, match="tile must be a positive multiple of 32"):
        StageSettings(tile=tile)


def test_tile_from_the_manifest_is_checked_and_named() -> None:
    from atlasbuilder.manifest import builtin_manifest_path
    from atlasbuilder.segmentation.stage import settings_from_manifest

    m = load_manifest(builtin_manifest_path("demo"))
    st = settings_from_manifest(m)
    assert st.tile == m.stages.segmentation.tile == 128 and st.tta is st.flips is False
    odd = m.model_copy(update={"stages": m.stages.model_copy(update={
        "segmentation": m.stages.segmentation.model_copy(update={"tile": 200, "tta": True})})})
    with pytest.raises(InputError, match=r"demo.yaml: stages.segmentation.tile: tile must be a positive "
                                         r"multiple of 32 .* got 200"):
        settings_from_manifest(odd)
    fixed = odd.model_copy(update={"stages": odd.stages.model_copy(update={
        "segmentation": odd.stages.segmentation.model_copy(update={"tile": 64})})})
    st = settings_from_manifest(fixed)
    assert st.tile == 64 and st.tta is st.flips is True  # TTA trains with flips too
    assert settings_from_manifest(fixed.quick()).tta is False  # quick builds predict without TTA


def test_segment_rerun_after_an_annotation_changed_retrains(tmp_path: Path) -> None:
    """`atlasbuilder segment` into the same directory: unchanged inputs reuse everything; a
    changed annotation retrains the cohort model and so redoes every brain."""
    manifest = _cohort(tmp_path / "cohort")
    out = tmp_path / "seg"
    segment(manifest, out, device="cpu", settings=TINY, progress=False)

    def stamps() -> dict[str, int]:
        return {p: (out / p).stat().st_mtime_ns for p in
                ("cohort_model.pt", "cohort_model-2.pt", "B01/segmentation.json",
                 "B02/segmentation.json")}

    first = stamps()
    segment(manifest, out, device="cpu", settings=TINY, progress=False)
    assert stamps() == first
    ann = tmp_path / "cohort" / "annotations" / "B02" / "B02_s0001.png"
    lab = iio.imread(ann)
    lab[lab == 2] = 1  # the expert moves the border: area 2 of this section becomes area 1
    iio.imwrite(ann, lab)
    segment(manifest, out, device="cpu", settings=TINY, progress=False)
    after = stamps()
    assert all(after[p] != first[p] for p in first)
    labels = load_section_labels(out / "B02")
    assert np.array_equal(labels[1] > 0, lab > 0) and len(np.unique(labels[1])) == 2  # one area left
    # the same for one brain on its own: another seed is another result
    info = json.loads((out / "B01" / "segmentation.json").read_text())
    again = segment_subject(manifest, "B01", out / "B01", init_checkpoint=out / "cohort_model.pt",
                            settings=TINY, seed=1, progress=False)
    assert again["inputs_key"] != info["inputs_key"] and again["seed"] == 1


def test_an_atlas_prior_reaches_every_sections_prediction(cohort: Path, cohort_model: Path,
                                                          tmp_path: Path) -> None:
    """An atlas that says the opposite of the sections (hOc2 where they show hOc1's stripes, and
    the reverse), given a heavy weight, decides the areas; the prediction records it."""
    from dataclasses import replace

    from conftest import section_placement, two_area_atlas

    from atlasbuilder.registration import TransformGraph
    from atlasbuilder.segmentation.prediction import open_prediction
    from atlasbuilder.segmentation.prior import AtlasPrior

    st = replace(TINY, transfer_iterations=0, prior_weight=5.0)
    # the tissue box's middle column lies near col 30 (x = 6 mm at 0.2 mm pixels)
    atlas = two_area_atlas(tmp_path / "atlas", left="hOc2_left", split_mm=6.0, p=0.6)
    places = {n: section_placement(n, (H, W), file=f"B01_s{n:04d}.tif") for n in NUMBERS}
    classes = ["background", "hOc1_left", "hOc2_left"]
    prior = AtlasPrior(atlas, classes, places, TransformGraph(), "MNI152NLin2009cAsym", pixel_mm=0.2,
                       weight=5.0)
    info = segment_subject(cohort, "B01", tmp_path / "with", init_checkpoint=cohort_model, settings=st,
                           progress=False, prior=prior)
    assert info["prior"]["space"] == "MNI152NLin2009cAsym" and info["prior"]["weight"] == 5.0
    assert all(rec["prior"] for rec in info["sections"])
    labels = load_section_labels(tmp_path / "with")
    for n in NUMBERS:
        if n in ANNOTATED:
            continue
        truth = iio.imread(cohort.parent / "truth" / "B01" / f"B01_s{n:04d}.png")
        pred = labels[n]
        # where the atlas has 0 for an area, it is not called that area
        assert not (pred[:, :29] == 1).any() and not (pred[:, 31:] == 2).any(), n
        assert (pred[truth > 0] > 0).mean() > 0.5, n
    # the Dice reported on the annotated sections is that of their stored predictions, which have
    # the prior in them (it was once scored without: the network alone, which the prior overrules)
    dice: dict[int, list[float]] = {}
    for rec in info["sections"]:
        if rec["annotated"]:
            got = np.asarray(open_prediction(tmp_path / "with" / rec["prediction"])[0])
            ann = labels[rec["number"]]  # the expert labels, as region ids
            ids = [c["region_id"] for c in info["classes"]]
            for c in (1, 2):
                p, t = got == c, ann == ids[c]
                if t.any():
                    dice.setdefault(c, []).append(2 * float((p & t).sum()) / float(p.sum() + t.sum()))
    assert info["dice_annotated"]["after_training"] == pytest.approx(
        float(np.mean([np.mean(v) for v in dice.values()])), abs=1e-9)
    assert info["dice_annotated"]["after_training"] < 0.5  # the prior says the opposite
    # wrong classes, a weight other than the settings', a section that is not the placed one
    with pytest.raises(InputError, match="classes"):
        segment_subject(cohort, "B01", tmp_path / "c", init_checkpoint=cohort_model, settings=st,
                        progress=False, prior=AtlasPrior(atlas, classes[:2], places, TransformGraph(),
                                                         "MNI152NLin2009cAsym", pixel_mm=0.2, weight=5.0))
    with pytest.raises(InputError, match="prior_weight"):
        segment_subject(cohort, "B01", tmp_path / "w", init_checkpoint=cohort_model,
                        settings=replace(st, prior_weight=1.0), progress=False, prior=prior)
    wrong = {**places, 11: section_placement(11, (H, W), file="B01_s9999.tif")}
    with pytest.raises(InputError, match="B01_s9999.tif"):
        segment_subject(cohort, "B01", tmp_path / "f", init_checkpoint=cohort_model, settings=st,
                        progress=False, prior=AtlasPrior(atlas, classes, wrong, TransformGraph(),
                                                         "MNI152NLin2009cAsym", pixel_mm=0.2, weight=5.0))
    assert not (tmp_path / "f").exists()  # refused before any work


def test_the_cohort_model_learns_with_each_brains_atlas_prior(cohort: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """``train_cohort_model(priors=...)``: the prior is added to the scores while the network learns
    (the checkpoint says so); a brain's fine-tuning with its prior does the same; mapping with a
    model that learnt with a prior but without one warns; a prior of other classes is refused."""
    from dataclasses import replace

    from conftest import section_placement, two_area_atlas

    from atlasbuilder.registration import TransformGraph
    from atlasbuilder.segmentation.prior import AtlasPrior

    st = replace(TINY, prior_weight=1.0)
    atlas = two_area_atlas(tmp_path / "atlas", left="hOc1_left", split_mm=6.0, p=0.6)
    classes = ["background", "hOc1_left", "hOc2_left"]

    def prior(sid: str, cls: list[str] = classes) -> AtlasPrior:
        places = {n: section_placement(n, (H, W), file=f"{sid}_s{n:04d}.tif") for n in NUMBERS}
        return AtlasPrior(atlas, cls, places, TransformGraph(), "MNI152NLin2009cAsym", pixel_mm=0.2,
                          weight=1.0)

    ck = train_cohort_model(cohort, tmp_path / "cohort.pt", settings=st, progress=False,
                            priors={"B01": prior("B01"), "B02": prior("B02")})
    assert torch.load(ck, weights_only=True)["meta"]["prior_bias"] is True
    info = segment_subject(cohort, "B01", tmp_path / "B01", init_checkpoint=ck, settings=st,
                           progress=False, prior=prior("B01"))
    assert info["prior"]["weight"] == 1.0
    tuned = torch.load(tmp_path / "B01" / "model.pt", weights_only=True)["meta"]
    assert tuned["prior_bias"] is True and tuned["training"]["config"]["max_iterations"] == 20
    with pytest.raises(InputError, match=r"subject B02: the atlas prior was made for classes"):
        train_cohort_model(cohort, tmp_path / "bad.pt", settings=st, progress=False,
                           priors={"B02": prior("B02", classes[:2])})
    assert not (tmp_path / "bad.pt").exists()
    with caplog.at_level("WARNING"):
        segment_subject(cohort, "B02", tmp_path / "B02", init_checkpoint=ck,
                        settings=replace(st, transfer_iterations=0), progress=False)
    assert "learnt with an atlas prior" in caplog.text and "subject B02" in caplog.text


def test_min_area_drops_an_area_the_annotations_do_not_show(cohort: Path, cohort_models: list[Path],
                                                            tmp_path: Path) -> None:
    """``min_area_mm3``: an area a brain's annotations do not show, found in less than that volume
    of the brain, is read as the next most probable class; the stored predictions stay."""
    import shutil
    from dataclasses import replace

    from atlasbuilder.segmentation.prediction import open_prediction

    root = tmp_path / "cohort"
    shutil.copytree(cohort.parent, root)
    for ann in (root / "annotations" / "B02").glob("*.png"):  # the expert did not mark hOc2 here
        lab = iio.imread(ann)
        lab[lab == 2] = 0
        iio.imwrite(ann, lab)
    out = tmp_path / "B02"
    st = replace(TINY, transfer_iterations=0, min_area_mm3=0.0)
    info = segment_subject(root / "manifest.yaml", "B02", out, init_checkpoint=cohort_models, settings=st,
                           progress=False)
    assert info["annotated_areas"] == ["hOc1_left"] and info["dropped_areas"] == []
    # each area's volume: its predicted pixels on the non-annotated sections x 0.2 mm x 0.2 mm x
    # the section spacing (10 x 20 um)
    idx = {c["key"]: c["index"] for c in info["classes"]}
    pixels = {k: 0 for k in ("hOc1_left", "hOc2_left")}
    for rec in info["sections"]:
        if not rec["annotated"]:
            labels, _, _ = open_prediction(out / rec["prediction"])
            for k in pixels:
                pixels[k] += int((np.asarray(labels[...]) == idx[k]).sum())
    assert info["area_volumes_mm3"] == {k: pytest.approx(v * 0.2 * 0.2 * 0.2) for k, v in pixels.items()}
    v2 = info["area_volumes_mm3"]["hOc2_left"]
    assert v2 > 0  # the cohort models learnt hOc2 from B01 and the original B02
    before = {n: lab.copy() for n, lab in load_section_labels(out).items()}
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "segmentation.json"}

    # below the threshold: the readers drop it; only segmentation.json is rewritten
    kept = segment_subject(root / "manifest.yaml", "B02", out, init_checkpoint=cohort_models,
                           settings=replace(st, min_area_mm3=v2 * 0.9), progress=False)
    assert kept["dropped_areas"] == []
    dropped = segment_subject(root / "manifest.yaml", "B02", out, init_checkpoint=cohort_models,
                              settings=replace(st, min_area_mm3=v2 * 1.1), progress=False)
    assert dropped["dropped_areas"] == ["hOc2_left"]
    assert json.loads((out / "segmentation.json").read_text()) == dropped
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    tree = load_manifest(root / "manifest.yaml").load_hierarchy()
    id1, id2 = tree.get("hOc1_left").id, tree.get("hOc2_left").id
    after = load_section_labels(out)
    keys, maps = load_area_probabilities(out)
    for rec in dropped["sections"]:
        n = rec["number"]
        probs = load_section_probabilities(out, n)[1]
        assert not probs[idx["hOc2_left"]].any() and not maps[n][keys.index("hOc2_left")].any()
        if rec["annotated"]:
            assert np.array_equal(after[n], before[n])
            continue
        assert not (after[n] == id2).any()
        was = before[n] == id2
        # elsewhere unchanged; where hOc2 was, the more probable of background and hOc1
        assert np.array_equal(after[n][~was], before[n][~was])
        _, raw, _ = open_prediction(out / rec["prediction"])
        raw = np.asarray(raw[...])
        want = np.where(raw[idx["hOc1_left"]] > raw[0], id1, 0)
        assert np.array_equal(after[n][was], want[was])
        assert raw[idx["hOc2_left"]][was].any()  # the store still holds the network's output
    # a segmentation.json written before the pixel counts were recorded: counted from the stores
    old = json.loads((out / "segmentation.json").read_text())
    for rec in old["sections"]:
        rec.pop("class_pixels", None)
    old.pop("dropped_areas")
    (out / "segmentation.json").write_text(json.dumps(old))
    again = segment_subject(root / "manifest.yaml", "B02", out, init_checkpoint=cohort_models,
                            settings=replace(st, min_area_mm3=v2 * 1.1), progress=False)
    assert again["area_volumes_mm3"] == dropped["area_volumes_mm3"]
    assert again["dropped_areas"] == ["hOc2_left"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    # an area the annotations show is never dropped
    big = segment_subject(root / "manifest.yaml", "B02", out, init_checkpoint=cohort_models,
                          settings=replace(st, min_area_mm3=1e12), progress=False)
    assert big["dropped_areas"] == ["hOc2_left"]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="min_area_mm3 must be a number >= 0"):
            StageSettings(min_area_mm3=bad)
