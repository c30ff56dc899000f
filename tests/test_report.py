"""The HTML report: self-contained, every expected figure present, right volumes, and it opens
in headless Chromium without console errors."""

from __future__ import annotations

import base64
import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from conftest import make_small_atlas_files
from test_viewer import browser_skip_reason, launch

from atlasbuilder.atlas import load_atlas
from atlasbuilder.errors import AtlasDirectoryError
from atlasbuilder.importing import import_atlas
from atlasbuilder.report import _volumes, write_report

SPACE = "MNI152NLin6Asym"


@pytest.fixture
def small_atlas(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    return import_atlas(pm, labels, tmp_path / "a", space=SPACE, name="Small", version="0.3")


def add_build_outputs(atlas_dir):
    """What a build adds next to the maps: a stage table, stats CSVs and QA images."""
    atlas = load_atlas(atlas_dir)
    keys = [r.key for r in atlas.map_regions()]
    prov = json.loads((atlas_dir / "provenance.json").read_text())
    prov["stages"] = [
        {"name": "segmentation", "status": "done", "seconds": 12.5, "items": 40, "note": "U-Net",
         "cache_hits": 0, "units": 3},
        {"name": "registration", "status": "cached", "seconds": 0.2, "items": 3, "note": "",
         "cache_hits": 3, "units": 3},
    ]
    (atlas_dir / "provenance.json").write_text(json.dumps(prov))
    rng = np.random.default_rng(0)
    brains = ["B01", "B02", "B03"]
    sdir = atlas_dir / "stats"
    sdir.mkdir()
    rows = [{"brain": b, "area": k, "space": sp, "n_voxels": 10, "volume_mm3": v,
             "volume_corrected_mm3": v, "centroid_x_mm": rng.normal(), "centroid_y_mm": rng.normal(),
             "centroid_z_mm": rng.normal()}
            for sp in ("native", SPACE) for b in brains for k in keys
            for v in [float(rng.uniform(500, 900))]]
    pd.DataFrame(rows).to_csv(sdir / "brain_area.csv", index=False)
    pd.DataFrame([{"area": k, "brain_a": a, "brain_b": b, "dice": rng.uniform(0.3, 0.8)}
                  for k in keys for i, a in enumerate(brains) for b in brains[i + 1:]]
                 ).to_csv(sdir / "dice_pairwise.csv", index=False)
    pd.DataFrame([{"area": k, "brain": b, "threshold": t, "dice": rng.uniform(0.2, 0.7)}
                  for k in keys for b in brains for t in (0.1, 0.3, 0.5)]
                 ).to_csv(sdir / "loo_cv.csv", index=False)
    pd.DataFrame([{"area": k, "space": SPACE, "n_brains": 3, "volume_mean_mm3": 700.0}
                  for k in keys]).to_csv(sdir / "area_summary.csv", index=False)
    qa = atlas_dir / "brains" / "B01" / "registration"
    qa.mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(rng.random((8, 8)))
    fig.savefig(qa / "qa_MNI.png")
    plt.close(fig)
    (qa / "qa_MNI.json").write_text(json.dumps({"caption": "B01 edges over MNI"}))
    seg = atlas_dir / "brains" / "B02" / "segmentation"
    seg.mkdir(parents=True)
    (seg / "section_0042.png").write_bytes((qa / "qa_MNI.png").read_bytes())


def figures(html: str) -> dict[str, bytes]:
    """figure id -> decoded PNG bytes."""
    out = {}
    for fid, uri in re.findall(r'<figure id="([^"]+)" class="fig"><img alt="[^"]*" src="([^"]+)"', html):
        assert uri.startswith("data:image/png;base64,"), fid
        out[fid] = base64.b64decode(uri.split(",", 1)[1])
    return out


def test_report_has_every_figure(small_atlas):
    import zarr

    add_build_outputs(small_atlas)
    # as a soft build marks its maps (an imported atlas says nothing of how its maps were made)
    zarr.open_group(str(small_atlas / "store.zarr" / SPACE), mode="a").attrs["mode"] = "soft"
    out = write_report(small_atlas)
    assert out == small_atlas / "report.html"
    html = out.read_text()
    figs = figures(html)
    expected = {f"mpm-{SPACE}", f"mpm-montage-{SPACE}", f"pmaps-{SPACE}", "var-volumes",
                "var-centroids", "var-dice", "var-cv", "qa-brains-B01-registration-qa_MNI.png",
                "qa-brains-B02-segmentation-section_0042.png"}
    assert expected <= set(figs), expected - set(figs)
    for fid, png in figs.items():
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 500, fid
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<script" not in html
    # captions, stage table, hierarchy with every mapped region
    assert "B01 edges over MNI" in html
    assert "Each map is the mean over the brains of the CNN&#x27;s probability" in html
    assert "brains/B02/segmentation/section_0042.png" in html  # caption falls back to the path
    assert re.search(r"<b>segmentation</b>.*?done.*?12\.5 s", html)
    assert re.search(r"<b>registration</b>.*?cached", html)
    atlas = load_atlas(small_atlas)
    for r in atlas.map_regions():
        assert f"<code>{r.key}</code>" in html
    for nav in ("#overview", "#maps", "#regions", "#variability", "#qa"):
        assert f"href='{nav}'" in html


def test_volumes_are_computed_from_the_maps(small_atlas):
    atlas = load_atlas(small_atlas)
    vols = _volumes(atlas)[SPACE]
    sm = atlas.space_maps()
    vv = float(np.prod(sm.grid.spacing))
    mpm = atlas.mpm().values
    for r in atlas.map_regions():
        pm = atlas.probability_map(r).values.astype(np.float64)
        assert vols[r.id][0] == pytest.approx((mpm == r.id).sum() * vv)
        assert vols[r.id][1] == pytest.approx(pm.sum() * vv, rel=1e-6)


def test_report_without_build_outputs_leaves_sections_out(small_atlas, tmp_path):
    out = write_report(small_atlas, tmp_path / "r" / "report.html")
    html = out.read_text()
    assert 'id="variability"' not in html and 'id="qa"' not in html
    assert f'id="pmaps-{SPACE}"' in html
    assert "No provenance" not in html  # an imported atlas has provenance


def test_not_an_atlas(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(AtlasDirectoryError):
        write_report(tmp_path / "x")


@pytest.mark.skipif(browser_skip_reason() is not None, reason=str(browser_skip_reason()))
def test_report_opens_in_chromium_without_errors(small_atlas):
    from playwright.sync_api import sync_playwright

    add_build_outputs(small_atlas)
    out = write_report(small_atlas)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        page.set_default_timeout(120_000)
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
        page.goto(out.absolute().as_uri())
        page.wait_for_load_state("load")
        n_img, broken = page.evaluate(
            "() => { const i = [...document.images]; "
            "return [i.length, i.filter(x => !x.complete || x.naturalWidth === 0).length]; }")
        title = page.title()
        browser.close()
    assert problems == []
    assert n_img >= 9 and broken == 0
    assert title.startswith("Small 0.3")
