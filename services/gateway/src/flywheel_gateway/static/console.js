/* Flywheel's review console: works through the review queue; every action goes to the gateway,
   which calls the services with the expert's own token (kept on the server, never here). */
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var items = [];
  var current = -1;
  var REASONS = {
    REVIEW_REASON_LOW_RATING: "low rating", REVIEW_REASON_THUMBS_DOWN: "thumbs down",
    REVIEW_REASON_COMMENT: "comment", REVIEW_REASON_CANARY: "canary"
  };

  function api(path, body) {
    var init = { credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      init.method = "POST";
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (r) {
      if (r.status === 401) { showLogin(); throw new Error("Log in again."); }
      if (r.status === 204) return {};
      return r.json().then(function (data) {
        if (!r.ok) throw new Error(data.error || "Request failed (" + r.status + ").");
        return data;
      });
    });
  }

  function showLogin() {
    $("app").hidden = $("tools").hidden = true;
    $("login-view").hidden = false;
    $("token").focus();
  }
  function showApp() {
    $("login-view").hidden = true;
    $("app").hidden = $("tools").hidden = false;
    refresh();
    status();
  }

  $("login").addEventListener("submit", function (e) {
    e.preventDefault();
    var token = $("token").value;
    $("token").value = "";
    api("/console/login", { token: token }).then(showApp, function (err) {
      $("login-error").textContent = err.message;
    });
  });
  $("logout").addEventListener("click", function () { api("/console/logout", {}).then(showLogin); });
  $("refresh").addEventListener("click", refresh);
  $("order").addEventListener("change", refresh);

  function reasons(item) {
    return (item.reasons || []).map(function (r) { return REASONS[r] || r; }).join(", ");
  }

  function refresh() {
    return api("/api/v1/review/items?order=" + $("order").value).then(function (data) {
      var keep = current >= 0 && items[current] ? items[current].query_id : null;
      items = data.items;
      renderQueue();
      var at = items.findIndex(function (i) { return i.query_id === keep; });
      select(at >= 0 ? at : 0, at < 0);
    });
  }

  function renderQueue() {
    var queue = $("queue");
    queue.textContent = "";
    $("count").textContent = "(" + items.length + ")";
    items.forEach(function (item, i) {
      var li = document.createElement("li");
      var b = document.createElement("button");
      b.type = "button";
      b.dataset.queryId = item.query_id;
      b.textContent = item.question;
      var why = document.createElement("span");
      why.className = "why";
      why.textContent = reasons(item);
      b.append(why);
      b.addEventListener("click", function () { select(i, true); });
      li.append(b);
      queue.append(li);
    });
  }

  function select(i, claim) {
    current = items.length ? Math.max(0, Math.min(i, items.length - 1)) : -1;
    document.querySelectorAll("#queue button").forEach(function (b, j) {
      b.setAttribute("aria-current", String(j === current));
    });
    $("empty").hidden = current >= 0;
    $("detail").hidden = current < 0;
    $("status").textContent = "";
    if (current < 0) return;
    var item = items[current];
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
    $("correction").value = item.answer;
    $("note").value = "";
    if (claim && !item.claimed_by_caller) {
      api("/api/v1/review/claim", { query_id: item.query_id }).then(function () {
        item.claimed_by_caller = true;
      }, function (err) { $("status").textContent = err.message; });
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

  function act(action) {
    if (current < 0) return;
    var item = items[current];
    var body = { query_id: item.query_id, action: action, note: $("note").value };
    if (action === "correct") body.answer = $("correction").value;
    $("status").textContent = "Sending\u2026";
    api("/api/v1/review/actions", body).then(function () {
      items.splice(current, 1);
      renderQueue();
      select(current, true);
      $("status").textContent = "Saved: " + action + ".";
    }, function (err) { $("status").textContent = err.message; });
  }

  function skip() {
    if (current < 0) return;
    api("/api/v1/review/claim", { query_id: items[current].query_id, release: true }).catch(function () {});
    items[current].claimed_by_caller = false;
    select(current + 1, true);
  }

  $("accept").addEventListener("click", function () { act("accept"); });
  $("unanswerable").addEventListener("click", function () { act("unanswerable"); });
  $("skip").addEventListener("click", skip);
  $("correct-form").addEventListener("submit", function (e) { e.preventDefault(); act("correct"); });

  document.addEventListener("keydown", function (e) {
    var typing = /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.nodeName);
    if (typing) {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && e.target.id === "correction") { e.preventDefault(); act("correct"); }
      if (e.key === "Escape") e.target.blur();
      return;
    }
    if ($("app").hidden || e.ctrlKey || e.metaKey || e.altKey) return;
    var keys = {
      j: function () { select(current + 1, true); }, k: function () { select(current - 1, true); },
      a: function () { act("accept"); }, u: function () { act("unanswerable"); }, s: skip,
      r: refresh, c: function () { $("correction").focus(); $("correction").select(); }
    };
    if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
  });

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
        li.className = d.passed ? "passed" : "failed";
        li.textContent = d.version + ": " + d.action + (d.passed ? " passed" : " failed") +
          ((d.reasons || []).length ? " \u2013 " + d.reasons[0] : "");
        list.append(li);
      });
      if (!(data.decisions || []).length) list.textContent = "none yet";
    }).catch(function () {});
  }
  setInterval(function () { if (!$("app").hidden) status(); }, 15000);

  // A still-valid login (the HttpOnly cookie) opens the queue at once.
  api("/api/v1/review/status").then(showApp, showLogin);
})();
