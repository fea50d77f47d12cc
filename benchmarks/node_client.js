// The 16 KiB-frame load client: Node's http2 module (nghttp2 inside), as its own process.
//
//   node benchmarks/node_client.js --connect IP:PORT --authority IP:PORT --ca CA --cert C --key K
//        --op upload|download|multi|short [--bytes N] [--tunnels K] [--inflight M] [--count S]
//
// nghttp2 sends DATA frames of at most 16 KiB whatever the peer allows, as Envoy and most HTTP/2
// stacks do, so this is the "ordinary peer" of the benchmarks. Same windows as the Python client
// (16 MiB per stream, 64 MiB per connection) and the same benchmarks/wire.py protocol inside each
// tunnel. Prints one JSON object on stdout; the clock starts once the session is connected.
'use strict';
const http2 = require('http2');
const fs = require('fs');

const MiB = 1024 * 1024;
const STREAM_WINDOW = 16 * MiB;
const CONNECTION_WINDOW = 64 * MiB;
const SHORT_PAYLOAD = 1024;
const BLOCK = Buffer.alloc(MiB);
for (let i = 0; i < BLOCK.length; i++) BLOCK[i] = i & 0xff;  // same pattern as wire.PAYLOAD_BLOCK

function parseArgs(argv) {
  const a = {bytes: 16 * MiB, tunnels: 64, inflight: 64, count: 1000};
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, ''), v = argv[i + 1];
    a[k] = ['bytes', 'tunnels', 'inflight', 'count'].includes(k) ? Number(v) : v;
  }
  for (const k of ['connect', 'authority', 'ca', 'cert', 'key', 'op'])
    if (!a[k]) { console.error(`node_client: --${k} is required`); process.exit(2); }
  return a;
}

function header(op, n) {  // wire.HEADER: one op byte, big-endian u64 length
  const b = Buffer.alloc(9);
  b.write({upload: 'U', download: 'D', echo: 'E', idle: 'I'}[op], 0, 'latin1');
  b.writeBigUInt64BE(BigInt(n), 1);
  return b;
}

function percentile(xs, q) {
  const v = [...xs].sort((x, y) => x - y);
  const pos = (v.length - 1) * q / 100, lo = Math.floor(pos), hi = Math.ceil(pos);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

function openTunnel(session, authority) {
  return new Promise((resolve, reject) => {
    const s = session.request({':method': 'CONNECT', ':authority': authority});
    s.on('response', (h) => h[':status'] === 200 ? resolve(s) : reject(new Error(`CONNECT answered ${h[':status']}`)));
    s.on('error', reject);
  });
}

// Read until `want` bytes arrived (or the stream ended); resolves with the count.
function receive(s, want) {
  return new Promise((resolve, reject) => {
    let got = 0, done = false;
    const finish = () => { if (!done) { done = true; resolve(got); } };
    s.on('data', (d) => { got += d.length; if (got >= want) finish(); });
    s.on('end', finish);
    s.on('close', finish);
    s.on('error', (e) => { if (!done) { done = true; reject(e); } });
  });
}

async function writeAll(s, n) {
  let left = n;
  while (left > 0) {
    const take = Math.min(left, BLOCK.length);
    left -= take;
    if (!s.write(take === BLOCK.length ? BLOCK : BLOCK.subarray(0, take)))
      await new Promise((r) => s.once('drain', r));
  }
}

async function bulk(session, a, op, total, tunnels) {
  const per = Array.from({length: tunnels}, (_, i) => Math.floor(total / tunnels) + (i < total % tunnels ? 1 : 0));
  const counts = await Promise.all(per.map(async (n) => {
    const s = await openTunnel(session, a.authority);
    if (op === 'upload') {
      const ack = receive(s, 8);
      s.write(header('upload', n));
      await writeAll(s, n);
      s.end();
      if (await ack !== 8) throw new Error('upload: no acknowledgement from the sink');
      s.close(http2.constants.NGHTTP2_CANCEL);
      return n;
    }
    const got = receive(s, n);
    s.end(header('download', n));
    const c = await got;
    s.close(http2.constants.NGHTTP2_CANCEL);
    return c;
  }));
  return counts.reduce((x, y) => x + y, 0);
}

async function short(session, a) {
  const lat = [];
  let next = 0;
  const payload = Buffer.concat([header('echo', SHORT_PAYLOAD), BLOCK.subarray(0, SHORT_PAYLOAD)]);
  async function worker() {
    while (next < a.count) {
      next++;
      const t0 = process.hrtime.bigint();
      const s = await openTunnel(session, a.authority);
      const got = receive(s, SHORT_PAYLOAD);
      const ended = new Promise((r) => { s.on('end', r); s.on('close', r); });
      const closed = new Promise((r) => { if (s.closed) r(); else s.on('close', r); });
      s.end(payload);
      if (await got !== SHORT_PAYLOAD) throw new Error('short tunnel: echo incomplete');
      s.resume();
      await ended;
      lat.push(Number(process.hrtime.bigint() - t0) / 1e9);
      // Both sides have sent END_STREAM: the stream closes by itself. No s.close() here: at 'end'
      // Node's stream is often still open, so close() sent one RST_STREAM per tunnel, and nghttp2's
      // rapid-reset limit (CVE-2023-44487; Debian's 1.52.0-1+deb12u1: 1 000 RST_STREAM, then 33/s)
      // made nghttpx answer GOAWAY INTERNAL_ERROR after ~1 000 short tunnels. python-h2 sends none.
      await closed;
    }
  }
  await Promise.all(Array.from({length: a.inflight}, worker));
  return lat;
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const session = http2.connect(`https://${a.connect}`, {
    ca: fs.readFileSync(a.ca), cert: fs.readFileSync(a.cert), key: fs.readFileSync(a.key),
    checkServerIdentity: () => undefined,  // HBONE checks SPIFFE ids, not host names; the chain is verified
    servername: '',
    settings: {initialWindowSize: STREAM_WINDOW, maxFrameSize: MiB, enablePush: false},
    maxSessionMemory: 1024,  // MB; the default 10 MB refuses streams under bulk load
  });
  await new Promise((resolve, reject) => { session.once('connect', resolve); session.once('error', reject); });
  session.setLocalWindowSize(CONNECTION_WINDOW);
  // nghttp2 caps each DATA frame at 16 KiB (NGHTTP2_DATA_PAYLOADLEN) whatever the peer advertises.
  const out = {client: 'node-http2', op: a.op, frame_out: 16384};
  const cpu0 = process.cpuUsage(), t0 = process.hrtime.bigint();
  if (a.op === 'upload' || a.op === 'download' || a.op === 'multi') {
    const tunnels = a.op === 'multi' ? a.tunnels : 1;
    out.bytes = await bulk(session, a, a.op === 'download' ? 'download' : 'upload', a.bytes, tunnels);
    out.expected = a.bytes;
    out.tunnels = tunnels;
  } else if (a.op === 'short') {
    const lat = await short(session, a);
    Object.assign(out, {streams: lat.length, expected: a.count, p50_ms: percentile(lat, 50) * 1e3,
      p99_ms: percentile(lat, 99) * 1e3});
  } else {
    throw new Error(`node_client: op ${a.op} not supported`);
  }
  const wall = Number(process.hrtime.bigint() - t0) / 1e9, cpu = process.cpuUsage(cpu0);
  Object.assign(out, {wall_s: wall, cpu_user_s: cpu.user / 1e6, cpu_sys_s: cpu.system / 1e6});
  session.close();
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((e) => { console.error(`node_client: ${e.stack || e}`); process.exit(1); });
