/* Flywheel's site widget: <script src="https://GATEWAY/widget.js" defer></script> on a page.
   Asks the gateway about the page as the visitor sees it, streams the answer, shows the passages it
   came from (highlighted on the page), and asks for a rating. No framework, no inline styles. */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.__flywheelWidget) return;
  window.__flywheelWidget = true;
  var base = new URL(script.src).origin;
  var MAX_PAGE = 300000;
  // An answer that sends nothing for this long is given up (a stalled connection, a hung service).
  var IDLE_TIMEOUT_MS = 60000;
  // The passage highlight is the one rule the page itself needs (the ranges are in its DOM); the
  // rest of widget.css stays in the shadow root, off the page's own elements.
  var HIGHLIGHT_RULE = "::highlight(flywheel-passage) { background-color: #fff3a0; color: inherit; }";
  var state = null; // the current answer: {query_id, ticket, reacted}

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text) node.textContent = text;
    return node;
  }
  function stylesheet() {
    return el("link", { rel: "stylesheet", href: base + "/widget.css" });
  }

  // A constructed sheet: CSSOM, not an inline style, so a strict CSP allows it; and one rule only.
  if (typeof CSSStyleSheet === "function" && "adoptedStyleSheets" in document) {
    try {
      var pageSheet = new CSSStyleSheet();
      pageSheet.replaceSync(HIGHLIGHT_RULE);
      document.adoptedStyleSheets = Array.from(document.adoptedStyleSheets).concat([pageSheet]);
    } catch (e) { /* no highlight colour then: the passages are still listed */ }
  }
  var host = el("div", { id: "flywheel-widget", lang: "en" });
  var root = host.attachShadow({ mode: "open" });
  root.appendChild(stylesheet());

  // lang on the shadow tree's own elements too: the page's language may be another.
  var launcher = el("button", { type: "button", class: "launcher", lang: "en", "aria-expanded": "false", "aria-controls": "fw-panel" }, "Ask about this page");
  var panel = el("section", { id: "fw-panel", class: "panel", lang: "en", role: "dialog", "aria-label": "Ask about this page", hidden: "" });
  var close = el("button", { type: "button", class: "close", "aria-label": "Close" }, "\u00d7");
  var form = el("form", { class: "ask" });
  var label = el("label", { for: "fw-q" }, "Your question about this page");
  var input = el("input", { id: "fw-q", name: "question", type: "text", maxlength: "1000", autocomplete: "off", required: "" });
  var send = el("button", { type: "submit" }, "Ask");
  var answer = el("div", { class: "answer", role: "status", "aria-live": "polite", dir: "auto" });
  var sources = el("details", { class: "sources", hidden: "" });
  var summary = el("summary", {}, "Sources");
  var list = el("ol", {});
  var rate = el("div", { class: "rate", role: "group", "aria-label": "Rate this answer", hidden: "" });
  var thanks = el("p", { class: "thanks", role: "status", hidden: "" });

  form.append(label, input, send);
  sources.append(summary, list);
  rate.append(el("span", { class: "prompt" }, "Helpful?"));
  // Toggle buttons (aria-pressed): the visitor's choice is announced and shown.
  var thumbs = [[true, "Yes", "Yes, helpful"], [false, "No", "No, not helpful"]].map(function (t) {
    var b = el("button", { type: "button", "aria-label": t[2], "aria-pressed": "false" }, t[1]);
    b.addEventListener("click", function () { press(thumbs, b); react("thumbs_up", t[0]); });
    rate.append(b);
    return b;
  });
  var stars = el("span", { class: "stars", role: "group", "aria-label": "Rating from 1 to 5" });
  var starButtons = [];
  for (var i = 1; i <= 5; i++) {
    (function (n) {
      var b = el("button", { type: "button", "aria-label": "Rate " + n + " of 5", "aria-pressed": "false" }, String(n));
      b.addEventListener("click", function () { press(starButtons, b); react("rating", n); });
      stars.append(b);
      starButtons.push(b);
    })(i);
  }
  function press(group, chosen) {
    group.forEach(function (b) { b.setAttribute("aria-pressed", String(b === chosen)); });
  }
  var commentToggle = el("button", { type: "button", "aria-expanded": "false" }, "Comment");
  var commentForm = el("form", { class: "comment", hidden: "" });
  var commentBox = el("textarea", { "aria-label": "Your comment", maxlength: "2000", rows: "2" });
  commentForm.append(commentBox, el("button", { type: "submit" }, "Send"));
  rate.append(stars, commentToggle, commentForm);
  panel.append(close, form, answer, sources, rate, thanks);
  root.append(launcher, panel);
  document.body.appendChild(host);

  function toggle(open) {
    panel.hidden = !open;
    launcher.setAttribute("aria-expanded", String(open));
    if (open) input.focus(); else launcher.focus();
  }
  launcher.addEventListener("click", function () { toggle(panel.hidden); });
  close.addEventListener("click", function () { toggle(false); });
  panel.addEventListener("keydown", function (e) { if (e.key === "Escape") toggle(false); });
  commentToggle.addEventListener("click", function () {
    commentForm.hidden = !commentForm.hidden;
    commentToggle.setAttribute("aria-expanded", String(!commentForm.hidden));
    if (!commentForm.hidden) commentBox.focus();
  });
  commentForm.addEventListener("submit", function (e) {
    e.preventDefault();
    if (commentBox.value.trim()) react("comment", commentBox.value.trim());
  });

  function post(path, body, keepalive, signal) {
    return fetch(base + path, {
      method: "POST", credentials: "include", keepalive: !!keepalive, signal: signal,
      headers: { "content-type": "application/json" }, body: JSON.stringify(body)
    });
  }

  // A key per click or comment, reused only by that action's retry: the feedback service drops a
  // repeated key on an answer as a retry (every visitor shares the gateway's token), so a key per
  // kind lost a changed rating or a second comment.
  function actionKey() {
    if (crypto.randomUUID) return crypto.randomUUID();
    // randomUUID exists in secure contexts only; a site served over plain http has just this.
    return Array.prototype.map.call(crypto.getRandomValues(new Uint8Array(16)), function (b) {
      return (b + 256).toString(16).slice(1);
    }).join("");
  }

  function react(kind, value) {
    if (!state) return;
    var body = { query_id: state.query_id, ticket: state.ticket, idempotency_key: actionKey() };
    body[kind] = value;
    state.reacted = true;
    // One retry after a network error, which may have come after the service stored it: same key.
    post("/api/v1/feedback", body).catch(function () {
      return new Promise(function (resolve) { setTimeout(resolve, 1000); }).then(function () {
        return post("/api/v1/feedback", body);
      });
    }).then(function (r) { return r.ok; }, function () { return false; }).then(function (ok) {
      thanks.hidden = false;
      thanks.classList.toggle("error", !ok);
      thanks.textContent = ok ? "Thank you for your feedback." : "Your feedback could not be sent.";
    });
  }
  // A visitor who leaves without reacting to an answer tells us that too.
  window.addEventListener("pagehide", function () {
    if (state && !state.reacted) post("/api/v1/feedback", { query_id: state.query_id, ticket: state.ticket, ignored: true }, true);
  });

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var question = input.value.trim();
    if (question) ask(question);
  });

  function pageText() {
    return (document.body.innerText || "").slice(0, MAX_PAGE);
  }

  // An error whose message is written for the visitor; any other is replaced by a plain one.
  function problem(text) {
    var error = new Error(text);
    error.readable = true;
    return error;
  }
  function sentence(text) {
    text = String(text || "").trim();
    if (!text) return "Something went wrong. Try again.";
    text = text.charAt(0).toUpperCase() + text.slice(1);
    return /[.!?]$/.test(text) ? text : text + ".";
  }
  async function refusal(response) {
    if (response.status === 429) {
      var wait = parseInt(response.headers.get("retry-after") || "", 10);
      return problem(wait > 0 ? "Too many questions; try again in " + wait + " s." : "Too many questions; try again shortly.");
    }
    if (response.status >= 500) return problem("The answer service is unavailable; try again shortly.");
    var body = await response.json().catch(function () { return {}; });
    return problem(body.error ? sentence(body.error) : "The question could not be asked (" + response.status + ").");
  }

  var asking = false;
  async function ask(question) {
    if (asking) return;
    asking = true;
    state = null;
    // A disabled button loses focus to the page's body, where Escape no longer reaches the panel.
    if (root.activeElement === send) input.focus();
    send.disabled = true;
    // Shown (and announced) at once; aria-busy only once the text streams, so it is read whole.
    answer.textContent = "Finding the answer\u2026";
    answer.classList.remove("error");
    answer.classList.add("waiting");
    answer.setAttribute("aria-busy", "false");
    sources.hidden = rate.hidden = thanks.hidden = commentForm.hidden = true;
    list.textContent = "";
    press(thumbs, null);
    press(starButtons, null);
    var controller = new AbortController();
    var timer = 0, timedOut = false, stream = { done: false };
    function arm() {
      clearTimeout(timer);
      timer = setTimeout(function () { timedOut = true; controller.abort(); }, IDLE_TIMEOUT_MS);
    }
    try {
      arm();
      var response = await post("/api/v1/answers", {
        question: question, page: { url: location.href, title: document.title, text: pageText() }
      }, false, controller.signal);
      if (!response.ok) throw await refusal(response);
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      for (;;) {
        arm();
        var part = await reader.read();
        if (part.done) break;
        buffer += decoder.decode(part.value, { stream: true });
        var cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          handle(buffer.slice(0, cut), stream);
          buffer = buffer.slice(cut + 2);
        }
      }
      // A stream that ends without `done` (a dropped connection, a restarted gateway) is cut short.
      if (!stream.done) throw problem("The answer was interrupted. Try again.");
    } catch (error) {
      rate.hidden = true;
      answer.classList.add("error");
      if (timedOut) answer.textContent = "The answer took too long. Try again.";
      else if (error.readable) answer.textContent = error.message;
      else if (error instanceof TypeError) answer.textContent = "The answer service could not be reached. Check your connection and try again.";
      else answer.textContent = "Something went wrong. Try again.";
    } finally {
      clearTimeout(timer);
      answer.classList.remove("waiting");
      answer.setAttribute("aria-busy", "false");
      send.disabled = false;
      asking = false;
    }
  }

  function handle(block, stream) {
    var event = "message", data = "";
    block.split("\n").forEach(function (line) {
      if (line.indexOf("event: ") === 0) event = line.slice(7);
      else if (line.indexOf("data: ") === 0) data += line.slice(6);
    });
    var msg = JSON.parse(data || "{}");
    if (event === "meta") {
      state = { query_id: msg.query_id, ticket: msg.ticket, reacted: false };
      showPassages(msg.passages || []);
    } else if (event === "delta") {
      if (answer.classList.contains("waiting")) {
        answer.textContent = "";
        answer.classList.remove("waiting");
        answer.setAttribute("aria-busy", "true");
      }
      answer.textContent += msg.text;
    } else if (event === "done") {
      stream.done = true;
      if (answer.classList.contains("waiting")) answer.textContent = "";
      rate.hidden = false;
    } else if (event === "error") {
      throw problem(sentence(msg.error));
    }
  }

  function showPassages(passages) {
    summary.textContent = "Sources (" + passages.length + ")";
    passages.forEach(function (p) {
      var item = el("li", {});
      var b = el("button", { type: "button", class: "passage", title: "Show on the page", dir: "auto" }, p.text);
      b.addEventListener("click", function () { highlight([p.text], true); });
      item.append(b);
      list.append(item);
    });
    sources.hidden = passages.length === 0;
    highlight(passages.map(function (p) { return p.text; }), false);
  }

  // Finds each passage in the page's visible text and highlights it (CSS Custom Highlight API:
  // nothing in the page's DOM changes).
  function highlight(texts, scroll) {
    if (!window.CSS || !CSS.highlights || typeof Highlight === "undefined") return;
    var index = textIndex();
    var ranges = [];
    texts.forEach(function (t) {
      var needle = t.replace(/\s+/g, " ").trim().toLowerCase().slice(0, 60);
      var at = needle ? index.flat.indexOf(needle) : -1;
      if (at < 0) return;
      var end = Math.min(index.flat.length, at + t.replace(/\s+/g, " ").trim().length) - 1;
      var range = document.createRange();
      range.setStart(index.nodes[at], index.offsets[at]);
      range.setEnd(index.nodes[end], index.offsets[end] + 1);
      ranges.push(range);
    });
    CSS.highlights.set("flywheel-passage", new Highlight(...ranges));
    if (scroll && ranges[0]) {
      var still = window.matchMedia && matchMedia("(prefers-reduced-motion: reduce)").matches;
      ranges[0].startContainer.parentElement.scrollIntoView({ block: "center", behavior: still ? "auto" : "smooth" });
    }
  }

  function textIndex() {
    var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
      acceptNode: function (n) {
        return /^(SCRIPT|STYLE|NOSCRIPT|TEMPLATE)$/.test(n.parentNode.nodeName) ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT;
      }
    });
    var flat = [], nodes = [], offsets = [], space = true, node;
    while ((node = walker.nextNode())) {
      var s = node.nodeValue;
      for (var i = 0; i < s.length; i++) {
        var white = /\s/.test(s[i]);
        if (white && space) continue;
        flat.push(white ? " " : s[i].toLowerCase());
        nodes.push(node);
        offsets.push(i);
        space = white;
      }
    }
    return { flat: flat.join(""), nodes: nodes, offsets: offsets };
  }
})();
