/* Flywheel's review console: works through the review queue; every action goes to the gateway,
   which calls the services with the expert's own token (kept on the server, never here). */
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var noop = function () {};
  var BUTTONS = ["accept", "submit-correction", "unanswerable", "skip"];
  // An item acted on stays out of refreshed lists this long: the review reaches the trainer's
  // queue through Kafka, seconds later, and until then the trainer still lists it.
  var ACTED_HIDE_MS = 120000;
  // j / k held down passes items without claiming them: only the one it stops on is claimed.
  var CLAIM_DELAY_MS = 250;
  var STATUS_EVERY_MS = 15000, QUEUE_EVERY_MS = 30000, IDLE_MS = 20000;
  var REASONS = {
    REVIEW_REASON_LOW_RATING: "low rating", REVIEW_REASON_THUMBS_DOWN: "thumbs down",
    REVIEW_REASON_COMMENT: "comment", REVIEW_REASON_CANARY: "canary"
  };
  var DECISIONS = {
    DECISION_ACTION_CANARY_PROMOTE: "canary promoted",
    DECISION_ACTION_CANARY_SUPERSEDED: "canary replaced by a newer candidate",
    DECISION_ACTION_ROLLBACK: "rolled back",
    DECISION_ACTION_MANUAL_PROMOTE: "promoted by an admin",
    DECISION_ACTION_PIN: "pinned", DECISION_ACTION_UNPIN: "unpinned",
    DECISION_ACTION_AUTO_ROLLOUT_ON: "automatic rollout on",
    DECISION_ACTION_AUTO_ROLLOUT_OFF: "automatic rollout off"
  };

  var items = [];        // the queue as last loaded
  var current = -1;      // the index of the item shown
  var shown = null;      // its query id
  var held = {};         // query id -> claimed_until of each claim this console holds
  var sending = null;    // the query id whose action is in flight (the actions wait meanwhile)
  var pending = null;    // an action refused for a lapsed login: sent again after logging in
  var skipped = null;    // the item shown after a skip with nothing else to show: not claimed again
  var claims = Promise.resolve();  // claims and releases go one after another, in order
  var claimTimer = 0;
  var lastInput = Date.now();
  // Per query id: the expert's draft ({answer, note}), and the idempotency key of each action with
  // its text, reused by every retry of it (a lapsed login, a 503, a second press).
  var drafts = load("flywheel.console.drafts");
  var keys = load("flywheel.console.keys");
  // Query id -> when an action on it was saved (a reload within the round trip hides it too).
  var acted = load("flywheel.console.acted");

  function load(name) {
    try { return JSON.parse(sessionStorage.getItem(name) || "{}") || {}; } catch (e) { return {}; }
  }
  function save(name, value) {
    try { sessionStorage.setItem(name, JSON.stringify(value)); } catch (e) { /* storage full or off */ }
  }

  function api(path, body) {
    var init = { credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      init.method = "POST";
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (r) {
      if (r.status === 204) return {};
      return r.json().catch(function () { return {}; }).then(function (data) {
        if (r.ok) return data;
        var wait = parseInt(r.headers.get("retry-after") || "", 10);
        var message = r.status === 429 && wait > 0 ? "Too many requests; try again in " + wait + " s."
          : r.status >= 500 && !data.error ? "The gateway is unavailable; try again shortly."
          : data.error || "Request failed (" + r.status + ").";
        var err = new Error(message);
        err.status = r.status;
        if (r.status === 401) showLogin();
        throw err;
      });
    }, function () {
      var err = new Error("The gateway did not answer.");
      err.status = 0;
      throw err;
    });
  }

  function newKey() {
    if (crypto.randomUUID) return crypto.randomUUID();
    var bytes = crypto.getRandomValues(new Uint8Array(16));  // a page served over plain http
    return Array.prototype.map.call(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
  }
  function keyFor(id, action, answer, note) {
    var mine = keys[id] || (keys[id] = {});
    var what = action + "\n" + answer + "\n" + note;
    if (!mine[what]) {
      mine[what] = newKey();
      save("flywheel.console.keys", keys);
    }
    return mine[what];
  }

  function showLogin() {
    $("app").hidden = $("tools").hidden = true;
    $("login-view").hidden = false;
    $("token").focus();
  }
  function reveal() {
    $("login-view").hidden = true;
    $("login-error").textContent = "";
    $("app").hidden = $("tools").hidden = false;
    status();
  }
  // Whether the login holds is the queue's answer (the trainer's alone): only a 401 asks for the
  // token; the rollout panel failing (the evaluator down) does not.
  function start() {
    return refresh().then(function () {
      reveal();
      if (pending) {
        var body = pending;
        pending = null;
        send(body);
      }
    }, function (err) {
      if (err.status !== 401) reveal();
    });
  }

  $("login").addEventListener("submit", function (e) {
    e.preventDefault();
    var token = $("token").value;
    $("token").value = "";
    api("/console/login", { token: token }).then(start, function (err) {
      $("login-error").textContent = err.message;
    });
  });
  $("logout").addEventListener("click", function () {
    clearTimeout(claimTimer);
    Object.keys(held).forEach(function (id) { release(id); });
    claims.then(function () { return api("/console/logout", {}); }).catch(noop).then(function () {
      drafts = {};
      keys = {};
      save("flywheel.console.drafts", drafts);
      save("flywheel.console.keys", keys);
      items = [];
      shown = null;
      pending = null;
      showLogin();
    });
  });
  $("refresh").addEventListener("click", function () { refresh().catch(noop); });
  $("order").addEventListener("change", function () { refresh().catch(noop); });

  function reasons(item) {
    return (item.reasons || []).map(function (r) { return REASONS[r] || r; }).join(", ");
  }
  function indexOf(id) {
    return items.findIndex(function (i) { return i.query_id === id; });
  }

  function refresh() {
    return api("/api/v1/review/items?order=" + $("order").value).then(function (data) {
      var now = Date.now();
      items = data.items.filter(function (i) { return !(acted[i.query_id] > now - ACTED_HIDE_MS); });
      items.forEach(function (i) {
        if (i.claimed_by_caller) held[i.query_id] = i.claimed_until || "";
        else if (i.query_id !== shown) delete held[i.query_id];
      });
      $("queue-status").textContent = "";
      renderQueue();
      var at = indexOf(shown);
      if (at >= 0) {
        // The item shown, and what the expert is writing, stay as they are.
        current = at;
        markCurrent();
        showClaim();
      } else {
        select(0, true);
      }
    }, function (err) {
      if (err.status !== 401) $("queue-status").textContent = "The queue was not refreshed: " + err.message;
      throw err;
    });
  }

  function renderQueue() {
    var queue = $("queue");
    // A re-render replaces the buttons: focus goes back to the same item's (or the one in its place).
    var focused = queue.contains(document.activeElement) ? document.activeElement : null;
    var focusedAt = focused ? Array.prototype.indexOf.call(queue.querySelectorAll("button"), focused) : -1;
    queue.textContent = "";
    $("count").textContent = "(" + items.length + ")";
    items.forEach(function (item) {
      var li = document.createElement("li");
      var b = document.createElement("button");
      b.type = "button";
      b.dataset.queryId = item.query_id;
      b.textContent = item.question;
      var why = document.createElement("span");
      why.className = "why";
      why.textContent = reasons(item);
      b.append(why);
      b.addEventListener("click", function () { select(indexOf(item.query_id), true); });
      li.append(b);
      queue.append(li);
    });
    if (focused) {
      var buttons = queue.querySelectorAll("button");
      var again = Array.prototype.find.call(buttons, function (b) { return b.dataset.queryId === focused.dataset.queryId; });
      again = again || buttons[Math.min(focusedAt, buttons.length - 1)];
      if (again) again.focus(); else focusItem();
    }
  }
  // The item's heading (or "Nothing waits"), where focus goes after an action or Escape.
  function focusItem() {
    $(shown ? "question" : "empty").focus();
  }
  // Focus left on the page's body (a button that was disabled or removed) is put back on the item.
  function focusLost() {
    var at = document.activeElement;
    return !at || at === document.body || $("item").contains(at);
  }
  function markCurrent() {
    document.querySelectorAll("#queue button").forEach(function (b, j) {
      b.setAttribute("aria-current", String(j === current));
    });
  }
  function updateButtons() {
    BUTTONS.forEach(function (id) { $(id).disabled = sending !== null; });
  }

  function select(i, claim) {
    var previous = shown;
    current = items.length ? Math.max(0, Math.min(i, items.length - 1)) : -1;
    var item = items[current];
    shown = item ? item.query_id : null;
    if (previous !== shown) skipped = null;
    if (previous && previous !== shown) release(previous);
    markCurrent();
    $("empty").hidden = !!item;
    $("detail").hidden = !item;
    $("status").textContent = "";
    // One short line for screen readers, instead of the whole item each time it changes.
    var line = item ? "Item " + (current + 1) + " of " + items.length + ": " + item.question : "Nothing waits for review.";
    if ($("announce").textContent !== line) $("announce").textContent = line;  // an idle refresh says nothing
    if (!item) return;
    $("question").textContent = item.question;
    $("answer").textContent = item.answer;
    $("reasons").textContent = reasons(item);
    $("version").textContent = item.model_version;
    $("asked").textContent = item.times_asked || 1;
    // The visitor's browser sent the title and the URL: the link says where it goes, so a title
    // written to lure an expert ("log in again") cannot hide another site behind it.
    var url = item.page_url || "";
    $("page").textContent = item.page_title ? item.page_title + " (" + (url || "no URL") + ")" : url || "(unknown)";
    if (/^https?:/.test(url)) $("page").href = url; else $("page").removeAttribute("href");
    fill("passages", item.passages);
    fill("comments", item.comments);
    $("comments-box").hidden = !(item.comments || []).length;
    var draft = drafts[item.query_id] || {};
    $("correction").value = typeof draft.answer === "string" ? draft.answer : item.answer;
    $("note").value = draft.note || "";
    counted();
    showClaim();
    updateButtons();
    if (claim) {
      clearTimeout(claimTimer);
      claimTimer = setTimeout(function () { claimItem(item.query_id); }, CLAIM_DELAY_MS);
    }
  }

  function fill(id, texts) {
    var list = $(id);
    list.textContent = "";
    (texts || []).forEach(function (t) {
      var li = document.createElement("li");
      li.textContent = t;
      list.append(li);
    });
  }

  function inOrder(step) {
    claims = claims.then(step).catch(noop);
    return claims;
  }
  function claimItem(id) {
    return inOrder(function () {
      if (id !== shown || id === skipped || id in held || acted[id]) return;
      return api("/api/v1/review/claim", { query_id: id }).then(function (data) {
        held[id] = data.claimed_until || "";
        if (id === shown && id !== skipped) showClaim(); else release(id);
      }, function (err) {
        // Another expert holds it, or it is reviewed: not this expert's to answer.
        if (err.status === 409 || err.status === 404) drop(id, err.message);
        else if (id === shown) $("status").textContent = err.message;
      });
    });
  }
  // Releases a claim this console holds on an item it did not act on (nor is acting on).
  function release(id) {
    if (!(id in held) || acted[id] || id === sending) return claims;
    delete held[id];
    return inOrder(function () {
      return api("/api/v1/review/claim", { query_id: id, release: true }).catch(noop);
    });
  }
  function drop(id, message) {
    delete held[id];
    var wasShown = id === shown;
    var refocus = wasShown && focusLost();
    removeItem(id);
    $(wasShown ? "status" : "queue-status").textContent = message;
    if (refocus) focusItem();
  }
  function removeItem(id) {
    var at = indexOf(id);
    if (at < 0) return;
    items.splice(at, 1);
    renderQueue();
    if (shown === id) {
      shown = null;
      select(at, true);
    } else {
      current = indexOf(shown);
      markCurrent();
    }
  }

  function showClaim() {
    if (!shown) return;
    var until = shown in held ? Date.parse(held[shown]) : NaN;
    var text = "not claimed yet (an action claims it)";
    if (until <= Date.now()) text = "your claim ran out (an action claims it again)";
    else if (until > 0) text = "yours until " + new Date(until).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    $("claim").textContent = text;
  }

  function counted() {
    var box = $("correction");
    $("correction-count").textContent = box.value.length + " / " + box.maxLength;
  }
  ["correction", "note"].forEach(function (field) {
    $(field).addEventListener("input", function () {
      if (field === "correction") counted();
      if (!shown) return;
      drafts[shown] = { answer: $("correction").value, note: $("note").value };
      save("flywheel.console.drafts", drafts);
    });
  });

  function act(action) {
    var item = items[current];
    if (!item || sending !== null) return;
    var answer = action === "correct" ? $("correction").value : "";
    var note = $("note").value;
    if (action === "correct" && !answer.trim()) {
      $("status").textContent = "Write the correct answer first.";
      return;
    }
    var body = { query_id: item.query_id, action: action, note: note, idempotency_key: keyFor(item.query_id, action, answer, note) };
    if (action === "correct") body.answer = answer;
    // The action buttons are disabled while it is sent: focus on one of them would fall to the body.
    if (BUTTONS.indexOf(document.activeElement && document.activeElement.id) >= 0) $("question").focus();
    send(body);
  }
  function send(body) {
    var id = body.query_id;
    sending = id;
    updateButtons();
    if (id === shown) $("status").textContent = "Sending\u2026";
    api("/api/v1/review/actions", body).then(function (data) {
      Object.keys(acted).forEach(function (q) { if (acted[q] < Date.now() - ACTED_HIDE_MS) delete acted[q]; });
      acted[id] = Date.now();
      save("flywheel.console.acted", acted);
      delete held[id];
      delete drafts[id];
      delete keys[id];
      save("flywheel.console.drafts", drafts);
      save("flywheel.console.keys", keys);
      sending = null;
      var wasShown = id === shown;
      var refocus = wasShown && focusLost();
      removeItem(id);
      $(wasShown ? "status" : "queue-status").textContent =
        "Saved: " + body.action + (data.duplicate ? " (it was already recorded)" : "") + ".";
      if (refocus) focusItem();
    }, function (err) {
      sending = null;
      if (err.status === 401) {
        pending = body;
        $("login-error").textContent = "Your login ended. Log in again and your " + body.action + " is sent.";
      } else if (err.status === 409 || err.status === 404) {
        drop(id, err.message);
      } else {
        if (id !== shown) release(id);
        $(id === shown ? "status" : "queue-status").textContent = err.message + " Press again to retry.";
      }
    }).then(updateButtons);
  }

  function skip() {
    var item = items[current];
    if (!item || sending !== null) return;
    var next = current + 1 < items.length ? current + 1 : current - 1;
    if (next < 0) {
      // The only item: released, and not claimed again.
      clearTimeout(claimTimer);
      skipped = item.query_id;
      release(item.query_id);
      showClaim();
      $("status").textContent = "Skipped; nothing else waits.";
      return;
    }
    // The skipped item is released before the next one is claimed (they go in order).
    select(next, true);
  }

  $("accept").addEventListener("click", function () { act("accept"); });
  $("unanswerable").addEventListener("click", function () { act("unanswerable"); });
  $("skip").addEventListener("click", skip);
  $("correct-form").addEventListener("submit", function (e) { e.preventDefault(); act("correct"); });

  // Single-key shortcuts can be turned off (WCAG 2.1.4): an Escape that leaves a field, then a
  // stray key, must not act for an expert who did not mean it. The choice is kept per browser.
  var SHORTCUTS = "flywheel.console.shortcuts";
  try { $("shortcuts").checked = localStorage.getItem(SHORTCUTS) !== "off"; } catch (e) { /* storage off */ }
  $("shortcuts").addEventListener("change", function () {
    try { localStorage.setItem(SHORTCUTS, $("shortcuts").checked ? "on" : "off"); } catch (e) { /* storage off */ }
  });

  document.addEventListener("keydown", function (e) {
    var typing = /^(TEXTAREA|SELECT)$/.test(e.target.nodeName) || (e.target.nodeName === "INPUT" && e.target.type !== "checkbox");
    if (typing) {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && e.target.id === "correction") { e.preventDefault(); act("correct"); }
      if (e.key === "Escape") {
        // Out of the field onto the item's heading, where the shortcuts (if on) work; not the body.
        if (!$("app").hidden && $("item").contains(e.target)) focusItem(); else e.target.blur();
      }
      return;
    }
    if ($("app").hidden || e.ctrlKey || e.metaKey || e.altKey || !$("shortcuts").checked) return;
    var bindings = {
      j: function () { if (current + 1 < items.length) select(current + 1, true); },
      k: function () { if (current > 0) select(current - 1, true); },
      a: function () { act("accept"); }, u: function () { act("unanswerable"); }, s: skip,
      r: function () { refresh().catch(noop); },
      c: function () { $("correction").focus(); $("correction").select(); }
    };
    if (bindings[e.key]) { e.preventDefault(); bindings[e.key](); }
  });
  ["keydown", "input", "pointerdown"].forEach(function (type) {
    document.addEventListener(type, function () { lastInput = Date.now(); }, true);
  });

  // Leaving the page gives back what this console holds and did not act on.
  window.addEventListener("pagehide", function () {
    Object.keys(held).forEach(function (id) {
      if (acted[id] || id === sending) return;
      fetch("/api/v1/review/claim", {
        method: "POST", keepalive: true, credentials: "same-origin",
        headers: { "content-type": "application/json" }, body: JSON.stringify({ query_id: id, release: true })
      }).catch(noop);
    });
  });
  window.addEventListener("pageshow", function (e) {
    if (e.persisted && !$("app").hidden) {
      held = {};
      shown = null;
      refresh().catch(noop);
    }
  });

  function decision(d) {
    if (!d.action || d.action === "DECISION_ACTION_GATE") return d.passed ? ["gate passed", "passed"] : ["gate failed", "failed"];
    var name = DECISIONS[d.action] || d.action.replace(/^DECISION_ACTION_/, "").toLowerCase().replace(/_/g, " ");
    return [name, d.action === "DECISION_ACTION_ROLLBACK" ? "rollback" : d.action === "DECISION_ACTION_CANARY_PROMOTE" ? "passed" : ""];
  }

  function status() {
    api("/api/v1/review/status").then(function (data) {
      var r = data.rollout || {};
      var dl = $("rollout");
      dl.textContent = "";
      [["production", r.production], ["canary", r.canary ? r.canary + " (" + Math.round((r.canary_fraction || 0) * 100) + " %)" : "none"],
       ["automatic", r.auto_rollout ? "on" : "off"], ["pinned", r.pinned ? "yes" : "no"]].forEach(function (row) {
        var dt = document.createElement("dt"), dd = document.createElement("dd");
        dt.textContent = row[0];
        dd.textContent = row[1] || "\u2013";
        dl.append(dt, dd);
      });
      var list = $("decisions");
      list.textContent = "";
      (data.decisions || []).forEach(function (d) {
        var li = document.createElement("li");
        var label = decision(d);
        li.className = label[1];
        li.textContent = d.version + ": " + label[0] + ((d.reasons || []).length ? " \u2013 " + d.reasons[0] : "");
        list.append(li);
      });
      if (!(data.decisions || []).length) list.textContent = "none yet";
    }, function (err) {
      if (err.status === 401) return;
      $("rollout").textContent = "The rollout is unavailable: " + err.message;
      $("decisions").textContent = "";
    });
  }
  setInterval(function () {
    if ($("app").hidden) return;
    status();
    showClaim();
  }, STATUS_EVERY_MS);
  // The queue refreshes itself while the expert is idle; the item shown and any draft stay.
  setInterval(function () {
    if ($("app").hidden || sending !== null || document.visibilityState !== "visible") return;
    if (Date.now() - lastInput > IDLE_MS) refresh().catch(noop);
  }, QUEUE_EVERY_MS);

  // A still-valid login (the HttpOnly cookie) opens the queue at once.
  start();
})();
