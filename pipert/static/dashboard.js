// pipert dashboard: vanilla JavaScript, no build step, no dependencies.
// The live state arrives as Server-Sent Events from /dashboard/stream, read with fetch() so that the
// token travels in the Authorization header like every other request (EventSource cannot set headers).
"use strict";

const TOKEN_KEY = "pipert-token";
const LEVELS = {PIPE_INFRASTRUCTURE: 5, DEBUG: 10, INFO: 20, WARNING: 30, ERROR: 40, CRITICAL: 50};
const MAX_LOG = 1000;
const NODE_W = 184, NODE_H = 50, COL_W = 340, ROW_H = 62, FLOW_HEAD = 40, FLOW_PAD = 14, LANE_GAP = 26;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  pipe: null, structure: null, status: null, selected: null, frames: null,
  after: "", logs: [], controller: null, retry: 1000,
  nodes: {}, wires: {}, rows: {}, flowBoxes: {}, paramInputs: {},
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, parent, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function svg(tag, attrs, parent, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function number(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function latencyText(latency) {
  if (!latency || latency.p50 === undefined) return "–";
  return `${(latency.p50 * 1000).toFixed(1)} / ${(latency.p99 * 1000).toFixed(1)} ms`;
}

function nodeName(node) {
  if (node === null || node === undefined) return null;
  if (typeof node !== "object") return String(node);
  return node.host || node.hostname || node.name || node.id || JSON.stringify(node);
}

// ----- messages and requests -----

let messageTimer = null;

function say(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
  clearTimeout(messageTimer);
  if (kind === "ok") messageTimer = setTimeout(() => { box.hidden = true; }, 5000);
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  return headers;
}

// POST ``body`` as JSON (event routes take {"extra_args": {...}}, the params route the values themselves).
async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: authHeaders({"Content-Type": "application/json"}),
    body: body === undefined ? "" : JSON.stringify(body),
  });
  let document_ = null;
  try { document_ = await response.json(); } catch (error) { /* an empty or non-JSON answer */ }
  if (response.status === 401) askToken(document_ && document_.error);
  if (!response.ok) throw new Error((document_ && document_.error) || `${path}: HTTP ${response.status}`);
  return document_;
}

function reportAck(what, ack) {
  const errors = Object.entries(ack.errors || {});
  if (errors.length) {
    say(`${what}: failed in ${errors.map(([routine, error]) => `${routine} (${error})`).join(", ")}`, "error");
  } else if ((ack.pending || []).length) {
    say(`${what}: no answer within the timeout from ${ack.pending.join(", ")}`, "error");
  } else if (ack.handled_by) {
    say(`${what}: done by ${ack.handled_by.join(", ") || "no routine"}`, "ok");
  } else {
    say(`${what}: done`, "ok");
  }
}

async function act(what, path, body) {
  try {
    reportAck(what, await post(path, body));
  } catch (error) {
    say(`${what}: ${error.message}`, "error");
  }
}

// ----- the token -----

function askToken(reason) {
  state.pipe = null;
  $("main").hidden = true;
  $("controls").hidden = true;
  $("token-form").hidden = false;
  $("token-error").textContent = state.token ? (reason || "the token was refused") : "";
  $("token-input").focus();
  if (state.controller) state.controller.abort();
  state.controller = null;
  setConnection("needs a token", "down");
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token-input").value;
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("token-form").hidden = true;
  connect();
});

// ----- the live stream -----

function setConnection(text, kind) {
  const badge = $("connection");
  badge.textContent = text;
  badge.className = "connection " + (kind || "");
}

async function connect() {
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  const query = new URLSearchParams();
  if (state.frames) query.set("frames", state.frames);
  if (state.after) query.set("after", state.after);
  try {
    const response = await fetch("/dashboard/stream?" + query, {
      headers: authHeaders({Accept: "text/event-stream"}), signal: controller.signal, cache: "no-store",
    });
    if (response.status === 401) {
      const refusal = await response.json().catch(() => null);
      askToken(refusal && refusal.error);
      return;
    }
    if (!response.ok) {
      const refusal = await response.json().catch(() => null);
      throw new Error((refusal && refusal.error) || `HTTP ${response.status}`);
    }
    setConnection("live", "live");
    state.retry = 1000;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
    if (state.frames && /no routine/.test(error.message)) state.frames = null;
  }
  if (state.controller !== controller) return;
  if (!$("connection").textContent.startsWith("the pipe has ended")) setConnection("no daemon: retrying…", "down");
  setTimeout(() => { if (state.controller === controller) connect(); }, state.retry);
  state.retry = Math.min(state.retry * 2, 5000);
}

function dispatch(block) {
  let kind = "message", data = "", id = null;
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") kind = value;
    else if (field === "data") data += (data ? "\n" : "") + value;
    else if (field === "id") id = value;
  }
  if (!data) return;
  const message = JSON.parse(data);
  if (id) state.after = id;
  if (kind === "structure") onStructure(message);
  else if (kind === "status") onStatus(message);
  else if (kind === "log") onLog(message);
  else if (kind === "frame") onFrame(message);
  else if (kind === "bye") setConnection("the pipe has ended: waiting for a daemon…", "down");
}

// ----- structure: the graph, tables and forms are built once per pipe -----

function onStructure(structure) {
  $("main").hidden = false;
  $("controls").hidden = false;
  $("token-form").hidden = true;
  const same = state.structure && JSON.stringify(state.structure) === JSON.stringify(structure);
  if (same) return;  // a reconnection to the same pipe (frames switched): keep the page as it is
  if (state.pipe !== structure.pipe) {
    state.logs = [];
    $("log").textContent = "";
    if (state.pipe !== null) state.after = "";
  }
  state.pipe = structure.pipe;
  state.structure = structure;
  $("pipe-id").textContent = "pipe " + structure.pipe;
  const routines = structure.Routines.map((r) => r.routine_name);
  if (state.selected && !routines.includes(state.selected)) state.selected = null;
  drawGraph(structure);
  buildTables(structure);
  const filter = $("log-routine"), chosen = filter.value;
  filter.replaceChildren(el("option", {value: ""}, null, "every routine and the daemon"));
  for (const name of routines) el("option", {value: name}, filter, name);
  filter.value = routines.includes(chosen) ? chosen : "";
  buildDetail();
}

function layout(structure) {
  const wires = structure.Wires || [];
  const rank = {};
  for (const r of structure.Routines) rank[r.routine_name] = 0;
  for (let i = 0; i < structure.Routines.length; i++) {
    for (const w of wires) rank[w.destination] = Math.max(rank[w.destination], rank[w.source] + 1);
  }
  const flows = [];
  const byName = {};
  for (const r of structure.Routines) {
    let flow = byName[r.flow_name];
    if (!flow) {
      flow = byName[r.flow_name] = {name: r.flow_name, routines: [], min: Infinity, max: -Infinity};
      flows.push(flow);
    }
    flow.routines.push(r.routine_name);
    flow.min = Math.min(flow.min, rank[r.routine_name]);
    flow.max = Math.max(flow.max, rank[r.routine_name]);
  }
  flows.sort((a, b) => a.min - b.min || a.max - b.max);
  // Flows side by side in lanes: a flow goes into the first lane whose columns it does not share.
  const lanes = [];
  for (const flow of flows) {
    let lane = lanes.find((l) => l.end < flow.min);
    if (!lane) lanes.push(lane = {end: -1, flows: [], height: 0});
    lane.flows.push(flow);
    lane.end = flow.max;
    const perColumn = {};
    for (const name of flow.routines) perColumn[rank[name]] = (perColumn[rank[name]] || 0) + 1;
    flow.rows = Math.max(...Object.values(perColumn));
    lane.height = Math.max(lane.height, FLOW_HEAD + flow.rows * ROW_H + FLOW_PAD - (ROW_H - NODE_H));
  }
  const positions = {}, boxes = {};
  let y = 10;
  for (const lane of lanes) {
    for (const flow of lane.flows) {
      const used = {};
      for (const name of flow.routines) {
        const column = rank[name];
        const row = used[column] = (used[column] || 0) + 1;
        positions[name] = {x: 20 + column * COL_W, y: y + FLOW_HEAD + (row - 1) * ROW_H};
      }
      boxes[flow.name] = {x: 20 + flow.min * COL_W - FLOW_PAD, y: y,
        w: (flow.max - flow.min) * COL_W + NODE_W + 2 * FLOW_PAD, h: lane.height};
    }
    y += lane.height + LANE_GAP;
  }
  const columns = Math.max(0, ...Object.values(rank)) + 1;
  return {positions, boxes, width: 40 + (columns - 1) * COL_W + NODE_W + FLOW_PAD, height: y - LANE_GAP + 10};
}

function drawGraph(structure) {
  const graph = $("graph");
  graph.replaceChildren();
  const {positions, boxes, width, height} = layout(structure);
  graph.setAttribute("width", width);
  graph.setAttribute("height", height);
  graph.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const defs = svg("defs", {}, graph);
  const marker = svg("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
    markerHeight: 7, orient: "auto-start-reverse"}, defs);
  svg("path", {d: "M 0 0 L 10 5 L 0 10 z", fill: "#7d8799"}, marker);
  state.flowBoxes = {};
  for (const [name, box] of Object.entries(boxes)) {
    const group = svg("g", {class: "flow", "data-flow": name}, graph);
    svg("rect", {x: box.x, y: box.y, width: box.w, height: box.h, rx: 10}, group);
    const alive = svg("circle", {cx: box.x + 14, cy: box.y + 15, r: 5, class: "alive"}, group);
    svg("text", {x: box.x + 25, y: box.y + 19, class: "title"}, group, name);
    const meta = svg("text", {x: box.x + 10, y: box.y + 33, class: "meta"}, group, "");
    state.flowBoxes[name] = {group, alive, meta};
  }
  state.wires = {};
  const wiresLayer = svg("g", {}, graph);
  state.nodes = {};
  for (const r of structure.Routines) {
    const p = positions[r.routine_name];
    const group = svg("g", {class: "routine", "data-routine": r.routine_name, tabindex: 0}, graph);
    svg("rect", {x: p.x, y: p.y, width: NODE_W, height: NODE_H}, group);
    svg("text", {x: p.x + 10, y: p.y + 20, class: "name"}, group, r.routine_name);
    const stateText = svg("text", {x: p.x + NODE_W - 10, y: p.y + 20, class: "figures", "text-anchor": "end"}, group);
    const figures = svg("text", {x: p.x + 10, y: p.y + 38, class: "figures"}, group, "");
    group.addEventListener("click", () => select(r.routine_name));
    state.nodes[r.routine_name] = {group, stateText, figures};
  }
  const fanOut = {};
  for (const w of structure.Wires || []) fanOut[w.source] = (fanOut[w.source] || 0) + 1;
  for (const w of structure.Wires || []) {
    const from = positions[w.source], to = positions[w.destination];
    const x1 = from.x + NODE_W, y1 = from.y + NODE_H / 2, x2 = to.x, y2 = to.y + NODE_H / 2;
    const group = svg("g", {class: "wire", "data-wire": `${w.source}->${w.destination}`}, wiresLayer);
    const bend = Math.max(30, (x2 - x1) / 2);
    svg("path", {d: `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2 - 2} ${y2}`,
      "marker-end": "url(#arrow)"}, group);
    // Labels of a fan-out sit by their destinations, others half way, so that none overlap.
    const labelX = fanOut[w.source] > 1 ? x2 - (COL_W - NODE_W) / 2 : (x1 + x2) / 2;
    const labelY = (fanOut[w.source] > 1 ? y2 : (y1 + y2) / 2) - 20;
    const label = svg("text", {x: labelX, y: labelY, "text-anchor": "middle"}, group);
    svg("tspan", {x: labelX}, label, `${w.policy}, depth ${w.depth}`);
    const figures = svg("tspan", {x: labelX, dy: 13}, label, "");
    state.wires[`${w.source}->${w.destination}`] = {group, figures, wire: w};
  }
}

function buildTables(structure) {
  const body = $("routines").tBodies[0];
  body.replaceChildren();
  state.rows = {};
  for (const r of structure.Routines) {
    const row = el("tr", {class: "routine-row", "data-routine": r.routine_name}, body);
    const cells = {};
    for (const key of ["name", "flow", "state", "fps", "capacity", "in", "out", "latency", "error"]) {
      const numeric = ["fps", "capacity", "in", "out", "latency"].includes(key);
      cells[key] = el("td", {class: (numeric ? "num " : "") + key + (key === "error" ? " err" : "")}, row);
    }
    cells.name.textContent = r.routine_name;
    cells.flow.textContent = r.flow_name;
    row.addEventListener("click", () => select(r.routine_name));
    state.rows[r.routine_name] = cells;
  }
  const wires = $("wires").tBodies[0];
  wires.replaceChildren();
  for (const w of structure.Wires || []) {
    const row = el("tr", {"data-wire": `${w.source}->${w.destination}`}, wires);
    el("td", {}, row, `${w.source} → ${w.destination}`);
    el("td", {}, row, `${w.policy}, depth ${w.depth}`);
    state.wires[`${w.source}->${w.destination}`].cells = {depth: el("td", {class: "num"}, row, "–"),
      dropped: el("td", {class: "num"}, row, "–")};
  }
}

// ----- status: about once a second -----

function onStatus(status) {
  state.status = status;
  const hasLatency = Object.values(status.routines).some((r) => r.latency !== undefined);
  for (const cell of document.querySelectorAll(".latency")) cell.hidden = !hasLatency;
  for (const [name, r] of Object.entries(status.routines)) {
    const node = state.nodes[name], cells = state.rows[name];
    if (!node || !cells) continue;
    node.group.setAttribute("class", `routine state-${r.state}` + (name === state.selected ? " selected" : ""));
    node.stateText.textContent = r.state;
    node.figures.textContent = `${number(r.fps, 1)} fps · in ${r.messages_in} · out ${r.messages_out}`;
    cells.state.textContent = r.state;
    cells.state.className = `state state-${r.state}`;
    cells.fps.textContent = number(r.fps, 1);
    cells.capacity.textContent = number(r.capacity, 1);
    cells.in.textContent = r.messages_in;
    cells.out.textContent = r.messages_out;
    cells.latency.textContent = latencyText(r.latency);
    cells.latency.hidden = !hasLatency;
    cells.error.textContent = r.error || r.condition || "";
    cells.error.title = r.error || r.condition || "";
  }
  for (const w of status.wires) {
    const shown = state.wires[`${w.source}->${w.destination}`];
    if (!shown) continue;
    shown.group.setAttribute("class", "wire" + (w.dropped ? " dropping" : ""));
    shown.figures.textContent = `queued ${w.depth} · dropped ${w.dropped}`;
    if (shown.cells) {
      shown.cells.depth.textContent = w.depth;
      shown.cells.dropped.textContent = w.dropped;
    }
  }
  const nodes = {};
  for (const [name, f] of Object.entries(status.flows)) {
    const box = state.flowBoxes[name];
    const node = nodeName(f.node);
    if (node !== null) (nodes[node] = nodes[node] || []).push(name);
    if (!box) continue;
    box.alive.setAttribute("class", f.alive ? "alive" : "dead");
    box.group.setAttribute("class", "flow" + (f.alive ? "" : " dead"));
    const parts = [f.alive ? `pid ${f.pid}` : `ended (${f.last_exit ? f.last_exit.how : "not running"})`];
    if (node !== null) parts.push(`node ${node}`);
    parts.push(`restarts ${f.restarts}` + (f.restarting ? " (restarting)" : ""));
    box.meta.textContent = parts.join(" · ");
  }
  $("nodes-card").hidden = !Object.keys(nodes).length;
  const nodeRows = $("nodes").tBodies[0];
  nodeRows.replaceChildren();
  for (const [node, flows] of Object.entries(nodes)) {
    const row = el("tr", {}, nodeRows);
    el("td", {}, row, node);
    el("td", {}, row, flows.join(", "));
  }
  updateDetail();
}

// ----- the chosen routine -----

function select(name) {
  state.selected = name;
  for (const [routine, cells] of Object.entries(state.rows)) {
    cells.name.parentElement.classList.toggle("selected", routine === name);
  }
  for (const [routine, node] of Object.entries(state.nodes)) node.group.classList.toggle("selected", routine === name);
  if (state.frames && state.frames !== name) showFrames(null);
  buildDetail();
}

function routineStructure(name) {
  return state.structure.Routines.find((r) => r.routine_name === name);
}

function field(form, name, spec, value) {
  el("label", {for: `${form.id}-${name}`}, form.fields, name + (spec.required ? " *" : ""));
  let input;
  if (spec.choices) {
    input = el("select", {id: `${form.id}-${name}`, name}, form.fields);
    for (const choice of spec.choices) el("option", {value: JSON.stringify(choice)}, input, String(choice));
  } else if (spec.type === "bool") {
    input = el("input", {id: `${form.id}-${name}`, name, type: "checkbox"}, form.fields);
  } else {
    const numeric = spec.type === "int" || spec.type === "float";
    input = el("input", {id: `${form.id}-${name}`, name, type: numeric ? "number" : "text"}, form.fields);
    if (numeric) input.step = spec.type === "int" ? "1" : "any";
    if (spec.min !== undefined && spec.min !== null) input.min = spec.min;
    if (spec.max !== undefined && spec.max !== null) input.max = spec.max;
    if (spec.required) input.required = true;
    if (!spec.type) input.placeholder = "JSON or text";
  }
  input.dataset.type = spec.type || "";
  if (value !== undefined) setField(input, value);
  if (spec.help) el("span", {class: "help"}, form.fields, spec.help);
  return input;
}

// Show a parameter's value now in force, unless the user is editing that field.
function setField(input, value) {
  if (input.dataset.dirty || document.activeElement === input) return;
  if (input.tagName === "SELECT") input.value = JSON.stringify(value);
  else if (input.type === "checkbox") input.checked = Boolean(value);
  else if (value === null || value === undefined) input.value = "";
  else input.value = typeof value === "object" ? JSON.stringify(value) : value;
}

function readField(input) {
  if (input.tagName === "SELECT") return JSON.parse(input.value);
  if (input.type === "checkbox") return input.checked;
  const text = input.value;
  if (input.dataset.type === "int" || input.dataset.type === "float") return text === "" ? null : Number(text);
  if (input.dataset.type === "str") return text;
  try { return JSON.parse(text); } catch (error) { return text; }
}

function actionForm(parent, id, title, button) {
  const form = el("form", {class: "action", id}, parent);
  el("strong", {}, form, title);
  form.fields = el("div", {class: "fields"}, form);
  el("button", {type: "submit"}, form, button);
  return form;
}

function buildDetail() {
  const name = state.selected;
  $("detail-body").hidden = !name;
  $("detail-hint").hidden = Boolean(name);
  $("detail-title").textContent = name ? `Routine ${name}` : "Select a routine";
  const paramsBox = $("params-box"), eventsBox = $("events-box");
  paramsBox.replaceChildren();
  eventsBox.replaceChildren();
  state.paramInputs = {};
  if (!name) return;
  const routine = routineStructure(name);
  const params = routine.params || {};
  if (Object.keys(params).length) {
    el("h3", {}, paramsBox, "Parameters");
    const form = actionForm(paramsBox, "params-form", "", "Apply");
    const current = ((state.status && state.status.routines[name]) || {}).params || {};
    const inputs = state.paramInputs;
    for (const [param, spec] of Object.entries(params)) {
      inputs[param] = field(form, param, spec, current[param] !== undefined ? current[param] : spec.default);
      inputs[param].addEventListener("input", () => { inputs[param].dataset.dirty = "1"; });
    }
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const now = ((state.status && state.status.routines[name]) || {}).params || {};
      const changed = {};
      for (const [param, input] of Object.entries(inputs)) {
        const value = readField(input);
        if (JSON.stringify(value) !== JSON.stringify(now[param])) changed[param] = value;
      }
      for (const input of Object.values(inputs)) delete input.dataset.dirty;
      if (!Object.keys(changed).length) { say(`parameters of ${name}: nothing changed`, "ok"); return; }
      act(`parameters of ${name}`, `/routines/${encodeURIComponent(name)}/params`, changed);
    });
  }
  const events = routine.events || [];
  if (events.length) el("h3", {}, eventsBox, "Events");
  for (const eventName of events) {
    const form = actionForm(eventsBox, `event-${eventName}`, eventName, `Send ${eventName}`);
    const inputs = {};
    for (const spec of (routine.event_params || {})[eventName] || []) {
      inputs[spec.name] = field(form, spec.name, spec, spec.default);
    }
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const args = {};
      for (const [param, input] of Object.entries(inputs)) {
        const given = input.type === "checkbox" || input.tagName === "SELECT" || input.value !== "";
        if (given) args[param] = readField(input);
      }
      act(`${eventName} to ${name}`,
        `/routines/${encodeURIComponent(name)}/events/${encodeURIComponent(eventName)}/execute`, {extra_args: args});
    });
  }
  updateDetail();
}

function updateDetail() {
  const name = state.selected;
  if (!name || !state.status || !state.status.routines[name]) return;
  const r = state.status.routines[name];
  const values = $("detail-values");
  values.replaceChildren();
  const rows = [["flow", r.flow], ["state", r.state], ["fps", number(r.fps, 2)], ["capacity", number(r.capacity, 2)],
    ["messages in", r.messages_in], ["messages out", r.messages_out]];
  if (r.paced_fps) rows.push(["paced at", `${r.paced_fps} fps`]);
  if (r.latency !== undefined) rows.push(["latency p50 / p99", latencyText(r.latency)]);
  rows.push(["last error", r.error || "none"]);
  if (r.condition) rows.push(["condition", r.condition]);
  for (const [param, value] of Object.entries(r.params || {})) {
    const input = state.paramInputs[param];
    if (input) setField(input, value);
    else rows.push([`param ${param}`, JSON.stringify(value)]);
  }
  for (const [key, value] of rows) {
    el("dt", {}, values, key);
    el("dd", {}, values, String(value));
  }
  const showing = state.frames === name;
  $("frames-button").textContent = showing ? "Hide frames" : "Show frames";
  $("frames-note").textContent = showing ? (r.log_data ? "sampled, JPEG" : "turning frames on…") : "";
}

function showFrames(routine) {
  state.frames = routine;
  for (const id of ["frame-input", "frame-output"]) $(id).removeAttribute("src");
  updateDetail();
  connect();
}

$("frames-button").addEventListener("click", () => showFrames(state.frames === state.selected ? null : state.selected));

function onFrame(frame) {
  if (frame.routine !== state.frames) return;
  $(`frame-${frame.direction}`).src = "data:image/jpeg;base64," + frame.jpeg;
}

// ----- the log -----

function logLine(record) {
  const line = el("div", {class: `line level-${record.level}`});
  const time = new Date(record.time * 1000).toLocaleTimeString([], {hour12: false});
  line.append(`${time} ${record.level.padEnd(7)} `);
  el("span", {class: "source"}, line, record.routine || record.source);
  line.append(" " + record.message);
  return line;
}

function shown(record) {
  const level = Number($("log-level").value), routine = $("log-routine").value;
  return (LEVELS[record.level] || 20) >= level && (!routine || record.routine === routine);
}

function onLog(batch) {
  const box = $("log");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 30;
  if (batch.skipped) $("log-note").textContent = `${batch.skipped} earlier records are no longer kept`;
  for (const record of batch.records) {
    state.logs.push(record);
    if (shown(record)) box.appendChild(logLine(record));
  }
  if (state.logs.length > MAX_LOG) state.logs.splice(0, state.logs.length - MAX_LOG);
  while (box.childElementCount > MAX_LOG) box.firstElementChild.remove();
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function redrawLog() {
  const box = $("log");
  box.replaceChildren(...state.logs.filter(shown).map(logLine));
  box.scrollTop = box.scrollHeight;
}

$("log-level").addEventListener("change", redrawLog);
$("log-routine").addEventListener("change", redrawLog);

// ----- pipeline controls -----

$("start-button").addEventListener("click", () => act("start", "/start"));
$("pause-button").addEventListener("click", () => act("pause", "/pause"));
$("kill-button").addEventListener("click", () => $("kill-dialog").showModal());
$("kill-dialog").addEventListener("close", async () => {
  if ($("kill-dialog").returnValue !== "kill") return;
  try {
    const killed = await post("/kill");
    say(`kill sent to flows ${killed.flows.join(", ")}`, "ok");
  } catch (error) {
    say(`kill: ${error.message}`, "error");
  }
});

connect();
