/* Tether review console — plain JavaScript, no build step, no third-party code.
 *
 * Every value that comes from the API is put into the page with textContent / text nodes (see el()),
 * never as HTML, and made inert first (inert(): control, line-separator and bidi characters are shown
 * as escapes such as \u202e, so an agent's text cannot reorder or hide what a reviewer reads). The
 * reviewer token lives in sessionStorage and goes out as a Bearer header on every call; nothing else
 * is stored.
 *
 * Charts are SVG drawn here from the admin API's /api/stats (no library, nothing fetched elsewhere).
 *
 * Live updates: EventSource cannot send an Authorization header, and a token in a query string ends
 * up in access logs and browser history, so the console reads /api/events with fetch() and a streamed
 * body (same header as every other call). While that stream is down it polls every few seconds and
 * reconnects with backoff.
 */
(function () {
  'use strict';

  var TOKEN_KEY = 'tether.reviewerToken';
  var POLL_MS = 5000;
  var API_BASE = new URL('../api/', window.location.href);

  // ------------------------------------------------------------------------------------------ DOM helpers

  // C0, DEL, C1, LRM/RLM/ALM, the line and paragraph separators, bidi embeddings/overrides/isolates
  // (the same set as proxy/inert.py)
  var UNSAFE = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;
  var NAMED = { '\n': '\\n', '\r': '\\r', '\t': '\\t' };

  /** A text node for a block of code (<pre>): its newlines and tabs stay, everything else as inert(). */
  function block(v) {
    return document.createTextNode(String(v).split('\n').map(function (line) {
      return line.split('\t').map(inert).join('\t');
    }).join('\n'));
  }

  /** Text with every control, separator and bidi character shown as an escape (\x1b, \u202e). */
  function inert(v) {
    var t = String(v);
    return t.replace(UNSAFE, function (c) {
      if (NAMED[c]) return NAMED[c];
      var h = c.charCodeAt(0).toString(16);
      return c.charCodeAt(0) < 256 ? '\\x' + ('0' + h).slice(-2) : '\\u' + ('000' + h).slice(-4);
    });
  }

  /** el('tag.class#id', {attrs}, children...) — strings become text nodes, never HTML. */
  function el(spec, attrs) {
    var m = /^([a-z0-9]+)?((?:[.#][A-Za-z0-9_-]+)*)$/.exec(spec);
    var node = document.createElement((m && m[1]) || 'div');
    if (m && m[2]) {
      m[2].replace(/([.#])([A-Za-z0-9_-]+)/g, function (_, kind, name) {
        if (kind === '.') node.classList.add(name); else node.id = name;
      });
    }
    var start = 1;
    if (attrs && typeof attrs === 'object' && !(attrs instanceof Node) && !Array.isArray(attrs)) {
      start = 2;
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k.slice(0, 2) === 'on' && typeof v === 'function') node.addEventListener(k.slice(2), v);
        else if (k === 'text') node.textContent = inert(v);
        else if (k === 'value') node.value = v;  // an editable value keeps its exact text
        else if (k === 'checked' || k === 'selected' || k === 'disabled') node[k] = !!v;
        else node.setAttribute(k, v === true ? '' : inert(v));
      });
    }
    for (var i = start; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }

  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(node, c); }); return; }
    node.appendChild(child instanceof Node ? child : document.createTextNode(inert(child)));
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function $(id) { return document.getElementById(id); }

  function pretty(v) {
    if (v === undefined) return '';
    if (typeof v === 'string') return v;
    try { return JSON.stringify(v, null, 2); } catch (e) { return String(v); }
  }

  function value(v) {
    if (v === null || v === undefined) return el('span.none', '(none)');
    if (v === '') return el('span.none', '(empty)');
    if (typeof v === 'string') return v;
    return el('code', JSON.stringify(v));
  }

  function toDate(t) {
    if (t === null || t === undefined || t === '') return null;
    var d = typeof t === 'number' ? new Date(t * 1000) : new Date(t);
    return isNaN(d.getTime()) ? null : d;
  }

  function ago(t) {
    var d = toDate(t);
    if (!d) return '';
    var s = Math.round((Date.now() - d.getTime()) / 1000);
    var future = s < 0;
    s = Math.abs(s);
    var txt = s < 60 ? s + ' s' : s < 3600 ? Math.floor(s / 60) + ' min' : s < 86400 ? Math.floor(s / 3600) + ' h'
      : Math.floor(s / 86400) + ' d';
    return future ? 'in ' + txt : txt + ' ago';
  }

  function when(t) {
    var d = toDate(t);
    if (!d) return el('span.none', '—');
    return el('time', { datetime: d.toISOString(), title: d.toLocaleString() }, ago(t));
  }

  function stamp(t) {
    var d = toDate(t);
    if (!d) return el('span.none', '—');
    return el('time', { datetime: d.toISOString() }, d.toLocaleString());
  }

  function badge(state) {
    return el('span.badge.state-' + String(state || 'none').replace(/[^a-z_]/gi, ''), String(state || '—').replace(/_/g, ' '));
  }

  function headlineText(it) {
    var h = it.headline && it.headline.text;
    if (h) return h;
    return it.agent + (it.on_behalf_of ? ', for ' + it.on_behalf_of + ',' : '') + ' wants to call ' + it.capability +
      (it.intent ? ' — because: ' + it.intent : '');
  }

  function pct(x) { return (x === null || x === undefined) ? '—' : (Math.round(x * 1000) / 10) + '%'; }

  function dl(rows, skipEmpty) {
    var d = el('dl.facts');
    rows.forEach(function (r) {
      if (!r) return;
      if (skipEmpty && (r[1] === null || r[1] === undefined || r[1] === '')) return;
      d.appendChild(el('dt', r[0]));
      d.appendChild(el('dd', r[1] === null || r[1] === undefined || r[1] === '' ? el('span.none', '—') : r[1]));
    });
    return d;
  }

  function table(caption, headers, rows, opts) {
    opts = opts || {};
    var t = el('table' + (opts.cls ? '.' + opts.cls : ''));
    if (caption) t.appendChild(el('caption' + (opts.hideCaption ? '.sr-only' : ''), caption));
    t.appendChild(el('thead', el('tr', headers.map(function (h) { return el('th', { scope: 'col' }, h); }))));
    var tb = el('tbody');
    rows.forEach(function (r) { tb.appendChild(r instanceof Node ? r : el('tr', r.map(function (c) { return el('td', c); }))); });
    Array.prototype.forEach.call(tb.rows, function (tr) {
      Array.prototype.forEach.call(tr.cells, function (cell, i) { if (headers[i]) cell.setAttribute('data-label', headers[i]); });
    });
    t.appendChild(tb);
    if (!opts.noCards) t.classList.add('cards');
    return el('div.table-wrap', t);
  }

  function announce(msg) {
    var a = $('announcer');
    a.textContent = '';
    window.setTimeout(function () { a.textContent = inert(msg); }, 30);
  }

  var flashTimer = null;
  function flash(msg, kind) {
    var f = $('flash');
    f.className = 'flash ' + (kind || 'ok');
    f.textContent = inert(msg);
    f.hidden = false;
    if (flashTimer) window.clearTimeout(flashTimer);
    flashTimer = window.setTimeout(function () { f.hidden = true; }, kind === 'error' ? 12000 : 6000);
  }

  function errorBox(err) {
    var box = el('div.error-box', { role: 'alert' });
    box.appendChild(el('strong', err.code ? err.code.replace(/_/g, ' ') : 'error'));
    box.appendChild(document.createTextNode(': ' + (err.message || 'request failed')));
    if (err.details && err.details.field !== undefined) {
      box.appendChild(el('div', 'Field: ', el('code', err.details.field || '(the whole body)'),
        err.details.rule ? el('span.muted', ' — rule ' + err.details.rule) : null));
    }
    if (err.request_id) box.appendChild(el('div.muted.small', 'request id ' + err.request_id));
    return box;
  }

  // ------------------------------------------------------------------------------------------ API

  // Signed in with the identity provider (proxy/signin.py): an HttpOnly session cookie the page never
  // sees, plus the CSRF token every state-changing call must carry. Pasting a token still works.
  var SESSION = null;   // {reviewer, csrf} from /auth/session
  var SESSION_MARK = '(session)';
  function token() { return window.sessionStorage.getItem(TOKEN_KEY) || (SESSION ? SESSION_MARK : null); }
  function authHeaders(tok) {
    var t = tok || token();
    if (t && t !== SESSION_MARK) return { Authorization: 'Bearer ' + t };
    if (SESSION) return { 'X-Tether-CSRF': SESSION.csrf };
    return { Authorization: 'Bearer ' };
  }

  function ApiError(status, body) {
    var e = (body && body.error) || {};
    this.status = status;
    this.code = e.code || ('http_' + status);
    this.message = e.message || ('the admin API answered ' + status);
    this.request_id = e.request_id;
    this.details = e.details;
  }

  function apiUrl(path, params) {
    var u = new URL(path, API_BASE);
    if (params) {
      Object.keys(params).forEach(function (k) {
        var v = params[k];
        if (v !== null && v !== undefined && v !== '') u.searchParams.set(k, v);
      });
    }
    return u.toString();
  }

  function api(method, path, params, body, tok) {
    var headers = authHeaders(tok);
    headers.Accept = 'application/json';
    var init = { method: method, headers: headers, cache: 'no-store', credentials: SESSION && !tok ? 'same-origin' : 'omit' };
    if (body !== undefined) { headers['Content-Type'] = 'application/json'; init.body = JSON.stringify(body); }
    return fetch(apiUrl(path, params), init).then(function (resp) {
      live.reachable(true);
      return resp.text().then(function (txt) {
        var doc = null;
        try { doc = txt ? JSON.parse(txt) : null; } catch (e) { doc = null; }
        if (!resp.ok) {
          var err = new ApiError(resp.status, doc);
          if (!tok && (resp.status === 401 || err.code === 'reviewer_required')) signedOut(err);
          throw err;
        }
        return doc;
      });
    }, function (e) {
      live.reachable(false);
      throw new ApiError(0, { error: { code: 'network_error', message: 'the gateway could not be reached (' + e.message + ')' } });
    });
  }

  function authMessage(err) {
    if (err.code === 'reviewer_required') {
      return 'This token is valid but is not a reviewer\'s token (403 reviewer_required): ' + err.message +
        '. Ask for a token with the reviewer role — an agent token cannot be used here.';
    }
    if (err.status === 401) {
      return 'The token was not accepted (401 ' + err.code + '): ' + err.message + '. Paste a fresh reviewer token.';
    }
    return err.code + ': ' + err.message;
  }

  // on_behalf_of_proof: was the human proven by the identity provider, or only named by the agent's token?
  function proofText(proof) {
    if (proof === 'verified') return 'verified by the identity provider';
    if (proof === 'asserted') return 'asserted by the agent\'s token (not verified)';
    return null;
  }

  function tokenName(tok) {
    try {
      var part = tok.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      var bytes = Uint8Array.from(window.atob(part), function (c) { return c.charCodeAt(0); });
      var claims = JSON.parse(new TextDecoder().decode(bytes));
      return claims.sub || 'reviewer';
    } catch (e) { return 'reviewer'; }
  }

  // ------------------------------------------------------------------------------------------ session

  var screenCtl = null;   // the mounted screen: {name, refresh(), key(ev), destroy()}

  function showSignin(message) {
    $('nav').hidden = true;
    $('session').hidden = true;
    clear($('screen'));
    $('signin').hidden = false;
    $('signin-error').textContent = inert(message || '');
    var input = $('token-input');
    input.setAttribute('aria-invalid', message ? 'true' : 'false');
    input.focus();
    document.title = 'Sign in — Tether review console';
  }

  function signedOut(err) {
    window.sessionStorage.removeItem(TOKEN_KEY);
    if (SESSION) {
      var csrf = SESSION.csrf;
      SESSION = null;
      fetch('/auth/logout', { method: 'POST', headers: { 'X-Tether-CSRF': csrf }, credentials: 'same-origin' })
        .catch(function () {});
    }
    live.stop();
    if (screenCtl && screenCtl.destroy) screenCtl.destroy();
    screenCtl = null;
    showSignin(err ? authMessage(err) : '');
  }

  function signIn(tok) {
    $('signin-error').textContent = '';
    return api('GET', 'review/items', { state: 'pending', limit: 1 }, undefined, tok).then(function () {
      window.sessionStorage.setItem(TOKEN_KEY, tok);
      $('token-input').value = '';
      started();
    }, function (err) {
      $('signin-error').textContent = inert(authMessage(err));
      $('token-input').setAttribute('aria-invalid', 'true');
      $('token-input').focus();
    });
  }

  function started() {
    $('signin').hidden = true;
    $('nav').hidden = false;
    $('session').hidden = false;
    $('who-name').textContent = inert(SESSION && token() === SESSION_MARK ? SESSION.reviewer : tokenName(token()));
    live.start();
    if (!window.location.hash || window.location.hash === '#' || window.location.hash === '#/') {
      window.location.hash = '#/queue';
    } else {
      route();
    }
    refreshQueueCount();
  }

  var countSeq = 0;
  function refreshQueueCount() {
    if (!token()) return;
    var my = ++countSeq;
    // one summary row is enough: the answer's "pending" is the store's count, whatever the queue holds
    api('GET', 'review/items', { state: 'pending', limit: 1 }).then(function (doc) {
      if (my !== countSeq) return;  // an older answer arriving late
      var c = $('queue-count');
      c.textContent = doc.pending ? String(doc.pending) : '';
      c.setAttribute('aria-label', doc.pending + ' pending');
    }, function () {});
  }

  // ------------------------------------------------------------------------------------------ live updates

  var live = {
    ctrl: null, pollTimer: null, retry: 0, running: false, debounce: null, offline: false, mode: 'connecting',
    start: function () {
      this.running = true;
      this.connect();
    },
    stop: function () {
      this.running = false;
      if (this.ctrl) this.ctrl.abort();
      this.ctrl = null;
      this.stopPolling();
      this.offline = false;
      this.state('off');
    },
    state: function (s) {
      this.mode = s;
      var node = $('live-state');
      var shown = this.offline && s !== 'off' ? 'offline' : s;
      node.className = 'live-state ' + shown;
      node.textContent = shown === 'offline' ? 'offline — retrying' : shown === 'live' ? 'live'
        : shown === 'polling' ? 'polling every ' + (POLL_MS / 1000) + ' s' : shown === 'off' ? '' : 'connecting…';
      node.title = shown === 'offline' ? 'The gateway does not answer; the console keeps trying and catches up when it is back.'
        : 'How the console learns about new activity';
    },
    /** Every API answer (or failure to get one) says whether the gateway is reachable. */
    reachable: function (ok) {
      if (ok === !this.offline) return;
      this.offline = !ok;
      document.body.classList.toggle('offline', this.offline);
      if (this.running) {
        this.state(this.mode);
        announce(ok ? 'The gateway answers again.' : 'The gateway is offline; retrying.');
        if (!ok) this.startPolling();
        else { this.changed(); if (this.mode !== 'live') { this.retry = 0; this.connect(); } }
      }
    },
    startPolling: function () {
      if (this.pollTimer) return;
      var self = this;
      if (this.mode !== 'live' || this.offline) this.state('polling');
      this.pollTimer = window.setInterval(function () { self.changed(); }, POLL_MS);
    },
    stopPolling: function () {
      if (this.pollTimer) window.clearInterval(this.pollTimer);
      this.pollTimer = null;
    },
    changed: function () {
      var self = this;
      if (this.debounce) return;
      this.debounce = window.setTimeout(function () {
        self.debounce = null;
        refreshQueueCount();
        if (screenCtl && screenCtl.refresh) screenCtl.refresh();
      }, 400);
    },
    connect: function () {
      var self = this;
      if (this.retryTimer) { window.clearTimeout(this.retryTimer); this.retryTimer = null; }
      if (this.ctrl) this.ctrl.abort();
      if (!this.running || !window.ReadableStream || !window.TextDecoder) { this.startPolling(); return; }
      var ctrl = new AbortController();
      this.ctrl = ctrl;
      var evHeaders = authHeaders();
      evHeaders.Accept = 'text/event-stream';
      fetch(apiUrl('events'), {
        headers: evHeaders,
        cache: 'no-store', credentials: SESSION ? 'same-origin' : 'omit', signal: ctrl.signal
      }).then(function (resp) {
        if (resp.status === 401 || resp.status === 403) {
          return resp.json().then(function (doc) { signedOut(new ApiError(resp.status, doc)); }, function () { signedOut(); });
        }
        if (!resp.ok || !resp.body) throw new Error('events answered ' + resp.status);
        var reader = resp.body.getReader();
        var decoder = new TextDecoder();
        var buf = '';
        function pump() {
          return reader.read().then(function (r) {
            if (r.done) throw new Error('event stream ended');
            buf += decoder.decode(r.value, { stream: true }).replace(/\r\n?/g, '\n');
            var i;
            while ((i = buf.indexOf('\n\n')) >= 0) {
              self.block(buf.slice(0, i));
              buf = buf.slice(i + 2);
            }
            return pump();
          });
        }
        return pump();
      }).catch(function () {
        if (!self.running || ctrl.signal.aborted) return;
        self.startPolling();
        var wait = Math.min(30000, 1000 * Math.pow(2, self.retry++));
        self.retryTimer = window.setTimeout(function () { self.retryTimer = null; if (self.running) self.connect(); }, wait);
      });
    },
    block: function (text) {
      var ev = 'message';
      text.split('\n').forEach(function (line) {
        if (line.indexOf('event:') === 0) ev = line.slice(6).trim();
      });
      if (ev === 'hello') {
        var wasPolling = !!this.pollTimer;
        this.retry = 0;
        this.stopPolling();
        this.state('live');
        if (wasPolling) this.changed();
      } else if (ev === 'journal') {
        this.changed();
      }
    }
  };

  // ------------------------------------------------------------------------------------------ dialogs

  /** A modal form. opts: {title, body: Node[], submit, danger, onSubmit(form) -> Promise}. */
  function actionDialog(opts) {
    var dlg = $('action-dialog');
    var form = $('action-form');
    $('action-title').textContent = inert(opts.title);
    clear($('action-body'));
    append($('action-body'), opts.body);
    $('action-error').textContent = '';
    var submit = $('action-submit');
    submit.textContent = opts.submit;
    submit.className = opts.danger ? 'danger' : 'primary';
    submit.disabled = false;
    form.onsubmit = function (ev) {
      ev.preventDefault();
      var problem = opts.validate ? opts.validate(form) : null;
      if (problem) {
        $('action-error').textContent = problem;
        return;
      }
      submit.disabled = true;
      $('action-error').textContent = '';
      Promise.resolve(opts.onSubmit(form)).then(function () {
        dlg.close();
      }, function (err) {
        submit.disabled = false;
        $('action-error').textContent = inert((err && err.code ? err.code + ': ' : '') + ((err && err.message) || String(err)));
      });
    };
    $('action-cancel').onclick = function () { dlg.close(); };
    var opener = document.activeElement;
    dlg.onclose = function () { if (opener && opener.focus && document.body.contains(opener)) opener.focus(); };
    dlg.showModal();
    var first = form.querySelector('#action-body textarea, #action-body input, #action-body select');
    (first || submit).focus();
  }

  function dialogOpen() {
    return $('action-dialog').open || $('help-dialog').open;
  }

  // ------------------------------------------------------------------------------------------ router

  function parseHash() {
    var h = window.location.hash.replace(/^#\/?/, '');
    var parts = h.split('/').map(function (p) { return decodeURIComponent(p); });
    return { screen: parts[0] || 'queue', arg: parts[1] || null };
  }

  var screens = {};

  function route() {
    if (!token()) { showSignin(); return; }
    var r = parseHash();
    var make = screens[r.screen];
    if (!make) { window.location.hash = '#/queue'; return; }
    Array.prototype.forEach.call(document.querySelectorAll('#nav a'), function (a) {
      if (a.getAttribute('data-screen') === r.screen) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    });
    if (screenCtl && screenCtl.name === r.screen && screenCtl.select) {
      screenCtl.select(r.arg);
      return;
    }
    if (screenCtl && screenCtl.destroy) screenCtl.destroy();
    if (screenCtl) $('flash').hidden = true;  // a message belongs to the screen it was said on
    var root = clear($('screen'));
    screenCtl = make(root, r.arg);
    screenCtl.name = r.screen;
  }

  function go(hash) {
    if (window.location.hash === hash) route(); else window.location.hash = hash;
  }

  /** Keep the address in step with a selection made by j/k, without a history entry per key press. */
  function replaceHash(hash) {
    window.history.replaceState(null, '', hash);
  }

  function setTitle(t) { document.title = t + ' — Tether review console'; }

  function loading(msg) { return el('p.loading', { role: 'status' }, msg || 'Loading…'); }

  // ------------------------------------------------------------------------------------------ filters

  function field(label, input, hint) {
    var id = input.id || ('f-' + Math.random().toString(36).slice(2, 9));
    input.id = id;
    return el('div.field', el('label', { for: id }, label), input, hint ? el('span.hint', hint) : null);
  }

  function select(name, options, current) {
    return el('select', { name: name }, options.map(function (o) {
      var v = Array.isArray(o) ? o[0] : o;
      var l = Array.isArray(o) ? o[1] : (o || 'any');
      return el('option', { value: v, selected: v === current }, l);
    }));
  }

  function formValues(form) {
    var out = {};
    Array.prototype.forEach.call(form.elements, function (e) {
      if (e.name) out[e.name] = e.value.trim();
    });
    return out;
  }

  var knownAgents = null;
  function agentsList() {
    if (knownAgents) return Promise.resolve(knownAgents);
    return api('GET', 'agents').then(function (doc) {
      var caps = {};
      doc.agents.forEach(function (a) { a.grants.forEach(function (g) { caps[g.capability] = g.effect; }); });
      knownAgents = { agents: doc.agents.map(function (a) { return a.agent; }), capabilities: Object.keys(caps).sort() };
      return knownAgents;
    }, function () { return { agents: [], capabilities: [] }; });
  }

  // ------------------------------------------------------------------------------------------ queue

  var queueFilters = { state: 'pending', agent: '', capability: '', upstream: '', min_age: '' };

  screens.queue = function (root, selectedId) {
    setTitle('Review queue');
    var items = [];
    var selected = selectedId;
    var detailSeq = 0;
    var shown = null;       // the item currently in the detail pane
    var editing = false;
    var lastIndex = -1;

    var heading = el('h1', 'Review queue');
    var form = el('form.filters', { 'aria-label': 'Filter the review queue' });
    var listBox = el('div.list-pane', { 'aria-label': 'Review items' });
    var detail = el('section.detail-pane', { 'aria-label': 'Review item', tabindex: '-1' });
    root.appendChild(el('div.screen-head', heading, el('p.muted', 'Writes the agents made in dry-run, newest first. Approve to send them to the upstream; reject with a reason.')));
    root.appendChild(form);
    var split = el('div.split', listBox, detail);
    root.appendChild(split);
    // on a phone the list and the item take turns: an open item fills the screen, with a way back
    function showingDetail(on) { split.classList.toggle('showing-detail', !!on); }

    agentsList().then(function (known) {
      var f = queueFilters;
      append(form, [
        field('State', select('state', [['pending', 'pending'], ['replayed', 'replayed'], ['replay_failed', 'replay failed'],
          ['approved', 'approved (replaying)'], ['rejected', 'rejected'], ['expired', 'expired'], ['', 'any state']], f.state)),
        field('Agent', select('agent', [['', 'any agent']].concat(known.agents), f.agent)),
        field('Capability', select('capability', [['', 'any capability']].concat(known.capabilities), f.capability)),
        field('Upstream', el('input', { name: 'upstream', type: 'text', value: f.upstream, size: '10', placeholder: 'any' })),
        field('Older than', select('min_age', [['', 'any age'], ['300', '5 minutes'], ['3600', '1 hour'], ['86400', '1 day'], ['604800', '1 week']], f.min_age)),
        el('div.field.actions', el('button', { type: 'submit' }, 'Apply'))
      ]);
    });
    form.addEventListener('submit', function (ev) { ev.preventDefault(); queueFilters = formValues(form); load(true); });
    form.addEventListener('change', function (ev) { if (ev.target.tagName === 'SELECT') { queueFilters = formValues(form); load(true); } });

    function params() {
      var p = {}; Object.keys(queueFilters).forEach(function (k) { p[k] = queueFilters[k]; });
      p.limit = 200;
      return p;
    }

    var listSeq = 0;
    function load(userAction) {
      // remember where the open item was: after a decision it leaves the pending list, and j/k go on from there
      items.forEach(function (i, n) { if (i.id === selected) lastIndex = n; });
      if (!items.length) { clear(listBox); listBox.appendChild(loading('Loading the queue…')); }
      var my = ++listSeq;
      return api('GET', 'review/items', params()).then(function (doc) {
        if (my !== listSeq) return;  // a newer load (other filters, a later event) is on its way
        var before = {}; items.forEach(function (i) { before[i.id] = i; });
        var fresh = doc.items.filter(function (i) { return !before[i.id]; });
        var hadItems = items.length > 0 || !userAction;
        items = doc.items;
        renderList();
        if (!userAction && hadItems && fresh.length) {
          announce(fresh.length + ' new item' + (fresh.length > 1 ? 's' : '') + ' in the queue');
        }
        if (selected) {
          var cur = items.filter(function (i) { return i.id === selected; })[0];
          if (!shown || shown.id !== selected) showDetail(selected);
          else if (cur && cur.updated_at !== shown.updated_at && !editing && !dialogOpen()) showDetail(selected);
          else if (!cur && shown.state === 'pending' && !dialogOpen()) recheckShown();
        } else {
          renderEmptyDetail();
        }
      }, function (err) {
        if (my === listSeq) clear(listBox).appendChild(errorBox(err));
      });
    }

    function recheckShown() {
      // the open item left the list: someone decided it, or it expired
      api('GET', 'review/items/' + encodeURIComponent(shown.id)).then(function (it) {
        if (it.state !== shown.state) {
          if (editing) flash('Item ' + it.id + ' is now ' + it.state.replace(/_/g, ' ') + ' (decided elsewhere).', 'warn');
          else showDetail(it.id);
        }
      }, function () {});
    }

    function renderList() {
      var hadFocus = listBox.contains(document.activeElement) ? document.activeElement.getAttribute('data-id') : null;
      clear(listBox);
      listBox.appendChild(el('h2.sr-only', 'Items'));
      listBox.appendChild(el('p.list-count', items.length + ' item' + (items.length === 1 ? '' : 's') +
        (queueFilters.state ? ' ' + queueFilters.state.replace(/_/g, ' ') : '')));
      if (!items.length) {
        listBox.appendChild(el('p.empty', queueFilters.state === 'pending' ? 'Nothing waiting for review.' : 'No items match.'));
        return;
      }
      var ul = el('ul.items');
      items.forEach(function (it) {
        var a = el('a.item-link', { href: '#/queue/' + encodeURIComponent(it.id), 'data-id': it.id,
          'aria-current': it.id === selected ? 'true' : null },
          el('span.item-top', el('span.cap', it.capability), when(it.created_at)),
          el('span.item-headline', headlineText(it)),
          el('span.item-req', el('span.method', it.request.method), ' ', it.upstream, ' ', it.request.path),
          it.state !== 'pending' ? badge(it.state) : null);
        ul.appendChild(el('li', a));
      });
      listBox.appendChild(ul);
      if (hadFocus) {
        var again = listBox.querySelector('a[data-id="' + cssEscape(hadFocus) + '"]');
        if (again) again.focus();
      }
    }

    function nextPending(afterId) {
      var idx = -1;
      items.forEach(function (i, n) { if (i.id === afterId) idx = n; });
      var rest = items.filter(function (i, n) { return i.state === 'pending' && i.id !== afterId && n > idx; });
      if (!rest.length) rest = items.filter(function (i) { return i.state === 'pending' && i.id !== afterId; }).reverse();
      return rest.length ? rest[0].id : null;
    }

    function renderEmptyDetail() {
      showingDetail(false);
      clear(detail);
      detail.appendChild(el('div.placeholder', el('p', items.length ? 'Select an item (or press ' : 'No item selected.',
        items.length ? el('kbd', 'j') : null, items.length ? ') to see the full request, the change against the current record and the agent\'s record.' : null)));
    }

    function showDetail(id) {
      var seq = ++detailSeq;
      editing = false;
      showingDetail(true);
      clear(detail);
      detail.appendChild(loading('Loading item…'));
      api('GET', 'review/items/' + encodeURIComponent(id)).then(function (it) {
        if (seq !== detailSeq) return;
        shown = it;
        renderDetail(it, seq);
      }, function (err) {
        if (seq !== detailSeq) return;
        shown = null;
        clear(detail).appendChild(errorBox(err));
      });
    }

    function requestLine(it) {
      var r = it.request;
      return r.path + (r.query ? '?' + r.query : '');
    }

    function bodyOf(r) {
      if (r.body_json !== undefined && r.body_json !== null) return { json: true, value: r.body_json };
      if (r.body_b64) return { json: false, text: '(binary body, ' + Math.floor(r.body_b64.length * 3 / 4) + ' bytes)' };
      var t = r.body_text || '';
      if (!t) return { json: false, text: '' };
      try { return { json: true, value: JSON.parse(t) }; } catch (e) { return { json: false, text: t }; }
    }

    function renderDetail(it, seq) {
      clear(detail);
      var r = it.request;
      var body = bodyOf(r);
      setTitle(it.capability + ' — review');
      detail.appendChild(el('p.back', el('a.back-link', { href: '#/queue' }, '← All items')));
      detail.appendChild(el('div.detail-head',
        el('h2', { id: 'item-title' }, it.capability, ' ', badge(it.state)),
        el('p.muted.small', 'Item ', el('code', it.id))));
      detail.appendChild(el('p.headline', { id: 'item-headline' }, headlineText(it)));
      detail.setAttribute('aria-labelledby', 'item-title');
      detail.setAttribute('aria-describedby', 'item-headline');

      detail.appendChild(dl([
        ['Agent', it.agent],
        ['On behalf of', it.on_behalf_of || el('span.none', 'the agent itself')],
        ['Person', proofText(it.on_behalf_of_proof)],
        ['Intent', el('span.intent', it.intent || '(none given)')],
        ['Captured', stamp(it.created_at)],
        it.state === 'pending' ? ['Expires', when(it.expires_at)] : null,
        it.tx ? ['Transaction', el('a', { href: '#/transactions/' + encodeURIComponent(it.tx) }, it.tx)] : null,
        it.quarantined ? ['Note', el('strong', 'captured while the agent was quarantined')] : null,
        it.canary ? ['Canary', String(it.canary)] : null,
        ['Journal', it.intent_seq !== null && it.intent_seq !== undefined
          ? el('a', { href: '#/journal/' + it.intent_seq }, 'request record #' + it.intent_seq)
          : el('span.muted', 'request ' + (it.request_id || '—'))]
      ]));

      // decision actions first: they are what the reviewer is here for
      var actions = el('div.decide');
      var errSlot = el('div.decide-error');
      if (it.state === 'pending') {
        append(actions, [
          el('button.primary', { type: 'button', onclick: function () { approve(it); } }, 'Approve ', el('kbd', 'a')),
          el('button', { type: 'button', onclick: function () { startEdit(it); } }, 'Edit, then approve ', el('kbd', 'e')),
          el('button.danger', { type: 'button', onclick: function () { reject(it); } }, 'Reject ', el('kbd', 'r'))
        ]);
        detail.appendChild(el('section.block.decision', { 'aria-label': 'Decision' }, actions, errSlot));
      } else {
        detail.appendChild(decisionSummary(it));
      }
      var editSlot = el('div.edit-slot');
      detail.appendChild(editSlot);

      // the change against the current record
      var diffBox = el('section.block', { 'aria-labelledby': 'diff-h' }, el('h3', { id: 'diff-h' }, 'Change against the current record'));
      detail.appendChild(diffBox);
      if (it.state === 'pending' && (body.json || r.method === 'DELETE')) {
        var wait = loading('Reading the current record through the gateway…');
        diffBox.appendChild(wait);
        api('GET', 'review/items/' + encodeURIComponent(it.id) + '/diff').then(function (d) {
          if (seq !== detailSeq) return;
          wait.remove();
          renderDiff(diffBox, d, it);
        }, function (err) {
          if (seq !== detailSeq) return;
          wait.remove();
          diffBox.appendChild(errorBox(err));
        });
      } else if (it.state !== 'pending') {
        diffBox.appendChild(el('p.muted', 'Shown for pending items only (the record has changed since).'));
      } else {
        diffBox.appendChild(el('p.muted', 'The body is not JSON; there is nothing to compare field by field.'));
      }

      // the request as it would be sent
      var reqBox = el('section.block', { 'aria-labelledby': 'req-h' },
        el('h3', { id: 'req-h' }, 'Request as it would be sent'),
        el('p.request-line', el('span.method', r.method), ' ', el('code', requestLine(it)), el('span.muted', ' to upstream '), el('strong', it.upstream)),
        r.wire_method && r.wire_method !== r.method ? el('p.muted', 'sent on the wire as ' + r.wire_method) : null,
        r.content_type ? el('p.muted.small', 'Content-Type: ' + r.content_type) : null,
        body.json ? el('pre.code', { tabindex: '0', 'aria-label': 'Request body' }, block(pretty(body.value)))
          : body.text ? el('pre.code', { tabindex: '0', 'aria-label': 'Request body' }, block(body.text)) : el('p.muted', 'No body.'),
        r.headers && r.headers.length ? el('details', el('summary', 'Headers the agent sent (' + r.headers.length + ')'),
          table('Captured request headers', ['Header', 'Value'], r.headers.map(function (h) { return [h[0], h[1]]; }), { hideCaption: true })) : null,
        el('p.muted.small', 'The upstream\'s credentials and Tether\'s provenance headers are added when it is sent.'));
      detail.appendChild(reqBox);

      // what the agent was told
      var syn = it.synthetic || {};
      var synHeaders = Object.keys(syn.headers || {});
      detail.appendChild(el('section.block', { 'aria-labelledby': 'syn-h' },
        el('h3', { id: 'syn-h' }, 'Synthetic response the agent got'),
        el('p', 'Status ', el('strong', String(syn.status)),
          synHeaders.length ? el('span.muted', ' — ' + synHeaders.map(function (k) { return k + ': ' + syn.headers[k]; }).join(', ')) : null),
        syn.body !== null && syn.body !== undefined ? el('pre.code', { tabindex: '0', 'aria-label': 'Synthetic response body' }, block(pretty(syn.body))) : el('p.muted', 'No body.')));

      // the agent's approval record for this capability
      var evBox = el('section.block', { 'aria-labelledby': 'ev-h' }, el('h3', { id: 'ev-h' }, 'This agent\'s record for ' + it.capability));
      detail.appendChild(evBox);
      var evWait = loading('Loading review evidence…');
      evBox.appendChild(evWait);
      api('GET', 'promotions/evidence', { agent: it.agent, capability: it.capability }).then(function (doc) {
        if (seq !== detailSeq) return;
        evWait.remove();
        evBox.appendChild(evidence(doc.evidence, doc.missing));
      }, function (err) {
        if (seq !== detailSeq) return;
        evWait.remove();
        evBox.appendChild(el('p.muted', 'No evidence: ' + err.message));
      });

      function approve(item) {
        actionDialog({
          title: 'Approve and send?',
          body: [el('p', 'This sends ', el('strong', item.request.method + ' ' + requestLine(item)), ' to ', el('strong', item.upstream),
            ' now, as ', el('strong', item.agent), item.on_behalf_of ? ' for ' + item.on_behalf_of : '', '.'),
          field('Note (optional)', el('input', { type: 'text', name: 'note', autocomplete: 'off' }))],
          submit: 'Approve and send',
          onSubmit: function (f) {
            var note = f.elements.note.value.trim();
            return decide(item, 'approve', note ? { note: note } : {});
          }
        });
      }

      function reject(item) {
        var reason = el('textarea', { name: 'reason', rows: '3', required: true, 'aria-describedby': 'action-error' });
        var quick = el('div.quick', el('span.muted', 'Common reasons: '),
          ['Wrong record', 'Wrong value', 'Not needed', 'Needs a human conversation'].map(function (q) {
            return el('button.chip', { type: 'button', onclick: function () { reason.value = q; reason.focus(); } }, q);
          }));
        actionDialog({
          title: 'Reject this item?',
          body: [el('p', 'Nothing is sent. The reason is recorded in the journal and counts against the agent\'s error budget.'),
            field('Reason (required)', reason), quick],
          submit: 'Reject',
          danger: true,
          validate: function (f) { return f.elements.reason.value.trim() ? null : 'A rejection needs a reason.'; },
          onSubmit: function (f) { return decide(item, 'reject', { reason: f.elements.reason.value.trim() }); }
        });
      }

      function decide(item, action, payload) {
        return api('POST', 'review/items/' + encodeURIComponent(item.id) + '/' + action, undefined, payload).then(function (res) {
          done(res);
        }, function (err) {
          if (err.code === 'already_decided') {
            flash('Someone else already decided this item: ' + err.message, 'warn');
            showDetail(item.id);
            load();
            return;
          }
          throw err;
        });
      }

      function done(res) {
        var how = res.decision && res.decision.edited ? 'replayed with your edits' : 'replayed as sent';
        var msg = res.state === 'rejected' ? 'Rejected — nothing was sent.'
          : res.state === 'replayed' ? 'Approved — ' + how + '; the upstream answered ' + (res.replay && res.replay.status) + '.'
            : res.state === 'replay_failed' ? 'Approved, but the upstream refused it (' + ((res.replay && (res.replay.status || res.replay.error)) || 'error') + ').'
              : 'Approved (' + res.state + ').';
        // move on: the next pending item after this one (or the one before), as a reviewer works a queue
        var next = nextPending(res.id);
        flash(msg + (next ? ' Next item.' : ' Nothing left to review.'), res.state === 'replay_failed' ? 'error' : 'ok');
        announce(msg);
        refreshQueueCount();
        if (next && res.state !== 'replay_failed') {
          replaceHash('#/queue/' + encodeURIComponent(next));
          selected = next;
          load().then(function () { detail.focus(); });
          return;
        }
        shown = res;
        renderDetail(res, ++detailSeq);
        load();
        detail.focus();
      }

      function startEdit(item) {
        if (editing) return;
        editing = true;
        actions.hidden = true;
        clear(editSlot);
        var original = bodyOf(item.request);
        var flat = original.json && original.value && typeof original.value === 'object' && !Array.isArray(original.value) &&
          Object.keys(original.value).every(function (k) { var v = original.value[k]; return v === null || typeof v !== 'object'; });
        var box = el('form.block.editor', { 'aria-labelledby': 'edit-h', novalidate: true });
        box.appendChild(el('h3', { id: 'edit-h' }, 'Edit the request body'));
        box.appendChild(el('p.muted', 'Your edited body replaces the agent\'s. It is checked against the capability\'s rules again before it is sent.'));
        var err = el('div.edit-error', { id: 'edit-error' });
        var inputs = {};
        var jsonArea = el('textarea.json', { rows: '10', spellcheck: 'false', 'aria-describedby': 'edit-error', id: 'edit-json' });
        var mode = flat ? 'form' : 'json';
        var formRows = el('div.edit-fields');
        if (flat) {
          Object.keys(original.value).forEach(function (k) {
            var v = original.value[k];
            var input = el('input', { type: 'text', name: k, 'data-kind': v === null ? 'null' : typeof v,
              value: v === null ? '' : String(v), 'aria-describedby': 'edit-error', autocomplete: 'off' });
            inputs[k] = input;
            formRows.appendChild(field(k, input, v === null ? 'empty means null' : typeof v === 'string' ? null : typeof v));
          });
          box.appendChild(formRows);
        }
        jsonArea.value = original.json ? pretty(original.value) : (original.text || '');
        var jsonField = field('Body (' + (original.json ? 'JSON' : 'text') + ')', jsonArea);
        jsonField.hidden = flat;
        box.appendChild(jsonField);
        box.appendChild(err);
        var toggle = flat ? el('button.linklike', { type: 'button', onclick: function () {
          if (mode === 'form') { jsonArea.value = pretty(fromForm()); mode = 'json'; formRows.hidden = true; jsonField.hidden = false; toggle.textContent = 'Edit as fields'; jsonArea.focus(); }
          else { mode = 'form'; formRows.hidden = false; jsonField.hidden = true; toggle.textContent = 'Edit as JSON'; var first = formRows.querySelector('input'); if (first) first.focus(); }
        } }, 'Edit as JSON') : null;
        box.appendChild(el('div.buttons', el('button.primary', { type: 'submit' }, 'Approve with edits'),
          el('button', { type: 'button', onclick: cancel }, 'Cancel'), toggle));
        editSlot.appendChild(box);

        function fromForm() {
          var out = {};
          Object.keys(inputs).forEach(function (k) {
            var input = inputs[k];
            var kind = input.getAttribute('data-kind');
            var raw = input.value;
            if (kind === 'number' && raw.trim() !== '' && !isNaN(Number(raw))) out[k] = Number(raw);
            else if (kind === 'boolean' && (raw === 'true' || raw === 'false')) out[k] = raw === 'true';
            else if (kind === 'null' && raw === '') out[k] = null;
            else out[k] = raw;
          });
          return out;
        }

        function cancel() {
          editing = false;
          actions.hidden = false;
          clear(editSlot);
          var again = actions.querySelector('button');
          if (again) again.focus(); else detail.focus();
        }

        function markInvalid(fieldName) {
          Object.keys(inputs).forEach(function (k) { inputs[k].removeAttribute('aria-invalid'); });
          jsonArea.removeAttribute('aria-invalid');
          var target = mode === 'form' && fieldName && inputs[fieldName.split('.')[0]] ? inputs[fieldName.split('.')[0]] : (mode === 'json' ? jsonArea : null);
          if (target) { target.setAttribute('aria-invalid', 'true'); target.focus(); }
        }

        box.addEventListener('keydown', function (ev) { if (ev.key === 'Escape') { ev.preventDefault(); cancel(); } });
        box.addEventListener('submit', function (ev) {
          ev.preventDefault();
          clear(err);
          var edit;
          if (mode === 'form') edit = fromForm();
          else if (original.json) {
            try { edit = JSON.parse(jsonArea.value); } catch (e) {
              err.appendChild(el('div.error-box', { role: 'alert' }, el('strong', 'not valid JSON'), ': ' + e.message));
              markInvalid(null);
              return;
            }
          } else edit = jsonArea.value;
          var submitBtn = box.querySelector('button[type=submit]');
          submitBtn.disabled = true;
          api('POST', 'review/items/' + encodeURIComponent(item.id) + '/approve', undefined, { edit: edit, note: 'edited in the console' }).then(function (res) {
            editing = false;
            done(res);
          }, function (e) {
            submitBtn.disabled = false;
            if (e.code === 'already_decided') { editing = false; flash('Someone else already decided this item.', 'warn'); showDetail(item.id); return; }
            err.appendChild(errorBox(e));
            markInvalid(e.details && e.details.field);
          });
        });
        var first = flat ? formRows.querySelector('input') : jsonArea;
        if (first) first.focus();
        box.scrollIntoView({ block: 'nearest' });
      }

      ctl.approve = function () { if (it.state === 'pending' && !editing) approve(it); };
      ctl.reject = function () { if (it.state === 'pending' && !editing) reject(it); };
      ctl.edit = function () { if (it.state === 'pending') startEdit(it); };
    }

    function renderDiff(box, d, it) {
      if (d.error) box.appendChild(el('p.warn-text', 'Could not read the current record: ' + d.error));
      if (d.operation === 'update' && d.fields.length) {
        var changed = d.fields.filter(function (f) { return f.changed; }).length;
        box.appendChild(el('p', changed + ' of ' + d.fields.length + ' field' + (d.fields.length === 1 ? '' : 's') + ' would change.'));
        box.appendChild(table('Field by field: current value and proposed value', ['Field', 'Current', 'Proposed', 'Change'],
          d.fields.map(function (f) {
            return el('tr' + (f.changed ? '.changed' : ''), el('th', { scope: 'row' }, el('code', f.field)),
              el('td', value(f.current)), el('td', value(f.proposed)), el('td', f.changed ? el('strong', 'changes') : el('span.muted', 'same')));
          }), { cls: 'diff' }));
      } else if (d.fields.length) {
        box.appendChild(el('p', d.operation === 'create' || it.request.method === 'POST' ? 'A new record with these fields:' : 'Fields to be written:'));
        box.appendChild(table('Fields to be written', ['Field', 'Value'], d.fields.map(function (f) {
          return el('tr', el('th', { scope: 'row' }, el('code', f.field)), el('td', value(f.proposed)));
        }), { cls: 'diff', hideCaption: true }));
      } else if (it.request.method === 'DELETE') {
        box.appendChild(el('p', 'This would delete the record at ', el('code', it.request.path), '.'));
      } else if (!d.error) {
        box.appendChild(el('p.muted', 'No field-by-field comparison for this operation.'));
      }
      if (d.current) {
        box.appendChild(el('details', el('summary', 'The whole current record'), el('pre.code', block(pretty(d.current)))));
      }
    }

    function decisionSummary(it) {
      var dcs = it.decision || {};
      var rep = it.replay || null;
      var s = el('section.block.decision', { 'aria-label': 'Decision' });
      s.appendChild(el('h3', 'Decision'));
      s.appendChild(dl([
        ['State', badge(it.state)],
        ['Decided by', dcs.by || (dcs.action === 'expire' ? 'expired' : null)],
        ['At', stamp(dcs.at)],
        dcs.reason ? ['Reason', dcs.reason] : null,
        dcs.note ? ['Note', dcs.note] : null,
        dcs.action === 'approve' ? ['Edited', dcs.edited ? 'yes' : 'no'] : null,
        rep ? ['Upstream answered', rep.status ? String(rep.status) : (rep.error || '—') + (rep.message ? ': ' + rep.message : '')] : null,
        rep && rep.request_id ? ['Replay request', el('a', { href: '#/journal/' + rep.intent_seq }, 'journal record #' + rep.intent_seq)] : null
      ]));
      if (dcs.edit_body !== undefined) s.appendChild(el('details', el('summary', 'Body as edited'), el('pre.code', block(pretty(dcs.edit_body)))));
      if (rep && rep.body !== undefined && rep.body !== null && rep.body !== '') s.appendChild(el('details', el('summary', 'Upstream response body'), el('pre.code', block(pretty(rep.body)))));
      return s;
    }

    function move(delta) {
      if (!items.length) return;
      var idx = -1;
      items.forEach(function (i, n) { if (i.id === selected) idx = n; });
      var next = idx < 0 ? (delta > 0 ? 0 : items.length - 1) : Math.max(0, Math.min(items.length - 1, idx + delta));
      if (idx < 0 && lastIndex >= 0) next = Math.max(0, Math.min(items.length - 1, lastIndex + (delta > 0 ? 0 : -1)));
      var id = items[next].id;
      // select now (not on the hashchange that would follow) so that quick j j j moves three items
      replaceHash('#/queue/' + encodeURIComponent(id));
      ctl.select(id);
      var a = listBox.querySelector('a[data-id="' + cssEscape(id) + '"]');
      if (a) a.focus();
    }

    var ctl = {
      refresh: function () { load(false); },
      select: function (id) {
        if (id === selected && shown && shown.id === id) return;
        items.forEach(function (i, n) { if (i.id === selected) lastIndex = n; });
        selected = id;
        Array.prototype.forEach.call(listBox.querySelectorAll('a.item-link'), function (a) {
          if (a.getAttribute('data-id') === id) a.setAttribute('aria-current', 'true'); else a.removeAttribute('aria-current');
        });
        if (id) showDetail(id); else { shown = null; renderEmptyDetail(); }
      },
      key: function (ev) {
        if (ev.key === 'j') { move(1); return true; }
        if (ev.key === 'k') { move(-1); return true; }
        if (ev.key === 'a' && ctl.approve) { ctl.approve(); return true; }
        if (ev.key === 'r' && ctl.reject) { ctl.reject(); return true; }
        if (ev.key === 'e' && ctl.edit) { ctl.edit(); return true; }
        if (ev.key === '/') { var s = form.querySelector('select, input'); if (s) s.focus(); return true; }
        return false;
      }
    };
    load(true);
    if (!selected) renderEmptyDetail();
    return ctl;
  };

  function evidence(ev, missing) {
    var gate = ev.gate || {};
    var box = el('div.evidence');
    box.appendChild(dl([
      ['Reviewed', ev.reviewed + ' (needs ' + gate.min_reviewed + ' to promote)'],
      ['Approved', ev.approved + (ev.edited ? ' (' + ev.edited + ' with edits)' : '')],
      ['Rejected', String(ev.rejected)],
      ['Approval rate', (ev.reviewed ? pct(ev.approval_rate) : 'none yet') + ' (gate ' + pct(gate.min_approval_rate) + ')'],
      ['Edit share', (ev.approved ? pct(ev.edit_share) : 'none yet') + ' (at most ' + pct(gate.max_edit_share) + ')'],
      ['Replay failures', String(ev.replay_failed)],
      ['Pending · expired', ev.pending + ' · ' + ev.expired],
      ['Window', ev.window_days + ' days']
    ]));
    if (missing && missing.length) {
      box.appendChild(el('p.muted', 'Not yet eligible for promotion to live:'));
      box.appendChild(el('ul.missing', missing.map(function (m) { return el('li', m); })));
    } else {
      box.appendChild(el('p.ok-text', 'Meets the promotion gate.'));
    }
    return box;
  }

  function cssEscape(s) {
    return window.CSS && CSS.escape ? CSS.escape(s) : String(s).replace(/["\\]/g, '\\$&');
  }

  // ------------------------------------------------------------------------------------------ journal

  var journalFilters = { q: '', agent: '', user: '', capability: '', decision: '', kind: '', request_id: '', since: '', until: '' };

  screens.journal = function (root, seqArg) {
    if (seqArg) return journalRecord(root, seqArg);
    setTitle('Journal');
    var records = [];
    var next = null;
    var chain = el('div.chain', { role: 'status' });
    var form = el('form.filters', { 'aria-label': 'Search and filter the journal', role: 'search' });
    var body = el('div');
    var more = el('button', { type: 'button', hidden: true, onclick: function () { load(next); } }, 'Load older records');
    root.appendChild(el('div.screen-head', el('h1', 'Journal'), el('p.muted', 'Every decision, request and outcome, newest first. The records are hash-chained; the chain is verified below.')));
    root.appendChild(chain);
    root.appendChild(form);
    root.appendChild(body);
    root.appendChild(el('p', more));

    var f = journalFilters;
    append(form, [
      field('Search', el('input', { type: 'search', name: 'q', value: f.q, placeholder: 'intent, path, reason, ids', size: '24' })),
      field('Agent', el('input', { type: 'text', name: 'agent', value: f.agent, size: '12' })),
      field('On behalf of', el('input', { type: 'text', name: 'user', value: f.user, size: '12' })),
      field('Capability', el('input', { type: 'text', name: 'capability', value: f.capability, size: '14' })),
      field('Decision', select('decision', [['', 'any'], 'live', 'dry_run', 'canary', 'denied', 'replay', 'approved', 'rejected', 'expired',
        'quarantined', 'released', 'promoted', 'rolled_back', 'needs_attention'], f.decision)),
      field('Kind', select('kind', [['', 'any'], 'request', 'outcome', 'review', 'tx', 'governance', 'system'], f.kind)),
      field('Since', el('input', { type: 'text', name: 'since', value: f.since, size: '16', placeholder: '2h or 2026-11-25' })),
      field('Until', el('input', { type: 'text', name: 'until', value: f.until, size: '16', placeholder: '10m' })),
      field('Request id', el('input', { type: 'text', name: 'request_id', value: f.request_id, size: '12' })),
      el('div.field.actions', el('button', { type: 'submit' }, 'Search'),
        el('button', { type: 'button', onclick: function () { Array.prototype.forEach.call(form.elements, function (e) { if (e.name) e.value = ''; }); journalFilters = formValues(form); load(null); } }, 'Clear'))
    ]);
    form.addEventListener('submit', function (ev) { ev.preventDefault(); journalFilters = formValues(form); load(null); });

    function verify() {
      clear(chain).appendChild(el('span', 'Verifying the hash chain…'));
      api('GET', 'journal/verify').then(function (v) {
        clear(chain);
        chain.className = 'chain ' + (v.ok ? 'ok' : 'broken');
        if (v.ok) {
          chain.appendChild(el('span', el('strong', 'Chain intact'), ' — ' + v.checked + ' records verified' +
            (v.first_seq !== null ? ' (#' + v.first_seq + ' to #' + v.last_seq + ')' : '') + '.'));
        } else {
          chain.appendChild(el('span', el('strong', 'Chain broken'), ' at record #' + v.broken_seq + ': ' + v.problem +
            ' (' + v.checked + ' checked).'));
        }
        chain.appendChild(el('button.linklike', { type: 'button', onclick: verify }, 'Verify again'));
      }, function (err) { clear(chain).appendChild(errorBox(err)); });
    }

    function params(before) {
      var p = {}; Object.keys(journalFilters).forEach(function (k) { p[k] = journalFilters[k]; });
      p.limit = 100;
      if (before) p.before_seq = before;
      return p;
    }

    var listSeq = 0;
    function load(before) {
      if (!before) { clear(body).appendChild(loading('Loading records…')); }
      var my = ++listSeq;
      return api('GET', 'journal', params(before)).then(function (doc) {
        if (my !== listSeq) return;
        records = before ? records.concat(doc.records) : doc.records;
        next = doc.next_before_seq;
        more.hidden = !next || !doc.more;  // a search that read its share of the journal says there is more
        render();
      }, function (err) { clear(body).appendChild(errorBox(err)); });
    }

    function render() {
      clear(body);
      if (!records.length) { body.appendChild(el('p.empty', 'No records match.')); return; }
      body.appendChild(table('Journal records, newest first', ['#', 'Time', 'Kind', 'Agent', 'On behalf of', 'Capability / action', 'Decision', 'Result', 'Intent'],
        records.map(function (r) {
          return el('tr' + (r.decision === 'denied' ? '.denied' : ''),
            el('td', el('a', { href: '#/journal/' + r.seq, 'aria-label': 'Record ' + r.seq }, '#' + r.seq)),
            el('td.nowrap', when(r.ts)),
            el('td', r.kind),
            el('td', r.agent || ''),
            el('td', r.on_behalf_of || ''),
            el('td', r.capability ? el('div', r.capability) : null, r.method ? el('div.small.muted', r.method + ' ' + (r.path || '')) : (r.event ? el('div.small.muted', r.event) : null)),
            el('td', r.decision ? badge(r.decision) : ''),
            el('td', r.status ? String(r.status) : '', r.reason ? el('div.small', r.reason) : null, r.reviewer ? el('div.small.muted', 'by ' + r.reviewer) : null),
            el('td.intent-cell', r.intent || ''));
        }), { cls: 'journal', hideCaption: true }));
    }

    function refresh() {
      // new records arrive on top: fetch the first page and put what is new in front
      var my = listSeq;
      api('GET', 'journal', params(null)).then(function (doc) {
        if (my !== listSeq) return;  // the filters changed meanwhile
        var top = records.length ? records[0].seq : 0;
        var fresh = doc.records.filter(function (r) { return r.seq > top; });
        if (!fresh.length) return;
        records = fresh.concat(records);
        render();
        announce(fresh.length + ' new journal record' + (fresh.length > 1 ? 's' : ''));
      }, function () {});
    }

    verify();
    load(null);
    var rows = 0;
    return {
      refresh: refresh,
      key: function (ev) {
        if (ev.key === '/') { form.elements.q.focus(); return true; }
        if (ev.key === 'j' || ev.key === 'k') { rows = focusRow(body, ev.key === 'j' ? 1 : -1); return true; }
        return false;
      }
    };
  };

  function focusRow(container, delta) {
    var links = Array.prototype.slice.call(container.querySelectorAll('tbody tr td:first-child a'));
    if (!links.length) return 0;
    var idx = links.indexOf(document.activeElement);
    var next = idx < 0 ? 0 : Math.max(0, Math.min(links.length - 1, idx + delta));
    links[next].focus();
    return next;
  }

  function journalRecord(root, seq) {
    setTitle('Journal record #' + seq);
    root.appendChild(el('p', el('a', { href: '#/journal' }, '← Back to the journal')));
    var body = el('div');
    root.appendChild(body);
    body.appendChild(loading('Loading record…'));
    api('GET', 'journal/' + encodeURIComponent(seq)).then(function (doc) {
      clear(body);
      var r = doc.record;
      body.appendChild(el('h1', 'Record #' + r.seq + ' ', badge(r.decision || r.kind)));
      if (doc.integrity && !doc.integrity.ok) {
        body.appendChild(el('div.tamper', { role: 'alert' },
          el('strong', 'This record does not verify: do not trust what it says.'),
          el('ul', doc.integrity.problems.map(function (p) { return el('li', p); })),
          el('p.small', 'Run ', el('code', 'tether journal verify'), ' and compare with your checkpoints or archives.')));
      }
      body.appendChild(el('section.block', { 'aria-labelledby': 'rec-h' }, el('h2', { id: 'rec-h' }, 'What happened'), dl([
        ['Time', stamp(r.ts)],
        ['Kind', r.kind + (r.event ? ' — ' + r.event : '')],
        ['Agent', r.agent],
        ['On behalf of', r.on_behalf_of],
        ['Person', proofText(r.on_behalf_of_proof)],
        ['Intent', r.intent],
        ['Capability', r.capability],
        ['Action', r.method ? el('code', r.method + ' ' + (r.path || '') + (r.query ? '?' + r.query : '')) : null],
        ['Upstream', r.upstream],
        ['Decision', r.decision ? badge(r.decision) : null],
        ['Reason', r.reason],
        ['Status', r.status !== undefined && r.status !== null ? String(r.status) : null],
        ['Reviewer', r.reviewer],
        ['Review item', r.review_item ? el('a', { href: '#/queue/' + encodeURIComponent(r.review_item) }, r.review_item) : null],
        ['Transaction', r.tx ? el('a', { href: '#/transactions/' + encodeURIComponent(r.tx) }, r.tx) : null],
        ['Request id', r.request_id ? el('code', r.request_id) : null],
        ['Hash', el('code.hash', r.hash)],
        ['Previous hash', el('code.hash', r.prev_hash)]
      ], true)));
      body.appendChild(el('details.block', el('summary', 'The full record (JSON)'), el('pre.code', block(pretty(r)))));

      if (doc.related && doc.related.length > 1) {
        body.appendChild(el('section.block', { 'aria-labelledby': 'rel-h' }, el('h2', { id: 'rel-h' }, 'The same request'),
          table('Records of the same request', ['#', 'Time', 'Kind', 'Decision', 'Result'], doc.related.map(function (x) {
            return el('tr' + (x.seq === r.seq ? '.current' : ''),
              el('td', x.seq === r.seq ? el('strong', '#' + x.seq + ' (this)') : el('a', { href: '#/journal/' + x.seq }, '#' + x.seq)),
              el('td', stamp(x.ts)), el('td', x.kind + (x.event ? ' — ' + x.event : '')), el('td', x.decision ? badge(x.decision) : ''),
              el('td', x.status ? String(x.status) : '', x.reason ? ' ' + x.reason : '', x.reviewer ? ' (by ' + x.reviewer + ')' : ''));
          }), { hideCaption: true })));
      }
      if (doc.review_item) {
        var it = doc.review_item;
        var dcs = it.decision || {};
        body.appendChild(el('section.block', { 'aria-labelledby': 'ri-h' }, el('h2', { id: 'ri-h' }, 'Review item'), dl([
          ['Item', el('a', { href: '#/queue/' + encodeURIComponent(it.id) }, it.id)],
          ['State', badge(it.state)],
          ['Request', el('code', it.request.method + ' ' + it.request.path)],
          ['Decided by', dcs.by], ['Reason', dcs.reason], ['Note', dcs.note],
          ['Upstream answered', it.replay && it.replay.status ? String(it.replay.status) : null]
        ], true)));
      }
      if (doc.transaction) body.appendChild(txSummary(doc.transaction));
      var h = body.querySelector('h1');
      h.setAttribute('tabindex', '-1');
      h.focus();
    }, function (err) { clear(body).appendChild(errorBox(err)); });
    return {};
  }

  function txSummary(tx) {
    return el('section.block', { 'aria-labelledby': 'tx-h' }, el('h2', { id: 'tx-h' }, 'Transaction'), dl([
      ['Transaction', el('a', { href: '#/transactions/' + encodeURIComponent(tx.id) }, tx.id)],
      ['State', badge(tx.state)],
      ['Steps', (tx.steps || []).length + ' (' + (tx.remaining_steps || []).length + ' not yet undone)'],
      ['Problem', tx.problem]
    ]));
  }

  // ------------------------------------------------------------------------------------------ transactions

  var txFilter = 'recent';

  screens.transactions = function (root, selectedId) {
    setTitle('Transactions');
    var txs = [];
    var selected = selectedId;
    var seq = 0;
    var form = el('form.filters', { 'aria-label': 'Filter transactions' });
    var listBox = el('div.list-pane', { 'aria-label': 'Transactions' });
    var detail = el('section.detail-pane', { 'aria-label': 'Transaction', tabindex: '-1' });
    root.appendChild(el('div.screen-head', el('h1', 'Transactions'), el('p.muted', 'Workflows the agents tied together. A rollback undoes their live writes newest first; a step that cannot be undone leaves the transaction needing attention.')));
    root.appendChild(form);
    var split = el('div.split', listBox, detail);
    root.appendChild(split);
    form.appendChild(field('Show', select('state', [['recent', 'open, needing attention, recent rollbacks'], ['needs_attention', 'needs attention'], ['open', 'open'],
      ['rolling_back', 'rolling back'], ['rolled_back', 'rolled back'], ['committed', 'committed'], ['', 'all']], txFilter)));
    form.addEventListener('change', function () { txFilter = form.elements.state.value; load(); });
    form.addEventListener('submit', function (ev) { ev.preventDefault(); });

    var listSeq = 0;
    function load() {
      // the default view: what needs a human, what is running, and the last rollbacks (what just happened)
      var calls = txFilter === 'recent' ? [['needs_attention', 200], ['rolling_back', 200], ['open', 200], ['rolled_back', 20]]
        : [[txFilter, 200]];
      var my = ++listSeq;
      return Promise.all(calls.map(function (c) { return api('GET', 'transactions', { state: c[0], limit: c[1] }); })).then(function (docs) {
        if (my !== listSeq) return;
        txs = [].concat.apply([], docs.map(function (d) { return d.transactions; }));
        renderList();
        if (selected && !detail.querySelector('.tx-detail')) showDetail(selected);
      }, function (err) { clear(listBox).appendChild(errorBox(err)); });
    }

    function renderList() {
      var hadFocus = listBox.contains(document.activeElement) ? document.activeElement.getAttribute('data-id') : null;
      clear(listBox);
      listBox.appendChild(el('p.list-count', txs.length + ' transaction' + (txs.length === 1 ? '' : 's')));
      if (!txs.length) {
        listBox.appendChild(el('p.empty', txFilter === 'recent' ? 'No open transaction, none needing attention and no recent rollback.' : 'No transaction in this state.'));
        return;
      }
      var ul = el('ul.items');
      txs.forEach(function (tx) {
        ul.appendChild(el('li', el('a.item-link', { href: '#/transactions/' + encodeURIComponent(tx.id), 'data-id': tx.id, 'aria-current': tx.id === selected ? 'true' : null },
          el('span.item-top', el('span.cap', tx.name || tx.id), badge(tx.state)),
          el('span.item-who', tx.agent, tx.on_behalf_of ? el('span.muted', ' for ' + tx.on_behalf_of) : null),
          el('span.item-req', 'opened ', when(tx.created_at), tx.problem ? el('span.warn-text', ' — ' + tx.problem) : null))));
      });
      listBox.appendChild(ul);
      if (hadFocus) { var a = listBox.querySelector('a[data-id="' + cssEscape(hadFocus) + '"]'); if (a) a.focus(); }
    }

    function showDetail(id) {
      var my = ++seq;
      clear(detail);
      split.classList.toggle('showing-detail', !!id);
      if (!id) { detail.appendChild(el('div.placeholder', el('p', 'Select a transaction to see its steps.'))); return; }
      detail.appendChild(loading('Loading transaction…'));
      api('GET', 'transactions/' + encodeURIComponent(id)).then(function (tx) {
        if (my !== seq) return;
        renderDetail(tx);
      }, function (err) { if (my === seq) clear(detail).appendChild(errorBox(err)); });
    }

    function renderDetail(tx) {
      clear(detail);
      var wrap = el('div.tx-detail');
      detail.appendChild(el('p.back', el('a.back-link', { href: '#/transactions' }, '← All transactions')));
      detail.appendChild(wrap);
      wrap.appendChild(el('div.detail-head', el('h2', { id: 'tx-title' }, tx.name || tx.id, ' ', badge(tx.state)), el('p.muted.small', 'Transaction ', el('code', tx.id))));
      detail.setAttribute('aria-labelledby', 'tx-title');
      wrap.appendChild(dl([
        ['Agent', tx.agent], ['On behalf of', tx.on_behalf_of], ['Opened', stamp(tx.created_at)],
        tx.state === 'open' ? ['Deadline', when(tx.deadline)] : null,
        ['Rollback reason', tx.rollback_reason], ['Problem', tx.problem ? el('strong.warn-text', tx.problem) : null]
      ]));
      var hasConflict = (tx.steps || []).some(function (s) { return s.state === 'conflict'; });
      if (tx.state === 'needs_attention') {
        wrap.appendChild(el('div.decide', el('button.primary', { type: 'button', onclick: function () { confirmTx(tx, 'retry', hasConflict); } }, 'Retry the rollback…')));
      } else if (tx.state === 'open') {
        wrap.appendChild(el('div.decide', el('button.danger', { type: 'button', onclick: function () { confirmTx(tx, 'rollback', hasConflict); } }, 'Roll back…')));
      }
      var steps = (tx.steps || []).slice().sort(function (a, b) { return (b.order || b.id) - (a.order || a.id); });
      wrap.appendChild(el('h3', 'Steps (newest first, the order they are undone in)'));
      if (!steps.length) wrap.appendChild(el('p.muted', 'No live writes recorded.'));
      else {
        // one card per step, in words: what was written, how it is undone, where it stands
        wrap.appendChild(el('ol.steps', steps.map(function (s) {
          var plan = s.plan || {};
          var req = plan.request;
          var remaining = tx.remaining_steps && tx.remaining_steps.indexOf(s.id) >= 0;
          return el('li.step' + (remaining ? '.remaining' : ''), { 'data-step': String(s.id) },
            el('div.step-head', el('span.step-no', '#' + (s.order || s.id)), ' ', el('strong', s.capability || '—'), ' ', badge(s.state),
              remaining ? el('span.small.warn-text', ' not undone yet') : null),
            el('div.step-write', el('span.method', s.method), ' ', el('code', s.path)),
            s.intent ? el('div.small.muted', 'because: ' + s.intent) : null,
            el('div.step-undo', el('span.muted', 'Undo: '), req ? [el('span.method', req.method), ' ', el('code', req.path)] : (plan.kind || s.reason || 'nothing to undo'),
              plan.note ? el('span.muted', ' — ' + plan.note) : null),
            req && req.body && typeof req.body === 'object' && !Array.isArray(req.body) ? el('ul.undo-fields', Object.keys(req.body).slice(0, 12).map(function (k) {
              return el('li', el('code', k), ' → ', value(req.body[k]));
            })) : null,
            (s.attempts || s.last_error) ? el('div.small', (s.attempts || 0) + ' attempt' + (s.attempts === 1 ? '' : 's'),
              s.last_error ? el('span.warn-text', ' — ' + s.last_error) : null) : null);
        })));
      }
      wrap.appendChild(el('details.block', el('summary', 'The whole transaction (JSON)'), el('pre.code', block(pretty(tx)))));
    }

    function confirmTx(tx, action, hasConflict) {
      var body = [el('p', action === 'retry'
        ? 'Run the remaining undo steps of ' + tx.id + ' again, newest first.'
        : 'Undo every live write of ' + tx.id + ' that is not undone yet, newest first. This changes records in the upstream systems.')];
      if (hasConflict) {
        body.push(el('fieldset', el('legend', 'Steps in conflict (the record changed after the agent\'s write)'),
          el('label.radio', el('input', { type: 'radio', name: 'resolve', value: '', checked: true }), ' Leave them for a human (stop at the first)'),
          el('label.radio', el('input', { type: 'radio', name: 'resolve', value: 'skip' }), ' Skip them (keep the newer change)'),
          el('label.radio', el('input', { type: 'radio', name: 'resolve', value: 'overwrite' }), ' Overwrite the newer change')));
      }
      actionDialog({
        title: action === 'retry' ? 'Retry the rollback?' : 'Roll back this transaction?',
        body: body,
        submit: action === 'retry' ? 'Retry rollback' : 'Roll back',
        danger: action === 'rollback',
        onSubmit: function (f) {
          var resolve = f.elements.resolve ? (f.querySelector('input[name=resolve]:checked') || {}).value : '';
          var payload = resolve ? { resolve_conflicts: resolve } : {};
          return api('POST', 'transactions/' + encodeURIComponent(tx.id) + '/' + action, undefined, payload).then(function (res) {
            var msg = 'Transaction ' + res.id + ' is now ' + res.state.replace(/_/g, ' ') + (res.problem ? ': ' + res.problem : '') + '.';
            flash(msg, res.state === 'rolled_back' ? 'ok' : 'warn');
            announce(msg);
            renderDetail(res);
            load();
          });
        }
      });
    }

    load();
    showDetail(selected);
    var txCtl = {
      refresh: function () { load().then(function () { if (selected && !dialogOpen()) showDetailQuiet(selected); }); },
      select: function (id) {
        selected = id;
        Array.prototype.forEach.call(listBox.querySelectorAll('a.item-link'), function (a) {
          if (a.getAttribute('data-id') === id) a.setAttribute('aria-current', 'true'); else a.removeAttribute('aria-current');
        });
        showDetail(id);
      },
      key: function (ev) {
        if (ev.key === 'j' || ev.key === 'k') {
          if (!txs.length) return true;
          var idx = -1; txs.forEach(function (t, n) { if (t.id === selected) idx = n; });
          var next = idx < 0 ? 0 : Math.max(0, Math.min(txs.length - 1, idx + (ev.key === 'j' ? 1 : -1)));
          replaceHash('#/transactions/' + encodeURIComponent(txs[next].id));
          txCtl.select(txs[next].id);
          var a = listBox.querySelector('a[data-id="' + cssEscape(txs[next].id) + '"]');
          if (a) a.focus();
          return true;
        }
        if (ev.key === '/') { form.elements.state.focus(); return true; }
        return false;
      }
    };
    return txCtl;

    function showDetailQuiet(id) {
      var my = ++seq;
      api('GET', 'transactions/' + encodeURIComponent(id)).then(function (tx) { if (my === seq) renderDetail(tx); }, function () {});
    }
  };


  // ------------------------------------------------------------------------------------------ charts

  var SVG_NS = 'http://www.w3.org/2000/svg';
  var chartSeq = 0;

  function svgEl(tag, attrs, text) {
    var n = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) { if (attrs[k] !== null && attrs[k] !== undefined) n.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) n.textContent = inert(text);
    return n;
  }

  function shortTime(t, span) {
    var d = new Date(t * 1000);
    if (span > 2 * 86400) return d.toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
    return ('0' + d.getHours()).slice(-2) + ':' + ('0' + d.getMinutes()).slice(-2);
  }

  /**
   * A small SVG chart drawn from numbers (no library): bars and/or lines over the buckets of /api/stats,
   * an optional dashed threshold (the error budget, the promotion gate) and markers (quarantines).
   * opts: {title, summary, stats, bars: [{values, cls, label}], lines: [{values, cls, label}], max,
   *        percent, threshold: {value, label}, markers: [{t, label, cls}], empty}
   */
  function chart(opts) {
    var W = 320, H = 150, L = 34, R = 8, T = 10, B = 22;
    var id = 'chart-' + (++chartSeq);
    var fig = el('figure.chart' + (opts.cls ? '.' + opts.cls : ''), { 'data-chart': opts.key || '' });
    fig.appendChild(el('figcaption', opts.title));
    var svg = svgEl('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-labelledby': id + '-t ' + id + '-d',
      focusable: 'false' });
    svg.appendChild(svgEl('title', { id: id + '-t' }, opts.title));
    svg.appendChild(svgEl('desc', { id: id + '-d' }, opts.summary || ''));
    var st = opts.stats;
    var n = st.buckets.length;
    var all = [];
    (opts.bars || []).forEach(function (b) { all = all.concat(b.values); });
    (opts.lines || []).forEach(function (l) { all = all.concat(l.values.filter(function (v) { return v !== null; })); });
    var max = opts.max !== undefined ? opts.max : Math.max.apply(null, [1].concat(all));
    if (opts.threshold && opts.threshold.value > max) max = opts.threshold.value * 1.1;
    var x = function (i) { return L + (W - L - R) * i / n; };
    var y = function (v) { return T + (H - T - B) * (1 - Math.min(v, max) / max); };
    var fmt = function (v) { return opts.percent ? Math.round(v * 100) + '%' : String(Math.round(v * 10) / 10); };
    svg.appendChild(svgEl('line', { x1: L, x2: W - R, y1: y(0), y2: y(0), 'class': 'axis' }));
    svg.appendChild(svgEl('line', { x1: L, x2: L, y1: T, y2: y(0), 'class': 'axis' }));
    svg.appendChild(svgEl('text', { x: L - 4, y: T + 8, 'text-anchor': 'end', 'class': 'tick' }, fmt(max)));
    svg.appendChild(svgEl('text', { x: L - 4, y: y(0), 'text-anchor': 'end', 'class': 'tick' }, fmt(0)));
    svg.appendChild(svgEl('text', { x: L, y: H - 6, 'class': 'tick' }, shortTime(st.buckets[0], st.until - st.since)));
    svg.appendChild(svgEl('text', { x: W - R, y: H - 6, 'text-anchor': 'end', 'class': 'tick' }, 'now'));
    var stacks = new Array(n).fill(0);
    (opts.bars || []).forEach(function (b) {
      var g = svgEl('g', { 'class': 'bars ' + (b.cls || '') });
      b.values.forEach(function (v, i) {
        if (!v) return;
        var bw = Math.max(1, (W - L - R) / n - 1);
        var top = y(stacks[i] + v);
        var r = svgEl('rect', { x: x(i) + 0.5, y: top, width: bw, height: Math.max(0.5, y(stacks[i]) - top) });
        r.appendChild(svgEl('title', {}, (b.label || '') + ': ' + fmt(v) + ' at ' + shortTime(st.buckets[i], st.until - st.since)));
        g.appendChild(r);
        stacks[i] += v;
      });
      svg.appendChild(g);
    });
    (opts.lines || []).forEach(function (l) {
      var pts = [];
      l.values.forEach(function (v, i) { if (v !== null && v !== undefined) pts.push((x(i) + (W - L - R) / n / 2).toFixed(1) + ',' + y(v).toFixed(1)); });
      if (pts.length) svg.appendChild(svgEl('polyline', { points: pts.join(' '), 'class': 'line ' + (l.cls || '') }));
      if (pts.length === 1) {
        var xy = pts[0].split(',');
        svg.appendChild(svgEl('circle', { cx: xy[0], cy: xy[1], r: 2.5, 'class': 'dot ' + (l.cls || '') }));
      }
    });
    if (opts.threshold && opts.threshold.value !== null && opts.threshold.value !== undefined) {
      var ty = y(opts.threshold.value);
      svg.appendChild(svgEl('line', { x1: L, x2: W - R, y1: ty, y2: ty, 'class': 'threshold' }));
      svg.appendChild(svgEl('text', { x: W - R - 2, y: ty - 3, 'text-anchor': 'end', 'class': 'tick threshold-label' },
        opts.threshold.label + ' ' + fmt(opts.threshold.value)));
    }
    (opts.markers || []).forEach(function (m) {
      var i = Math.min(n - 1, Math.max(0, Math.floor((m.t - st.since) / st.bucket_seconds)));
      var mx = x(i) + (W - L - R) / n / 2;
      var g = svgEl('g', { 'class': 'marker ' + (m.cls || '') });
      g.appendChild(svgEl('line', { x1: mx, x2: mx, y1: T, y2: y(0) }));
      g.appendChild(svgEl('title', {}, m.label));
      svg.appendChild(g);
    });
    fig.appendChild(svg);
    if (opts.legend) fig.appendChild(el('p.legend.small', opts.legend));
    if (opts.empty) fig.appendChild(el('p.chart-empty.small.muted', opts.empty));
    return fig;
  }

  function sum(v) { return v.reduce(function (a, b) { return a + (b || 0); }, 0); }

  function agentCharts(name, row, st) {
    var span = st.until - st.since;
    var rangeText = span > 2 * 86400 ? Math.round(span / 86400) + ' days' : Math.round(span / 3600) + ' hours';
    var box = el('div.charts', { 'aria-label': 'Charts for ' + name });
    var q = row.quarantines || [];
    var markers = q.map(function (m) { return { t: m.at, cls: m.event, label: (m.event === 'quarantined' ? 'quarantined' : 'released') + (m.reason ? ': ' + m.reason : '') }; });
    var req = sum(row.requests);
    box.appendChild(chart({ key: 'requests', title: 'Requests', stats: st, bars: [{ values: row.requests, cls: 'requests', label: 'requests' }],
      markers: markers, summary: req + ' requests over the last ' + rangeText + (q.length ? '; ' + q.length + ' quarantine event(s) marked' : ''),
      legend: q.length ? [el('span.key.quarantined', '|'), ' quarantined ', el('span.key.released', '|'), ' released'] : null }));
    var ratio = row.requests.map(function (r, i) { var ev = r + row.rejected[i] + row.rollbacks[i]; return ev ? row.bad[i] / ev : null; });
    var budget = row.budget ? row.budget.max_bad_ratio : null;
    var over = ratio.filter(function (v) { return v !== null && budget !== null && v > budget; }).length;
    box.appendChild(chart({ key: 'bad', title: 'Bad outcomes against the error budget', stats: st, percent: true, max: 1,
      bars: [{ values: ratio.map(function (v) { return v || 0; }), cls: 'bad', label: 'bad share' }],
      threshold: budget !== null ? { value: budget, label: 'budget' } : null, markers: markers,
      summary: sum(row.bad) + ' bad outcomes of ' + req + ' requests; the budget allows ' + (budget !== null ? Math.round(budget * 100) + '%' : '—') +
        (over ? '; ' + over + ' period(s) over it' : ''),
      empty: req ? null : 'No requests in this period.' }));
    var okCum = 0, decided = 0;
    var rate = row.approved.map(function (a, i) { okCum += a; decided += a + row.rejected[i]; return decided ? okCum / decided : null; });
    box.appendChild(chart({ key: 'approval', title: 'Dry-run approval rate against the promotion gate', stats: st, percent: true, max: 1,
      bars: [{ values: row.approved.map(function (v, i) { var d = v + row.rejected[i]; return d ? v / d : 0; }), cls: 'approved', label: 'approved in this period' }],
      lines: [{ values: rate, cls: 'rate' }],
      legend: decided ? [el('span.key.approved', '■'), ' approved per period ', el('span.key.rate', '—'), ' running approval rate'] : null,
      threshold: row.min_approval_rate !== null ? { value: row.min_approval_rate, label: 'gate' } : null,
      summary: (decided ? sumText(row) : 'no review decisions') + ' over the last ' + rangeText +
        (row.min_approval_rate !== null ? '; promotion needs ' + Math.round(row.min_approval_rate * 100) + '%' : ''),
      empty: decided ? null : (row.write_grants ? 'No review decisions in this period.' : 'This agent has no write grants.') }));
    return box;
  }

  function sumText(row) {
    var a = sum(row.approved), r = sum(row.rejected);
    return a + ' approved, ' + r + ' rejected (' + Math.round(100 * a / (a + r)) + '% approved)';
  }

  function upstreamCharts(name, row, st) {
    var box = el('div.charts', { 'aria-label': 'Charts for upstream ' + name });
    box.appendChild(chart({ key: 'traffic', title: 'Requests and upstream errors', stats: st,
      bars: [{ values: row.requests.map(function (v, i) { return Math.max(0, v - row.errors[i]); }), cls: 'requests', label: 'requests' },
        { values: row.errors, cls: 'bad', label: 'errors' }],
      summary: sum(row.requests) + ' requests, ' + sum(row.errors) + ' upstream errors',
      legend: [el('span.key.requests', '■'), ' requests ', el('span.key.bad', '■'), ' upstream errors'] }));
    var series = row.quota_remaining || [];
    var known = series.some(function (v) { return v !== null; });
    if (known || row.quota) {
      box.appendChild(chart({ key: 'quota', title: 'Quota remaining', stats: st,
        lines: [{ values: series, cls: 'quota' }], max: row.quota_limit || (row.quota && row.quota.limit) || undefined,
        summary: row.quota ? 'now ' + row.quota.remaining + ' of ' + row.quota.limit : 'quota remaining as reported by the upstream',
        empty: known ? null : 'Now: ' + row.quota.remaining + ' of ' + row.quota.limit + ' (no history yet).' }));
    } else {
      box.appendChild(el('figure.chart.no-data', { 'data-chart': 'quota' }, el('figcaption', 'Quota remaining'),
        el('p.small.muted', 'Not reported: this gateway does not track ' + name + '\'s own quota signals yet (see proxy/stats.py, quota_of).')));
    }
    return box;
  }

  // ------------------------------------------------------------------------------------------ agents

  var statsRange = '24h';
  var RANGES = { '24h': 24, '7d': 28 };

  screens.agents = function (root) {
    setTitle('Agents');
    var body = el('div');
    var form = el('form.filters', { 'aria-label': 'Chart period' });
    root.appendChild(el('div.screen-head', el('h1', 'Agents'), el('p.muted', 'Service levels over each agent\'s window, its error budget, quarantine, and how far each write grant is on the way to live.')));
    form.appendChild(field('Charts over', select('range', [['24h', 'the last 24 hours'], ['7d', 'the last 7 days']], statsRange)));
    form.addEventListener('change', function () { statsRange = form.elements.range.value; load(); });
    form.addEventListener('submit', function (ev) { ev.preventDefault(); });
    root.appendChild(form);
    root.appendChild(body);
    body.appendChild(loading('Loading agents…'));

    var loadSeq = 0;
    function load() {
      var my = ++loadSeq;
      return Promise.all([api('GET', 'agents'), api('GET', 'grants'), api('GET', 'promotions', { history: 1 }),
        api('GET', 'stats', { since: statsRange, buckets: RANGES[statsRange] })]).then(function (res) {
        if (my !== loadSeq) return;
        render(res[0].agents, res[1].grants, res[2].promotions, res[3], res[0].upstreams);
      }, function (err) { clear(body).appendChild(errorBox(err)); });
    }

    function renderQuota(upstreams) {
      // the SaaS quota the company shares (proxy/quota.py): what each upstream last said, and any block
      (upstreams || []).filter(function (u) { return u.blocked || u.reserve || Object.keys(u.windows || {}).length; }).forEach(function (u) {
        var card = el('section.card' + (u.blocked ? '.quarantined' : ''));
        card.appendChild(el('h2', 'Upstream ' + u.upstream + ' quota ', badge(u.blocked ? 'held_back' : 'ok')));
        if (u.blocked) card.appendChild(el('p', 'Agents get 429 upstream_quota until ', stamp(u.blocked_until), ': ' + u.reason));
        card.appendChild(table('Quota of ' + u.upstream + ' (reserve ' + (u.reserve || 'none') + ')', ['Window', 'Remaining', 'Limit'],
          Object.keys(u.windows || {}).map(function (w) {
            var d = u.windows[w];
            return [w, d.remaining === null || d.remaining === undefined ? '—' : String(d.remaining), d.limit === null || d.limit === undefined ? '—' : String(d.limit)];
          })));
        body.appendChild(card);
      });
    }

    function render(agents, grants, promotions, stats, upstreams) {
      var focusId = document.activeElement && document.activeElement.id;
      clear(body);
      var byKey = {};
      grants.forEach(function (g) { byKey[g.agent + '\u0000' + g.capability] = g; });
      var summary = agents.filter(function (a) { return a.quarantined; }).length;
      body.appendChild(el('p', agents.length + ' agent' + (agents.length === 1 ? '' : 's') + (summary ? ', ' : ''), summary ? el('strong.warn-text', summary + ' quarantined') : null, '.'));
      renderQuota(upstreams);
      agents.slice().sort(function (x, y) { return (y.quarantined ? 1 : 0) - (x.quarantined ? 1 : 0); }).forEach(function (a) {
        var s = a.sli;
        var b = s.budget || {};
        var id = 'agent-' + a.agent.replace(/[^A-Za-z0-9_-]/g, '_');
        var card = el('section.card' + (a.quarantined ? '.quarantined' : ''), { 'aria-labelledby': id + '-h' });
        card.appendChild(el('h2', { id: id + '-h' }, a.agent, ' ', a.quarantined ? badge('quarantined') : badge('active')));
        if (a.quarantined) {
          var q = a.quarantined;
          card.appendChild(el('div.quarantine-box', dl([['Quarantined', stamp(q.since)], ['By', q.by], ['Reason', q.reason]]),
            el('button.primary', { type: 'button', id: id + '-release', onclick: function () { release(a.agent); } }, 'Release ' + a.agent + '…')));
        }
        var ratio = typeof s.budget_left_ratio === 'number' ? s.budget_left_ratio : 0;
        card.appendChild(el('div.budget',
          el('label', { for: id + '-meter' }, 'Error budget left: ', el('strong', pct(ratio))),
          el('meter', { id: id + '-meter', min: '0', max: '1', low: '0.25', high: '0.6', optimum: '1', value: String(ratio) }, pct(ratio)),
          el('span.muted.small', ' ' + s.bad + ' bad of ' + s.events + ' events (' + pct(s.bad_ratio) + '; allowed ' + pct(b.max_bad_ratio) +
            ' over ' + Math.round((b.window || 0) / 60) + ' min, judged from ' + b.min_requests + ' requests)')));
        if (stats && stats.agents[a.agent]) card.appendChild(agentCharts(a.agent, stats.agents[a.agent], stats));
        card.appendChild(table('Service levels for ' + a.agent, ['Requests', 'Denials', 'Validation', 'Rate limited', 'Upstream errors', 'Rejected reviews', 'Rollbacks', 'Replay failures'],
          [[String(s.requests), String(s.denials), String(s.validation), String(s.rate_limited), String(s.upstream_errors), String(s.rejected_reviews), String(s.rollbacks), String(s.replay_failures)]],
          { cls: 'sli', hideCaption: false }));
        card.appendChild(table('Grants of ' + a.agent, ['Capability', 'Effect', 'Mode', 'Review evidence', 'Promotion gate', 'Canary'],
          a.grants.map(function (g) {
            var gs = byKey[a.agent + '\u0000' + g.capability];
            var ev = gs && gs.evidence;
            return el('tr',
              el('th', { scope: 'row' }, el('code', g.capability)),
              el('td', g.effect),
              el('td', badge(g.mode), g.declared_mode && g.declared_mode !== g.mode ? el('div.small.muted', 'declared ' + g.declared_mode) : null),
              el('td.small', ev ? ev.reviewed + ' reviewed, ' + pct(ev.approval_rate) + ' approved, ' + pct(ev.edit_share) + ' edited; ' + ev.pending + ' pending' : el('span.muted', 'reads are always live')),
              el('td.small', !gs ? '' : g.declared_mode === 'live' ? el('span.muted', 'live by the rules') : gs.gate_met ? el('span.ok-text', 'met')
                : el('ul.missing', gs.missing.map(function (m) { return el('li', m); }))),
              el('td.small', gs && gs.canary && (gs.canary.live || gs.canary.dry_run) ? gs.canary.live + ' live (' + pct(gs.canary.live_success_rate) + ' ok), ' + gs.canary.dry_run + ' dry-run' : ''));
          }), { cls: 'grants' }));
        if (!a.quarantined) {
          card.appendChild(el('p', el('button', { type: 'button', id: id + '-quarantine', onclick: function () { quarantine(a.agent); } }, 'Quarantine ' + a.agent + '…')));
        }
        body.appendChild(card);
      });
      if (stats) {
        var ups = el('section.block', { 'aria-labelledby': 'ups-h' }, el('h2', { id: 'ups-h' }, 'Upstreams'));
        Object.keys(stats.upstreams).sort().forEach(function (u) {
          ups.appendChild(el('section.card.upstream', { 'aria-label': 'Upstream ' + u, 'data-upstream': u }, el('h3', u), upstreamCharts(u, stats.upstreams[u], stats)));
        });
        if (stats.truncated) ups.appendChild(el('p.small.muted', 'Charts show the first ' + stats.scanned + ' records of the period.'));
        body.appendChild(ups);
      }
      body.appendChild(el('section.block', { 'aria-labelledby': 'promo-h' }, el('h2', { id: 'promo-h' }, 'Promotion history'),
        promotions.length ? table('Promotions, newest first', ['When', 'Agent', 'Capability', 'From → to', 'By', 'Forced', 'Evidence'], promotions.map(function (p) {
          return [stamp(p.at), p.agent, el('code', p.capability), (p.from || '?') + ' → ' + p.mode, p.by, p.forced ? el('strong.warn-text', 'forced: ' + (p.reason || '')) : 'no',
            p.evidence ? p.evidence.reviewed + ' reviewed, ' + pct(p.evidence.approval_rate) + ' approved' : ''];
        }), { hideCaption: true }) : el('p.muted', 'No promotions yet.')));
      if (focusId && $(focusId)) $(focusId).focus();
    }

    function reasonDialog(title, submit, intro, action, agent, danger) {
      actionDialog({
        title: title,
        body: [el('p', intro), field('Reason (required)', el('textarea', { name: 'reason', rows: '3', required: true, 'aria-describedby': 'action-error' }))],
        submit: submit,
        danger: danger,
        validate: function (f) { return f.elements.reason.value.trim() ? null : 'A reason is required.'; },
        onSubmit: function (f) {
          return api('POST', 'agents/' + encodeURIComponent(agent) + '/' + action, undefined, { reason: f.elements.reason.value.trim() }).then(function () {
            var msg = action === 'release' ? agent + ' is released.' : agent + ' is quarantined.';
            flash(msg, 'ok');
            announce(msg);
            return load();
          });
        }
      });
    }

    function release(agent) {
      reasonDialog('Release ' + agent + '?', 'Release', 'Its writes go back to their granted modes and its service-level window starts afresh.', 'release', agent, false);
    }

    function quarantine(agent) {
      reasonDialog('Quarantine ' + agent + '?', 'Quarantine', 'Its writes are forced to dry-run (or refused, as configured) until someone releases it.', 'quarantine', agent, true);
    }

    load();
    return { refresh: function () { if (!dialogOpen()) load(); } };
  };

  // ------------------------------------------------------------------------------------------ keyboard

  function typing(t) {
    if (!t || !t.tagName) return false;
    var tag = t.tagName;
    return tag === 'INPUT' || tag === 'TEXTAREA' || tag === 'SELECT' || t.isContentEditable;
  }

  document.addEventListener('keydown', function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || !token()) return;
    if (dialogOpen() || typing(ev.target)) return;
    if (ev.key === '?') { ev.preventDefault(); $('help-dialog').showModal(); return; }
    var nav = { '1': '#/queue', '2': '#/journal', '3': '#/transactions', '4': '#/agents' }[ev.key];
    if (nav) { ev.preventDefault(); go(nav); return; }
    if (screenCtl && screenCtl.key && screenCtl.key(ev)) ev.preventDefault();
  });

  // ------------------------------------------------------------------------------------------ start

  document.addEventListener('DOMContentLoaded', function () {
    $('signin-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      var tok = $('token-input').value.trim().replace(/^Bearer\s+/i, '');
      if (!tok) {
        $('signin-error').textContent = 'Paste a reviewer token first.';
        $('token-input').setAttribute('aria-invalid', 'true');
        $('token-input').focus();
        return;
      }
      signIn(tok);
    });
    $('sign-out').addEventListener('click', function () { signedOut(); });
    $('help-button').addEventListener('click', function () { $('help-dialog').showModal(); });
    window.addEventListener('hashchange', route);
    if (window.sessionStorage.getItem(TOKEN_KEY)) { started(); return; }
    fetch('/auth/session', { credentials: 'same-origin', cache: 'no-store' }).then(function (resp) {
      return resp.ok ? resp.json() : {};
    }).then(function (doc) {
      if (doc.sign_in) {
        $('idp-signin').hidden = false;
        $('idp-signin-link').href = doc.sign_in_url + '?next=' + encodeURIComponent('/console/' + window.location.hash);
      }
      if (doc.signed_in) { SESSION = { reviewer: doc.reviewer, csrf: doc.csrf }; started(); } else showSignin(doc.problem || '');
    }, function () { showSignin(); });
  });
}());
