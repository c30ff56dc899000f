"""Web viewer: the JSON API and volumes against the Atlas API, and the page in headless Chromium
(load, jump to a coordinate, click a voxel, pick a region, screenshot)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_small_atlas_files

from atlasbuilder.atlas import load_atlas
from atlasbuilder.errors import AtlasDirectoryError, MissingFileError
from atlasbuilder.export.viewer import make_viewer_server, niivue_bundle
from atlasbuilder.importing import import_atlas

SCREENSHOT_COPY = Path("/tmp/viewer_screenshot.png")


def chromium_path() -> str | None:
    """Debian's chromium (or ATLASBUILDER_CHROMIUM); Playwright's own browsers are not used."""
    env = os.environ.get("ATLASBUILDER_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no `playwright install` needed)"
    if chromium_path() is None:
        return "no chromium executable (apt-get install chromium, or set ATLASBUILDER_CHROMIUM)"
    return None


def launch(p):
    return p.chromium.launch(
        executable_path=chromium_path(),
        args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
    )


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A small atlas served on a free port (needs the NiiVue bundle only to start)."""
    pm, labels = make_small_atlas_files(tmp_path)
    atlas_dir = import_atlas(pm, labels, tmp_path / "a", space="MNI152NLin6Asym")
    try:
        niivue_bundle()
    except MissingFileError:  # the API does not need NiiVue: a stand-in keeps this off npm
        fake = tmp_path / "niivue.umd.js"
        fake.write_text("window.niivue = undefined;\n")
        monkeypatch.setenv("ATLASBUILDER_NIIVUE", str(fake))
    server = make_viewer_server(atlas_dir, 0)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield server, load_atlas(atlas_dir)
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_api_answers_like_atlas_query(served):
    server, atlas = served
    assert server.server_address[0] == "127.0.0.1"
    status, body = get(server.url + "api/info")
    info = json.loads(body)
    assert status == 200 and info["spaces"][0]["name"] == "MNI152NLin6Asym"
    assert info["spaces"][0]["mapped"] == [r.key for r in atlas.map_regions()]
    keys = set()

    def walk(nodes):
        for n in nodes:
            keys.add(n["key"])
            walk(n["children"])

    walk(info["tree"])
    assert keys == {r.key for r in atlas.regions}
    grid = atlas.space_maps().grid
    rng = np.random.default_rng(0)
    mpm = atlas.mpm().values
    ijk = rng.integers(0, grid.shape, size=(15, 3))
    pts = nib.affines.apply_affine(grid.affine, ijk) + rng.uniform(-0.4, 0.4, (15, 3))
    for n, pt in enumerate(pts):
        status, body = get(server.url + "api/query?x={}&y={}&z={}".format(*pt))
        ans = json.loads(body)
        want = atlas.query(pt, min_probability=0.0)[0]
        assert status == 200
        assert [(r["key"], r["probability"]) for r in ans["regions"]] == \
            [(r["key"], r["probability"]) for r in want["regions"]]
        label = int(mpm[tuple(ijk[n])])
        assert (ans["mpm"] or {}).get("id", 0) == label
    status, body = get(server.url + "api/query?x=500&y=0&z=0")
    assert status == 200 and json.loads(body)["outside"] is True and json.loads(body)["mpm"] is None
    status, body = get(server.url + "api/query?x=a&y=0&z=0")
    assert status == 400 and "numeric" in json.loads(body)["error"]
    status, body = get(server.url + "nope")
    assert status == 404


def test_volumes_are_the_atlas_maps(served):
    server, atlas = served
    grid = atlas.space_maps().grid
    status, body = get(server.url + "volumes/MNI152NLin6Asym/mpm.nii.gz")
    assert status == 200
    img = nib.Nifti1Image.from_bytes(gzip.decompress(body))
    np.testing.assert_array_equal(np.asarray(img.dataobj), atlas.mpm().values)
    np.testing.assert_allclose(img.affine, grid.affine)
    key = atlas.map_regions()[1].key
    status, body = get(server.url + f"volumes/MNI152NLin6Asym/pmaps/{key}.nii.gz")
    img = nib.Nifti1Image.from_bytes(gzip.decompress(body))
    np.testing.assert_array_equal(np.asarray(img.dataobj), atlas.probability_map(key).values)
    status, body = get(server.url + "volumes/MNI152NLin6Asym/template.nii.gz")
    assert status == 200 and nib.Nifti1Image.from_bytes(gzip.decompress(body)).shape == (182, 218, 182)
    status, body = get(server.url + "volumes/MNI152NLin6Asym/pmaps/no_such_area.nii.gz")
    assert status == 400 and "no_such_area" in json.loads(body)["error"]
    status, body = get(server.url + "volumes/BigBrain/mpm.nii.gz")
    assert status == 400 and "no maps in space" in json.loads(body)["error"]


def test_missing_bundle_and_bad_atlas_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLASBUILDER_NIIVUE", str(tmp_path / "missing.js"))
    with pytest.raises(MissingFileError, match="fetch_viewer_assets"):
        niivue_bundle()
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtlasDirectoryError):
        make_viewer_server(tmp_path / "empty", 0)


@pytest.mark.slow
@pytest.mark.skipif(browser_skip_reason() is not None, reason=str(browser_skip_reason()))
def test_viewer_in_headless_chromium(juelich_atlas, tmp_path):
    try:
        niivue_bundle()
    except MissingFileError:
        pytest.skip("NiiVue bundle absent: run scripts/fetch_viewer_assets.sh")
    from playwright.sync_api import sync_playwright

    atlas = load_atlas(juelich_atlas)
    server = make_viewer_server(juelich_atlas, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    problems: list[str] = []
    try:
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.set_default_timeout(120_000)
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(server.url + "?render=0")  # no 3-D tile: software WebGL is slow
            page.wait_for_function("window.atlasViewer && window.atlasViewer.ready")

            def shown() -> tuple[list[float], str | None, list[tuple[str, float]]]:
                mm = json.loads(page.get_attribute("#location-mm", "data-mm"))
                mpm = page.locator("#mpm-region")
                mpm_key = mpm.get_attribute("data-key") if mpm.count() else None
                items = page.locator("#areas li[data-key]")
                areas = [(items.nth(i).get_attribute("data-key"),
                          float(items.nth(i).get_attribute("data-probability")))
                         for i in range(items.count())]
                return mm, mpm_key, areas

            def expected(mm: list[float]) -> tuple[str | None, list[tuple[str, float]]]:
                ans = atlas.query(mm, min_probability=0.0)[0]
                idx, inside = atlas.space_maps().grid.nearest_voxel(np.asarray([mm]))
                label = int(atlas.mpm().values[tuple(idx[0])]) if inside[0] else 0
                return (atlas.regions.get(label).key if label else None,
                        [(r["key"], r["probability"]) for r in ans["regions"]])

            # 1. the coordinate box
            page.fill("#gx", "-10")
            page.fill("#gy", "-90")
            page.fill("#gz", "0")
            page.click("#goto button")
            page.wait_for_function("window.atlasViewer.lastQuery.point[1] === -90")
            mm, mpm_key, areas = shown()
            assert mm == [-10, -90, 0]
            assert (mpm_key, areas) == expected(mm)
            assert "hOc1_left" in [k for k, _ in areas]

            # 2. a click on a voxel of the axial slice shows the areas there
            target = [-20.0, -80.0, 0.0]
            pos = page.evaluate("mm => window.atlasViewer.canvasPosOfMM(mm)", target)
            box = page.locator("#gl").bounding_box()
            page.mouse.click(box["x"] + pos[0], box["y"] + pos[1])
            page.wait_for_function("window.atlasViewer.lastQuery.point[1] !== -90")
            mm, mpm_key, areas = shown()
            assert np.allclose(mm, target, atol=1.5), mm
            assert (mpm_key, areas) == expected(mm)
            assert mpm_key is not None and areas
            assert page.locator("#mpm-region").inner_text().strip() == atlas.regions.get(mpm_key).name

            # 3. the region picker loads a probability map
            page.fill("#region-filter", "hOc1")
            page.click("#tree span[data-key='hOc1_left']")
            page.wait_for_function("document.getElementById('pmap-name').textContent !== 'none'")
            assert page.inner_text("#pmap-name") == atlas.regions.get("hOc1_left").name
            assert page.evaluate("window.atlasViewer.nv.volumes.length") == 3

            shot = tmp_path / "viewer.png"
            page.screenshot(path=str(shot), timeout=180_000)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert problems == []
    # the MPM is drawn over the template: many saturated (coloured) pixels in the image area
    import matplotlib.image as mpimg

    rgb = mpimg.imread(shot)[:, 340:, :3]
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    assert (saturation > 0.25).mean() > 0.02
    shutil.copyfile(shot, SCREENSHOT_COPY)
