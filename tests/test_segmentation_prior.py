"""The atlas prior: an existing atlas's probabilities at a section's pixels, added to the CNN's
scores (:mod:`atlasbuilder.segmentation.prior`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import section_placement, two_area_atlas  # noqa: E402

from atlasbuilder.errors import InputError  # noqa: E402
from atlasbuilder.reconstruction import SectionPlacement  # noqa: E402
from atlasbuilder.registration import TransformGraph  # noqa: E402
from atlasbuilder.segmentation.prediction import SlidingWindow, predict_array  # noqa: E402
from atlasbuilder.segmentation.prior import PRIOR_FLOOR, AtlasPrior, prior_predictor  # noqa: E402

SPACE = "MNI152NLin2009cAsym"
CLASSES = ["background", "hOc1_left", "hOc2_left"]


def test_the_prior_is_the_atlas_at_each_pixel(tmp_path: Path) -> None:
    atlas = two_area_atlas(tmp_path)
    prior = AtlasPrior(atlas, CLASSES, {1: section_placement(1, (40, 60))}, TransformGraph(), SPACE,
                       pixel_mm=0.2, weight=0.5)
    assert prior.space == SPACE and prior.step_px == 5 and prior.missing == []
    # exact at points: the areas as stored, the background what they leave
    pts = np.array([[2.0, 0, -3], [15.0, 0, -3], [50.0, 0, 0]])
    np.testing.assert_allclose(prior.probabilities(pts),
                               [[0.1, 0.2, 1.0], [0.9, 0.0, 0.0], [0.0, 0.8, 0.0]], atol=1e-6)
    grid = prior.section_grid(1)
    assert grid is not None and grid.shape == (3, 8, 12) and grid.dtype == np.float32
    prob = np.exp(grid / 0.5) - PRIOR_FLOOR
    # grid column j lies at x = (5 j + 2) * 0.2 mm: hOc1 left of x = 6 mm, hOc2 beyond
    x = (np.arange(12) * 5 + 2) * 0.2
    assert (prob.argmax(0)[:, x < 5] == 1).all() and (prob.argmax(0)[:, x > 7] == 2).all()
    assert np.allclose(prob.sum(0), 1.0, atol=0.01)
    # no placement, weight 0: no prior
    none = AtlasPrior(atlas, CLASSES, {1: SectionPlacement(1, 0.0, None, "missing")}, TransformGraph(),
                      SPACE, pixel_mm=0.2)
    assert none.section_grid(1) is None and none.section_grid(99) is None
    zero = AtlasPrior(atlas, CLASSES, {1: section_placement(1, (40, 60))}, TransformGraph(), SPACE,
                      pixel_mm=0.2, weight=0.0)
    assert zero.section_grid(1) is None


def test_section_grids_of_many_sections_are_each_sections_grid(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The brain's sections go through the transforms together (in batches of at most
    ``_BATCH_POINTS`` points, a section never split): the same grids as one section at a time."""
    import atlasbuilder.segmentation.prior as prior_mod

    atlas = two_area_atlas(tmp_path)
    places = {n: SectionPlacement(n, 0.5 * n - 2.0, np.array([[0.0, 0.2, 0.3 * n], [-0.2, 0.0, -n / 7]]),
                                  "ok", shape=(30 + 3 * n, 61 - 2 * n)) for n in range(1, 8)}
    places[4] = SectionPlacement(4, 0.0, None, "missing")
    prior = AtlasPrior(atlas, CLASSES, places, TransformGraph(), SPACE, pixel_mm=0.2, weight=0.7)
    one = {n: prior.section_grid(n) for n in [*places, 99]}
    assert one[4] is None and one[99] is None
    for batch in (2_000_000, 100, 1):  # all in one lookup; a few sections per lookup; one each
        monkeypatch.setattr(prior_mod, "_BATCH_POINTS", batch)
        many = prior.section_grids([7, 99, 1, 4, 2, 3, 5, 6])
        assert list(many) == [7, 99, 1, 4, 2, 3, 5, 6]
        for n, g in one.items():
            if g is None:
                assert many[n] is None
            else:
                m = many[n]
                assert m is not None and m.shape == g.shape and np.array_equal(m, g), (batch, n)
    bias = prior.section_bias([3, 4])
    assert bias[1] is None and bias[0] is not None and np.array_equal(bias[0][0], one[3])
    assert bias[0][1] == prior.step_px


def test_an_area_the_atlas_lacks_gets_the_background_prior(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    atlas = two_area_atlas(tmp_path)
    classes = [*CLASSES, "hOc3v_left"]
    with caplog.at_level("WARNING"):
        prior = AtlasPrior(atlas, classes, {1: section_placement(1, (40, 60))}, TransformGraph(), SPACE,
                           pixel_mm=0.2)
    assert prior.missing == ["hOc3v_left"] and "hOc3v_left" in caplog.text
    grid = prior.section_grid(1)
    assert grid is not None
    np.testing.assert_array_equal(grid[3], grid[0])


def test_bad_priors_are_clear_errors(tmp_path: Path) -> None:
    atlas = two_area_atlas(tmp_path)
    with pytest.raises(InputError, match="subject:B01"):
        AtlasPrior(atlas, CLASSES, {}, TransformGraph(), "subject:B01", pixel_mm=0.2)
    with pytest.raises(InputError, match="maps none of the areas"):
        AtlasPrior(atlas, ["background", "hOc5_right"], {}, TransformGraph(), SPACE, pixel_mm=0.2)
    with pytest.raises(InputError, match="start with 'background'"):
        AtlasPrior(atlas, CLASSES[::-1], {}, TransformGraph(), SPACE, pixel_mm=0.2)
    with pytest.raises(InputError, match="weight"):
        AtlasPrior(atlas, CLASSES, {}, TransformGraph(), SPACE, pixel_mm=0.2, weight=float("nan"))
    from atlasbuilder.errors import AtlasBuilderError

    with pytest.raises(AtlasBuilderError, match="atlas"):
        AtlasPrior(tmp_path / "nothing", CLASSES, {}, TransformGraph(), SPACE, pixel_mm=0.2)


def test_the_predictor_gets_the_prior_at_its_pixels(tmp_path: Path) -> None:
    """A network with no opinion (zero scores) returns the prior itself: exactly at the grid's
    points, bilinearly between them, with and without flip test-time augmentation."""
    prior = AtlasPrior(two_area_atlas(tmp_path), CLASSES, {1: section_placement(1, (37, 61))},
                       TransformGraph(), SPACE, pixel_mm=0.2, weight=0.5)
    grid = prior.section_grid(1)
    assert grid is not None

    class NoOpinion(torch.nn.Module):
        classes = CLASSES

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros((x.shape[0], 3, *x.shape[2:]))

    x = np.zeros((1, 37, 61), np.float32)
    for tta in (False, True):
        out = predict_array(x, prior_predictor(NoOpinion(), grid, prior.step_px),
                            window=SlidingWindow(roi_size=16, overlap=0.25), tta=tta)
        nodes = out[:, 2::5, 2::5]
        np.testing.assert_allclose(nodes, grid[:, :nodes.shape[1], :nodes.shape[2]], atol=1e-4)
        # pixel column 4 lies 0.4 of the way from the grid's column 0 (pixel 2) to 1 (pixel 7)
        np.testing.assert_allclose(out[:, 2, 4], 0.6 * grid[:, 0, 0] + 0.4 * grid[:, 0, 1], atol=1e-4)
    assert prior_predictor(NoOpinion(), None, 5).__class__ is NoOpinion


def test_juelich_prior_counts_other_areas_as_background(juelich_atlas: Path) -> None:
    """With the 121-area FSL maps, V1's prior is high on the left calcarine; the other areas of the
    atlas count as background (what the annotations call it)."""
    classes = ["background", "hOc1_left", "hOc1_right"]
    prior = AtlasPrior(juelich_atlas, classes, {}, TransformGraph(), "MNI152NLin6Asym", pixel_mm=0.2)
    p = prior.probabilities(np.array([[-10.0, -95, 0], [40.0, 20, 20]]))
    assert p[1, 0] > 0.5 > p[2, 0]
    # a frontal point: no visual area, some other area (background) likely
    assert p[0, 1] == pytest.approx(1.0) and p[1:, 1].max() == 0
