// The study page's glue: draws the data with plotly, sorts the table, links the brush, the table and the
// curves, and (while the sweep runs) re-reads report-data.js. Every string from the experiment reaches the
// page as text (textContent) or, for plotly, which renders a subset of HTML, escaped by esc().
"use strict";
(function () {
  const DIMS = ["optimizer", "lr", "batch_size", "dropout", "batchnorm"];
  const NAMES = { optimizer: "optimizer", lr: "learning rate", batch_size: "batch size", dropout: "dropout",
                  batchnorm: "batch norm", seed: "seed", acc: "best accuracy (%)" };
  const PALETTE = ["#3559e0", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0b7285", "#a61e4d", "#5c940d",
                   "#d9480f", "#1864ab", "#862e9c", "#087f5b"];
  const RAMP = ["#440154", "#3b528b", "#21918c", "#5ec962", "#b5a800", "#fde725"];
  const CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["sendDataToCloud"] };
  const state = { sort: null, highlight: null, colourBy: "optimizer", constraints: {}, updates: 0 };
  let data = null, pollTimer = null, pending = null;
  const seen = new Set();  // the plots below the first screen: drawn once they come near it, then on every update
  window.tuneAlexnetState = state;

  function esc(v) {
    return String(v).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }
  const $ = (id) => document.getElementById(id);
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  const fmt = {
    acc: (v) => (v === null || v === undefined ? "" : v.toFixed(2)),
    diff: (v) => (v === null || v === undefined ? "" : (v > 0 ? "+" : "") + v.toFixed(2)),
    bool: (v) => (v === null || v === undefined ? "" : v ? "yes" : "no"),
    onoff: (v) => (v === null || v === undefined ? "" : v ? "on" : "off"),
    plain: (v) => (v === null || v === undefined ? "" : String(v)),
    time: (v) => {
      if (v === null || v === undefined) return "";
      const s = Math.round(v);
      return s >= 3600 ? Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m"
        : Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
    },
  };
  function label(r) {
    return (r.run ? "run " + r.run : "trial " + r.trial) + ": " + r.optimizer + " lr " + r.lr + " batch " +
      r.batch_size + (r.dropout ? " dropout" : " no dropout") + (r.batchnorm ? " BN" : " no BN") +
      (data.repeats > 1 ? " seed " + r.seed : "");
  }

  // --- the headline ------------------------------------------------------------------------------------
  function headline() {
    $("title").textContent = "Study page: " + data.title;
    document.title = "Study page: " + data.title;
    $("path").textContent = data.path;
    $("ran").textContent = data.ran;
    $("reduced").hidden = !data.reduced;
    $("reduced").textContent = data.reduced ? "Reduced against the study: " + data.reduced +
      ". Accuracies are not comparable with the original's full runs." : "";
    const what = $("what");
    what.replaceChildren();
    for (const [k, v] of Object.entries(data.headline)) { what.append(el("dt", k), el("dd", v)); }
    const counts = $("counts");
    counts.replaceChildren();
    const order = ["running", "pending", "paused", "terminated", "diverged", "errored", "lost", "damaged"];
    const rank = (s) => (order.includes(s) ? order.indexOf(s) : order.length);
    const entries = Object.entries(data.counts).sort((a, b) => rank(a[0]) - rank(b[0]));
    for (const [status, n] of entries) {
      const chip = el("span", null, "chip st-" + status.replace(/[^a-z]/g, ""));
      chip.append(el("b", n), document.createTextNode(status));
      counts.append(chip);
    }
    $("notes").textContent = data.notes.join(" ");
    const best = data.runs.find((r) => r.trial === data.best);
    const bestP = $("best");
    bestP.replaceChildren();
    if (best) {
      bestP.append(el("b", best.acc.toFixed(2) + "%"), document.createTextNode(" " + label(best) +
        (best.orig !== null ? " (original: " + best.orig.toFixed(2) + "%)" : "")));
    } else bestP.textContent = "No run has an accuracy yet.";
    // the original's columns are over the same runs as this experiment's (page.py _optimizers)
    table($("optimizers"), ["optimizer", "runs", "best %", "its run", "mean %", "original best %", "its run",
      "original mean %"], data.optimizers.map((o) => [
      [o.optimizer], [o.runs, "num"], [fmt.acc(o.best), "num"], [fmt.plain(o.best_run), "num"],
      [fmt.acc(o.mean), "num"], [fmt.acc(o.orig_best), "num"], [fmt.plain(o.orig_best_run), "num"],
      [fmt.acc(o.orig_mean), "num"]]));
    $("footer").textContent = "Written " + data.updated + " by tune-alexnet. Accuracies are each run's best test " +
      "accuracy in percent; the original study's numbers are its published results for the same run.";
  }

  function table(t, heads, rows) {
    const tr = el("tr");
    heads.forEach((h) => tr.append(el("th", h)));
    t.tHead.replaceChildren(tr);
    t.tBodies[0].replaceChildren(...rows.map((cells) => {
      const row = el("tr");
      cells.forEach(([v, cls]) => row.append(el("td", v, cls)));
      return row;
    }));
  }

  function live() {
    const L = data.live, badge = $("live-badge");
    badge.hidden = false;
    badge.className = L ? "badge" : "badge done";
    badge.textContent = L ? "live · updated " + data.updated.slice(11, 19) : "finished";
    $("live").hidden = !L;
    if (!L) return;
    $("live-line").textContent = L.running.length + " running, " + L.pending + " pending; elapsed " +
      fmt.time(L.elapsed_s) + (L.left_s === null ? "; time left: known once a run has finished"
        : "; about " + fmt.time(L.left_s) + " left");
    table($("running"), ["run", "optimizer", "lr", "batch", "dropout", "batch norm", "epoch", "accuracy %",
      "best %"], L.running.map((r) => [[fmt.plain(r.run), "num"], [r.optimizer], [fmt.plain(r.lr), "num"],
      [fmt.plain(r.batch_size), "num"], [fmt.onoff(r.dropout)], [fmt.onoff(r.batchnorm)],
      [fmt.plain(r.epoch) + " / " + fmt.plain(r.max_epochs), "num"], [fmt.acc(r.acc), "num"],
      [fmt.acc(r.best), "num"]]));
  }

  // --- parallel coordinates and the brush --------------------------------------------------------------
  function levels(key) {
    const seen = [];
    for (const r of data.runs) if (r[key] !== null && !seen.includes(r[key])) seen.push(r[key]);
    if (key !== "optimizer") seen.sort((a, b) => a - b);
    return seen;
  }
  function axes() {
    const out = [];
    const opts = data.optimizers.map((o) => o.optimizer);
    for (const r of data.runs) if (r.optimizer !== null && !opts.includes(r.optimizer)) opts.push(r.optimizer);
    out.push({ key: "optimizer", pos: (r) => (r.optimizer === null ? null : opts.indexOf(r.optimizer)),
               tickvals: opts.map((_, i) => i), ticktext: opts, range: [-0.3, Math.max(opts.length - 0.7, 0.3)] });
    const lrs = levels("lr");
    out.push({ key: "lr", pos: (r) => (r.lr ? Math.log10(r.lr) : null), tickvals: lrs.map(Math.log10),
               ticktext: lrs.map(String) });
    const bss = levels("batch_size");
    out.push({ key: "batch_size", pos: (r) => (r.batch_size ? Math.log2(r.batch_size) : null),
               tickvals: bss.map(Math.log2), ticktext: bss.map(String) });
    for (const k of ["dropout", "batchnorm"]) {
      out.push({ key: k, pos: (r) => (r[k] === null ? null : r[k] ? 1 : 0), tickvals: [0, 1],
                 ticktext: ["off", "on"], range: [-0.2, 1.2] });
    }
    if (data.repeats > 1) {  // seeds are names, not amounts: one tick each, evenly spaced
      const seeds = levels("seed");
      out.push({ key: "seed", pos: (r) => (r.seed === null ? null : seeds.indexOf(r.seed)),
                 tickvals: seeds.map((_, i) => i), ticktext: seeds.map(String) });
    }
    out.push({ key: "acc", pos: (r) => r.acc });
    for (const a of out) {
      if (a.tickvals && !a.range) {
        const lo = Math.min(...a.tickvals), hi = Math.max(...a.tickvals), pad = Math.max((hi - lo) * 0.08, 0.2);
        a.range = [lo - pad, hi + pad];
      }
    }
    return out;
  }
  function inRange(v, ranges) {
    if (v === null || v === undefined || Number.isNaN(v)) return false;
    const list = Array.isArray(ranges[0]) ? ranges : [ranges];
    return list.some(([a, b]) => v >= Math.min(a, b) && v <= Math.max(a, b));
  }
  function selected(r, axs) {
    return axs.every((a) => !state.constraints[a.key] || inRange(a.pos(r), state.constraints[a.key]));
  }

  function parcoords(axs) {
    const rows = data.runs.filter((r) => r.acc !== null && r.acc !== undefined);
    const accs = rows.map((r) => r.acc);
    const dims = axs.map((a) => {
      const d = { label: esc(NAMES[a.key]), values: rows.map(a.pos) };
      if (a.tickvals) { d.tickvals = a.tickvals; d.ticktext = a.ticktext.map(esc); }
      if (a.range) d.range = a.range;
      if (a.key === "acc") d.range = [Math.min(...accs, 100) - 1, Math.max(...accs, 0) + 1];
      if (state.constraints[a.key]) d.constraintrange = state.constraints[a.key];
      return d;
    });
    const trace = { type: "parcoords", dimensions: dims, labelangle: 0, labelfont: { size: 13 },
      line: { color: accs, colorscale: "Viridis", cmin: Math.min(...accs, 100), cmax: Math.max(...accs, 0),
              showscale: true, colorbar: { title: { text: "best acc. %" }, thickness: 12, x: 1.06 } } };
    const layout = { margin: { l: 70, r: 110, t: 50, b: 30 }, height: 380, font: { size: 12 } };
    Plotly.react("parcoords", rows.length ? [trace] : [], layout, CONFIG);
  }
  function brushed() {
    const gd = $("parcoords");
    if (!gd.data || !gd.data[0]) return;
    const axs = axes(), c = {};
    gd.data[0].dimensions.forEach((d, i) => {
      const r = d.constraintrange;
      if (r && r.length) c[axs[i].key] = JSON.parse(JSON.stringify(r));
    });
    state.constraints = c;
    runsTable(axs);
    curves(axs);
  }

  // --- the run table -----------------------------------------------------------------------------------
  const COLUMNS = [
    ["run", "run", "num", fmt.plain], ["optimizer", "optimizer", "", fmt.plain], ["lr", "lr", "num", fmt.plain],
    ["batch_size", "batch", "num", fmt.plain], ["dropout", "dropout", "", fmt.onoff],
    ["batchnorm", "batch norm", "", fmt.onoff], ["seed", "seed", "num", fmt.plain],
    ["acc", "best acc. %", "num", fmt.acc], ["orig", "original %", "num", fmt.acc],
    ["diff", "difference", "num", fmt.diff], ["epochs", "epochs", "num", fmt.plain],
    ["best_epoch", "best epoch", "num", fmt.plain], ["stopped", "stopped early", "", fmt.bool],
    ["status", "status", "", fmt.plain], ["train_s", "train time", "num", fmt.time],
  ];
  function compare(a, b) {
    const { key, dir } = state.sort, x = a[key], y = b[key];
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;  // empty cells last, either way
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * dir;
  }
  function runsTable(axs) {
    const t = $("runs"), tr = el("tr");
    for (const [key, name, cls] of COLUMNS) {
      const th = el("th", name, cls);
      th.dataset.key = key;
      if (state.sort && state.sort.key === key) th.classList.add(state.sort.dir > 0 ? "sorted-asc" : "sorted-desc");
      th.addEventListener("click", () => {
        state.sort = { key, dir: state.sort && state.sort.key === key ? -state.sort.dir : key === "acc" ? -1 : 1 };
        runsTable(axes());
      });
      tr.append(th);
    }
    t.tHead.replaceChildren(tr);
    let rows = data.runs.filter((r) => selected(r, axs));
    if (state.sort) rows = rows.slice().sort(compare);
    t.tBodies[0].replaceChildren(...rows.map((r) => {
      const row = el("tr");
      row.dataset.trial = r.trial;
      if (r.trial === data.best) row.classList.add("best");
      if (r.trial === state.highlight) row.classList.add("highlight");
      for (const [key, , cls, f] of COLUMNS) {
        let c = cls;
        if (key === "diff" && r.diff !== null) c += r.diff >= 0 ? " pos" : " neg";
        row.append(el("td", f(r[key]), c));
      }
      row.addEventListener("click", () => {
        state.highlight = state.highlight === r.trial ? null : r.trial;
        runsTable(axes());
        curves(axes());
      });
      return row;
    }));
    $("shown").textContent = rows.length + " of " + data.runs.length + " runs shown" +
      (Object.keys(state.constraints).length ? " (selection on " +
        Object.keys(state.constraints).map((k) => NAMES[k]).join(", ") + ")" : "");
  }

  // --- learning curves ---------------------------------------------------------------------------------
  function colours() {
    const key = state.colourBy, vals = levels(key), map = new Map();
    const ramp = key === "lr" || key === "batch_size" || key === "seed";
    vals.forEach((v, i) => map.set(v, ramp ? RAMP[Math.round((i * (RAMP.length - 1)) / Math.max(vals.length - 1, 1))]
      : PALETTE[i % PALETTE.length]));
    const legend = $("legend");
    legend.replaceChildren(...vals.map((v) => {
      const s = el("span"), sw = el("i");
      sw.style.background = map.get(v);
      s.append(sw, document.createTextNode(key === "dropout" || key === "batchnorm" ? fmt.onoff(v) : String(v)));
      return s;
    }));
    return (r) => map.get(r[key]) || "#98a2b3";
  }
  function curves(axs) {
    seen.add("curve-acc");
    // One trace per colour and selection state (runs joined by gaps), plus one for the highlighted run: a
    // hundred runs draw as a handful of traces, which keeps the page quick to open.
    const colour = colours(), hl = state.highlight, groups = new Map(), marks = [[], [], [], [], [], [], [], []];
    let hlRun = null;
    for (const r of data.runs) {
      const c = data.curves[r.trial];
      if (!c || !c[0].length) continue;
      if (r.trial === hl) { hlRun = r; continue; }
      const on = selected(r, axs), key = colour(r) + (on ? "|on" : "|off");
      if (!groups.has(key)) groups.set(key, { colour: colour(r), on: on, x: [], acc: [], loss: [], text: [] });
      const g = groups.get(key), name = esc(label(r));
      for (let i = 0; i < c[0].length; i++) { g.x.push(c[0][i]); g.acc.push(c[1][i]); g.loss.push(c[2][i]); g.text.push(name); }
      g.x.push(null); g.acc.push(null); g.loss.push(null); g.text.push("");
      if (!on) continue;
      const bi = r.best_epoch ? c[0].indexOf(r.best_epoch) : -1, li = c[0].length - 1;
      if (bi >= 0) { marks[0].push(c[0][bi]); marks[1].push(c[1][bi]); marks[2].push(c[2][bi]); marks[3].push(esc(label(r))); }
      marks[4].push(c[0][li]); marks[5].push(c[1][li]); marks[6].push(c[2][li]); marks[7].push(esc(label(r)));
    }
    const traces = { acc: [], loss: [] };
    for (const g of groups.values()) {
      const opacity = hl ? 0.12 : g.on ? 0.75 : 0.07;
      for (const [k, ys, unit] of [["acc", g.acc, "%"], ["loss", g.loss, ""]]) {
        traces[k].push({ type: "scatter", mode: "lines", x: g.x, y: ys, customdata: g.text, opacity: opacity,
          line: { color: g.colour, width: 1.3 }, showlegend: false, connectgaps: false,
          hovertemplate: "%{customdata}<br>epoch %{x}: %{y:.3f}" + unit + "<extra></extra>" });
      }
    }
    for (const [k, y0, y1, unit] of [["acc", 1, 5, "%"], ["loss", 2, 6, ""]]) {
      traces[k].push(
        { type: "scatter", mode: "markers", x: marks[0], y: marks[y0], customdata: marks[3], name: "best epoch",
          marker: { symbol: "circle-open", size: 7, color: "#1f2430", line: { width: 1.3 } },
          hovertemplate: "%{customdata}<br>best epoch %{x}: %{y:.3f}" + unit + "<extra></extra>" },
        { type: "scatter", mode: "markers", x: marks[4], y: marks[y1], customdata: marks[7], name: "last epoch",
          marker: { symbol: "x-thin-open", size: 8, color: "#b42318", line: { width: 1.5 } },
          hovertemplate: "%{customdata}<br>last epoch %{x}: %{y:.3f}" + unit + "<extra></extra>" });
      if (hlRun) {
        const c = data.curves[hlRun.trial], name = esc(label(hlRun)), bi = c[0].indexOf(hlRun.best_epoch);
        const ys = k === "acc" ? c[1] : c[2], last = c[0].length - 1;
        traces[k].push({ type: "scatter", mode: "lines+markers", x: c[0], y: ys, meta: hlRun.trial, name: name,
          line: { color: colour(hlRun), width: 3.5 }, marker: { size: 4 }, opacity: 1,
          hovertemplate: name + "<br>epoch %{x}: %{y:.3f}" + unit + "<extra></extra>" });
        traces[k].push({ type: "scatter", mode: "markers", showlegend: false, hoverinfo: "skip",
          x: [...(bi >= 0 ? [c[0][bi]] : []), c[0][last]], y: [...(bi >= 0 ? [ys[bi]] : []), ys[last]],
          marker: { symbol: [...(bi >= 0 ? ["circle-open"] : []), "x-thin-open"], size: 12,
                    color: "#1f2430", line: { width: 2.5 } } });
      }
    }
    // Epochs are whole numbers: ticks at a whole step (1, 2, 5, 10, 20, ...) that gives at most about ten.
    let last = 1;
    for (const r of data.runs) { const c = data.curves[r.trial]; if (c && c[0].length) last = Math.max(last, c[0][c[0].length - 1]); }
    let step = 1;
    for (let i = 0; last / step > 10; i++) step = [2, 5, 10][i % 3] * 10 ** Math.floor(i / 3);
    const base = (title, y) => ({ title: { text: title, x: 0.01, xanchor: "left" }, height: 400, margin: { l: 60, r: 10, t: 40, b: 80 },
      hovermode: "closest", yaxis: y,
      xaxis: { title: { text: "epoch" }, zeroline: false, tickmode: "linear", tick0: 0, dtick: step, tickformat: "d" },
      legend: { orientation: "h", y: -0.22, x: 0 } });
    Plotly.react("curve-acc", traces.acc, base("Test accuracy per epoch", { title: { text: "accuracy (%)" } }), CONFIG);
    Plotly.react("curve-loss", traces.loss,
      base("Train loss per epoch", { title: { text: "train loss" }, type: "log", ...logTicks(traces.loss) }), CONFIG);
  }

  // Log-axis ticks at 1, 2 and 5 times a power of ten (every digit where that leaves fewer than three), each
  // written out in full: plotly's own labels either repeat ("0.35, 0.35") or drop the decade ("5" for 0.5).
  function logTicks(traces) {
    let lo = Infinity, hi = -Infinity;
    for (const t of traces) for (const y of t.y) if (y > 0) { lo = Math.min(lo, y); hi = Math.max(hi, y); }
    if (!(lo < Infinity)) return {};
    const within = (digits) => {
      const v = [];
      for (let k = Math.floor(Math.log10(lo)); k <= Math.ceil(Math.log10(hi)); k++) {
        for (const d of digits) { const x = Number((d * 10 ** k).toPrecision(1)); if (x >= lo && x <= hi) v.push(x); }
      }
      return v;
    };
    let vals = within([1, 2, 5]);
    if (vals.length < 3) vals = within([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    if (vals.length < 2) return {};
    return { tickmode: "array", tickvals: vals, ticktext: vals.map((v) => String(v)) };
  }

  // --- heatmaps, main effects, importance --------------------------------------------------------------
  function heatmap() {
    seen.add("heatmap");
    const H = data.heatmap, nO = H.optimizers.length;
    const panels = ["dropout, no BN", "dropout, BN", "no dropout, no BN", "no dropout, BN"];
    const traces = [], layout = { height: 80 + 240 * Math.max(nO, 1), margin: { l: 70, r: 20, t: 30, b: 50 },
      annotations: [], font: { size: 11 } };
    const xs = H.batch_sizes.map(String), ys = H.lrs.map(String);
    const used = [0, 1, 2, 3].filter((p) => H.cells.some((c) => c.p === p)), nP = Math.max(used.length, 1);
    for (let o = 0; o < nO; o++) {
      for (const [j, p] of used.entries()) {
        const k = o * nP + j + 1, z = ys.map(() => xs.map(() => null)), text = ys.map(() => xs.map(() => ""));
        for (const c of H.cells.filter((c) => c.o === o && c.p === p)) {
          z[c.lr][c.bs] = c.mean;
          text[c.lr][c.bs] = c.mean.toFixed(1) + (c.std !== null ? " ± " + c.std.toFixed(1) : "") +
            (c.orig !== null ? "<br>orig. " + c.orig.toFixed(1) : "");
        }
        traces.push({ type: "heatmap", x: xs, y: ys, z: z, text: text, texttemplate: "%{text}",
          textfont: { size: 10 }, hovertemplate: "lr %{y}, batch %{x}<br>%{text}<extra></extra>",
          zmin: 10, zmax: 90, colorscale: "Viridis", showscale: k === 1, xgap: 2, ygap: 2,
          colorbar: { title: { text: "acc. %" }, thickness: 12, len: 0.6 },
          xaxis: "x" + (k === 1 ? "" : k), yaxis: "y" + (k === 1 ? "" : k) });
        const w = Math.min(1 / nP, 0.25), x0 = j * w + 0.01, x1 = (j + 1) * w - 0.02, top = 1 - o / nO, bottom = 1 - (o + 1) / nO;
        layout["xaxis" + (k === 1 ? "" : k)] = { domain: [x0, x1], type: "category", anchor: "y" + (k === 1 ? "" : k),
          title: o === nO - 1 ? { text: "batch size" } : undefined };
        layout["yaxis" + (k === 1 ? "" : k)] = { domain: [bottom + 0.1 / nO, top - 0.12 / nO], type: "category",
          anchor: "x" + (k === 1 ? "" : k), title: j === 0 ? { text: "learning rate" } : undefined };
        layout.annotations.push({ text: "<b>" + esc(H.optimizers[o]) + "</b>: " + panels[p], showarrow: false,
          xref: "paper", yref: "paper", x: (x0 + x1) / 2, y: top - 0.115 / nO, yanchor: "bottom", font: { size: 12 } });
      }
    }
    $("heat-note").textContent = "Each cell: this experiment's mean best accuracy" +
      (data.repeats > 1 ? " ± standard deviation over its " + data.repeats + " seeds" : "") +
      ", and below it the original study's accuracy for the same run. Empty cells: not run.";
    Plotly.react("heatmap", traces, layout, CONFIG);
  }
  function effects() {
    seen.add("effects");
    const E = data.effects, n = E.length, traces = [], layout = { height: 330, barmode: "group",
      margin: { l: 55, r: 10, t: 40, b: 70 }, legend: { orientation: "h", y: -0.2, x: 0 }, annotations: [] };
    E.forEach((e, i) => {
      const k = i ? String(i + 1) : "", xs = e.levels.map((l) => esc(l.level));
      traces.push({ type: "bar", name: "this experiment", x: xs, y: e.levels.map((l) => l.mean),
        error_y: { type: "data", array: e.levels.map((l) => l.std || 0), visible: true },
        marker: { color: "#3559e0" }, xaxis: "x" + k, yaxis: "y" + k, showlegend: i === 0,
        hovertemplate: "%{x}: %{y:.2f}%<extra>this experiment</extra>" });
      traces.push({ type: "bar", name: "original (same runs)", x: xs, y: e.levels.map((l) => l.orig),
        marker: { color: "#c0c6d2" }, xaxis: "x" + k, yaxis: "y" + k, showlegend: i === 0,
        hovertemplate: "%{x}: %{y:.2f}%<extra>original</extra>" });
      const x0 = i / n + 0.02, x1 = (i + 1) / n - 0.02;
      layout["xaxis" + k] = { domain: [x0, x1], type: "category", anchor: "y" + k };
      layout["yaxis" + k] = { range: [0, 100], anchor: "x" + k, title: i === 0 ? { text: "mean acc. %" } : undefined };
      layout.annotations.push({ text: esc(NAMES[e.dim]), showarrow: false, xref: "paper", yref: "paper",
        x: (x0 + x1) / 2, y: 1.0, yanchor: "bottom" });
    });
    Plotly.react("effects", traces, layout, CONFIG);
  }
  function importance() {
    const I = data.importance, dims = DIMS.filter((d) => d in I.ours || d in I.orig);
    const rest = (s) => Math.max(0, 1 - dims.reduce((a, d) => a + (s[d] || 0), 0));
    const varied = (d) => new Set(data.runs.filter((r) => r.acc !== null && r.acc !== undefined).map((r) => r[d])).size > 1;
    const ys = [...dims.map((d) => NAMES[d] + (varied(d) ? "" : " (not varied)")), "interactions and noise"];
    const bar = (s, name, color) => ({ type: "bar", orientation: "h", name: name, y: ys,
      x: [...dims.map((d) => 100 * (s[d] || 0)), 100 * rest(s)], marker: { color: color },
      hovertemplate: "%{y}: %{x:.1f}%<extra>" + esc(name) + "</extra>" });
    const traces = Object.keys(I.ours).length ? [bar(I.ours, "this experiment", "#3559e0")] : [];
    if (Object.keys(I.orig).length) traces.push(bar(I.orig, "original, same " + I.orig_runs + " runs", "#c0c6d2"));
    Plotly.react("importance", traces, { height: 280, barmode: "group", title: { text: "Share of variance explained" },
      margin: { l: 150, r: 20, t: 40, b: 40 }, xaxis: { title: { text: "% of the variance" }, range: [0, 100] },
      yaxis: { autorange: "reversed" }, legend: { orientation: "h", y: -0.25 } }, CONFIG);
  }
  function problems() {
    const rows = data.runs.filter((r) => data.problem_statuses.includes(r.status));
    $("no-problems").hidden = rows.length > 0;
    $("problems").parentElement.hidden = rows.length === 0;
    table($("problems"), ["run", "trial", "optimizer", "status", "epochs", "error"], rows.map((r) => [
      [fmt.plain(r.run), "num"], [r.trial], [fmt.plain(r.optimizer)], [r.status], [fmt.plain(r.epochs), "num"],
      [r.error || "", "err"]]));
  }

  // --- drawing, and live updates -----------------------------------------------------------------------
  function draw() {
    const axs = axes(), times = {};
    const timed = (name, f) => { const t = performance.now(); f(); times[name] = Math.round(performance.now() - t); };
    timed("headline", () => { headline(); live(); });
    timed("parcoords", () => parcoords(axs));
    const gd = $("parcoords");
    if (gd.on && !gd.dataset.linked) { gd.on("plotly_restyle", brushed); gd.dataset.linked = "1"; }
    timed("table", () => runsTable(axs));
    if (seen.has("curve-acc")) timed("curves", () => curves(axs));
    if (seen.has("heatmap")) timed("heatmap", heatmap);
    if (seen.has("effects")) timed("effects", () => { effects(); importance(); });
    timed("problems", problems);
    document.body.dataset.drawMs = JSON.stringify(times);
    document.body.dataset.updates = String(state.updates);
    if (!document.body.dataset.ready) document.body.dataset.readyMs = String(performance.now());
    document.body.dataset.ready = "1";
  }
  function setup() {
    const select = $("colour-by");
    for (const k of [...DIMS, "seed"]) {
      const o = el("option", NAMES[k]);
      o.value = k;
      select.append(o);
    }
    // colour by the first setting that varies here (one optimizer only: its curves would all be one colour)
    state.colourBy = DIMS.find((k) => new Set(data.runs.map((r) => r[k])).size > 1) || state.colourBy;
    select.value = state.colourBy;
    select.addEventListener("change", () => { state.colourBy = select.value; curves(axes()); });
    $("clear").addEventListener("click", () => {
      state.constraints = {};
      state.highlight = null;
      draw();
    });
  }
  function schedule() {
    clearTimeout(pollTimer);
    if (data.live) pollTimer = setTimeout(poll, Math.max(500, 1000 * data.poll_s));
  }
  function poll() {
    if (pending) pending.remove();
    pending = document.createElement("script");
    pending.src = "report-data.js?t=" + Date.now();
    pending.onerror = schedule;  // not there (yet): try again later
    pending.onload = () => { if (!pollTimer) schedule(); };
    pollTimer = null;
    document.head.append(pending);
  }
  window.tuneAlexnetUpdate = function (next) {
    if (!next || next.stamp === data.stamp) { schedule(); return; }
    data = next;
    state.updates += 1;
    if (state.highlight && !data.runs.some((r) => r.trial === state.highlight)) state.highlight = null;
    draw();
    schedule();
  };

  // The plots below the first screen draw when they come near it, so that the page opens quickly.
  const LAZY = { "curve-acc": () => curves(axes()), heatmap: heatmap, effects: () => { effects(); importance(); } };
  function lazy() {
    if (!("IntersectionObserver" in window)) { for (const f of Object.values(LAZY)) f(); return; }
    const io = new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (!e.isIntersecting) continue;
        io.unobserve(e.target);
        if (!seen.has(e.target.id)) LAZY[e.target.id]();
      }
    }, { rootMargin: "300px" });
    for (const id of Object.keys(LAZY)) io.observe($(id));
  }

  data = JSON.parse($("study-data").textContent);
  setup();
  draw();
  lazy();
  schedule();
})();
