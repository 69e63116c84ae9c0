// Trends and the station map of the wall: uPlot charts (vendored, api/static/vendor/uplot) loaded from
// /api/kpis/history, then moved by the feed's updates; stations drawn in SVG by latitude and longitude.
"use strict";

window.IocCharts = (function () {
  const TZ = "Asia/Ho_Chi_Minh";
  const HOUR = 3600;
  const BUCKET = 1800;  // the hydrographs' and incident lines' step: the history's buckets
  const REDRAW_MS = 1000;
  const SEV_COLOURS = { critical: "#ef4444", high: "#fb923c", medium: "#facc15", low: "#60a5fa" };
  const SEVERITIES = ["critical", "high", "medium", "low"];
  const BD_COLOURS = ["#facc15", "#fb923c", "#ef4444"];
  const svgNS = "http://www.w3.org/2000/svg";

  let w = null;            // what the wall gives: t, nf, role, mainScope, stations, unitNames, get, authHeaders, aqiBand, alarmColour
  let loadedFor = null;    // the token/scope the charts were loaded for
  const hydro = new Map(); // station_id -> {plot, xs, ys, bds}
  const air = new Map();   // station_id -> {plot, hours: Map(hourStart -> aqi)}
  let dossiers = null;     // {plot, today: Map(hour -> cumulative received/completed), week: ...}
  let incidents = null;    // {plot, points: [[t, {sev: n}]]}
  let dirty = false;
  let selected = null;     // the station shown in the map's detail box

  const $ = (id) => document.getElementById(id);
  const now = () => Date.now() / 1000;
  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const tzDate = (ts) => uPlot.tzDate(new Date(ts * 1e3), TZ);
  const localMidnight = (ts) => {
    // Asia/Ho_Chi_Minh is UTC+7 all year.
    const day = Math.floor((ts + 7 * HOUR) / 86400);
    return day * 86400 - 7 * HOUR;
  };

  async function history(kpi, scope, win, from, to, bucket) {
    const q = new URLSearchParams({ kpi, scope, window: win, from: new Date(from * 1e3).toISOString(),
      to: new Date(to * 1e3).toISOString(), bucket });
    try {
      const res = await fetch("/api/kpis/history?" + q, { headers: w.authHeaders() });
      if (!res.ok) return [];
      return (await res.json()).points.map((p) => [Date.parse(p.as_of) / 1000, p.value, Date.parse(p.t) / 1000]);
    } catch (e) {
      return [];
    }
  }

  // --- common chart options ----------------------------------------------------------------------
  function sizeOf(el, height) {
    const width = Math.max(120, Math.floor(el.clientWidth || 300));
    return { width, height: Math.max(80, Math.floor(height || el.clientHeight || 160)) };
  }

  const DAY = new Intl.DateTimeFormat("vi-VN", { timeZone: TZ, day: "numeric", month: "numeric" });
  const CLOCK = new Intl.DateTimeFormat("vi-VN", { timeZone: TZ, hour: "2-digit", minute: "2-digit", hour12: false });

  // Axes sized from the page's font (so 4K reads like 1080p); times as Vietnamese read them (5/12, 14:00).
  function baseAxes(yFormat, xTime, opts = {}) {
    const grid = { stroke: css("--line") || "#23304a", width: 1 };
    const px = parseFloat(getComputedStyle(document.documentElement).fontSize) * 0.68;
    const font = Math.round(px) + "px sans-serif";
    const x = { stroke: css("--muted") || "#93a3bf", grid, ticks: grid, font, size: Math.round(px * 1.9), show: opts.x !== false };
    if (!xTime) x.values = (u, splits) => splits.map((v) => String(v).padStart(2, "0") + "h");
    else x.values = (u, splits) => {
      const span = u.scales.x.max - u.scales.x.min;
      // Over days: the date at local midnight, the hour elsewhere ("5/12", "12h").
      return splits.map((v) => (span <= 36 * HOUR ? CLOCK.format(new Date(v * 1e3))
        : (v + 7 * HOUR) % 86400 === 0 ? DAY.format(new Date(v * 1e3)) : String(((v + 7 * HOUR) % 86400) / HOUR) + "h"));
    };
    if (!xTime) x.incrs = [1, 2, 3, 4, 6, 12];
    else x.incrs = [HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, 86400];
    if (!opts.x && opts.x !== undefined) x.size = 0;
    return [x, { stroke: css("--muted") || "#93a3bf", grid, ticks: grid, font, size: Math.round(px * (opts.ySize || 3.6)),
      values: (u, splits) => splits.map(yFormat) }];
  }

  // "Quan trắc không khí Vinh Phú" → "Vinh Phú": the kind is the panel's title already.
  const shortName = (st) => (st.name || st.station_id).replace(/^(Quan trắc không khí|Trạm thủy văn|Trạm đo mưa|Trạm khí tượng)\s+/u, "");

  function makePlot(el, opts, data, height) {
    el.replaceChildren();
    return new uPlot({ ...sizeOf(el, height), legend: { show: false }, cursor: { show: false }, tzDate, ...opts }, data, el);
  }

  // --- hydrographs: each gauge over 72 h against BĐ I/II/III ---------------------------------------
  function hydroRange(st) {
    return (u, min, max) => {
      const known = [st.bd1_m, st.bd2_m, st.bd3_m].filter((x) => x !== null && x !== undefined);
      const lo = Math.min(min ?? Infinity, ...known);
      const hi = Math.max(max ?? -Infinity, ...known);
      if (!isFinite(lo) || !isFinite(hi)) return [0, 1];
      const pad = Math.max(0.2, (hi - lo) * 0.08);
      return [Math.floor((lo - pad) * 10) / 10, Math.ceil((hi + pad) * 10) / 10];
    };
  }

  async function loadHydro(gauges) {
    const box = $("hydro-charts");
    box.replaceChildren();
    box.classList.toggle("single", gauges.length <= 2);
    hydro.clear();
    const to = now();
    await Promise.all(gauges.map(async (st) => {
      const card = document.createElement("figure");
      card.className = "chart-card hydro-card";
      card.dataset.station = st.station_id;
      const cap = document.createElement("figcaption");
      cap.textContent = shortName(st) + (st.river ? " · " + st.river : "");
      cap.title = st.name || st.station_id;
      const now_ = document.createElement("b");
      now_.className = "chart-now";
      cap.appendChild(now_);
      const plotEl = document.createElement("div");
      plotEl.className = "plot";
      card.append(cap, plotEl);
      box.appendChild(card);
      const pts = await history("water.level_m", "station:" + st.station_id, "now", to - 72 * HOUR, to, "30m");
      const entry = { st, xs: pts.map((p) => p[0]), ys: pts.map((p) => p[1]), el: plotEl, cap: now_, card };
      hydro.set(st.station_id, entry);
    }));
    for (const entry of hydro.values()) drawHydro(entry);
  }

  function hydroData(e) {
    const bds = [e.st.bd1_m, e.st.bd2_m, e.st.bd3_m];
    return [e.xs, e.ys, ...bds.map((b) => e.xs.map(() => (b === null || b === undefined ? null : b)))];
  }

  function drawHydro(e) {
    const m = (v) => w.metres(v);
    const opts = {
      scales: { x: { time: true, range: () => [now() - 72 * HOUR, now()] }, y: { range: hydroRange(e.st) } },
      axes: baseAxes((v) => w.nf().format(v), true, { ySize: 4.2 }),
      series: [{}, { stroke: css("--accent") || "#38bdf8", width: 2, spanGaps: true, points: { show: false } },
        ...BD_COLOURS.map((c) => ({ stroke: c, width: 1.5, dash: [6, 4], points: { show: false } }))],
    };
    e.plot = makePlot(e.el, opts, hydroData(e), e.el.clientHeight || 140);
    e.card.dataset.points = String(e.xs.length);
    e.card.dataset.last = String(e.xs.length ? e.xs[e.xs.length - 1] : 0);
    const last = e.ys.length ? e.ys[e.ys.length - 1] : null;
    e.cap.textContent = last === null || last === undefined ? "" : " " + m(last) + " m";
  }

  // --- VN_AQI over 24 h per air station, bars in the band colours ----------------------------------
  async function loadAir(stations) {
    const box = $("aqi-charts");
    box.replaceChildren();
    box.classList.toggle("single", stations.length <= 2);
    air.clear();
    const to = now();
    const from = Math.floor((to - 23 * HOUR) / HOUR) * HOUR;
    await Promise.all(stations.map(async (st) => {
      const card = document.createElement("figure");
      card.className = "chart-card aqi-card";
      card.dataset.station = st.station_id;
      const cap = document.createElement("figcaption");
      cap.textContent = shortName(st);
      cap.title = st.name || st.station_id;
      const plotEl = document.createElement("div");
      plotEl.className = "plot";
      card.append(cap, plotEl);
      box.appendChild(card);
      const pts = await history("env.aqi", "station:" + st.station_id, "now", from, to, "1h");
      const hours = new Map();
      for (const [, v, t0] of pts) if (v !== null && v !== undefined) hours.set(Math.floor(t0 / HOUR) * HOUR, v);
      air.set(st.station_id, { st, hours, el: plotEl, card });
    }));
    for (const e of air.values()) drawAir(e);
  }

  function airData(e) {
    const last = Math.floor(now() / HOUR) * HOUR;
    const xs = [];
    for (let t = last - 23 * HOUR; t <= last; t += HOUR) xs.push(t + HOUR / 2);
    return [xs, xs.map((x) => e.hours.get(x - HOUR / 2) ?? null)];
  }

  function drawAir(e) {
    const colours = (u, sidx) => u.data[sidx].map((v) => (v === null || v === undefined ? null : w.aqiBand(v).colour));
    const opts = {
      scales: { x: { time: true, range: (u, a, b) => [a - HOUR / 2, b + HOUR / 2] },
        y: { range: (u, min, max) => [0, Math.max(100, Math.ceil(((max || 0) * 1.1) / 50) * 50)] } },
      axes: baseAxes((v) => w.nf().format(v), true, { x: air.size <= 2, ySize: 3 }),
      series: [{}, { width: 0, fill: "#888", points: { show: false }, paths: uPlot.paths.bars({ size: [0.85, 64], disp: { fill: { unit: 3, values: colours } } }) }],
    };
    const data = airData(e);
    e.plot = makePlot(e.el, opts, data, e.el.clientHeight || 90);
    e.card.dataset.bars = String(data[1].filter((v) => v !== null).length);
  }

  // --- dossiers per hour today against the same weekday last week ---------------------------------
  function perHour(cumulative, upto) {
    // cumulative: Map(hour index 0..23 -> the "today" counter at the end of that hour, as last seen)
    const out = [];
    let before = 0;
    for (let h = 0; h < 24; h++) {
      if (h > upto) { out.push(null); continue; }
      const v = cumulative.get(h);
      if (v === undefined) { out.push(h < upto ? 0 : null); continue; }
      out.push(Math.max(0, v - before));
      before = v;
    }
    return out;
  }

  async function loadDossiers(scope) {
    const to = now();
    const today = localMidnight(to);
    const week = today - 7 * 86400;
    const grab = async (kpi, from, until) => {
      const map = new Map();
      for (const [, v, t0] of await history(kpi, scope, "today", from, until, "1h")) {
        if (v !== null && v !== undefined) map.set(Math.floor((t0 - from) / HOUR), v);
      }
      return map;
    };
    const [rt, ct, rw, cw] = await Promise.all([
      grab("dossier.received", today, to), grab("dossier.completed", today, to),
      grab("dossier.received", week, week + 86400), grab("dossier.completed", week, week + 86400),
    ]);
    dossiers = { scope, today, received: rt, completed: ct, weekReceived: rw, weekCompleted: cw, el: $("dossier-chart") };
    drawDossiers();
  }

  function dossierData() {
    const d = dossiers;
    const upto = Math.floor((now() - d.today) / HOUR);
    const xs = Array.from({ length: 24 }, (_, h) => h);
    return [xs, perHour(d.received, upto), perHour(d.completed, upto), perHour(d.weekReceived, 23), perHour(d.weekCompleted, 23)];
  }

  function drawDossiers() {
    const d = dossiers;
    const bars = (off) => uPlot.paths.bars({ size: [0.4, 40], align: 0, disp: { x0: { unit: 1, values: (u) => u.data[0].map((x) => x + off) }, size: { unit: 1, values: (u) => u.data[0].map(() => 0.4) } } });
    const opts = {
      scales: { x: { time: false, range: [-0.5, 23.5] }, y: { range: (u, min, max) => [0, Math.max(5, (max || 0) * 1.1)] } },
      axes: baseAxes((v) => w.nf().format(v), false, { ySize: 4.2 }),
      series: [{},
        { label: w.t("chartReceivedToday"), stroke: "#38bdf8", fill: "#38bdf8", width: 0, paths: bars(-0.4), points: { show: false } },
        { label: w.t("chartCompletedToday"), stroke: "#22c55e", fill: "#22c55e", width: 0, paths: bars(0), points: { show: false } },
        { label: w.t("chartReceivedWeek"), stroke: "#bae6fd", width: 2, dash: [5, 4], spanGaps: true, points: { show: false } },
        { label: w.t("chartCompletedWeek"), stroke: "#bbf7d0", width: 2, dash: [5, 4], spanGaps: true, points: { show: false } }],
    };
    const data = dossierData();
    d.plot = makePlot(d.el, opts, data);
    d.el.dataset.today = String(data[1].filter((v) => v !== null).reduce((a, b) => a + b, 0));
    d.el.dataset.week = String(data[3].filter((v) => v !== null).reduce((a, b) => a + b, 0));
  }

  // --- open incidents by severity over 24 h ---------------------------------------------------------
  async function loadIncidents(scope) {
    const to = now();
    const series = await Promise.all(SEVERITIES.map((s) => history("cyber.open." + s, scope, "now", to - 24 * HOUR, to, "30m")));
    const byT = new Map();
    series.forEach((pts, i) => {
      for (const [t, v] of pts) {
        const k = Math.round(t);
        if (!byT.has(k)) byT.set(k, {});
        byT.get(k)[SEVERITIES[i]] = v;
      }
    });
    incidents = { scope, points: [...byT.entries()].sort((a, b) => a[0] - b[0]), el: $("incident-chart") };
    drawIncidents();
  }

  function incidentData() {
    const xs = [];
    const ys = SEVERITIES.map(() => []);
    const carry = {};
    for (const [t, vals] of incidents.points) {
      if (t < now() - 24 * HOUR) continue;
      xs.push(t);
      SEVERITIES.forEach((s, i) => { if (vals[s] !== undefined) carry[s] = vals[s]; ys[i].push(carry[s] ?? null); });
    }
    return [xs, ...ys];
  }

  function drawIncidents() {
    const opts = {
      scales: { x: { time: true, range: () => [now() - 24 * HOUR, now()] }, y: { range: (u, min, max) => [0, Math.max(4, Math.ceil((max || 0) * 1.15))] } },
      axes: baseAxes((v) => w.nf().format(v), true),
      series: [{}, ...SEVERITIES.map((s) => ({ label: w.t("sev" + s[0].toUpperCase() + s.slice(1)), stroke: SEV_COLOURS[s], width: 2, spanGaps: true, points: { show: false } }))],
    };
    const data = incidentData();
    incidents.plot = makePlot(incidents.el, opts, data);
    incidents.el.dataset.points = String(data[0].length);
  }

  // --- the feed moves the charts -------------------------------------------------------------------
  function onItem(item) {
    const t = Date.parse(item.as_of) / 1000;
    if (!isFinite(t)) return;
    const scope = item.scope;
    if (item.kpi === "water.level_m" && scope.startsWith("station:")) {
      const e = hydro.get(scope.slice(8));
      if (e && item.value !== null && (!e.xs.length || t > e.xs[e.xs.length - 1])) {
        // One point per half hour, its latest value (as the history's buckets): while the worker
        // catches up on a backlog, "now" passes through old readings, and only the last one stands.
        const n = e.xs.length;
        if (n && Math.floor(e.xs[n - 1] / BUCKET) === Math.floor(t / BUCKET)) { e.xs[n - 1] = t; e.ys[n - 1] = item.value; }
        else { e.xs.push(t); e.ys.push(item.value); }
        while (e.xs.length && e.xs[0] < t - 72 * HOUR) { e.xs.shift(); e.ys.shift(); }
        e.changed = true; dirty = true;
      }
    } else if (item.kpi === "env.aqi" && item.window === "now" && scope.startsWith("station:")) {
      const e = air.get(scope.slice(8));
      if (e && item.value !== null) { e.hours.set(Math.floor(t / HOUR) * HOUR, item.value); e.changed = true; dirty = true; }
    } else if (dossiers && scope === dossiers.scope && item.window === "today"
      && (item.kpi === "dossier.received" || item.kpi === "dossier.completed")) {
      if (t >= dossiers.today + 86400) return;  // a new day: the next load starts it
      const map = item.kpi === "dossier.received" ? dossiers.received : dossiers.completed;
      map.set(Math.floor((t - dossiers.today) / HOUR), item.value ?? 0);
      dossiers.changed = true; dirty = true;
    } else if (incidents && scope === incidents.scope && item.kpi.startsWith("cyber.open.")) {
      const sev = item.kpi.slice(11);
      const last = incidents.points[incidents.points.length - 1];
      if (last && t >= last[0] && Math.floor(last[0] / BUCKET) === Math.floor(t / BUCKET)) {
        last[0] = t; last[1][sev] = item.value;  // one point per half hour, as above
      } else if (!last || t > last[0]) incidents.points.push([t, { ...(last ? last[1] : {}), [sev]: item.value }]);
      incidents.changed = true; dirty = true;
    }
    if (scope.startsWith("station:")) mapDirty = true;
  }

  function redraw() {
    if (!dirty) return;
    dirty = false;
    for (const e of hydro.values()) if (e.changed && e.plot) {
      e.changed = false; e.plot.setData(hydroData(e)); e.card.dataset.points = String(e.xs.length);
      e.card.dataset.last = String(e.xs[e.xs.length - 1]);
      e.cap.textContent = " " + w.metres(e.ys[e.ys.length - 1]) + " m";
    }
    for (const e of air.values()) if (e.changed && e.plot) {
      e.changed = false; const data = airData(e); e.plot.setData(data);
      e.card.dataset.bars = String(data[1].filter((v) => v !== null).length);
    }
    if (dossiers && dossiers.changed && dossiers.plot) {
      dossiers.changed = false; const data = dossierData(); dossiers.plot.setData(data);
      dossiers.el.dataset.today = String(data[1].filter((v) => v !== null).reduce((a, b) => a + b, 0));
    }
    if (incidents && incidents.changed && incidents.plot) {
      incidents.changed = false; const data = incidentData(); incidents.plot.setData(data);
      incidents.el.dataset.points = String(data[0].length);
    }
  }

  // --- the station map: SVG, by latitude and longitude, no tiles --------------------------------------
  let mapDirty = false;

  function stationColour(st) {
    const s = "station:" + st.station_id;
    const seen = (kpi, win) => w.stationItem(kpi, st, win);
    if (st.kind === "air") {
      const it = seen("env.aqi", "now");
      return it && it.value !== null && it.value !== undefined ? { colour: w.aqiBand(it.value).colour, value: it.value } : null;
    }
    if (st.kind === "water") {
      const it = seen("water.alarm_level", "now");
      return it && it.value !== null && it.value !== undefined ? { colour: w.alarmColour(Math.round(it.value)), value: it.value } : null;
    }
    if (st.kind === "rain") {
      const it = w.get("rain.mm", s, "24h");
      if (!it || it.value === null || it.value === undefined) return null;
      const v = it.value;
      return { colour: v >= 100 ? "#1d4ed8" : v >= 50 ? "#3b82f6" : v >= 16 ? "#60a5fa" : v > 0 ? "#93c5fd" : "#cbd5e1", value: v };
    }
    return null;
  }

  function drawMap() {
    const svg = $("map-svg");
    if (!svg) return;
    const stations = w.visibleStations();
    svg.replaceChildren();
    svg.dataset.stations = String(stations.length);
    if (!stations.length) return;
    const lats = stations.map((s) => s.lat), lons = stations.map((s) => s.lon);
    const pad = 0.08;
    // More room on the left: a station moved aside is labelled on its left.
    let [la0, la1, lo0, lo1] = [Math.min(...lats) - pad, Math.max(...lats) + pad, Math.min(...lons) - 1.5 * pad, Math.max(...lons) + pad];
    const k = Math.cos(((la0 + la1) / 2) * Math.PI / 180);  // equirectangular, true to scale at mid-latitude
    const W = 1000;
    const H = Math.max(300, Math.round(W * (la1 - la0) / ((lo1 - lo0) * k)));
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const x = (lon) => ((lon - lo0) / (lo1 - lo0)) * W;
    const y = (lat) => ((la1 - lat) / (la1 - la0)) * H;
    // A graticule every 0.5° for bearings (no province outline: none found under an open licence, see docs).
    const grid = document.createElementNS(svgNS, "g");
    grid.setAttribute("class", "graticule");
    for (let lon = Math.ceil(lo0 * 2) / 2; lon <= lo1; lon += 0.5) {
      const l = document.createElementNS(svgNS, "line");
      l.setAttribute("x1", x(lon)); l.setAttribute("x2", x(lon)); l.setAttribute("y1", 0); l.setAttribute("y2", H);
      const tx = document.createElementNS(svgNS, "text");
      tx.setAttribute("x", x(lon) + 4); tx.setAttribute("y", H - 6); tx.textContent = w.nf().format(lon) + "°E";
      grid.append(l, tx);
    }
    for (let lat = Math.ceil(la0 * 2) / 2; lat <= la1; lat += 0.5) {
      const l = document.createElementNS(svgNS, "line");
      l.setAttribute("x1", 0); l.setAttribute("x2", W); l.setAttribute("y1", y(lat)); l.setAttribute("y2", y(lat));
      const tx = document.createElementNS(svgNS, "text");
      tx.setAttribute("x", 4); tx.setAttribute("y", y(lat) - 4); tx.textContent = w.nf().format(lat) + "°N";
      grid.append(l, tx);
    }
    svg.appendChild(grid);
    const offline = w.offlineSet();
    const r = stations.length < 6 ? 26 : 17;
    const taken = [];
    // Gauges first: they keep their true place and their label; a station at the same place moves aside.
    for (const st of [...stations].sort((a, b) => (b.kind === "water") - (a.kind === "water"))) {
      // Stations at (nearly) one place, such as a commune's gauge and air station, side by side.
      let px = x(st.lon), py = y(st.lat);
      let moved = false;
      while (taken.some(([tx, ty]) => Math.hypot(tx - px, ty - py) < r * 1.6)) { px -= r * 2.2; moved = true; }
      taken.push([px, py]);
      const g = document.createElementNS(svgNS, "g");
      g.setAttribute("class", "st st-" + st.kind + (offline.has(st.station_id) ? " st-offline" : "") + (selected === st.station_id ? " st-selected" : ""));
      g.setAttribute("transform", `translate(${px.toFixed(1)},${py.toFixed(1)})`);
      g.setAttribute("tabindex", "0");
      g.setAttribute("role", "button");
      g.dataset.station = st.station_id;
      g.dataset.commune = st.commune_code;
      const c = stationColour(st);
      const shape = document.createElementNS(svgNS, st.kind === "water" ? "rect" : "circle");
      if (st.kind === "water") {
        shape.setAttribute("x", -r); shape.setAttribute("y", -r); shape.setAttribute("width", 2 * r); shape.setAttribute("height", 2 * r);
        shape.setAttribute("transform", "rotate(45)");
      } else shape.setAttribute("r", st.kind === "air" ? r : r * 0.7);
      shape.setAttribute("fill", c ? c.colour : "#475569");
      g.dataset.colour = c ? c.colour : "";
      const title = document.createElementNS(svgNS, "title");
      title.textContent = (st.name || st.station_id) + " · " + w.t("kind_" + st.kind);
      g.append(title, shape);
      if (st.kind === "water" || stations.length < 6) {
        const label = document.createElementNS(svgNS, "text");
        // A station moved aside (to the left) is labelled on its left, clear of its neighbour's label.
        label.setAttribute("x", moved ? -(r + 6) : r + 6); label.setAttribute("y", 8);
        if (moved) label.setAttribute("text-anchor", "end");
        label.textContent = shortName(st);
        g.appendChild(label);
      }
      g.addEventListener("click", () => { selected = st.station_id; showDetail(st); drawMap(); });
      g.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { selected = st.station_id; showDetail(st); drawMap(); } });
      svg.appendChild(g);
    }
    if (selected) {
      const st = stations.find((s) => s.station_id === selected);
      if (st) showDetail(st);
    }
  }

  function showDetail(st) {
    const box = $("map-detail");
    box.hidden = false;
    box.dataset.station = st.station_id;
    const rows = [[w.t("station"), (st.name || st.station_id) + " (" + st.station_id + ")"],
      [w.t("kindLabel"), w.t("kind_" + st.kind)],
      [w.t("commune"), w.unitNames().get(st.commune_code) || st.commune_code],
      [w.t("coordinates"), w.nf().format(st.lat) + "°N, " + w.nf().format(st.lon) + "°E"]];
    const item = (kpi, win) => w.stationItem(kpi, st, win);
    const val = (it, suffix) => (it && it.value !== null && it.value !== undefined ? w.nf().format(it.value) + (suffix || "") : "—");
    if (st.kind === "air") {
      const a = item("env.aqi", "now");
      rows.push([w.t("colAqiHour"), val(a) + (a && a.value !== null && a.value !== undefined ? " · " + w.aqiBand(a.value).label : "")]);
    } else if (st.kind === "water") {
      const lv = item("water.level_m", "now");
      const al = item("water.alarm_level", "now");
      rows.push([w.t("colLevel"), lv && lv.value !== null && lv.value !== undefined ? w.metres(lv.value) + " m" : "—"]);
      rows.push([w.t("level"), al && al.value !== null && al.value !== undefined ? (al.value ? "BĐ " + ["", "I", "II", "III"][Math.round(al.value)] : w.t("alarmNone")) : "—"]);
      rows.push(["BĐ I / II / III", [st.bd1_m, st.bd2_m, st.bd3_m].map((b) => (b === null || b === undefined ? "—" : w.metres(b))).join(" / ") + " m"]);
    } else if (st.kind === "rain") {
      rows.push([w.t("rain24"), val(w.get("rain.mm", "station:" + st.station_id, "24h"), " mm")]);
    }
    const dl = document.createElement("dl");
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    }
    const close = document.createElement("button");
    close.type = "button";
    close.className = "close";
    close.textContent = "×";
    close.title = w.t("close");
    close.addEventListener("click", () => { selected = null; box.hidden = true; drawMap(); });
    box.replaceChildren(close, dl);
  }

  // --- lifecycle -----------------------------------------------------------------------------------
  // History is reloaded every few minutes, and soon when it was thin (a wall opened while `ioc dev`
  // is still back-filling sees the past once the back-fill has written it).
  const RELOAD_MS = 300000;
  const RETRY_MS = 15000;
  let reloadTimer = null;
  let retries = 0;

  function thin() {
    const hydroThin = [...hydro.values()].some((e) => e.xs.length < 24);
    const weekThin = dossiers && ![...dossiers.weekReceived.values()].some((v) => v > 0);
    return hydroThin || Boolean(weekThin) || (incidents && incidents.points.length < 4);
  }

  function scheduleReload() {
    clearTimeout(reloadTimer);
    const soon = thin() && retries < 12;
    retries = soon ? retries + 1 : 0;
    reloadTimer = setTimeout(() => { loadedFor = null; load(); }, soon ? RETRY_MS : RELOAD_MS);
  }

  async function load() {
    const role = w.role();
    const key = sessionStorage.getItem("ioc.token") + "|" + w.mainScope();
    if (loadedFor === key) { drawMap(); return; }
    loadedFor = key;
    const env = role !== "security";
    $("trends").hidden = false;
    for (const id of ["hydro-panel", "aqi-panel", "dossier-panel", "map-panel"]) $(id).hidden = !env;
    const tasks = [loadIncidents(w.mainScope())];
    if (env) {
      tasks.push(loadHydro(w.visibleStationsOf("water")), loadAir(w.visibleStationsOf("air")), loadDossiers(w.mainScope()));
    }
    drawMap();
    await Promise.all(tasks);
    scheduleReload();
  }

  function redrawAll() {
    for (const e of hydro.values()) drawHydro(e);
    for (const e of air.values()) drawAir(e);
    if (dossiers) drawDossiers();
    if (incidents) drawIncidents();
    drawMap();
  }

  function init(wall) {
    w = wall;
    setInterval(() => {
      redraw();
      if (mapDirty) { mapDirty = false; drawMap(); }
    }, REDRAW_MS);
    let resizeTimer = null;
    window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(redrawAll, 200); });
  }

  return { init, load, onItem, redrawAll, drawMap, reset: () => { loadedFor = null; } };
})();
