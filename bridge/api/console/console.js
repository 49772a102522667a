// Fieldbridge console: reads the bridge's own API (relative URLs, so it also works behind a
// path prefix) with the operator's key, sent as a header. Server-Sent Events are read with
// fetch, because EventSource cannot send headers and the key must never be in a URL.
"use strict";
(() => {
  const KEY_STORAGE = "fieldbridge.console.key";
  const SPARK_WINDOW = 10 * 60 * 1000; // the sparkline shows the last 10 minutes
  const SPARK_MAX = 400; // samples kept per point for its sparkline
  const MAX_ROWS = 500; // rows drawn at once; the search narrows the rest
  const $ = (id) => document.getElementById(id);

  const state = {
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    whoami: null,
    points: new Map(), // id -> point as /v1/points gives it, kept up to date by events
    spark: new Map(), // id -> {t: [ms], v: [number|null]}
    seeded: new Set(), // ids whose sparkline history was asked for
    rows: new Map(), // id -> {tr, value, quality, time, spark}
    dirty: new Set(),
    sources: [],
    sinks: [],
    detail: null, // the point shown in the detail dialog
    chart: null,
    streams: null, // AbortController of the running streams
    discovery: "unknown", // "available", "absent" or "unknown"
    paused: false, // the streams were let go while the tab was hidden
  };

  // --- text helpers -------------------------------------------------------------------------

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // replaceChildren without the null and undefined that conditional children leave.
  function fill(node, ...children) {
    node.replaceChildren(...children.filter((child) => child !== null && child !== undefined));
  }

  function formatValue(value) {
    if (value === null || value === undefined) return "—";
    if (typeof value === "number") {
      return value.toLocaleString(undefined, {maximumFractionDigits: 3, useGrouping: false});
    }
    return String(value);
  }

  function formatTime(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    const today = new Date().toDateString() === date.toDateString();
    return today ? date.toLocaleTimeString() : date.toLocaleString();
  }

  function ago(iso) {
    if (!iso) return "—";
    const seconds = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor(seconds % 3600 / 60)} min ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }

  function since(iso) {
    return el("time", {datetime: iso || "", title: iso ? new Date(iso).toLocaleString() : null,
                       "data-ago": iso || null}, ago(iso));
  }

  function badge(kind, value, label) {
    return el("span", {class: `badge ${kind}-${value}`}, label || value);
  }

  // --- the API ------------------------------------------------------------------------------

  function headers(extra) {
    const all = Object.assign({Accept: "application/json"}, extra || {});
    if (state.key) all.Authorization = `Bearer ${state.key}`;
    return all;
  }

  class ApiProblem extends Error {
    constructor(status, error) {
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.code = error.code || "";
      this.hint = error.hint || "";
      this.details = error.details || null;
    }
  }

  async function problemOf(response) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch (ignored) {
      // not the API's structured error: keep the status alone
    }
    return new ApiProblem(response.status, error);
  }

  // Calls the API; a 401 or 403 is shown as the plain message naming the scope needed.
  async function api(path, {method = "GET", body, scope = "read", quiet = false} = {}) {
    const init = {method, headers: headers(body === undefined ? {} : {"Content-Type": "application/json"}),
                  cache: "no-store"};
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    if (response.ok) return response.json();
    const problem = await problemOf(response);
    if ((problem.status === 401 || problem.status === 403) && !quiet) showAuthProblem(problem, scope);
    throw problem;
  }

  function showAuthProblem(problem, scope) {
    const box = $("auth-message");
    fill(box);
    if (problem.status === 401) {
      box.append(el("strong", {}, "Not authorized (401). "),
        `This page needs an API key with the “${scope}” scope: ${problem.message}. `,
        state.key ? "Check the key under “API key”." : "Enter one under “API key”.");
      openKeyForm();
    } else {
      box.append(el("strong", {}, "Forbidden (403). "),
        `The “${scope}” scope is missing: ${problem.message}.`,
        problem.hint ? ` ${capitalize(problem.hint)}.` : "");
    }
    box.hidden = false;
  }

  function capitalize(text) {
    return text ? text[0].toUpperCase() + text.slice(1) : text;
  }

  function clearAuthProblem() {
    $("auth-message").hidden = true;
    fill($("auth-message"));
  }

  function allows(scope) {
    const scopes = state.whoami ? state.whoami.scopes : [];
    return scopes.includes(scope) || scopes.includes("admin");
  }

  // --- Server-Sent Events over fetch ---------------------------------------------------------

  // Reads one SSE stream and reconnects with backoff (resuming after the last event id);
  // stops for good on 401/403 or when `signal` aborts.
  async function follow(path, onMessage, signal) {
    let lastId = null;
    let delay = 500;
    while (!signal.aborted) {
      try {
        const extra = {Accept: "text/event-stream"};
        if (lastId) extra["Last-Event-ID"] = lastId;
        const response = await fetch(path, {headers: headers(extra), signal, cache: "no-store"});
        if (response.status === 401 || response.status === 403) {
          showAuthProblem(await problemOf(response), "read");
          setLive("offline", "Not authorized");
          return;
        }
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        setLive("live");
        delay = 500;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const {value, done} = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let name = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith(":")) continue;
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
              if (field === "event") name = text;
              else if (field === "data") data.push(text);
              else if (field === "id") lastId = text;
            }
            if (data.length) onMessage(name, JSON.parse(data.join("\n")));
          }
        }
      } catch (error) {
        if (signal.aborted) return;
      }
      setLive("connecting", "Reconnecting…");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10000);
    }
  }

  function setLive(mode, text) {
    const live = $("live");
    if (live.dataset.live === mode && !text) return;
    live.dataset.live = mode;
    live.textContent = text || {live: "Live", connecting: "Connecting…", offline: "Offline"}[mode];
  }

  // --- sources and sinks --------------------------------------------------------------------

  const SOURCE_COUNTERS = ["readings", "events", "rejected", "errors", "connects"];
  const SINK_COUNTERS = ["nacked", "republished", "unroutable", "errors"];

  function counters(values, names) {
    const parts = [];
    for (const name of names.concat(Object.keys(values || {}).filter((n) => !names.includes(n)).sort())) {
      if (values && name in values) parts.push(el("span", {}, `${name} `, el("b", {}, values[name])));
    }
    const box = el("span", {class: "counters"});
    parts.forEach((part, index) => { if (index) box.append(" · "); box.append(part); });
    return box;
  }

  function errorCell(entry) {
    if (!entry.last_error) return el("td", {class: "muted"}, "—");
    return el("td", {},
      entry.error_category ? badge("cat", entry.error_category) : null, " ",
      entry.last_error_at ? since(entry.last_error_at) : null,
      el("span", {class: "error-text"}, entry.last_error));
  }

  function endpointRow(entry, isDevice) {
    const name = el("td", {}, el("strong", {}, entry.id), " ",
      el("span", {class: "muted"}, entry.protocol), el("span", {class: "endpoint"}, entry.endpoint || ""));
    return el("tr", {class: isDevice ? "device" : "source", "data-id": entry.id,
                     "data-state": entry.state},
      name,
      el("td", {}, badge("s", entry.state)),
      el("td", {}, since(entry.since)),
      errorCell(entry),
      el("td", {}, counters(entry.counters, SOURCE_COUNTERS),
        entry.points !== undefined ? el("span", {class: "counters"}, ` · points `, el("b", {}, entry.points)) : null));
  }

  function renderSources(sources) {
    state.sources = sources;
    const body = $("sources-body");
    const rows = [];
    const tally = {};
    for (const source of sources) {
      tally[source.state] = (tally[source.state] || 0) + 1;
      rows.push(endpointRow(source, false));
      for (const device of source.devices || []) rows.push(endpointRow(device, true));
    }
    if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: 5, class: "muted"}, "No sources configured.")));
    body.replaceChildren(...rows);
    const parts = Object.entries(tally).map(([name, count]) => `${count} ${name}`);
    $("sources-summary").textContent = `${sources.length} source${sources.length === 1 ? "" : "s"}` +
      (parts.length ? `: ${parts.join(", ")}` : "");
  }

  function renderSinks(sinks) {
    state.sinks = sinks;
    const rows = sinks.map((sink) => {
      const outbox = sink.outbox;
      const outboxCell = outbox ?
        el("td", {class: "num"}, el("b", {}, formatValue(outbox.events)),
          ` / ${formatValue(outbox.max_events)}`,
          el("span", {class: "endpoint"}, outbox.oldest_age_seconds ?
            `oldest ${Math.round(outbox.oldest_age_seconds)} s` : "empty"),
          outbox.dropped ? el("span", {class: "endpoint bad-text"}, `dropped ${outbox.dropped}`) : null) :
        el("td", {class: "muted"}, "—");
      const count = (name) => formatValue((sink.counters || {})[name] || 0);
      return el("tr", {"data-id": sink.id, "data-state": sink.state},
        el("td", {}, el("strong", {}, sink.id), " ", el("span", {class: "muted"}, sink.protocol),
          el("span", {class: "endpoint"}, sink.endpoint || "")),
        el("td", {}, badge("s", sink.state), " ", since(sink.since)),
        outboxCell,
        el("td", {class: "num"}, count("confirmed")),
        el("td", {class: "num"}, count("published"),
          el("span", {class: "endpoint"}, counters(sink.counters, SINK_COUNTERS.filter((n) => (sink.counters || {})[n])))),
        errorCell(sink));
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", {colspan: 6, class: "muted"},
        "No sinks configured: events are kept in the store and served here and over the API.")));
    }
    fill($("sinks-body"), ...rows);
  }

  // --- points -------------------------------------------------------------------------------

  function matches(point, terms) {
    for (const term of terms) {
      const equals = term.indexOf("=");
      if (equals > 0) {
        const key = term.slice(0, equals);
        const wanted = term.slice(equals + 1);
        const tags = point.tags || {};
        const found = Object.keys(tags).some((name) => name.toLowerCase() === key &&
          String(tags[name]).toLowerCase().includes(wanted));
        if (!found) return false;
        continue;
      }
      const haystack = [point.id, point.source, point.device, point.description,
        ...Object.entries(point.tags || {}).map(([k, v]) => `${k}=${v}`)]
        .filter(Boolean).join(" ").toLowerCase();
      if (!haystack.includes(term)) return false;
    }
    return true;
  }

  // A long point id may wrap after its dots rather than anywhere.
  function breakable(id) {
    const parts = [];
    id.split(".").forEach((part, index, all) => {
      parts.push(index < all.length - 1 ? `${part}.` : part);
      if (index < all.length - 1) parts.push(el("wbr"));
    });
    return parts;
  }

  function qualityBadge(point) {
    const quality = point.quality || "none";
    return badge("q", quality, point.quality ? quality : "no data");
  }

  function renderPoints() {
    const terms = $("search").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    const all = [...state.points.values()].sort((a, b) => a.id.localeCompare(b.id));
    const shown = all.filter((point) => matches(point, terms));
    state.rows.clear();
    observer.disconnect();
    const rows = shown.slice(0, MAX_ROWS).map((point) => {
      const link = el("button", {type: "button", class: "point-link", "data-point": point.id},
        ...breakable(point.id));
      const row = {
        tr: el("tr", {"data-point": point.id}),
        value: el("td", {class: "num value"}),
        quality: el("td", {class: "quality"}),
        time: el("td", {class: "time"}),
        spark: el("td", {class: "wide spark-cell"}),
      };
      row.tr.append(el("td", {}, link), row.value, row.quality, row.time,
        el("td", {class: "wide"}, point.source || "", point.device ?
          el("span", {class: "endpoint"}, point.device) : null), row.spark);
      state.rows.set(point.id, row);
      fillRow(point, row);
      observer.observe(row.tr);
      return row.tr;
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", {colspan: 6, class: "muted"},
        all.length ? "No point matches the search." : "No points configured.")));
    }
    fill($("points-body"), ...rows);
    $("points-count").textContent = shown.length > MAX_ROWS ?
      `showing ${MAX_ROWS} of ${shown.length} matching points; narrow the search` :
      `${shown.length} of ${all.length} points`;
  }

  function fillRow(point, row) {
    fill(row.value, el("span", {class: "v"}, formatValue(point.value)),
      point.unit ? el("span", {class: "unit"}, point.unit) : null);
    fill(row.quality, qualityBadge(point),
      point.reason ? el("span", {class: "reason"}, point.reason) : null);
    fill(row.time, point.ts ? el("time", {datetime: point.ts, title: point.ts},
      formatTime(point.ts)) : "—");
    drawSpark(point.id, row.spark);
  }

  function sparkSeries(id) {
    let series = state.spark.get(id);
    if (!series) state.spark.set(id, series = {t: [], v: []});
    return series;
  }

  function numeric(value) {
    if (typeof value === "number") return value;
    if (typeof value === "boolean") return value ? 1 : 0;
    return null;
  }

  function addSample(id, iso, value) {
    const t = new Date(iso).getTime();
    const series = sparkSeries(id);
    const last = series.t.length ? series.t[series.t.length - 1] : -Infinity;
    if (t < last) return; // an older sample than the sparkline already has
    series.t.push(t);
    series.v.push(numeric(value));
    const cut = Date.now() - SPARK_WINDOW;
    let drop = 0;
    while (drop < series.t.length - 1 && (series.t[drop] < cut || series.t.length - drop > SPARK_MAX)) drop++;
    if (drop) { series.t.splice(0, drop); series.v.splice(0, drop); }
  }

  const SVG = "http://www.w3.org/2000/svg";

  function drawSpark(id, cell) {
    const series = state.spark.get(id);
    const values = series ? series.v.filter((v) => v !== null) : [];
    if (!values.length) {
      fill(cell);
      return;
    }
    const end = Date.now();
    const start = Math.max(end - SPARK_WINDOW, series.t[0]);
    const span = Math.max(1, end - start);
    let low = Math.min(...values);
    let high = Math.max(...values);
    if (high === low) { high += 1; low -= 1; }
    const width = 140;
    const height = 28;
    const points = [];
    for (let i = 0; i < series.t.length; i++) {
      if (series.v[i] === null) continue;
      const x = Math.max(0, (series.t[i] - start) / span * width);
      const y = height - 2 - (series.v[i] - low) / (high - low) * (height - 4);
      points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    }
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `last 10 minutes: ${formatValue(low)} to ${formatValue(high)}`);
    if (points.length) points.push(`${width},${points[points.length - 1].split(",")[1]}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
    fill(cell, svg);
  }

  // Rows that scroll into view get their last 10 minutes of history, a few at a time.
  const seedQueue = [];
  let seeding = 0;
  const observer = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      const id = entry.target.dataset.point;
      if (entry.isIntersecting && id && !state.seeded.has(id)) {
        state.seeded.add(id);
        seedQueue.push(id);
      }
    }
    pumpSeeds();
  });

  function pumpSeeds() {
    while (seeding < 4 && seedQueue.length) {
      const id = seedQueue.shift();
      seeding++;
      seed(id).finally(() => { seeding--; pumpSeeds(); });
    }
  }

  async function seed(id) {
    try {
      const history = await api(`v1/points/${encodeURIComponent(id)}/history?since=-10m&order=desc&limit=${SPARK_MAX}`,
                                {quiet: true});
      const live = state.spark.get(id) || {t: [], v: []};
      const series = {t: [], v: []};
      for (const event of history.items.reverse()) {
        series.t.push(new Date(event.ts).getTime());
        series.v.push(numeric(event.value));
      }
      const newest = series.t.length ? series.t[series.t.length - 1] : -Infinity;
      live.t.forEach((t, i) => { if (t > newest) { series.t.push(t); series.v.push(live.v[i]); } });
      state.spark.set(id, series);
      const row = state.rows.get(id);
      if (row) drawSpark(id, row.spark);
    } catch (error) {
      state.seeded.delete(id); // asked again when the row shows next time
    }
  }

  function onEvent(event) {
    let point = state.points.get(event.point);
    if (!point) {
      point = {id: event.point, source: event.source, device: null, unit: event.unit,
               tags: event.tags || {}, writable: false, configured: false};
      state.points.set(event.point, point);
      scheduleFullRender();
    }
    Object.assign(point, {value: event.value, quality: event.quality, reason: event.reason,
                          ts: event.ts, received_at: event.received_at, event_id: event.id});
    if (!point.unit && event.unit) point.unit = event.unit;
    addSample(event.point, event.ts, event.value);
    state.dirty.add(event.point);
    if (state.detail && state.detail.id === event.point) detailEvent(event);
    scheduleFlush();
  }

  let flushPending = false;
  function scheduleFlush() {
    if (flushPending) return;
    flushPending = true;
    requestAnimationFrame(() => {
      flushPending = false;
      for (const id of state.dirty) {
        const row = state.rows.get(id);
        if (!row) continue;
        fillRow(state.points.get(id), row);
        row.tr.classList.remove("changed");
        void row.tr.offsetWidth; // restart the highlight
        row.tr.classList.add("changed");
      }
      state.dirty.clear();
    });
  }

  let fullRenderPending = false;
  function scheduleFullRender() {
    if (fullRenderPending) return;
    fullRenderPending = true;
    setTimeout(() => { fullRenderPending = false; renderPoints(); }, 250);
  }

  // --- the point's detail: chart and write-back ---------------------------------------------

  function openDetail(id) {
    const point = state.points.get(id);
    if (!point) return;
    state.detail = {id, t: [], v: [], text: []};
    $("detail-title").textContent = point.id;
    $("detail-description").textContent = point.description || "";
    const meta = $("detail-meta");
    fill(meta);
    const add = (term, ...value) => meta.append(el("dt", {}, term), el("dd", {}, ...value));
    add("Value", el("strong", {id: "detail-value"}, formatValue(point.value)), point.unit ? ` ${point.unit}` : "");
    add("Quality", el("span", {id: "detail-quality"}, qualityBadge(point),
      point.reason ? ` ${point.reason}` : ""));
    add("Time", el("span", {id: "detail-time"}, point.ts ? new Date(point.ts).toLocaleString() : "—"));
    add("Source", point.source || "—", point.device ? ` · device ${point.device}` : "");
    const tags = Object.entries(point.tags || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    add("Tags", tags || "—");
    add("Writable", point.writable ? "yes" : "no");
    setupWrite(point);
    const dialog = $("detail");
    if (!dialog.open) dialog.showModal();
    loadHistory();
  }

  function closeDetail() {
    state.detail = null;
    if (state.chart) { state.chart.destroy(); state.chart = null; }
    fill($("detail-chart"));
  }

  const RANGES = {"15m": "15 minutes", "1h": "hour", "6h": "6 hours", "24h": "24 hours", "7d": "7 days"};

  async function loadHistory() {
    const detail = state.detail;
    if (!detail) return;
    const range = $("detail-range").value;
    const limit = 5000;
    $("detail-note").textContent = "Loading…";
    let history;
    try {
      history = await api(`v1/points/${encodeURIComponent(detail.id)}/history?since=-${range}&order=desc&limit=${limit}`);
    } catch (error) {
      $("detail-note").textContent = `History unavailable: ${error.message}`;
      return;
    }
    if (state.detail !== detail) return;
    const events = history.items.reverse();
    detail.t = events.map((event) => new Date(event.ts).getTime() / 1000);
    detail.v = events.map((event) => numeric(event.value));
    detail.text = events.filter((event) => typeof event.value === "string");
    detail.range = range;
    $("detail-note").textContent = `${events.length} event${events.length === 1 ? "" : "s"} over the last ${RANGES[range]}` +
      (history.has_more ? ` (the newest ${limit})` : "");
    drawChart();
  }

  function drawChart() {
    const detail = state.detail;
    const box = $("detail-chart");
    if (state.chart) { state.chart.destroy(); state.chart = null; }
    const point = state.points.get(detail.id);
    if (detail.text.length && detail.v.every((v) => v === null)) {
      const list = el("ul", {});
      for (const event of detail.text.slice(-20).reverse()) {
        list.append(el("li", {}, `${new Date(event.ts).toLocaleString()}: ${event.value}`));
      }
      fill(box, el("p", {class: "muted"}, "Text values, the latest first:"), list);
      return;
    }
    if (!detail.t.length) {
      fill(box, el("p", {class: "muted empty"}, "No history in this range."));
      return;
    }
    fill(box);
    if (typeof uPlot !== "function") return;
    const styles = getComputedStyle(document.documentElement);
    const stroke = styles.getPropertyValue("--spark").trim() || "#0b5cad";
    const axis = {stroke: styles.getPropertyValue("--muted").trim(),
                  grid: {stroke: styles.getPropertyValue("--line").trim(), width: 1},
                  ticks: {stroke: styles.getPropertyValue("--line").trim(), width: 1}};
    const width = Math.max(280, box.clientWidth || 600);
    const seconds = RANGE_SECONDS[detail.range];
    const series = {label: point && point.unit ? `${detail.id} (${point.unit})` : detail.id,
                    stroke, width: 1.5, spanGaps: false,
                    value: (u, v) => v === null ? "—" : formatValue(v)};
    // A point reports by exception: its value holds until the next event, so the line is
    // drawn in steps, and carried on to now.
    if (uPlot.paths && uPlot.paths.stepped) series.paths = uPlot.paths.stepped({align: 1});
    state.chart = new uPlot({
      width, height: 260,
      scales: {x: {time: true, range: () => [Date.now() / 1000 - seconds, Date.now() / 1000]}},
      series: [{}, series],
      axes: [axis, Object.assign({size: 60}, axis)],
      cursor: {drag: {x: true, y: false}},
      legend: {live: true},
    }, chartData(detail), box);
  }

  const RANGE_SECONDS = {"15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800};

  function chartData(detail) {
    const t = detail.t.slice();
    const v = detail.v.slice();
    if (t.length && v[v.length - 1] !== null) {
      t.push(Math.max(Date.now() / 1000, t[t.length - 1]));
      v.push(v[v.length - 1]);
    }
    return [t, v];
  }

  let chartPending = false;
  function detailEvent(event) {
    const detail = state.detail;
    const point = state.points.get(event.point);
    $("detail-value").textContent = formatValue(event.value);
    fill($("detail-quality"), qualityBadge(point), event.reason ? ` ${event.reason}` : "");
    $("detail-time").textContent = new Date(event.ts).toLocaleString();
    if (detail.range === undefined) return;
    detail.t.push(new Date(event.ts).getTime() / 1000);
    detail.v.push(numeric(event.value));
    if (typeof event.value === "string") detail.text.push(event);
    if (chartPending) return;
    chartPending = true;
    setTimeout(() => {
      chartPending = false;
      if (state.detail !== detail) return;
      if (state.chart) state.chart.setData(chartData(detail));
      else drawChart();
    }, 500);
  }

  function setupWrite(point) {
    const box = $("detail-write");
    box.hidden = !point.writable;
    $("write-confirm").hidden = true;
    $("write-result").textContent = "";
    $("write-result").className = "";
    if (!point.writable) return;
    const isBool = typeof point.value === "boolean";
    $("write-value").hidden = isBool;
    $("write-value").required = !isBool;
    $("write-bool").hidden = !isBool;
    $("write-value").value = point.value === null || point.value === undefined || isBool ? "" : String(point.value);
    $("write-unit").textContent = point.unit ? `(${point.unit})` : "";
    const permitted = allows("write");
    for (const id of ["write-value", "write-bool", "write-start"]) $(id).disabled = !permitted;
    if (!permitted) {
      $("write-result").textContent = "Writing needs an API key with the “write” scope" +
        (state.whoami ? ` (the key “${state.whoami.name}” has ${state.whoami.scopes.join(", ") || "no scopes"}).` : ".");
    }
  }

  function writeValue(point) {
    if (typeof point.value === "boolean") return $("write-bool").value === "true";
    const text = $("write-value").value.trim();
    if (typeof point.value === "number" || point.value === null) {
      if (text !== "" && !Number.isNaN(Number(text))) return Number(text);
      if (typeof point.value === "number") throw new Error(`“${text}” is not a number`);
    }
    if (text === "true" || text === "false") return text === "true";
    return text;
  }

  function startWrite(submit) {
    submit.preventDefault();
    const point = state.points.get(state.detail.id);
    let value;
    try {
      value = writeValue(point);
    } catch (error) {
      $("write-result").textContent = error.message;
      $("write-result").className = "bad-text";
      return;
    }
    state.detail.pending = value;
    $("write-question").textContent = `Write ${JSON.stringify(value)}${point.unit ? ` ${point.unit}` : ""} ` +
      `to ${point.id} on ${point.device ? `device ${point.device} of ` : ""}source ${point.source}? ` +
      "The device acts on it at once.";
    $("write-result").textContent = "";
    $("write-confirm").hidden = false;
    $("write-yes").focus();
  }

  async function confirmWrite() {
    const detail = state.detail;
    const value = detail.pending;
    $("write-confirm").hidden = true;
    $("write-result").className = "";
    $("write-result").textContent = "Writing…";
    try {
      const result = await api(`v1/points/${encodeURIComponent(detail.id)}`,
                               {method: "PUT", body: {value}, scope: "write"});
      $("write-result").textContent = `Written: ${JSON.stringify(result.value)} at ` +
        `${new Date(result.written_at).toLocaleTimeString()}. The next poll shows its effect.`;
      $("write-result").className = "ok-text";
    } catch (error) {
      $("write-result").textContent = `Not written: ${error.message}` +
        (error.hint ? ` (${error.hint})` : "");
      $("write-result").className = "bad-text";
    }
    $("write-start").focus();
  }

  // --- discovery ----------------------------------------------------------------------------

  function showDiscoveryAbsent() {
    state.discovery = "absent";
    $("discover-availability").textContent = "Discovery is not available on this bridge: " +
      "its API has no /v1/discover endpoint. Update Fieldbridge to browse, scan and sample endpoints from here.";
    $("discover-availability").className = "notice info";
    $("discover-run").disabled = true;
  }

  async function probeDiscovery() {
    // A GET on the POST-only route answers 405 where it exists, 404 where it does not,
    // without starting anything.
    try {
      const response = await fetch("v1/discover/opcua", {headers: headers(), cache: "no-store"});
      if (response.status === 404) { showDiscoveryAbsent(); return; }
      state.discovery = "available";
      $("discover-availability").className = "muted small";
      $("discover-availability").textContent = allows("admin") ?
        "Browse an OPC-UA server, scan a Modbus device or sample an MQTT broker; the result is a mapping to review." :
        "Discovery needs an API key with the “admin” scope.";
    } catch (error) {
      $("discover-availability").textContent = "Cannot reach the bridge to check for discovery.";
    }
  }

  function showProtocolFields() {
    const protocol = $("discover-protocol").value;
    for (const fieldset of document.querySelectorAll("#discover-form fieldset")) {
      fieldset.hidden = fieldset.dataset.protocol !== protocol;
    }
  }

  // "1, 2 5 - 7" as "1,2,5-7": the comma-separated list a discovery request takes.
  function commaList(text) {
    return text.replace(/\s*-\s*/g, "-").split(/[\s,]+/).filter(Boolean).join(",");
  }

  // The body of POST /v1/discover/{protocol}: the fields of the protocol's request model
  // (ModbusDiscoverRequest, OpcuaDiscoverRequest, MqttDiscoverRequest), as
  // `fieldbridge discover <protocol>` takes them: unit ids, tables and the address range
  // of a Modbus scan are strings ("1-3,7", "holding,input", "0-99").
  function discoveryParameters(protocol) {
    const fieldset = document.querySelector(`#discover-form fieldset[data-protocol="${protocol}"]`);
    const value = (name) => fieldset.querySelector(`[name="${name}"]`).value.trim();
    const number = (name) => Number(value(name));
    if (protocol === "opcua") {
      const body = {url: value("url"), depth: number("depth")};
      if (value("root")) body.root = value("root");
      return body;
    }
    if (protocol === "modbus") {
      const body = {host: value("host"), port: number("port")};
      // Left empty, the request's defaults apply: unit 1, every table, addresses 0-999.
      const units = commaList(value("units"));
      const tables = commaList(value("tables"));
      const range = value("range").replace(/\s+/g, "");
      if (units) body.units = units;
      if (tables) body.tables = tables;
      if (range) body.range = range;
      return body;
    }
    return {host: value("host"), port: number("port"), filter: value("filter"), seconds: number("seconds")};
  }

  async function discover(submit) {
    submit.preventDefault();
    const protocol = $("discover-protocol").value;
    const status = $("discover-status");
    $("discover-run").disabled = true;
    status.className = "";
    status.textContent = `Discovering over ${protocol}… this can take a while.`;
    try {
      const response = await fetch(`v1/discover/${protocol}`, {
        method: "POST", cache: "no-store",
        headers: headers({"Content-Type": "application/json"}),
        body: JSON.stringify(discoveryParameters(protocol)),
      });
      if (response.status === 404) { status.textContent = ""; showDiscoveryAbsent(); return; }
      if (!response.ok) {
        const problem = await problemOf(response);
        if (problem.status === 401 || problem.status === 403) showAuthProblem(problem, "admin");
        status.className = "bad-text";
        status.textContent = problem.status === 409 ?
          "A discovery is already running on this bridge; try again when it has finished." :
          `Discovery failed: ${problem.message}${problem.hint ? ` (${problem.hint})` : ""}`;
        return;
      }
      showDiscovery(await response.json());
      status.textContent = "";
    } catch (error) {
      status.className = "bad-text";
      status.textContent = `Discovery failed: ${error.message}`;
    } finally {
      if (state.discovery !== "absent") $("discover-run").disabled = false;
    }
  }

  function showDiscovery(result) {
    const items = result.items || [];
    const warnings = (result.warnings || []).slice();
    if (result.partial) warnings.unshift("The result is partial: discovery stopped before it covered everything.");
    fill($("discover-warnings"), ...warnings.map((text) => el("li", {}, text)));
    fill($("discover-items"), ...items.map((item) => el("tr", {},
      el("td", {}, item.name), el("td", {}, String(item.address)), el("td", {}, item.type || "—"),
      el("td", {}, item.unit || "—"), el("td", {}, item.writable ? "yes" : "no"))));
    if (!items.length) $("discover-items").append(el("tr", {}, el("td", {colspan: 5, class: "muted"}, "Nothing found.")));
    $("discover-yaml").textContent = result.yaml || "";
    const link = $("discover-download");
    if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(new Blob([result.yaml || ""], {type: "application/yaml"}));
    link.download = `discovered-${result.protocol || "mapping"}.yaml`;
    $("discover-result").hidden = false;
  }

  // --- the key ------------------------------------------------------------------------------

  function openKeyForm() {
    $("key-form").hidden = false;
    $("key-button").setAttribute("aria-expanded", "true");
    $("key-input").focus();
  }

  function showWho() {
    const who = state.whoami;
    $("key-who").textContent = !who ? "" : who.keys_required ?
      `Using key “${who.name}” (scopes: ${who.scopes.join(", ") || "none"}).` :
      "This bridge asks for no key: every scope is open.";
  }

  async function useKey(submit) {
    submit.preventDefault();
    state.key = $("key-input").value.trim();
    $("key-input").value = "";
    if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
    else sessionStorage.removeItem(KEY_STORAGE);
    await start();
  }

  async function forgetKey() {
    state.key = "";
    sessionStorage.removeItem(KEY_STORAGE);
    $("key-input").value = "";
    await start();
  }

  // --- start --------------------------------------------------------------------------------

  async function start() {
    if (state.streams) state.streams.abort();
    state.streams = new AbortController();
    clearAuthProblem();
    state.whoami = null;
    try {
      state.whoami = await api("v1/whoami");
    } catch (error) {
      showWho();
      if (!(error instanceof ApiProblem)) {
        setLive("offline", "Cannot reach the bridge");
      } else {
        setLive("offline", "Not authorized");
      }
      probeDiscovery();
      return;
    }
    showWho();
    $("bridge-id").textContent = state.whoami.bridge || "";
    document.title = `${state.whoami.bridge} · Fieldbridge console`;
    if (!state.whoami.keys_required) $("key-button").textContent = "API key (none needed)";
    if (!allows("read")) {
      showAuthProblem(new ApiProblem(403, {
        message: `the key '${state.whoami.name}' lacks the 'read' scope`,
        hint: `add 'read' to the scopes of key '${state.whoami.name}' under api.keys`}), "read");
      setLive("offline", "Not authorized");
      return;
    }
    if (state.whoami.keys_required && state.key) {
      $("key-form").hidden = true;
      $("key-button").setAttribute("aria-expanded", "false");
    }
    probeDiscovery();
    const signal = state.streams.signal;
    try {
      const [page, sources, sinks] = await Promise.all([
        api("v1/points?limit=10000"), api("v1/sources"), api("v1/sinks")]);
      state.points = new Map(page.items.map((point) => [point.id, point]));
      for (const point of page.items) if (point.ts) addSample(point.id, point.ts, point.value);
      renderPoints();
      renderSources(sources.items);
      renderSinks(sinks.items);
    } catch (error) {
      if (!(error instanceof ApiProblem)) setLive("offline", "Cannot reach the bridge");
      return;
    }
    follow("v1/events/stream", (name, data) => { if (name === "event") onEvent(data); }, signal);
    follow("v1/status/stream", (name, data) => {
      if (name !== "status") return;
      renderSources(data.sources);
      renderSinks(data.sinks);
    }, signal);
  }

  function wire() {
    $("key-button").addEventListener("click", () => {
      const form = $("key-form");
      if (form.hidden) openKeyForm();
      else { form.hidden = true; $("key-button").setAttribute("aria-expanded", "false"); }
    });
    $("key-form").addEventListener("submit", useKey);
    $("key-forget").addEventListener("click", forgetKey);
    let searchTimer = null;
    $("search").addEventListener("input", () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(renderPoints, 120);
    });
    $("points-body").addEventListener("click", (click) => {
      const button = click.target.closest("button.point-link");
      if (button) openDetail(button.dataset.point);
    });
    $("detail-close").addEventListener("click", () => $("detail").close());
    $("detail").addEventListener("close", () => {
      const id = state.detail && state.detail.id;
      closeDetail();
      const button = id && document.querySelector(`button.point-link[data-point="${CSS.escape(id)}"]`);
      if (button) button.focus();
    });
    $("detail-range").addEventListener("change", loadHistory);
    $("write-form").addEventListener("submit", startWrite);
    $("write-yes").addEventListener("click", confirmWrite);
    $("write-no").addEventListener("click", () => {
      $("write-confirm").hidden = true;
      $("write-result").textContent = "Cancelled: nothing was written.";
      $("write-start").focus();
    });
    $("discover-protocol").addEventListener("change", showProtocolFields);
    $("discover-form").addEventListener("submit", discover);
    $("discover-copy").addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText($("discover-yaml").textContent);
        $("discover-status").textContent = "YAML copied.";
      } catch (error) {
        $("discover-status").textContent = "Copying is not allowed here: select the text instead.";
      }
    });
    // A tab in the background lets go of its two streams after a while (browsers allow few
    // connections per host), and picks everything up again when it is shown.
    let hiddenTimer = null;
    document.addEventListener("visibilitychange", () => {
      clearTimeout(hiddenTimer);
      if (document.hidden) {
        hiddenTimer = setTimeout(() => {
          if (state.streams) state.streams.abort();
          state.paused = true;
          setLive("offline", "Paused in the background");
        }, 30000);
      } else if (state.paused) {
        state.paused = false;
        start();
      }
    });
    window.addEventListener("resize", () => {
      if (state.chart) state.chart.setSize({width: Math.max(280, $("detail-chart").clientWidth), height: 260});
    });
    // "since" cells count up without a message from the bridge.
    setInterval(() => {
      for (const node of document.querySelectorAll("time[data-ago]")) node.textContent = ago(node.dataset.ago);
    }, 1000);
    // Sparklines slide with time even for points that do not change.
    setInterval(() => { for (const [id, row] of state.rows) drawSpark(id, row.spark); }, 15000);
  }

  wire();
  start();
})();
