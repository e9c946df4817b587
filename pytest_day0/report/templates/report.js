// The flip viewer: inflate the embedded document, filter it by task / direction / text, show one page at a time.
// Every string from the records reaches the page through textContent (a model's answer is text, never markup).
"use strict";
(function () {
  var PAGE = 25;
  var $ = function (id) { return document.getElementById(id); };
  var status = $("flip-status"), list = $("flip-list"), taskSel = $("flip-task"), dirSel = $("flip-direction");
  var search = $("flip-search"), pageInfo = $("flip-page");
  var data = { groups: [], items: [] }, view = [], page = 0, haystack = null;
  var started = performance.now();

  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  async function load() {
    var raw = $("flip-data").textContent.trim();
    if (!raw) { return data; }
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser has no DecompressionStream; open the report in a current Chromium, Firefox " +
                      "or Safari");
    }
    var bin = atob(raw), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return JSON.parse(await new Response(stream).text());
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function verdictOf(k) {
    if (k === null || k === undefined) { return el("span", "wrong", "no score"); }
    if (k === 1) { return el("span", "right", "right (1)"); }
    if (k === 0) { return el("span", "wrong", "wrong (0)"); }
    return el("span", "", "value " + k.toFixed(3));
  }

  function targetText(it) {
    if (it.t === null || it.t === undefined) { return "—"; }
    if (it.ch && typeof it.t === "number" && it.ch[it.t] !== undefined) { return it.t + ": " + it.ch[it.t]; }
    return String(it.t);
  }

  function argmax(lp) {
    var best = -1;
    if (!lp) { return best; }
    for (var i = 0; i < lp.length; i++) { if (best < 0 || lp[i] > lp[best]) { best = i; } }
    return best;
  }

  function logprobTable(it) {
    var b = it.b.lp, c = it.c.lp;
    if (!b && !c) { return null; }
    var rows = Math.max(b ? b.length : 0, c ? c.length : 0), bb = argmax(b), cb = argmax(c);
    var table = el("table", "lp"), head = el("tr");
    ["choice", "baseline log-likelihood", "candidate log-likelihood"].forEach(function (h) {
      head.appendChild(el("th", "", h));
    });
    var thead = el("thead"); thead.appendChild(head); table.appendChild(thead);
    var body = el("tbody");
    for (var i = 0; i < rows; i++) {
      var tr = el("tr", it.t === i ? "target" : "");
      tr.appendChild(el("td", "", (it.ch && it.ch[i] !== undefined ? i + ": " + it.ch[i] : String(i)) +
                                  (it.t === i ? "  (target)" : "")));
      tr.appendChild(el("td", "num" + (i === bb ? " best" : ""), b && b[i] !== undefined ? b[i].toFixed(3) : "—"));
      tr.appendChild(el("td", "num" + (i === cb ? " best" : ""), c && c[i] !== undefined ? c[i].toFixed(3) : "—"));
      body.appendChild(tr);
    }
    table.appendChild(body);
    return table;
  }

  function side(name, s) {
    var box = el("div", "side " + name);
    box.appendChild(el("h4", "", name));
    var line = el("div"); line.appendChild(verdictOf(s.k)); box.appendChild(line);
    box.appendChild(el("pre", "response", s.r === null || s.r === undefined ? "(no response)" : s.r));
    if (s.e) { box.appendChild(el("div", "wrong error", s.e)); }
    return box;
  }

  function card(it) {
    var g = data.groups[it.g], li = el("li", "flip " + it.d);
    li.dataset.id = it.id; li.dataset.task = g.task; li.dataset.recipe = g.recipe; li.dataset.direction = it.d;
    var head = el("div", "flip-head");
    head.appendChild(el("span", "dir " + it.d, it.d === "lost" ? "right → wrong" : "wrong → right"));
    head.appendChild(el("b", "", g.recipe + " / " + g.task));
    var id = el("span", "label", "id "); id.appendChild(el("code", "item-id", it.id)); head.appendChild(id);
    li.appendChild(head);
    var body = el("div", "flip-body"), question = el("div", "question");
    question.appendChild(el("h4", "", "prompt"));
    question.appendChild(el("pre", "prompt", it.p === null || it.p === undefined ? "(not recorded)" : it.p));
    var target = el("div"); target.appendChild(el("span", "label", "target "));
    target.appendChild(el("code", "target", targetText(it))); question.appendChild(target);
    body.appendChild(question); body.appendChild(side("baseline", it.b)); body.appendChild(side("candidate", it.c));
    li.appendChild(body);
    var lp = logprobTable(it); if (lp) { li.appendChild(lp); }
    return li;
  }

  function pages() { return Math.max(1, Math.ceil(view.length / PAGE)); }

  function render() {
    var from = page * PAGE, to = Math.min(view.length, from + PAGE), frag = document.createDocumentFragment();
    for (var i = from; i < to; i++) { frag.appendChild(card(data.items[view[i]])); }
    list.replaceChildren(frag);
    pageInfo.textContent = "page " + (view.length ? page + 1 : 0) + " of " + (view.length ? pages() : 0);
    $("flip-first").disabled = $("flip-prev").disabled = page === 0;
    $("flip-next").disabled = $("flip-last").disabled = page >= pages() - 1;
    var lost = 0;
    for (var j = 0; j < view.length; j++) { if (data.items[view[j]].d === "lost") { lost++; } }
    setStatus("ready", view.length ? "items " + (from + 1) + "–" + to + " of " + view.length + " (" + lost +
              " lost, " + (view.length - lost) + " gained)" : data.items.length ? "no flipped item matches" : "no item flipped on any compared task");
  }

  function text(it) {
    return [it.id, it.p, it.b.r, it.c.r, it.t].join("\u0000").toLowerCase();
  }

  function filter() {
    var g = taskSel.value, d = dirSel.value, q = search.value.trim().toLowerCase(), items = data.items;
    if (q && haystack === null) { haystack = items.map(text); }  // built once, on the first search
    view = [];
    for (var i = 0; i < items.length; i++) {
      var it = items[i];
      if (g !== "all" && it.g !== +g) { continue; }
      if (d !== "all" && it.d !== d) { continue; }
      if (q && haystack[i].indexOf(q) < 0) { continue; }
      view.push(i);
    }
    page = 0;
    render();
  }

  function go(p) { page = Math.max(0, Math.min(pages() - 1, p)); render(); window.scrollTo(0, $("flips").offsetTop); }

  var typing = null;
  taskSel.addEventListener("change", filter);
  dirSel.addEventListener("change", filter);
  search.addEventListener("input", function () { clearTimeout(typing); typing = setTimeout(filter, 200); });
  $("flip-first").addEventListener("click", function () { go(0); });
  $("flip-prev").addEventListener("click", function () { go(page - 1); });
  $("flip-next").addEventListener("click", function () { go(page + 1); });
  $("flip-last").addEventListener("click", function () { go(pages() - 1); });

  load().then(function (doc) {
    data = doc;
    filter();
    // for benchmarks and tests: milliseconds from navigation start, and from this script's start, to the first page
    window.day0Flips = { items: data.items.length, readyMs: performance.now(), scriptMs: performance.now() - started };
  }).catch(function (err) {
    setStatus("error", "the flipped items could not be read: " + err.message);
  });
})();
