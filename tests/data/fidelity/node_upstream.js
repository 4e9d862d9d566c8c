// A real upstream on Node's own http/https module, for tests/test_transport_fidelity.py and
// bench/fidelity.py. Usage: node node_upstream.js [--tls CERT KEY] [--keepalive-ms N]
// Prints {"port": N} once listening. The routes script only what Node's server itself does not decide.
'use strict';
const http = require('http');
const https = require('https');
const fs = require('fs');
const crypto = require('crypto');
const zlib = require('zlib');

const args = process.argv.slice(2);
let tls = null;
let keepAliveMs = 5000;
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--tls') { tls = {cert: fs.readFileSync(args[i + 1]), key: fs.readFileSync(args[i + 2])}; i += 2; }
  else if (args[i] === '--keepalive-ms') { keepAliveMs = Number(args[i + 1]); i += 1; }
}

const stats = {connections: 0, requests: {}};
const served = new WeakMap();  // socket -> requests answered on it

function json(res, status, doc, extra) {
  const body = Buffer.from(JSON.stringify(doc));
  res.writeHead(status, Object.assign({'Content-Type': 'application/json', 'Content-Length': body.length}, extra || {}));
  res.end(body);
}

function closeDelimited(req, res, ragged) {
  // no Content-Length, no chunking: the body ends when the connection does
  res.useChunkedEncodingByDefault = false;
  res.writeHead(200, {'Content-Type': 'text/plain'});
  res.write('part-1\n');
  setTimeout(() => {
    res.write('part-2\n');
    setTimeout(() => {
      if (!ragged) { res.end(); return; }
      // plain TCP: RST; TLS: the socket torn down without close_notify
      if (tls) req.socket.destroy(); else req.socket.resetAndDestroy();
    }, 50);
  }, 30);
}

function handler(req, res) {
  const path = req.url.split('?')[0];
  const query = new URLSearchParams(req.url.split('?')[1] || '');
  stats.requests[path] = (stats.requests[path] || 0) + 1;
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    const before = served.get(req.socket) || 0;
    served.set(req.socket, before + 1);
    if (path === '/stats') return json(res, 200, stats);
    if (path === '/echo') {
      return json(res, 200, {method: req.method, url: req.url, headers: req.rawHeaders, length: body.length,
                             sha256: crypto.createHash('sha256').update(body).digest('hex')});
    }
    if (path === '/upload') {  // an object store: chunked uploads are refused
      if (req.headers['transfer-encoding']) return json(res, 411, {error: 'MissingContentLength'});
      return json(res, 200, {length: body.length, content_length: req.headers['content-length'],
                             sha256: crypto.createHash('sha256').update(body).digest('hex')});
    }
    if (path === '/reset-close') return closeDelimited(req, res, true);
    if (path === '/clean-close') return closeDelimited(req, res, false);
    if (path === '/hints') {
      res.writeEarlyHints({link: '</style.css>; rel=preload; as=style'});
      return setTimeout(() => json(res, 200, {final: true}), 20);
    }
    if (path === '/flaky') {
      // answers only the first request of a connection: a request on a reused one is read and then
      // dropped unanswered, as when a server closes an idle connection just as the request arrives
      if (before > 0) return req.socket.destroy();
      return json(res, 200, {n: stats.requests[path], method: req.method});
    }
    if (path === '/te') {
      // a transfer coding other than chunked last: the body runs until the connection closes
      const codings = query.get('codings') || 'gzip';
      const payload = codings.includes('gzip') ? zlib.gzipSync(Buffer.from('hello, coded world')) : Buffer.from('x');
      res.setHeader('Transfer-Encoding', codings);
      res.setHeader('Connection', 'close');
      res.writeHead(200, {'Content-Type': 'text/plain'});
      return res.end(payload);
    }
    if (path === '/write-cut') {  // a write applied, its answer cut after 1000 of its 100000 bytes
      res.writeHead(201, {'Content-Type': 'application/json', 'Content-Length': 100000, 'Location': '/items/cut-1'});
      res.write('{"id": "cut-1", "pad": "' + 'x'.repeat(975));
      return setTimeout(() => req.socket.destroy(), 50);
    }
    return json(res, 200, {ok: true});
  });
}

const server = tls ? https.createServer(tls, handler) : http.createServer(handler);
server.keepAliveTimeout = keepAliveMs;
server.on('connection', () => { stats.connections += 1; });
server.on('secureConnection', () => {});
server.listen(0, '127.0.0.1', () => { console.log(JSON.stringify({port: server.address().port})); });
process.on('SIGTERM', () => process.exit(0));
