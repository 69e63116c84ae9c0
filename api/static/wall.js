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
      station: "Trạm", suspect: "nghi vấn", suspectHint: "Bộ phát hiện bất thường nghi ngờ số liệu của trạm này (xem cảnh báo)",
      badToken: "Mã truy cập không hợp lệ hoặc đã hết hạn. Vui lòng dán mã mới.",
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
      bySeverity: "Sự cố đang mở theo mức độ",
      sevCritical: "Khẩn cấp", sevHigh: "Cao", sevMedium: "Trung bình", sevLow: "Thấp",
      airTitle: "Chất lượng không khí theo trạm", airHint: "VN_AQI giờ (QĐ 1459/QĐ-TCMT), xấu nhất trước",
      colAqiHour: "AQI giờ", colDominant: "Chất ô nhiễm chính", colPm25: "PM2.5 1 giờ (µg/m³)",
      riversTitle: "Mực nước sông", riversHint: "Mức báo động theo QĐ 05/2020/QĐ-TTg",
      gauge: "Trạm thủy văn", colLevel: "Mực nước", colGauge: "Báo động, so với BĐ I/II/III (m)",
      noStations: "Không có trạm.", river: "Sông", offline: "Mất tín hiệu",
      alarmNone: "Dưới BĐ I", alarmUnknown: "Chưa xác định",
      alarmUnknownHint: "Chưa cấu hình đủ mức báo động thấp hơn",
      levelNotShared: "Mực nước chi tiết chỉ hiển thị ở cấp tỉnh",
      rainMax: "Mưa 24 giờ lớn nhất", rainAt: "tại",
      pollutants: { pm25: "PM2.5", pm10: "PM10", o3: "O₃", no2: "NO₂", so2: "SO₂", co: "CO" },
      progressIndex: "Chỉ số tiến độ hôm nay", mtta: "Thời gian xác nhận TB (24 giờ)", mttr: "Thời gian khắc phục TB (24 giờ)",
      minutes: "phút", monthToDate: "Từ đầu tháng",
      hydroTitle: "Mực nước 72 giờ", hydroHint: "Đường nét đứt: BĐ I (vàng), II (cam), III (đỏ)",
      aqiTrendTitle: "VN_AQI 24 giờ theo trạm", aqiTrendHint: "Mỗi cột một giờ, màu theo mức AQI",
      dossierTrendTitle: "Hồ sơ theo giờ hôm nay", dossierTrendHint: "Cột: hôm nay · nét đứt: cùng thứ tuần trước",
      chartReceivedToday: "Tiếp nhận hôm nay", chartCompletedToday: "Giải quyết hôm nay",
      chartReceivedWeek: "Tiếp nhận tuần trước", chartCompletedWeek: "Giải quyết tuần trước",
      incidentTrendTitle: "Sự cố ATTT đang mở 24 giờ", incidentTrendHint: "Theo mức độ",
      mapTitle: "Bản đồ trạm quan trắc", mapHint: "Màu theo AQI hoặc mức báo động lũ; bấm vào trạm để xem chi tiết",
      mapNoOutline: "Không vẽ ranh giới tỉnh (chưa có nguồn mở được phép dùng)",
      kind_air: "Không khí", kind_water: "Thủy văn", kind_rain: "Đo mưa", kind_weather: "Khí tượng",
      kindLabel: "Loại trạm", coordinates: "Tọa độ", rain24: "Mưa 24 giờ", close: "Đóng",
      staleBanner: "Dữ liệu không còn mới: chưa nhận được cập nhật trong hơn 1 phút",
      offBanner: "Mất kết nối tới máy chủ: số liệu đang hiển thị có thể đã cũ, đang thử kết nối lại…",
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
      station: "Station", suspect: "suspect", suspectHint: "An anomaly detector doubts this station's figures (see the alerts)",
      badToken: "The access token is invalid or expired. Please paste a new one.",
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
      bySeverity: "Open incidents by severity",
      sevCritical: "Critical", sevHigh: "High", sevMedium: "Medium", sevLow: "Low",
      airTitle: "Air quality by station", airHint: "Hourly VN_AQI (Decision 1459/QĐ-TCMT), worst first",
      colAqiHour: "Hourly AQI", colDominant: "Dominant pollutant", colPm25: "PM2.5 1 h (µg/m³)",
      riversTitle: "Rivers", riversHint: "Flood alarm levels per Decision 05/2020/QĐ-TTg",
      gauge: "River gauge", colLevel: "Level", colGauge: "Alarm, against BĐ I/II/III (m)",
      noStations: "No stations.", river: "River", offline: "Offline",
      alarmNone: "Below BĐ I", alarmUnknown: "Unknown",
      alarmUnknownHint: "Lower alarm levels not configured",
      levelNotShared: "Detailed levels are shown at province level only",
      rainMax: "Wettest 24 h", rainAt: "at",
      pollutants: { pm25: "PM2.5", pm10: "PM10", o3: "O₃", no2: "NO₂", so2: "SO₂", co: "CO" },
      progressIndex: "Progress index today", mtta: "Mean time to acknowledge (24 h)", mttr: "Mean time to resolve (24 h)",
      minutes: "min", monthToDate: "Month to date",
      hydroTitle: "River levels, 72 h", hydroHint: "Dashed: BĐ I (yellow), II (orange), III (red)",
      aqiTrendTitle: "VN_AQI by station, 24 h", aqiTrendHint: "One bar an hour, in the AQI band colour",
      dossierTrendTitle: "Dossiers per hour today", dossierTrendHint: "Bars: today · dashed: same weekday last week",
      chartReceivedToday: "Received today", chartCompletedToday: "Completed today",
      chartReceivedWeek: "Received last week", chartCompletedWeek: "Completed last week",
      incidentTrendTitle: "Open cyber incidents, 24 h", incidentTrendHint: "By severity",
      mapTitle: "Station map", mapHint: "Coloured by AQI or flood alarm level; click a station for details",
      mapNoOutline: "No province outline (no openly licensed source found)",
      kind_air: "Air quality", kind_water: "River gauge", kind_rain: "Rain gauge", kind_weather: "Weather",
      kindLabel: "Kind", coordinates: "Coordinates", rain24: "Rain, 24 h", close: "Close",
      staleBanner: "Data is not fresh: no update for more than a minute",
      offBanner: "Disconnected from the server: the figures shown may be out of date; reconnecting…",
    },
  };
  // VN_AQI bands (Decision 1459/QĐ-TCMT): upper bound and colour.
  const SEVERITIES = ["critical", "high", "medium", "low"];
  const ROMAN = ["", "I", "II", "III"];
  // Flood alarm level colours: 0 below BĐ I, then BĐ I, II, III.
  const ALARM_COLOURS = ["#22c55e", "#facc15", "#fb923c", "#ef4444"];
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
    units: [], unitNames: new Map(), stations: [],
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
    // The whole page says it too: a stale or lost feed must not pass for live figures.
    document.body.dataset.feed = kind;
    const banner = $("feed-banner");
    const text = kind === "stale" ? "staleBanner" : kind === "off" && state.token ? "offBanner" : null;
    banner.hidden = !text;
    if (text) { banner.dataset.i18n = text; banner.textContent = t(text); }
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

  // Only channels the role may subscribe to (api/auth.py): a commune its own commune, security the
  // province; operators and admins also every air station and water gauge.
  // A commune also its own stations (those whose commune_code is its own).
  function channelsFor() {
    const withKpis = (s) => s.kind === "air" || s.kind === "water" || s.kind === "rain";
    if (state.role === "commune") {
      return ["kpi:commune:" + state.commune, "alerts"].concat(state.stations
        .filter((s) => withKpis(s) && s.commune_code === state.commune).map((s) => "kpi:station:" + s.station_id));
    }
    if (state.role === "security") return ["kpi:province", "alerts"];
    const stations = state.stations.filter(withKpis).map((s) => "kpi:station:" + s.station_id);
    return ["kpi:province", "alerts"].concat(state.units.map((u) => "kpi:commune:" + u.code), stations);
  }

  const seesStations = () => state.role === "operator" || state.role === "admin";
  // Whether a station's own KPIs reach this wall: operators all, a commune those in it.
  const seesStation = (st) => seesStations() || (state.role === "commune" && st.commune_code === state.commune);

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
      // An anomaly alert's evidence (REST: explanation; the firing event: extra.explanation).
      explanation: a.explanation || (a.extra && a.extra.explanation) || (held && held.explanation) || null,
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
      if (a.explanation && a.explanation.method) text.title = a.explanation.method;
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

  async function loadStations() {
    if (state.stations.length) return;
    try {
      const res = await fetch("/api/stations", { headers: authHeaders() });
      if (res.ok) state.stations = (await res.json()).items;
    } catch (e) { /* the station panels stay empty */ }
  }

  async function onAuthOk(ws, msg) {
    state.role = msg.role;
    state.commune = msg.commune;
    state.retry = 0;
    $("login").hidden = true;
    $("wall").hidden = false;
    await Promise.all([loadUnits(), loadStations(), loadAlerts()]);
    if (ws.readyState !== WebSocket.OPEN) return;
    const channels = channelsFor();
    const resume = {};
    for (const c of channels) if (state.seq[c] !== undefined) resume[c] = state.seq[c];
    ws.send(JSON.stringify({ type: "subscribe", channels, resume }));
    setConn("on");
    $("communes").hidden = state.role === "security";
    $("sensors").hidden = state.role === "security";
    render();
    window.IocCharts.load();
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
        for (const item of msg.items) { put(item); window.IocCharts.onItem(item); }
        state.seq[msg.channel] = msg.seq;
        if (msg.recovered === false) notice(t("notRecovered"));
        touched();
        break;
      case "resumed": state.seq[msg.channel] = msg.seq; break;
      case "update": put(msg.item); window.IocCharts.onItem(msg.item); state.seq[msg.channel] = msg.seq; touched(); break;
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
  // Numbers the Vietnamese way (1.234,5) in both languages: the wall's figures are Vietnamese figures.
  const NUMBERS = "vi-VN";
  const nf = () => new Intl.NumberFormat(NUMBERS, { maximumFractionDigits: 1 });
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
    const progress = get("dossier.progress_index", s, "today");
    setTile("progress_index", progress, { sub: target(progress).replace("%", "") });
    setTile("in_progress", get("dossier.in_progress", s, "now"));
    setTile("overdue", get("dossier.overdue", s, "now"));
    setTile("cyber_open", get("cyber.open", s, "now"));
    for (const [tile, kpi] of [["mtta", "cyber.mtta_minutes"], ["mttr", "cyber.mttr_minutes"]]) {
      const mtd = get(kpi, s, "mtd");
      setTile(tile, get(kpi, s, "24h"), { sub: t("minutes") + (mtd && mtd.value !== null && mtd.value !== undefined
        ? " · " + t("monthToDate") + ": " + nf().format(mtd.value) : "") });
    }
    for (const sev of SEVERITIES) {
      const it = get("cyber.open." + sev, s, "now");
      const li = document.querySelector(`[data-open-sev="${sev}"]`);
      li.querySelector("b").textContent = fmt(it);
      li.classList.toggle("nonzero", Boolean(it && it.value > 0));
    }
    const aqi = get("env.aqi", s, "now");
    if (aqi && aqi.value !== null) {
      const band = aqiBand(aqi.value);
      const id = aqi.extra && (aqi.extra.station || aqi.extra.station_id);
      const named = id && state.stations.find((x) => x.station_id === id);
      const where = (named && named.name) || id;
      setTile("aqi", aqi, { sub: band.label + (where ? " · " + (named ? where : t("station") + " " + where) : ""), colour: band.colour });
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
    renderAir();
    renderRivers();
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

  // --- station panels -------------------------------------------------------------------------
  // Operators read each station's own channel; a commune may only read its commune's aggregates,
  // which name the station they come from (extra.station), so a station shows what is known of it.
  function visibleStations(kind) {
    const all = state.stations.filter((st) => st.kind === kind);
    return state.role === "commune" ? all.filter((st) => st.commune_code === state.commune) : all;
  }

  function stationItem(kpi, st, win) {
    const own = seesStation(st) ? get(kpi, "station:" + st.station_id, win) : undefined;
    if (own || seesStations()) return own;
    const agg = get(kpi, "commune:" + st.commune_code, win);
    return agg && agg.extra && agg.extra.station === st.station_id ? agg : undefined;
  }

  function offlineSet() {
    const off = get("sensor.offline", mainScope(), "now");
    return new Set((off && off.extra && off.extra.stations) || []);
  }

  const td = (text, cls) => {
    const el = document.createElement("td");
    el.textContent = text;
    if (cls) el.className = cls;
    return el;
  };
  const hasValue = (it) => Boolean(it) && it.value !== null && it.value !== undefined;
  const pm1 = () => new Intl.NumberFormat(NUMBERS,
    { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const metres = (v) => (v === null || v === undefined) ? "—"
    : new Intl.NumberFormat(NUMBERS, { minimumFractionDigits: 2, maximumFractionDigits: 2 }).format(v);

  function aqiBadge(value) {
    const badge = document.createElement("span");
    badge.className = "badge aqi-badge";
    const band = aqiBand(value);
    badge.textContent = String(Math.round(value));
    badge.dataset.value = String(value);
    badge.style.background = band.colour;
    badge.style.color = band.index >= 4 ? "#fff" : "#000";
    badge.title = band.label;
    return { badge, band };
  }

  // The station's name, a muted line under it (river, commune), and a tag when it is silent.
  function stationName(st, sub, offline, suspect) {
    const cellEl = document.createElement("td");
    cellEl.className = "st-name";
    const main = document.createElement("span");
    main.className = "st-main";
    main.textContent = st.name || st.station_id;
    main.title = st.station_id;
    cellEl.appendChild(main);
    if (offline) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = t("offline");
      cellEl.append(" ", tag);
    }
    if (suspect) {  // quality "suspect" on the station's snapshots: an anomaly detector doubts them
      const tag = document.createElement("span");
      tag.className = "tag suspect";
      tag.textContent = t("suspect");
      tag.title = t("suspectHint");
      cellEl.append(" ", tag);
    }
    const line = document.createElement("span");
    line.className = "st-sub";
    line.textContent = sub;
    cellEl.append(document.createElement("br"), line);
    return cellEl;
  }

  function renderAir() {
    const offline = offlineSet();
    const rows = visibleStations("air").map((st) => {
      const aqi = stationItem("env.aqi", st, "now");
      return { st, aqi, v: hasValue(aqi) ? aqi.value : null };
    });
    rows.sort((a, b) => (b.v ?? -1) - (a.v ?? -1) || (a.st.name || "").localeCompare(b.st.name || "", "vi"));
    const frag = document.createDocumentFragment();
    for (const { st, aqi, v } of rows) {
      const tr = document.createElement("tr");
      tr.dataset.station = st.station_id;
      tr.dataset.commune = st.commune_code;
      const silent = offline.has(st.station_id);
      tr.classList.toggle("offline", silent);
      const pm = seesStation(st) ? get("env.pm25", "station:" + st.station_id, "1h") : undefined;
      const suspect = [aqi, pm].some((x) => x && x.quality === "suspect");
      tr.classList.toggle("suspect", suspect);
      tr.appendChild(stationName(st, state.unitNames.get(st.commune_code) || st.commune_code || "", silent, suspect));
      const aqiCell = td("", "aqi");
      if (v !== null) {
        const { badge, band } = aqiBadge(v);
        const label = document.createElement("span");
        label.className = "band";
        label.textContent = band.label;
        aqiCell.append(badge, " ", label);
        tr.dataset.band = String(band.index);
      } else aqiCell.textContent = "—";
      const dom = aqi && aqi.extra && aqi.extra.dominant;
      tr.append(aqiCell, td(dom ? (t("pollutants")[dom] || dom) : "—", "dominant"),
        td(hasValue(pm) ? pm1().format(pm.value) : "—", "num pm25"));
      frag.appendChild(tr);
    }
    $("air-rows").replaceChildren(frag);
    $("air-empty").hidden = rows.length > 0;
  }

  // A bar from 0 m to a little above the highest of the level and the alarm levels, with a mark
  // at each configured alarm level, filled to the level in the colour of the alarm level reached.
  function levelBar(level, bds, alarm) {
    const bar = document.createElement("div");
    bar.className = "lvl-bar";
    const known = bds.filter((x) => x !== null && x !== undefined);
    const top = Math.max(...known, level ?? 0) * 1.08 || 1;
    const pct = (x) => Math.max(0, Math.min(100, (x / top) * 100)) + "%";
    if (level !== null && level !== undefined) {
      const fill = document.createElement("div");
      fill.className = "lvl-fill";
      fill.style.width = pct(level);
      fill.style.background = alarm === null || alarm === undefined ? "var(--muted)" : ALARM_COLOURS[alarm];
      bar.appendChild(fill);
    }
    bds.forEach((x, i) => {
      if (x === null || x === undefined) return;
      const mark = document.createElement("span");
      mark.className = "lvl-mark lvl-mark-" + (i + 1);
      mark.style.left = pct(x);
      mark.title = "BĐ " + ROMAN[i + 1] + ": " + metres(x) + " m";
      const lab = document.createElement("span");
      lab.className = "lvl-mark-label";
      lab.textContent = ROMAN[i + 1];
      mark.appendChild(lab);
      bar.appendChild(mark);
    });
    return bar;
  }

  function renderRivers() {
    const offline = offlineSet();
    const frag = document.createDocumentFragment();
    const gauges = visibleStations("water");
    const rows = gauges.map((st) => {
      const alarm = stationItem("water.alarm_level", st, "now");
      const levelItem = seesStation(st) ? get("water.level_m", "station:" + st.station_id, "now") : undefined;
      const a = hasValue(alarm) ? Math.round(alarm.value) : null;
      const suspect = [alarm, levelItem].some((x) => x && x.quality === "suspect");
      return { st, a, level: hasValue(levelItem) ? levelItem.value : null, suspect };
    });
    rows.sort((x, y) => (y.a ?? -1) - (x.a ?? -1) || (x.st.name || "").localeCompare(y.st.name || "", "vi"));
    for (const { st, a, level, suspect } of rows) {
      const bds = [st.bd1_m, st.bd2_m, st.bd3_m];
      const tr = document.createElement("tr");
      tr.dataset.station = st.station_id;
      tr.dataset.commune = st.commune_code;
      tr.dataset.alarm = a === null ? "" : String(a);
      const silent = offline.has(st.station_id);
      tr.classList.toggle("offline", silent);
      const sub = [st.river ? t("river") + " " + st.river : "", state.unitNames.get(st.commune_code) || ""]
        .filter(Boolean).join(" · ");
      tr.classList.toggle("suspect", suspect);
      tr.appendChild(stationName(st, sub, silent, suspect));
      const lv = td(level === null ? "—" : metres(level) + " m", "num level");
      if (level !== null) lv.dataset.value = String(level);
      else if (!seesStation(st)) lv.title = t("levelNotShared");
      tr.appendChild(lv);
      // Alarm reached, the bar, and the alarm levels under it.
      const cellEl = td("", "bar-col");
      const chip = document.createElement("span");
      chip.className = "alarm-chip " + (a === null ? "alarm-unknown" : "alarm-" + a);
      chip.textContent = a === null ? t("alarmUnknown") : a === 0 ? t("alarmNone") : "BĐ " + ROMAN[a];
      if (a === null && bds.some((x) => x !== null && x !== undefined)) chip.title = t("alarmUnknownHint");
      const levels = document.createElement("div");
      levels.className = "bd-levels";
      bds.forEach((x, i) => {
        const known = x !== null && x !== undefined;
        const span = document.createElement("span");
        span.className = "bd bd" + (i + 1) + (known ? "" : " bd-unknown");
        const name = document.createElement("span");
        name.className = "bd-name";
        name.textContent = (i === 0 ? "BĐ " : "") + ROMAN[i + 1] + " ";
        const val = document.createElement("b");
        val.className = "bd-value";
        val.textContent = known ? metres(x) : "—";
        if (known) span.dataset.value = String(x);
        span.append(name, val);
        levels.appendChild(span);
      });
      // Without any configured alarm level there is nothing to draw the level against.
      if (bds.some((x) => x !== null && x !== undefined)) cellEl.append(chip, levelBar(level, bds, a), levels);
      else cellEl.append(chip, levels);
      tr.appendChild(cellEl);
      frag.appendChild(tr);
    }
    $("river-rows").replaceChildren(frag);
    $("river-empty").hidden = gauges.length > 0;
    const rain = get("rain.mm", mainScope(), "24h");
    const where = rain && rain.extra && rain.extra.station;
    const rainStation = where && state.stations.find((x) => x.station_id === where);
    $("rain-line").textContent = hasValue(rain)
      ? t("rainMax") + ": " + nf().format(rain.value) + " mm"
        + (where ? " " + t("rainAt") + " " + ((rainStation && rainStation.name) || where) : "")
      : "";
  }

  function applyLanguage() {
    document.documentElement.lang = state.lang;
    document.title = t("title");
    for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
    for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
    for (const el of document.querySelectorAll("[data-i18n-label]")) el.setAttribute("aria-label", t(el.dataset.i18nLabel));
    $("lang").textContent = state.lang === "vi" ? "EN" : "VI";
    render();
    renderAlerts();
    if (state.role) window.IocCharts.redrawAll();
  }

  // --- start -----------------------------------------------------------------------------------
  function start() {
    window.IocCharts.init({
      t, nf, metres, get, aqiBand, stationItem, offlineSet,
      role: () => state.role, mainScope, unitNames: () => state.unitNames, authHeaders,
      alarmColour: (level) => ALARM_COLOURS[level] || ALARM_COLOURS[0],
      visibleStations: () => (state.role === "commune"
        ? state.stations.filter((st) => st.commune_code === state.commune) : state.stations),
      visibleStationsOf: (kind) => visibleStations(kind),
    });
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
      if (token) { sessionStorage.setItem(TOKEN_KEY, token); window.IocCharts.reset(); begin(); }
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
