// atlasbuilder web viewer: NiiVue shows the volumes; the Python server answers /api/query with
// exactly what `atlasbuilder query` computes (nearest voxel of the atlas grid).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = {
    info: null, space: null, nv: null, pmapKey: null, pmapVol: null, regions: new Map(),
    ready: false, lastQuery: null, queryToken: 0, timer: null,
  };

  function setStatus(text) { $("status").textContent = text; }

  function hexToRgb(hex) {
    const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(hex || "");
    return m ? [parseInt(m[1], 16), parseInt(m[2], 16), parseInt(m[3], 16)] : [128, 128, 128];
  }

  async function getJSON(url) {
    const r = await fetch(url);
    const doc = await r.json();
    if (!r.ok) { throw new Error(doc.error || r.statusText); }
    return doc;
  }

  function spaceInfo() { return state.info.spaces.find((s) => s.name === state.space); }

  function fmt(v) { return (Math.round(v * 10) / 10).toFixed(1); }

  // ---- location panel -------------------------------------------------------------------------
  function swatch(colour) {
    const s = document.createElement("span");
    s.className = "swatch";
    s.style.background = colour;
    return s;
  }

  function showAnswer(ans) {
    state.lastQuery = ans;
    const [x, y, z] = ans.point;
    $("location-mm").textContent = `(${fmt(x)}, ${fmt(y)}, ${fmt(z)})`;
    $("location-mm").dataset.mm = JSON.stringify(ans.point);
    const mpm = $("location-mpm");
    mpm.replaceChildren();
    if (ans.outside) {
      mpm.textContent = "outside the atlas volume";
    } else if (ans.mpm) {
      mpm.append("MPM: ", swatch(ans.mpm.colour));
      const b = document.createElement("b");
      b.textContent = ` ${ans.mpm.name}`;
      b.dataset.key = ans.mpm.key;
      b.id = "mpm-region";
      mpm.append(b);
    } else {
      mpm.textContent = "MPM: no region";
    }
    const list = $("areas");
    list.replaceChildren();
    for (const r of ans.regions) {
      const li = document.createElement("li");
      li.dataset.key = r.key;
      li.dataset.probability = String(r.probability);
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("i");
      fill.style.width = `${Math.round(100 * r.probability)}%`;
      fill.style.background = r.colour;
      bar.append(fill);
      const p = document.createElement("span");
      p.className = "p";
      p.textContent = `${Math.round(100 * r.probability)}%`;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = r.name;
      name.title = r.key;
      li.append(p, bar, name);
      li.addEventListener("click", () => showPmap(r.key));
      list.append(li);
    }
    if (!ans.outside && ans.regions.length === 0) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "no mapped area here";
      list.append(li);
    }
  }

  async function queryAt(mm) {
    const token = ++state.queryToken;
    const q = new URLSearchParams({ x: mm[0], y: mm[1], z: mm[2], space: state.space });
    try {
      const ans = await getJSON(`/api/query?${q}`);
      if (token === state.queryToken) { showAnswer(ans); }
    } catch (err) {
      setStatus(`query failed: ${err.message}`);
    }
  }

  function onLocation(data) {
    if (!data || !data.mm) { return; }
    const mm = [data.mm[0], data.mm[1], data.mm[2]];
    clearTimeout(state.timer);
    state.timer = setTimeout(() => queryAt(mm), 60);  // dragging fires many events
  }

  // ---- volumes ---------------------------------------------------------------------------------
  function mpmLut() {
    const mapped = spaceInfo().mapped;
    const lut = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: [""] };
    for (const key of mapped) {
      const r = state.regions.get(key);
      const [R, G, B] = hexToRgb(r.colour);
      lut.R.push(R); lut.G.push(G); lut.B.push(B); lut.A.push(255); lut.I.push(r.id);
      lut.labels.push(r.name);
    }
    return lut;
  }

  async function loadSpace(space) {
    state.ready = false;
    state.space = space;
    state.pmapKey = null;
    state.pmapVol = null;
    setStatus(`loading ${space}…`);
    const nv = state.nv;
    const base = `/volumes/${encodeURIComponent(space)}`;
    await nv.loadVolumes([
      { url: `${base}/template.nii.gz`, name: "template.nii.gz", colormap: "gray" },
      {
        url: `${base}/mpm.nii.gz`, name: "mpm.nii.gz", opacity: Number($("mpm-opacity").value),
        ignoreZeroVoxels: true,
      },
    ]);
    nv.volumes[1].setColormapLabel(mpmLut());
    nv.updateGLVolume();
    updatePmapUi();
    const c = spaceInfo().centre;
    gotoMM(c);
    state.ready = true;
    setStatus(`${space}: click to query a voxel`);
  }

  function gotoMM(mm) {
    const nv = state.nv;
    nv.scene.crosshairPos = nv.mm2frac([mm[0], mm[1], mm[2]]);
    nv.drawScene();
    queryAt(mm);
  }

  function updatePmapUi() {
    $("pmap-name").textContent = state.pmapKey ? state.regions.get(state.pmapKey).name : "none";
    $("pmap-clear").hidden = !state.pmapKey;
    for (const el of document.querySelectorAll("#tree li > span")) {
      el.classList.toggle("selected", el.dataset.key === state.pmapKey);
    }
  }

  async function clearPmap() {
    if (state.pmapVol) { state.nv.removeVolume(state.pmapVol); }
    state.pmapVol = null;
    state.pmapKey = null;
    updatePmapUi();
  }

  async function showPmap(key) {
    if (!spaceInfo().mapped.includes(key)) { return; }
    await clearPmap();
    setStatus(`loading probability map of ${key}…`);
    const url = `/volumes/${encodeURIComponent(state.space)}/pmaps/${encodeURIComponent(key)}.nii.gz`;
    state.pmapVol = await state.nv.addVolumeFromUrl({
      url, name: `${key}.nii.gz`, colormap: "warm", cal_min: 0.01, cal_max: 1,
      opacity: Number($("pmap-opacity").value),
    });
    state.pmapKey = key;
    updatePmapUi();
    setStatus(`${state.space}: probability map of ${state.regions.get(key).name}`);
  }

  // ---- region tree -----------------------------------------------------------------------------
  function buildTree() {
    const mapped = new Set(spaceInfo().mapped);
    const make = (nodes, depth) => {
      const ul = document.createElement("ul");
      for (const n of nodes) {
        const li = document.createElement("li");
        li.dataset.search = `${n.name} ${n.key}`.toLowerCase();
        if (depth >= 2 && n.children.length) { li.classList.add("collapsed"); }
        const tog = document.createElement("span");
        tog.className = "toggle";
        tog.textContent = n.children.length ? (li.classList.contains("collapsed") ? "▸" : "▾") : "";
        const span = document.createElement("span");
        span.dataset.key = n.key;
        span.title = mapped.has(n.key) ? `${n.key}: show its probability map` : n.key;
        if (!mapped.has(n.key) && !n.children.length) { span.classList.add("nomap"); }
        span.append(swatch(n.colour), document.createTextNode(n.name));
        span.addEventListener("click", () => {
          if (mapped.has(n.key)) { showPmap(n.key); return; }
          li.classList.toggle("collapsed");
          tog.textContent = li.classList.contains("collapsed") ? "▸" : "▾";
        });
        li.append(tog, span);
        if (n.children.length) { li.append(make(n.children, depth + 1)); }
        ul.append(li);
      }
      return ul;
    };
    $("tree").replaceChildren(make(state.info.tree, 0));
  }

  function filterTree(text) {
    const t = text.trim().toLowerCase();
    const visit = (li) => {
      const kids = [...li.querySelectorAll(":scope > ul > li")];
      let any = false;
      for (const k of kids) { any = visit(k) || any; }
      const self = !t || li.dataset.search.includes(t);
      li.classList.toggle("hidden", !(self || any));
      if (t && any) {
        li.classList.remove("collapsed");
        const tog = li.querySelector(":scope > .toggle");
        if (tog && tog.textContent) { tog.textContent = "▾"; }
      }
      return self || any;
    };
    for (const li of document.querySelectorAll("#tree > ul > li")) { visit(li); }
  }

  // ---- wiring ----------------------------------------------------------------------------------
  function wire() {
    $("goto").addEventListener("submit", (ev) => {
      ev.preventDefault();
      gotoMM([Number($("gx").value), Number($("gy").value), Number($("gz").value)]);
    });
    $("space").addEventListener("change", (ev) => {
      loadSpace(ev.target.value).then(buildTree).catch(fail);
    });
    $("show-mpm").addEventListener("change", (ev) => {
      state.nv.setOpacity(1, ev.target.checked ? Number($("mpm-opacity").value) : 0);
    });
    $("mpm-opacity").addEventListener("input", (ev) => {
      if ($("show-mpm").checked) { state.nv.setOpacity(1, Number(ev.target.value)); }
    });
    $("pmap-opacity").addEventListener("input", (ev) => {
      if (state.pmapVol) {
        state.nv.setOpacity(state.nv.volumes.indexOf(state.pmapVol), Number(ev.target.value));
      }
    });
    $("pmap-clear").addEventListener("click", () => clearPmap());
    $("region-filter").addEventListener("input", (ev) => filterTree(ev.target.value));
    const types = {
      multi: state.nv.sliceTypeMultiplanar, axial: state.nv.sliceTypeAxial,
      coronal: state.nv.sliceTypeCoronal, sagittal: state.nv.sliceTypeSagittal,
      render: state.nv.sliceTypeRender,
    };
    for (const b of document.querySelectorAll(".views button")) {
      b.addEventListener("click", () => {
        state.nv.setSliceType(types[b.dataset.view]);
        for (const o of document.querySelectorAll(".views button")) { o.classList.toggle("on", o === b); }
      });
    }
  }

  function fail(err) {
    setStatus(`error: ${err.message}`);
    console.error(err);
  }

  async function main() {
    if (!window.niivue) { throw new Error("the NiiVue bundle did not load"); }
    state.info = await getJSON("/api/info");
    const walk = (nodes) => { for (const n of nodes) { state.regions.set(n.key, n); walk(n.children); } };
    walk(state.info.tree);
    document.title = `${state.info.name} — atlasbuilder viewer`;
    $("atlas-name").textContent = `${state.info.name} ${state.info.version || ""}`.trim();
    for (const s of state.info.spaces) {
      const o = document.createElement("option");
      o.value = o.textContent = s.name;
      $("space").append(o);
    }
    // ?render=0 leaves the 3-D tile out of the 2x2 view (much lighter without a GPU)
    const noRender = new URLSearchParams(window.location.search).get("render") === "0";
    const nv = new window.niivue.Niivue({
      backColor: [0.08, 0.09, 0.11, 1], show3Dcrosshair: true, dragAndDropEnabled: false,
      isColorbar: false, crosshairColor: [0.35, 0.66, 1, 1], loadingText: "loading",
      multiplanarShowRender: noRender ? 0 : 2,
    });
    state.nv = nv;
    await nv.attachTo("gl");
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.onLocationChange = onLocation;
    wire();
    await loadSpace(state.info.spaces[0].name);
    buildTree();
  }

  // for tests and the console: where a mm coordinate is drawn (CSS pixels in the canvas)
  window.atlasViewer = {
    get ready() { return state.ready; },
    get lastQuery() { return state.lastQuery; },
    get nv() { return state.nv; },
    gotoMM,
    showPmap,
    canvasPosOfMM(mm) {
      const nv = state.nv;
      const pos = nv.frac2canvasPos(nv.mm2frac([mm[0], mm[1], mm[2]]));
      if (!pos) { return null; }
      const dpr = nv.uiData && nv.uiData.dpr ? nv.uiData.dpr : window.devicePixelRatio || 1;
      return [pos[0] / dpr, pos[1] / dpr];
    },
  };

  main().catch(fail);
})();
