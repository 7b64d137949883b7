// mistral-bot dashboard: polls dashboard/data every 2 s, keeps the last hour of samples
// (at most `capacity`) and redraws the uPlot charts. No outside resources.
(function () {
  "use strict";

  const POLL_MS = 2000;
  const COLORS = {
    local: "#60a5fa", groq: "#fb923c", mistral: "#facc15",
    gemini: "#c084fc", openai: "#34d399", canned: "#94a3b8",
  };
  const KIND_COLORS = ["#f87171", "#fbbf24", "#fb923c", "#f472b6", "#a78bfa", "#38bdf8",
    "#4ade80", "#e879f9", "#fca5a5", "#fde68a", "#93c5fd", "#cbd5e1"];
  const BREAKER_COLORS = ["#22543d", "#b7791f", "#2b6cb0", "#c53030"];
  const BREAKER_NAMES = ["closed", "Retry-After", "half-open", "open"];
  // Tick steps for counts: whole numbers only.
  const COUNT_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];
  const AXIS = { stroke: "#8b9bb4", grid: { stroke: "#1f2b40", width: 1 }, ticks: { stroke: "#1f2b40", width: 1 } };

  let cols = null;      // the samples held, column by column
  let lastSeq = null;   // the newest sample's number
  const charts = {};    // id → { plot, key }
  let rawRequests = []; // requests per shown provider, unstacked (for the legend)

  const $ = (id) => document.getElementById(id);

  // ---- formatting -------------------------------------------------------------------
  const num = (v, digits) => v == null ? "–" : Number(v).toLocaleString("en-US",
    { maximumFractionDigits: digits == null ? 1 : digits });
  function bytes(v) {
    if (v == null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return num(v, v < 10 && i > 0 ? 1 : 0) + " " + units[i];
  }
  function ms(v) {
    if (v == null) return "–";
    return v >= 1000 ? num(v / 1000, v >= 10000 ? 0 : 1) + " s" : num(v, 0) + " ms";
  }
  function duration(s) {
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    if (d) return d + "d " + h + "h " + m + "m";
    if (h) return h + "h " + String(m).padStart(2, "0") + "m";
    return m + "m " + String(s % 60).padStart(2, "0") + "s";
  }
  const params = (n) => n >= 1e9 ? num(n / 1e9, 1) + "B" : num(n / 1e6, 0) + "M";

  // ---- the held samples ---------------------------------------------------------------
  function isColumn(v) { return Array.isArray(v); }

  function merge(series) {
    if (series.reset || cols == null) {
      cols = series;
    } else if (series.t.length) {
      const n = cols.t.length;
      for (const key of Object.keys(series)) {
        const add = series[key];
        if (key === "errors") {
          const kinds = new Set(Object.keys(cols.errors).concat(Object.keys(add)));
          for (const kind of kinds) {
            const old = cols.errors[kind] || new Array(n).fill(0);
            cols.errors[kind] = old.concat(add[kind] || new Array(series.t.length).fill(0));
          }
        } else if (isColumn(add) && isColumn(add[0])) {
          cols[key] = cols[key].map((col, p) => col.concat(add[p]));
        } else if (isColumn(add) && key !== "providers" && key !== "breaker_codes") {
          cols[key] = cols[key].concat(add);
        }
      }
    }
    lastSeq = series.last_seq;
    trim(series.capacity);
  }

  function trim(capacity) {
    const t = cols.t;
    const newest = t.length ? t[t.length - 1] : 0;
    let drop = Math.max(0, t.length - capacity);
    while (drop < t.length && t[drop] < newest - 3600) drop++;
    if (!drop) return;
    for (const key of Object.keys(cols)) {
      const v = cols[key];
      if (key === "errors") {
        for (const kind of Object.keys(v)) {
          v[kind] = v[kind].slice(drop);
          if (v[kind].every((x) => x === 0)) delete v[kind];
        }
      } else if (isColumn(v) && isColumn(v[0])) {
        cols[key] = v.map((col) => col.slice(drop));
      } else if (isColumn(v) && key !== "providers" && key !== "breaker_codes") {
        cols[key] = v.slice(drop);
      }
    }
  }

  // ---- charts -------------------------------------------------------------------------
  function size(el) {
    const width = Math.max(200, el.clientWidth);
    return { width, height: width < 420 ? 180 : 220 };
  }

  function zeroBased(u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; }

  // Draws `series` (uPlot series options after x) over `data` (x first) in the element
  // `id`; rebuilds the chart when the set of series (`key`) changes.
  function draw(id, key, series, data, yFormat, extra, counts) {
    const el = $(id);
    const points = data[0].length;
    el.dataset.points = String(points);
    let max = 0;
    for (let i = 1; i < data.length; i++) for (const v of data[i]) if (v != null && v > max) max = v;
    el.dataset.max = String(max);
    let chart = charts[id];
    if (chart && chart.key !== key) { chart.plot.destroy(); chart = null; }
    if (!chart) {
      el.textContent = "";
      const opts = Object.assign({
        ...size(el),
        cursor: { drag: { x: false, y: false } },
        legend: { live: true },
        scales: { x: { time: true }, y: { range: zeroBased } },
        axes: [Object.assign({}, AXIS),
          Object.assign({}, AXIS, { size: 56, values: (u, vals) => vals.map(yFormat) },
            counts ? { incrs: COUNT_INCRS } : {})],
        series: [{ value: (u, v) => v == null ? "–" : new Date(v * 1000).toLocaleTimeString() }]
          .concat(series),
      }, extra || {});
      chart = charts[id] = { key, plot: new uPlot(opts, data, el) };
    } else {
      chart.plot.setData(data);
    }
  }

  function line(label, color, opts) {
    return Object.assign({
      label, stroke: color, width: 1.6, points: { size: 4 },
      value: (u, v) => v == null ? "–" : num(v, 1),
    }, opts || {});
  }
  const area = (label, color, opts) => line(label, color, Object.assign({ fill: color + "33" }, opts || {}));

  function drawAll(now) {
    const c = cols;
    const t = c.t;
    const providers = c.providers;
    const inChain = new Set(now.chain);

    draw("c-tps", "tps", [
      area("generated tok/s", "#60a5fa"),
      line("prompt tok/s", "#c084fc"),
    ], [t, c.gen_tps, c.prompt_tps], (v) => num(v, 0));

    draw("c-slots", "slots", [
      area("slots busy", "#4ade80", { paths: uPlot.paths.stepped({ align: 1 }) }),
      line("queue", "#fbbf24", { paths: uPlot.paths.stepped({ align: 1 }) }),
      line("slots", "#475569", { dash: [4, 4], points: { show: false } }),
    ], [t, c.slots_busy, c.queue_len, c.slots], (v) => num(v, 0),
    { scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max, 1) + 0.5] } } }, true);

    draw("c-cache", "cache", [
      area("reused from cache", "#34d399"),
      area("processed", "#f472b6"),
    ], [t, c.prompt_cached, c.prompt_processed], (v) => num(v, 0), null, true);

    draw("c-park", "park", [
      line("hits RAM", "#4ade80"),
      line("hits disk", "#60a5fa"),
      line("misses", "#f87171"),
      line("RAM held", "#a3e635", { scale: "bytes", dash: [5, 3], points: { show: false }, value: (u, v) => bytes(v) }),
      line("disk held", "#38bdf8", { scale: "bytes", dash: [5, 3], points: { show: false }, value: (u, v) => bytes(v) }),
    ], [t, c.park_hits_ram, c.park_hits_disk, c.park_misses, c.park_ram_bytes, c.park_disk_bytes],
    (v) => num(v, 0), {
      scales: {
        x: { time: true },
        y: { range: (u, min, max) => [0, Math.max(max * 1.1, 4)] },
        bytes: { range: (u, min, max) => [0, Math.max(max * 1.1, 1 << 20)] },
      },
      axes: [Object.assign({}, AXIS),
        Object.assign({}, AXIS, { size: 48, incrs: COUNT_INCRS, values: (u, vals) => vals.map((v) => num(v, 0)) }),
        Object.assign({}, AXIS, { scale: "bytes", side: 1, size: 64, grid: { show: false }, values: (u, vals) => vals.map(bytes) })],
    });

    // Latency: one solid p50 and one dashed p95 line per provider that answered.
    for (const [id, p50, p95] of [["c-first", c.first_text_p50, c.first_text_p95],
      ["c-reply", c.reply_p50, c.reply_p95]]) {
      const series = [], data = [t];
      providers.forEach((name, p) => {
        if (name === "canned" || !p50[p].some((v) => v != null)) return;
        series.push(line(name + " p50", COLORS[name], { spanGaps: true, value: (u, v) => ms(v) }));
        series.push(line(name + " p95", COLORS[name], { spanGaps: true, dash: [5, 4], width: 1.2, value: (u, v) => ms(v) }));
        data.push(p50[p], p95[p]);
      });
      if (!series.length) { empty(id, "no replies in the last hour"); continue; }
      draw(id, series.map((s) => s.label).join(), series, data, ms);
    }

    // Requests stacked: each series is the sum up to its provider, the biggest drawn first.
    const shown = providers.filter((name, p) => inChain.has(name) || c.requests[p].some((v) => v > 0));
    const stacked = [];
    rawRequests = [];
    let sum = t.map(() => 0);
    for (const name of shown) {
      const col = c.requests[providers.indexOf(name)];
      sum = sum.map((s, i) => s + col[i]);
      stacked.push(sum);
      rawRequests.push(col);
    }
    const reqSeries = shown.map((name, i) => area(name, COLORS[name], {
      fill: COLORS[name] + "aa", width: 1, points: { show: false },
      paths: uPlot.paths.stepped({ align: 1 }),
      value: (u, v, si, idx) => idx == null || !rawRequests[i] ? "–" : num(rawRequests[i][idx], 0),
    })).reverse();
    draw("c-requests", "req:" + shown.join(), reqSeries, [t].concat(stacked.slice().reverse()), (v) => num(v, 0), null, true);

    const kinds = Object.keys(c.errors).sort();
    if (kinds.length) {
      draw("c-errors", "err:" + kinds.join(), kinds.map((kind, i) =>
        line(kind, KIND_COLORS[i % KIND_COLORS.length], { paths: uPlot.paths.stepped({ align: 1 }), points: { show: false } })),
      [t].concat(kinds.map((k) => c.errors[k])), (v) => num(v, 0), null, true);
    } else {
      empty("c-errors", "no errors in the last hour");
    }

    draw("c-rss", "rss", [area("resident", "#38bdf8", { value: (u, v) => bytes(v), points: { show: false } })],
      [t, c.rss_bytes], bytes, { axes: [Object.assign({}, AXIS), Object.assign({}, AXIS, { size: 70, values: (u, vals) => vals.map(bytes) })] });

    drawBreakers(now);
  }

  function empty(id, text) {
    const chart = charts[id];
    if (chart) { chart.plot.destroy(); delete charts[id]; }
    const el = $(id);
    el.dataset.points = String(cols.t.length);
    el.dataset.max = "0";
    el.innerHTML = "";
    const div = document.createElement("div");
    div.className = "empty";
    div.textContent = text;
    el.appendChild(div);
  }

  function drawBreakers(now) {
    const box = $("breakers");
    const t = cols.t;
    const rows = now.chain.filter((name) => name !== "canned");
    if (box.dataset.key !== rows.join()) {
      box.dataset.key = rows.join();
      box.innerHTML = "";
      for (const name of rows) {
        const row = document.createElement("div");
        row.className = "row";
        const label = document.createElement("span");
        label.textContent = name;
        const canvas = document.createElement("canvas");
        canvas.dataset.provider = name;
        row.append(label, canvas);
        box.appendChild(row);
      }
      const keys = document.createElement("div");
      keys.className = "legend-keys";
      BREAKER_NAMES.forEach((n, i) => {
        const k = document.createElement("span");
        const sw = document.createElement("i");
        sw.style.background = BREAKER_COLORS[i];
        k.append(sw, n);
        keys.appendChild(k);
      });
      box.appendChild(keys);
    }
    for (const canvas of box.querySelectorAll("canvas")) {
      const p = cols.providers.indexOf(canvas.dataset.provider);
      const codes = p >= 0 ? cols.breaker[p] : [];
      const w = canvas.clientWidth || 300, h = 14, dpr = window.devicePixelRatio || 1;
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
      const g = canvas.getContext("2d");
      g.scale(dpr, dpr);
      g.clearRect(0, 0, w, h);
      if (t.length < 1) continue;
      const t0 = t[0], span = Math.max(t[t.length - 1] - t0, 1);
      for (let i = 0; i < t.length; i++) {
        const code = codes[i];
        if (code == null) continue;
        const x0 = t.length === 1 ? 0 : ((t[i - 1] ?? t0) - t0) / span * w;
        const x1 = t.length === 1 ? w : (t[i] - t0) / span * w;
        g.fillStyle = BREAKER_COLORS[code];
        g.fillRect(x0, 0, Math.max(x1 - x0, 1), h);
      }
    }
    const body = $("t-health").tBodies[0];
    body.innerHTML = "";
    for (const h of now.health) {
      const tr = document.createElement("tr");
      const state = h.breaker === "closed" && h.retry_after_seconds > 0 ? "retry" : h.breaker;
      const label = { closed: "closed", open: "open", half_open: "half-open", retry: "Retry-After" }[state];
      cells(tr, [h.provider, label, h.open_for_seconds ? num(h.open_for_seconds, 0) + " s" : "–",
        h.retry_after_seconds ? num(h.retry_after_seconds, 0) + " s" : "–", String(h.consecutive_failures)]);
      tr.children[1].className = "state-" + state;
      body.appendChild(tr);
    }
  }

  function cells(tr, values) {
    for (const v of values) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
  }

  function drawFacts(now) {
    $("f-uptime").textContent = duration(now.uptime_seconds);
    $("f-rss").textContent = bytes(now.rss_bytes);
    const budget = now.engine ? bytes(now.engine.kv_park_ram_budget_bytes) : "–";
    $("f-memory").textContent = (now.memory_limit_bytes ? bytes(now.memory_limit_bytes) : "unknown") +
      " · " + budget;
    const m = now.model;
    $("f-model").textContent = m ? m.name + " · " + params(m.n_params) + " · " + bytes(m.size_bytes)
      : now.model_id + (now.ready ? "" : " (loading)");
    const e = now.engine;
    $("f-engine").textContent = e ? e.slots_busy + "/" + e.slots + " slots busy · queue " + e.queue_len +
      " · ctx " + num(now.ctx_size, 0) : now.ready ? "none (no local model)" : "loading";
    $("f-chain").textContent = now.chain.join(" → ");
    const stt = now.stt;
    $("f-stt").textContent = !stt || stt.requests === 0 ? "no voice notes yet" :
      stt.success + "/" + stt.requests + " transcribed · " + stt.audio_seconds + " s audio · p50 " +
      (stt.latency_p50_ms === null ? "–" : Math.round(stt.latency_p50_ms) + " ms") +
      (stt.errors > 0 ? " · " + stt.errors + " errors" : "");
    $("f-build").textContent = "v" + now.version + " · " + now.commit;
    $("f-interval").textContent = String(cols.interval_seconds);

    const body = $("t-providers").tBodies[0];
    body.innerHTML = "";
    for (const [name, s] of Object.entries(now.providers)) {
      if (!s.requests && !s.skipped && !now.chain.includes(name)) continue;
      const tr = document.createElement("tr");
      cells(tr, [name, num(s.requests, 0), num(s.success, 0), num(s.errors, 0), num(s.timeouts, 0),
        num(s.skipped, 0), ms(s.first_text_p50_ms), ms(s.first_text_p95_ms), ms(s.latency_p50_ms),
        ms(s.latency_p95_ms)]);
      const dot = document.createElement("span");
      dot.className = "dot";
      dot.style.background = COLORS[name] || "#94a3b8";
      tr.firstChild.prepend(dot);
      body.appendChild(tr);
    }
  }

  function drawFleet(now) {
    const servers = now.fleet || [];
    $("fleet").hidden = servers.length === 0;
    const body = $("t-fleet").tBodies[0];
    body.innerHTML = "";
    for (const s of servers) {
      const tr = document.createElement("tr");
      cells(tr, [s.url, s.up ? "up" : "down", num(s.in_flight, 0), num(s.requests, 0), num(s.errors, 0)]);
      tr.children[1].className = s.up ? "state-closed" : "state-open";
      body.appendChild(tr);
    }
  }

  function drawBudgets(now) {
    const rows = (now.budgets || []).filter((b) => b.budget != null || b.requests > 0 ||
      now.chain.includes(b.provider));
    $("budgets").hidden = rows.length === 0;
    const body = $("t-budgets").tBodies[0];
    body.innerHTML = "";
    for (const b of rows) {
      const tr = document.createElement("tr");
      const used = num(b.used, 0) + (b.budget != null ? " / " + num(b.budget, 0) : "") + " " + b.unit;
      cells(tr, [b.provider, num(b.prompt_tokens, 0), num(b.completion_tokens, 0), num(b.requests, 0),
        used, new Date(b.resets_at_unix * 1000).toISOString().replace("T", " ").slice(0, 16),
        b.header_remaining_tokens == null ? "–" : num(b.header_remaining_tokens, 0)]);
      if (b.budget != null && b.used >= b.budget) tr.children[4].className = "state-open";
      body.appendChild(tr);
    }
  }

  // ---- polling ------------------------------------------------------------------------
  function status(text, cls) {
    const el = $("status");
    el.textContent = text;
    el.className = "pill " + cls;
  }

  let now = null;
  async function poll() {
    try {
      const url = "dashboard/data" + (lastSeq == null ? "" : "?since=" + lastSeq);
      const response = await fetch(url, { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const body = await response.json();
      now = body.now;
      merge(body.series);
      drawFacts(now);
      drawFleet(now);
      drawBudgets(now);
      drawAll(now);
      status("live · " + new Date(now.unix_ms).toLocaleTimeString(), "live");
      document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    } catch (err) {
      status("offline: " + err.message, "down");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  // Charts follow their card's width (a phone turned, a window resized).
  const resized = new ResizeObserver((entries) => {
    for (const entry of entries) {
      const chart = charts[entry.target.id];
      if (chart && Math.abs(chart.plot.width - size(entry.target).width) > 1) {
        chart.plot.setSize(size(entry.target));
      }
    }
    if (now) drawBreakers(now);
  });
  for (const el of document.querySelectorAll(".chart")) resized.observe(el);

  poll();
})();
