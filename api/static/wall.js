// Operations-centre wall: live KPIs over /ws (subprotocol auth), reconnect with resume. No build step.
"use strict";

(function () {
  const TOKEN_KEY = "ioc.token";
  const LANG_KEY = "ioc.lang";
  const STALE_MS = 60000;
  const MAX_ALERTS = 100;
  const ACKABLE = new Set(["firing", "escalated", "silenced"]);

  const TEXT = {
    vi: {
      title: "Trung tâm giám sát điều hành thông minh Nghệ An",
      connected: "Đang kết nối trực tiếp", connecting: "Đang kết nối…", disconnected: "Mất kết nối",
      stale: "Không có dữ liệu mới", lastUpdate: "Cập nhật", logout: "Đăng xuất",
      pasteToken: "Dán mã truy cập (token) để mở màn hình:", connect: "Kết nối",
      tokenHint: "Mã được giữ trong phiên trình duyệt này, không đưa vào địa chỉ trang.",
      received: "Hồ sơ tiếp nhận hôm nay", completed: "Hồ sơ đã giải quyết hôm nay",
      onTime: "Tỷ lệ đúng hạn hôm nay", inProgress: "Đang giải quyết", overdue: "Quá hạn",
      cyberOpen: "Sự cố ATTT đang mở", aqi: "AQI cao nhất", water: "Mức báo động lũ cao nhất",
      byCommune: "Theo xã, phường", filter: "Lọc theo tên…", commune: "Xã/phường",
      colReceived: "Tiếp nhận", colCompleted: "Đã giải quyết", colOnTime: "Đúng hạn", colOverdue: "Quá hạn",
      colCyber: "Sự cố ATTT", colAqi: "AQI", colWater: "Báo động lũ",
      province: "Toàn tỉnh", target: "Mục tiêu", noAlarm: "Dưới báo động I", level: "Báo động",
      station: "Trạm", badToken: "Mã truy cập không hợp lệ hoặc đã hết hạn. Vui lòng dán mã mới.",
      notRecovered: "Đã tải lại toàn bộ số liệu sau khi mất kết nối (không khôi phục được phần bị lỡ).",
      forbidden: "Không có quyền xem kênh", tooSlow: "Kết nối quá chậm, đang kết nối lại…",
      notInRole: "Ngoài phạm vi quyền",
      alertsShort: "Cảnh báo", alertsTitle: "Cảnh báo đang mở", noAlerts: "Không có cảnh báo.",
      ack: "Xác nhận", acking: "Đang xác nhận…", ackFailed: "Không xác nhận được cảnh báo",
      severities: { info: "Thông tin", warning: "Cảnh báo", high: "Cao", critical: "Khẩn cấp" },
      states: { firing: "Đang kích hoạt", acknowledged: "Đã xác nhận", escalated: "Đã chuyển cấp",
        silenced: "Tạm im lặng", resolved: "Đã xử lý" },
      by: "bởi",
      bands: ["Tốt", "Trung bình", "Kém", "Xấu", "Rất xấu", "Nguy hại"],
    },
    en: {
      title: "Nghệ An Smart Operations Centre",
      connected: "Live", connecting: "Connecting…", disconnected: "Disconnected",
      stale: "No fresh data", lastUpdate: "Updated", logout: "Sign out",
      pasteToken: "Paste an access token to open the wall:", connect: "Connect",
      tokenHint: "The token is kept in this browser session only, never in the page address.",
      received: "Dossiers received today", completed: "Dossiers completed today",
      onTime: "On-time rate today", inProgress: "In progress", overdue: "Overdue",
      cyberOpen: "Open cyber incidents", aqi: "Worst AQI", water: "Highest flood alarm level",
      byCommune: "By commune", filter: "Filter by name…", commune: "Commune",
      colReceived: "Received", colCompleted: "Completed", colOnTime: "On time", colOverdue: "Overdue",
      colCyber: "Cyber", colAqi: "AQI", colWater: "Flood alarm",
      province: "Province", target: "Target", noAlarm: "Below alarm I", level: "Alarm",
      station: "Station", badToken: "The access token is invalid or expired. Please paste a new one.",
      notRecovered: "Data reloaded in full after a disconnection (the missed updates could not be replayed).",
      forbidden: "Not allowed to view channel", tooSlow: "Connection too slow, reconnecting…",
      notInRole: "Outside your rights",
      alertsShort: "Alerts", alertsTitle: "Open alerts", noAlerts: "No alerts.",
      ack: "Acknowledge", acking: "Acknowledging…", ackFailed: "Could not acknowledge the alert",
      severities: { info: "Info", warning: "Warning", high: "High", critical: "Critical" },
      states: { firing: "Firing", acknowledged: "Acknowledged", escalated: "Escalated",
        silenced: "Silenced", resolved: "Resolved" },
      by: "by",
      bands: ["Good", "Moderate", "Poor", "Bad", "Very bad", "Hazardous"],
    },
  };
  // VN_AQI bands (Decision 1459/QĐ-TCMT): upper bound and colour.
  const AQI_BANDS = [[50, "rgb(0,228,0)"], [100, "rgb(255,255,0)"], [150, "rgb(255,126,0)"],
    [200, "rgb(255,0,0)"], [300, "rgb(143,63,151)"], [Infinity, "rgb(126,0,35)"]];

  const $ = (id) => document.getElementById(id);
  const state = {
    lang: localStorage.getItem(LANG_KEY) === "en" ? "en" : "vi",
    token: null, ws: null, role: null, commune: null,
    items: new Map(),      // "kpi|scope|window" -> snapshot item
    alerts: new Map(),     // alert_id -> its latest known state (from GET /api/alerts and the alerts channel)
    acking: new Set(),     // alert ids with an acknowledgement in flight
    seq: {},               // channel -> last seq received (for resume)
    units: [], unitNames: new Map(),
    lastMessageAt: 0, lastUpdateAt: null, retry: 0, retryTimer: null, renderQueued: false,
  };
  const t = (key) => TEXT[state.lang][key] ?? key;

  // --- token: paste box or URL fragment, kept in sessionStorage, never in the URL ----------------
  function takeTokenFromFragment() {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  function showLogin(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    $("wall").hidden = true;
    $("login").hidden = false;
    notice(message || "");
    setConn("off");
  }

  function notice(message) {
    $("notice").textContent = message;
    $("notice").hidden = !message;
  }

  // --- connection ------------------------------------------------------------------------------
  function setConn(kind) {
    const el = $("conn");
    el.className = "conn conn-" + kind;
    const key = { on: "connected", wait: "connecting", off: "disconnected", stale: "stale" }[kind];
    $("conn-text").dataset.i18n = key;
    $("conn-text").textContent = t(key);
  }

  function connect() {
    clearTimeout(state.retryTimer);
    if (!state.token) return;
    setConn("wait");
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
    let ws;
    try {
      ws = new WebSocket(url, ["bearer", state.token]);
    } catch (e) {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    ws.onmessage = (ev) => onMessage(ws, ev.data);
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      state.ws = null;
      if (ev.code === 4401) { showLogin(t("badToken")); return; }
      if (ev.code === 4008) notice(t("tooSlow"));
      setConn("off");
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    const delay = Math.min(30000, 1000 * 2 ** state.retry) * (0.7 + Math.random() * 0.6);
    state.retry = Math.min(state.retry + 1, 5);
    state.retryTimer = setTimeout(connect, delay);
  }

  function channelsFor() {
    if (state.role === "commune") return ["kpi:commune:" + state.commune, "alerts"];
    if (state.role === "security") return ["kpi:province", "alerts"];
    return ["kpi:province", "alerts"].concat(state.units.map((u) => "kpi:commune:" + u.code));
  }

  // --- alerts: the ticker --------------------------------------------------------------------------
  const authHeaders = () => ({ Authorization: "Bearer " + state.token });

  // An alert (REST) or an alert event (the channel), reduced to what the ticker shows.
  function putAlert(a, fresh) {
    const at = a.at || a.updated_at || a.started_at;
    const ts = Date.parse(at);
    const held = state.alerts.get(a.alert_id);
    if (held && held.ts > ts) return;  // an older event arriving late changes nothing
    state.alerts.set(a.alert_id, {
      alert_id: a.alert_id, severity: a.severity, state: a.state, domain: a.domain,
      message_vi: a.message_vi, message_en: a.message_en, at, ts,
      by: a.by || a.acknowledged_by || null, fresh: Boolean(fresh && (!held || held.state !== a.state)),
    });
  }

  async function loadAlerts() {
    try {
      const res = await fetch("/api/alerts?state=active&limit=" + MAX_ALERTS, { headers: authHeaders() });
      if (res.ok) for (const a of (await res.json()).items) putAlert(a, false);
    } catch (e) { /* the channel still brings new ones */ }
    renderAlerts();
  }

  // Mirrors the API's rule (the API decides): operators any, security cyber ones, a commune its own.
  function canAck(a) {
    if (!ACKABLE.has(a.state)) return false;
    if (state.role === "operator" || state.role === "admin" || state.role === "commune") return true;
    return state.role === "security" && a.domain === "cyber";
  }

  async function acknowledge(id) {
    state.acking.add(id);
    renderAlerts();
    try {
      const res = await fetch("/api/alerts/" + encodeURIComponent(id) + "/ack", {
        method: "POST", headers: { ...authHeaders(), "Content-Type": "application/json" }, body: "{}",
      });
      const body = await res.json().catch(() => ({}));
      if (res.ok) putAlert(body.event, false);
      else if (res.status === 401) showLogin(t("badToken"));
      else notice(t("ackFailed") + ": " + (body.detail || res.status));
    } catch (e) {
      notice(t("ackFailed"));
    } finally {
      state.acking.delete(id);
      renderAlerts();
    }
  }

  function renderAlerts() {
    const open = [...state.alerts.values()].filter((a) => a.state !== "resolved")
      .sort((a, b) => b.ts - a.ts);
    while (state.alerts.size > MAX_ALERTS * 2) {  // forget the oldest resolved ones
      const oldest = [...state.alerts.values()].filter((a) => a.state === "resolved")
        .sort((a, b) => a.ts - b.ts)[0];
      if (!oldest) break;
      state.alerts.delete(oldest.alert_id);
    }
    $("alert-count-n").textContent = String(open.length);
    $("alert-count").classList.toggle("has-alerts", open.length > 0);
    $("alert-empty").hidden = open.length > 0;
    const list = document.createDocumentFragment();
    for (const a of open.slice(0, MAX_ALERTS)) {
      const li = document.createElement("li");
      li.className = "alert sev-" + a.severity + (a.state === "acknowledged" ? " is-acked" : "") + (a.fresh ? " is-new" : "");
      li.dataset.alertId = a.alert_id;
      const time = document.createElement("time");
      time.dateTime = a.at;
      time.textContent = new Date(a.at).toLocaleTimeString(state.lang === "vi" ? "vi-VN" : "en-GB");
      const sev = document.createElement("span");
      sev.className = "sev";
      sev.textContent = t("severities")[a.severity] || a.severity;
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = state.lang === "vi" ? a.message_vi : a.message_en;
      const st = document.createElement("span");
      st.className = "state";
      st.textContent = " · " + (t("states")[a.state] || a.state)
        + (a.state === "acknowledged" && a.by ? " " + t("by") + " " + a.by : "");
      text.appendChild(st);
      li.append(time, sev, text);
      if (canAck(a)) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "ack";
        button.disabled = state.acking.has(a.alert_id);
        button.textContent = button.disabled ? t("acking") : t("ack");
        button.addEventListener("click", () => acknowledge(a.alert_id));
        li.appendChild(button);
      } else li.appendChild(document.createElement("span"));
      list.appendChild(li);
      a.fresh = false;
    }
    $("alert-list").replaceChildren(list);
  }

  async function loadUnits() {
    if (state.units.length) return;
    try {
      const res = await fetch("/api/units", { headers: { Authorization: "Bearer " + state.token } });
      if (res.ok) {
        state.units = (await res.json()).items;
        state.unitNames = new Map(state.units.map((u) => [u.code, u.name]));
      }
    } catch (e) { /* the table stays empty; tiles still work */ }
  }

  async function onAuthOk(ws, msg) {
    state.role = msg.role;
    state.commune = msg.commune;
    state.retry = 0;
    $("login").hidden = true;
    $("wall").hidden = false;
    await Promise.all([loadUnits(), loadAlerts()]);
    if (ws.readyState !== WebSocket.OPEN) return;
    const channels = channelsFor();
    const resume = {};
    for (const c of channels) if (state.seq[c] !== undefined) resume[c] = state.seq[c];
    ws.send(JSON.stringify({ type: "subscribe", channels, resume }));
    setConn("on");
    $("communes").hidden = state.role === "security";
    render();
  }

  function onMessage(ws, data) {
    let msg;
    try { msg = JSON.parse(data); } catch (e) { return; }
    state.lastMessageAt = Date.now();
    switch (msg.type) {
      case "auth_ok": onAuthOk(ws, msg); break;
      case "snapshot":
        if (msg.channel === "alerts") {
          for (const item of msg.items) putAlert(item, false);
          state.seq[msg.channel] = msg.seq;
          renderAlerts();
          break;
        }
        for (const key of [...state.items.keys()]) {
          if ("kpi:" + key.split("|")[1] === msg.channel) state.items.delete(key);
        }
        for (const item of msg.items) put(item);
        state.seq[msg.channel] = msg.seq;
        if (msg.recovered === false) notice(t("notRecovered"));
        touched();
        break;
      case "resumed": state.seq[msg.channel] = msg.seq; break;
      case "update": put(msg.item); state.seq[msg.channel] = msg.seq; touched(); break;
      case "alert": putAlert(msg.item, msg.item.notify !== false); state.seq[msg.channel] = msg.seq; renderAlerts(); break;
      case "ping": ws.send(JSON.stringify({ type: "pong" })); if (state.ws === ws) setConn("on"); break;
      case "error":
        if (msg.code === "unauthorized" || msg.code === "token_expired") showLogin(t("badToken"));
        else if (msg.code === "forbidden") notice(t("forbidden") + " " + (msg.channel || ""));
        break;
      default: break;
    }
  }

  function put(item) { state.items.set(item.kpi + "|" + item.scope + "|" + item.window, item); }

  function touched() {
    state.lastUpdateAt = new Date();
    if (!state.renderQueued) {
      state.renderQueued = true;
      requestAnimationFrame(() => { state.renderQueued = false; render(); });
    }
  }

  // --- rendering -------------------------------------------------------------------------------
  const nf = () => new Intl.NumberFormat(state.lang === "vi" ? "vi-VN" : "en-GB", { maximumFractionDigits: 1 });
  const get = (kpi, scope, win) => state.items.get(kpi + "|" + scope + "|" + win);
  const fmt = (item, suffix) => (item && item.value !== null && item.value !== undefined)
    ? nf().format(item.value) + (suffix || "") : "—";

  function aqiBand(v) {
    const i = AQI_BANDS.findIndex(([hi]) => v <= hi);
    return { index: i, colour: AQI_BANDS[i][1], label: t("bands")[i] };
  }

  function mainScope() { return state.role === "commune" ? "commune:" + state.commune : "province"; }

  function setTile(name, item, { suffix = "", sub = "", colour = null } = {}) {
    const el = document.querySelector(`[data-tile="${name}"]`);
    el.querySelector(".value").textContent = fmt(item, suffix);
    el.querySelector(".sub").textContent = sub;
    el.classList.remove("ok", "warn", "breach");
    if (item && item.status) el.classList.add(item.status);
    el.style.borderTopColor = colour || "";
    el.classList.toggle("hidden-role", state.role === "security" && !name.startsWith("cyber"));
  }

  function render() {
    const s = mainScope();
    $("scope-label").textContent = state.role === "commune"
      ? (state.unitNames.get(state.commune) || state.commune) : t("province");
    const target = (it) => (it && it.target !== null && it.target !== undefined)
      ? t("target") + " " + nf().format(it.target) + "%" : "";
    setTile("received", get("dossier.received", s, "today"));
    setTile("completed", get("dossier.completed", s, "today"));
    const onTime = get("dossier.on_time_rate", s, "today");
    setTile("on_time", onTime, { suffix: "%", sub: target(onTime) });
    setTile("in_progress", get("dossier.in_progress", s, "now"));
    setTile("overdue", get("dossier.overdue", s, "now"));
    setTile("cyber_open", get("cyber.open", s, "now"));
    const aqi = get("env.aqi", s, "now");
    if (aqi && aqi.value !== null) {
      const band = aqiBand(aqi.value);
      const where = aqi.extra && (aqi.extra.station || aqi.extra.station_id);
      setTile("aqi", aqi, { sub: band.label + (where ? " · " + t("station") + " " + where : ""), colour: band.colour });
    } else setTile("aqi", aqi);
    const water = get("water.alarm_level", s, "now");
    const lvl = water && water.value ? Math.round(water.value) : 0;
    setTile("water", water, {
      // No level known (no reading, or the gauge's lower alarm levels are not configured): say nothing.
      sub: water && water.value !== null && water.value !== undefined
        ? (lvl ? t("level") + " " + ["", "I", "II", "III"][lvl] : t("noAlarm")) : "",
      colour: lvl ? ["", "#facc15", "#fb923c", "#ef4444"][lvl] : null,
    });
    renderCommunes();
    $("last-update").textContent = state.lastUpdateAt
      ? state.lastUpdateAt.toLocaleTimeString(state.lang === "vi" ? "vi-VN" : "en-GB") : "—";
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    td.className = "num" + (cls ? " " + cls : "");
    tr.appendChild(td);
    return td;
  }

  function renderCommunes() {
    const body = $("commune-rows");
    const needle = $("filter").value.trim().toLowerCase();
    const units = state.role === "commune"
      ? state.units.filter((u) => u.code === state.commune) : state.units;
    const rows = document.createDocumentFragment();
    for (const u of units) {
      if (needle && !u.name.toLowerCase().includes(needle)) continue;
      const s = "commune:" + u.code;
      const tr = document.createElement("tr");
      const name = document.createElement("td");
      name.textContent = u.name;
      tr.appendChild(name);
      cell(tr, fmt(get("dossier.received", s, "today")));
      cell(tr, fmt(get("dossier.completed", s, "today")));
      const onTime = get("dossier.on_time_rate", s, "today");
      cell(tr, fmt(onTime, "%"), onTime && onTime.status);
      const overdue = get("dossier.overdue", s, "now");
      cell(tr, fmt(overdue), overdue && overdue.value > 0 ? "breach" : "");
      cell(tr, fmt(get("cyber.open", s, "now")));
      const aqi = get("env.aqi", s, "now");
      const td = cell(tr, "");
      if (aqi && aqi.value !== null) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = nf().format(aqi.value);
        const band = aqiBand(aqi.value);
        badge.style.background = band.colour;
        badge.style.color = band.index >= 4 ? "#fff" : "#000";
        badge.title = band.label;
        td.appendChild(badge);
      } else td.textContent = "—";
      const water = get("water.alarm_level", s, "now");
      const lvl = water && water.value ? Math.round(water.value) : 0;
      cell(tr, water ? (lvl ? ["", "I", "II", "III"][lvl] : "0") : "—", lvl ? "lvl-" + lvl : "");
      rows.appendChild(tr);
    }
    body.replaceChildren(rows);
  }

  function applyLanguage() {
    document.documentElement.lang = state.lang;
    document.title = t("title");
    for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
    for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
    $("lang").textContent = state.lang === "vi" ? "EN" : "VI";
    render();
    renderAlerts();
  }

  // --- start -----------------------------------------------------------------------------------
  function start() {
    takeTokenFromFragment();
    window.addEventListener("hashchange", () => { takeTokenFromFragment(); begin(); });
    $("lang").addEventListener("click", () => {
      state.lang = state.lang === "vi" ? "en" : "vi";
      localStorage.setItem(LANG_KEY, state.lang);
      applyLanguage();
    });
    $("logout").addEventListener("click", () => {
      const ws = state.ws;
      state.ws = null;
      if (ws) ws.close(1000);
      showLogin("");
    });
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("token-input").value.trim();
      $("token-input").value = "";
      if (token) { sessionStorage.setItem(TOKEN_KEY, token); begin(); }
    });
    $("filter").addEventListener("input", renderCommunes);
    setInterval(() => {
      if (state.ws && state.ws.readyState === WebSocket.OPEN && Date.now() - state.lastMessageAt > STALE_MS) {
        setConn("stale");
      }
    }, 5000);
    applyLanguage();
    begin();
  }

  function begin() {
    state.token = sessionStorage.getItem(TOKEN_KEY);
    if (!state.token) { showLogin(""); return; }
    notice("");
    if (state.ws) { const old = state.ws; state.ws = null; old.close(1000); }
    state.retry = 0;
    connect();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
