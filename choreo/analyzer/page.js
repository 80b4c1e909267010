// choreo graph --format html: pan and zoom, click to highlight flows, search, findings linked to
// what they name, and (choreo graph --live) rates, lag and errors from the mesh on the drawing.
// Inlined into the page; it fetches nothing but the page's own live.json when served live.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("choreo-data").textContent);
  var viewport = document.getElementById("viewport");
  var svg = viewport.querySelector("svg");
  var details = document.getElementById("details");
  var search = document.getElementById("search");
  var status = document.getElementById("status");
  var view = { x: 0, y: 0, k: 1 };
  var selected = null;

  // -- pan and zoom: a CSS transform on the drawing, natural size (1:1) to start with ----------
  var natural = { w: svg.width.baseVal.value, h: svg.height.baseVal.value };
  function apply() {
    svg.style.transform = "translate(" + view.x + "px," + view.y + "px) scale(" + view.k + ")";
  }
  function zoomAt(factor, cx, cy) {
    var k = Math.min(4, Math.max(0.1, view.k * factor));
    view.x = cx - (cx - view.x) * (k / view.k);
    view.y = cy - (cy - view.y) * (k / view.k);
    view.k = k;
    apply();
  }
  function actualSize() {
    view.k = 1;
    view.x = Math.max(0, (viewport.clientWidth - natural.w) / 2);
    view.y = 0;
    apply();
  }
  function fit() {
    view.k = Math.min(viewport.clientWidth / natural.w, viewport.clientHeight / natural.h, 1);
    view.x = (viewport.clientWidth - natural.w * view.k) / 2;
    view.y = 0;
    apply();
  }
  function centerOn(el) {
    var box = el.getBoundingClientRect(), port = viewport.getBoundingClientRect();
    view.x += port.left + port.width / 2 - (box.left + box.width / 2);
    view.y += port.top + port.height / 2 - (box.top + box.height / 2);
    apply();
  }
  var drag = null;
  viewport.addEventListener("pointerdown", function (e) {
    drag = { x: e.clientX, y: e.clientY, vx: view.x, vy: view.y, moved: false };
    viewport.setPointerCapture(e.pointerId);
  });
  viewport.addEventListener("pointermove", function (e) {
    if (!drag) return;
    var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) { drag.moved = true; viewport.classList.add("dragging"); }
    view.x = drag.vx + dx;
    view.y = drag.vy + dy;
    apply();
  });
  viewport.addEventListener("pointerup", function (e) {
    var wasDrag = drag && drag.moved;
    drag = null;
    viewport.classList.remove("dragging");
    if (!wasDrag) click(e);
  });
  viewport.addEventListener("wheel", function (e) {
    e.preventDefault();
    var port = viewport.getBoundingClientRect();
    zoomAt(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - port.left, e.clientY - port.top);
  }, { passive: false });
  function button(id, fn) { document.getElementById(id).addEventListener("click", fn); }
  button("zoom-in", function () { zoomAt(1.25, viewport.clientWidth / 2, viewport.clientHeight / 2); });
  button("zoom-out", function () { zoomAt(0.8, viewport.clientWidth / 2, viewport.clientHeight / 2); });
  button("fit", fit);
  button("actual", actualSize);

  // -- select: a service or message and the flows it takes part in ---------------------------
  function element(id) { return document.getElementById(id); }
  function graphNodes() { return svg.querySelectorAll("g.node"); }
  function clearSelection() {
    selected = null;
    svg.querySelectorAll(".dim, .selected").forEach(function (el) { el.classList.remove("dim", "selected"); });
    details.innerHTML = data.hint;
    details.classList.add("quiet");
  }
  function select(id, center) {
    var el = element(id);
    if (!el || !data.nodes[id]) return false;
    var path = data.paths[id], keep = {};
    path.nodes.concat(path.edges).forEach(function (k) { keep[k] = true; });
    graphNodes().forEach(function (g) { g.classList.toggle("dim", !keep[g.id] && !g.classList.contains("legend")); });
    svg.querySelectorAll("g.edge").forEach(function (g) { g.classList.toggle("dim", !keep[g.id]); });
    svg.querySelectorAll(".selected").forEach(function (g) { g.classList.remove("selected"); });
    el.classList.add("selected");
    selected = id;
    describe(id);
    if (center) centerOn(el);
    return true;
  }
  function click(e) {
    var target = document.elementFromPoint(e.clientX, e.clientY);
    var node = target && target.closest ? target.closest("g.node") : null;
    if (node && data.nodes[node.id]) select(node.id, false);
    else clearSelection();
  }
  function esc(text) {
    return String(text).replace(/[&<>"]/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]; });
  }
  function list(title, items) {
    return items.length ? "<p>" + esc(title) + "</p><ul>" + items.map(function (i) { return "<li>" + i + "</li>"; }).join("") + "</ul>" : "";
  }
  function describe(id) {
    var n = data.nodes[id];
    var html = "<div class='kind'>" + esc(n.kind) + "</div><h3>" + esc(n.name) + "</h3>";
    if (n.where) html += "<div class='where'>" + esc(n.where) + "</div>";
    html += list("handlers", n.handlers.map(esc));
    html += list("answers (queries)", n.answers.map(esc)) + list("asks (queries)", n.asks.map(esc));
    html += list("in the flows of", data.flows.filter(function (f) { return f.nodes.indexOf(id) >= 0; })
      .map(function (f) { return esc(f.entry) + " <span class='hint'>(from " + esc(f.source) + ")</span>"; }));
    html += list("findings", n.findings.map(function (i) {
      var f = data.findings[i];
      return "<span class='sev'>" + esc(f.severity) + "</span> " + esc(f.message);
    }));
    var live = data.liveText[id];
    if (live) html += "<p class='ok'>" + esc(live) + "</p>";
    details.innerHTML = html;
    details.classList.remove("quiet");
  }
  data.liveText = {};

  // -- search: names that contain the text; Enter selects the first and centres on it ---------
  function matches(text) {
    text = text.trim().toLowerCase();
    var found = [];
    Object.keys(data.nodes).forEach(function (id) {
      if (text && data.nodes[id].name.toLowerCase().indexOf(text) >= 0) found.push(id);
    });
    return found;
  }
  search.addEventListener("input", function () {
    var found = matches(search.value);
    graphNodes().forEach(function (g) { g.classList.toggle("match", found.indexOf(g.id) >= 0); });
    status.textContent = search.value.trim() ? found.length + " match" + (found.length === 1 ? "" : "es") : "";
  });
  search.addEventListener("keydown", function (e) {
    if (e.key !== "Enter") return;
    var found = matches(search.value);
    if (found.length) select(found[0], true);
  });

  // -- findings name what they are about: links select it on the drawing ---------------------
  document.querySelectorAll("a.culprit").forEach(function (a) {
    a.addEventListener("click", function (e) {
      e.preventDefault();
      if (select(a.getAttribute("data-node"), true)) viewport.scrollIntoView({ block: "nearest" });
    });
  });

  // -- live: rates, lag and errors from the mesh, when the page is served by choreo graph --live
  var overlay = null;
  function midpoint(g) {
    var path = g.querySelector("path");
    if (!path) return null;
    return path.getPointAtLength(path.getTotalLength() / 2);
  }
  function label(id, text, bad, where) {
    var el = document.getElementById("live:" + id);
    if (!el) {
      el = document.createElementNS("http://www.w3.org/2000/svg", "text");
      el.setAttribute("id", "live:" + id);
      el.setAttribute("text-anchor", where.anchor);
      el.setAttribute("x", where.x);
      el.setAttribute("y", where.y);
      overlay.appendChild(el);
    }
    el.textContent = text;
    el.setAttribute("class", "live" + (bad ? " bad" : ""));
  }
  function showLive(doc) {
    if (!overlay) {
      overlay = document.createElementNS("http://www.w3.org/2000/svg", "g");
      overlay.setAttribute("id", "live");
      svg.querySelector("g.graph").appendChild(overlay);
    }
    Object.keys(doc.edges).forEach(function (id) {
      var g = element(id), p = g && midpoint(g);
      if (p) label(id, doc.edges[id].text, doc.edges[id].bad, { x: p.x + 4, y: p.y, anchor: "start" });
    });
    Object.keys(doc.nodes).forEach(function (id) {
      var g = element(id);
      if (!g) return;
      var box = g.getBBox();
      label(id, doc.nodes[id].text, doc.nodes[id].bad, { x: box.x + box.width + 5, y: box.y + box.height / 2 + 4, anchor: "start" });
      data.liveText[id] = doc.nodes[id].text;
    });
    var stamp = new Date(doc.time * 1000).toLocaleTimeString();
    var el = document.getElementById("live-status");
    el.textContent = doc.note ? doc.note + " (" + stamp + ")" : "live: " + stamp;
    el.classList.toggle("stale", Boolean(doc.note));
    if (selected) describe(selected);
  }
  function poll() {
    fetch(data.live.url, { cache: "no-store" })
      .then(function (r) { return r.json(); })
      .then(showLive)
      .catch(function (err) {
        var el = document.getElementById("live-status");
        el.textContent = "live: no answer from choreo graph --live (" + err.message + ")";
        el.classList.add("stale");
      })
      .then(function () { setTimeout(poll, data.live.interval * 1000); });
  }

  clearSelection();
  actualSize();
  if (data.live) poll();
  window.choreoGraph = { select: select, fit: fit, actualSize: actualSize, view: view, matches: matches };
})();
