/* The HTTP scenario's load client in C: HTTP/1.1 keep-alive requests inside HBONE tunnels (or over
 * plain TCP), so the waypoint can be measured alone, hop for hop against nginx and haproxy.
 *
 *   hbone_httpload --connect IP:PORT --authority IP:PORT --ca CA --cert C --key K
 *                  [--source-ip IP] [--connect-header 'name: value' ...] [--header 'Name: value' ...]
 *                  [--host H] (--tunnels N [--rate R] --seconds S | --count N [--tunnels N]) [--cpu-pid PID ...]
 *   hbone_httpload --plain --connect IP:PORT [--socks IP:PORT [--source-ip IP]] [--host H] [--header ...]
 *                  (--tunnels N [--rate R] ... | --count N)
 *
 * It drives every row of the HTTP scenario's quick mode (direct / nginx / haproxy plain, ours through
 * node-a's SOCKS5, wp-only / no-waypoint in HBONE), so all its ratios are same-client.
 *
 * Built by benchmarks/http.py at run time (benchmarks/cbuild.py: cc -O2 ... -lssl -lcrypto) where a C
 * compiler and the OpenSSL headers exist; otherwise the rows it drives say so. Why it exists: the
 * Python client (benchmarks/httpload.py) costs ~27 us of CPU per request on a 2-core machine where
 * the proxy under test wants ~50; this one costs a few, so the cores go to the proxy.
 *
 * HBONE mode does what a node proxy (ztunnel) does towards a waypoint: one TCP connection from
 * --source-ip, TLS 1.3 with our client certificate (the peer chain verified to --ca), ALPN h2, and
 * the tunnels as HTTP/2 CONNECT streams on it (at most --streams-per-conn per connection, ztunnel's
 * min(100, peer limit): more tunnels open more connections), each with :authority = --authority and
 * the --connect-header fields (ztunnel sends forwarded and baggage) plus a fresh traceparent. Windows
 * advertised large (16 MiB per stream, 1 GiB connection) and handed back in 1 MiB steps; the peer's
 * windows, SETTINGS, PING and WINDOW_UPDATE are honoured; GOAWAY, RST_STREAM, a tunnel the server
 * ends, a CONNECT not answered 200 or anything not HTTP/2 is an error: the run stops, prints why on
 * stderr and in the JSON, and exits 1. Inside each tunnel: `GET / HTTP/1.1` requests, one in flight
 * per tunnel, responses framed by Content-Length or chunked, wherever the DATA frames split them.
 * --plain opens N TCP connections to --connect and sends the same requests (direct / nginx / haproxy
 * rows driven by the same client, for same-client ratios). With --socks each of them is a SOCKS5
 * CONNECT (RFC 1928: no authentication, IPv4 address) to --connect through the proxy at --socks, made
 * from --source-ip: the mesh rows' way in, node-a's SOCKS5 listener (15080), which picks the source
 * workload by the connection's source address (as benchmarks/httpload.py's open_socks5). A refusal
 * (reply code != 0) or anything not SOCKS5 is an error like any other: exit 1, the reason printed.
 *
 * Loops (as benchmarks/httpload.py, whose JSON fields this prints):
 * - closed (--tunnels N): each tunnel sends its next request as soon as the previous response is in;
 * - open (--rate R): a request is due every 1/R s (timerfd, ns resolution) and goes to an idle
 *   tunnel, or waits in a backlog for the next one free; latency runs from the *scheduled* time, so a
 *   stall counts in full (no coordinated omission);
 * - count (--count N): exactly N requests, closed loop, no timing phases (the harness's split and
 *   deny checks).
 * All tunnels are open before the clock starts; then WARMUP_S unmeasured, then --seconds measured:
 * a request counts when it was sent (closed) or scheduled (open) inside the measured window; those
 * still in flight at its end are waited for (their latency counts), up to DRAIN_S. Client CPU is
 * getrusage over the measured window; each --cpu-pid process's CPU (/proc/PID/stat) is sampled at the
 * same two instants and printed as pid_cpu_s, so the harness gets the proxy's CPU for exactly the
 * counted requests.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define WARMUP_S 0.3                 /* as httpload: first requests pay set-up at each hop */
#define DRAIN_S 1.0                  /* in-flight requests of the measured window may finish this late */
#define SETUP_TIMEOUT_S 10.0         /* connect + TLS + every CONNECT answered */
#define IDLE_TIMEOUT_MS 10000        /* no event at all while requests are in flight: the run failed */
#define MAX_BACKLOG 10000            /* open loop: requests waiting for a free tunnel before "overloaded" */
#define MAX_FRAME_RECV 16384         /* we never raise SETTINGS_MAX_FRAME_SIZE (RFC 9113 6.5.2 default) */
#define READ_BUF (64 * 1024 + 9)     /* several TLS records' worth of frames; a frame is <= 16 KiB + 9 */
#define STREAM_WINDOW (16 * 1024 * 1024)   /* advertised per tunnel: responses never wait for window */
#define CONN_WINDOW_BOOST (1u << 30)       /* added to the connection window at start (65 535 + this) */
#define WINDOW_RETURN (1024 * 1024)  /* hand received DATA back in steps this large: few WINDOW_UPDATEs */
#define STREAMS_PER_CONN 100         /* ztunnel: min(100, peer limit) streams per pooled connection */
#define HEAD_MAX 8192                /* a response head (or chunk-size line) longer than this is junk */
#define BODY_KEY_MAX 16              /* as httpload: the first line of the first 16 body bytes */
#define BODY_KINDS 16                /* distinct body keys counted; more go to "other" */
#define MAX_TUNNELS 4096
#define MAX_HEADERS 16
#define MAX_CPU_PIDS 32

enum { F_DATA = 0, F_HEADERS = 1, F_PRIORITY = 2, F_RST = 3, F_SETTINGS = 4, F_PUSH = 5, F_PING = 6,
       F_GOAWAY = 7, F_WINDOW_UPDATE = 8 };
enum { END_STREAM = 1, ACK = 1, END_HEADERS = 4, PADDED = 8, PRIORITY_FLAG = 0x20 };
enum { S_HEADER_TABLE_SIZE = 1, S_ENABLE_PUSH = 2, S_MAX_CONCURRENT = 3, S_INITIAL_WINDOW = 4, S_MAX_FRAME = 5 };
/* The HTTP/1.1 response parser's states (RFC 9112 6: Content-Length or chunked framing). */
enum pstate { P_IDLE, P_HEAD, P_BODY, P_CHUNK_SIZE, P_CHUNK_DATA, P_CHUNK_CRLF, P_TRAILER };
enum loop { L_CLOSED, L_OPEN, L_COUNT };
enum { K_CONN = 1, K_PLAIN = 2, K_TIMER = 3 };   /* what an epoll event is about (high 32 bits) */

static const char PREFACE[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct conn;
struct tunnel {
    struct conn *c;              /* NULL in plain mode */
    int fd;                      /* plain mode: this tunnel's own TCP connection */
    uint32_t sid;
    int open, busy, pending;     /* CONNECT answered 200; request in flight; waiting for send window */
    int64_t send_window;
    uint64_t unacked;            /* DATA bytes received on this stream, not yet handed back */
    double started;              /* sent (closed loop) or scheduled (open loop) */
    enum pstate ps;
    char head[HEAD_MAX];
    size_t hlen;
    int status;
    long long remaining;
    char body[BODY_KEY_MAX];
    size_t blen;
};

struct conn {
    int fd;
    SSL *ssl;
    unsigned char rbuf[READ_BUF];
    size_t rhave;
    unsigned char *wbuf;
    size_t wlen, wcap;
    int64_t send_window, peer_initial;
    uint32_t peer_max_frame;
    uint64_t unacked;
    int settings_seen, epollout;
    struct tunnel **tunnels;     /* by (sid - 1) / 2 */
    int ntunnels;
};

static struct {
    const char *host, *authority, *ca, *cert, *key, *source_ip, *http_host;
    const char *connect_headers[MAX_HEADERS], *headers[MAX_HEADERS];
    int nconnect_headers, nheaders, port, tunnels, count, plain, streams_per_conn;
    char socks_host[64];         /* --socks: the SOCKS5 proxy (plain mode); port 0 = none */
    int socks_port;
    int cpu_pids[MAX_CPU_PIDS], ncpu_pids;
    double rate, seconds;
} A = {.tunnels = 1, .seconds = 3.0, .streams_per_conn = STREAMS_PER_CONN};

static struct {                  /* the run's state and results */
    int ep;
    struct conn *conns;
    int nconns;
    struct tunnel *tunnels;
    enum loop loop;
    int measuring_started, stopping;
    double t0, t1;               /* the measured window */
    struct tunnel **idle;        /* open loop: free tunnels */
    int nidle;
    double *backlog;             /* open loop: scheduled times waiting for a tunnel (ring) */
    int bl_head, bl_len;
    long long sent, completed, counted, inflight_counted;
    double *lat;
    long long nlat, cap_lat;
    long long statuses[600];
    char body_keys[BODY_KINDS][BODY_KEY_MAX + 1];
    long long body_counts[BODY_KINDS + 1];
    int nbody_keys;
    char error[512];
    unsigned char request[2048];
    size_t request_len;
} R;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(const char *fmt, ...) {
    if (R.error[0]) return;      /* the first error is the cause; later ones are its echoes */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(R.error, sizeof R.error, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------------------- results */

static void record(struct tunnel *t) {
    double now = now_s();
    R.completed++;
    int counts = R.loop == L_COUNT || (R.measuring_started && t->started >= R.t0 && t->started < R.t1);
    if (!counts) return;
    R.counted++;
    if (R.nlat == R.cap_lat) {
        R.cap_lat = R.cap_lat ? R.cap_lat * 2 : 65536;
        R.lat = realloc(R.lat, sizeof *R.lat * R.cap_lat);
        if (!R.lat) { fail("out of memory"); return; }
    }
    R.lat[R.nlat++] = now - t->started;
    if (t->status >= 0 && t->status < 600) R.statuses[t->status]++;
    char key[BODY_KEY_MAX + 1];
    size_t n = 0;
    while (n < t->blen && t->body[n] != '\n') { key[n] = t->body[n]; n++; }
    key[n] = 0;
    for (int i = 0; i < R.nbody_keys; i++)
        if (!strcmp(R.body_keys[i], key)) { R.body_counts[i]++; return; }
    if (R.nbody_keys < BODY_KINDS) {
        memcpy(R.body_keys[R.nbody_keys], key, n + 1);
        R.body_counts[R.nbody_keys++]++;
    } else R.body_counts[BODY_KINDS]++;
}

/* ------------------------------------------------------------------------------- output */

static void buf_append(struct conn *c, const void *p, size_t n) {
    if (c->wlen + n > c->wcap) {
        size_t cap = c->wcap ? c->wcap : 65536;
        while (cap < c->wlen + n) cap *= 2;
        c->wbuf = realloc(c->wbuf, cap);
        if (!c->wbuf) { fail("out of memory"); c->wlen = c->wcap = 0; return; }
        c->wcap = cap;
    }
    memcpy(c->wbuf + c->wlen, p, n);
    c->wlen += n;
}

static void frame_head(unsigned char *h, size_t n, int type, int flags, uint32_t sid) {
    h[0] = n >> 16; h[1] = n >> 8; h[2] = n; h[3] = type; h[4] = flags;
    h[5] = (sid >> 24) & 0x7f; h[6] = sid >> 16; h[7] = sid >> 8; h[8] = sid;
}

static void put_frame(struct conn *c, int type, int flags, uint32_t sid, const void *p, size_t n) {
    unsigned char h[9];
    frame_head(h, n, type, flags, sid);
    buf_append(c, h, 9);
    if (n) buf_append(c, p, n);
}

static void window_update(struct conn *c, uint32_t sid, uint32_t inc) {
    unsigned char p[4] = {(inc >> 24) & 0x7f, inc >> 16, inc >> 8, inc};
    put_frame(c, F_WINDOW_UPDATE, 0, sid, p, 4);
}

static void flush_conn(struct conn *c) {
    while (c->wlen) {
        int n = SSL_write(c->ssl, c->wbuf, c->wlen > 1 << 30 ? 1 << 30 : (int)c->wlen);
        if (n <= 0) {
            int e = SSL_get_error(c->ssl, n);
            if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                if (!c->epollout) {
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = ((uint64_t)K_CONN << 32) | (c - R.conns)};
                    epoll_ctl(R.ep, EPOLL_CTL_MOD, c->fd, &ev);
                    c->epollout = 1;
                }
                return;
            }
            fail("write to the server failed (connection closed?)");
            return;
        }
        memmove(c->wbuf, c->wbuf + n, c->wlen - n);
        c->wlen -= n;
    }
    if (c->epollout) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)K_CONN << 32) | (c - R.conns)};
        epoll_ctl(R.ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->epollout = 0;
    }
}

/* Send the request on t (its DATA frame queued on the connection; flushed after this event round). */
static void try_send_h2(struct tunnel *t) {
    struct conn *c = t->c;
    int64_t n = R.request_len;
    if (t->send_window < n || c->send_window < n || n > c->peer_max_frame) { t->pending = 1; return; }
    t->pending = 0;
    t->send_window -= n;
    c->send_window -= n;
    put_frame(c, F_DATA, 0, t->sid, R.request, R.request_len);
}

static void send_request(struct tunnel *t, double started) {
    t->started = started;
    t->busy = 1;
    t->ps = P_HEAD;
    t->hlen = t->blen = 0;
    t->status = -1;
    R.sent++;
    if (!t->c) {
        ssize_t n = send(t->fd, R.request, R.request_len, MSG_NOSIGNAL);
        /* One request in flight per connection: the socket's send buffer is empty, it takes it whole. */
        if (n != (ssize_t)R.request_len) fail("write to the server failed: %s", n < 0 ? strerror(errno) : "short write");
        return;
    }
    try_send_h2(t);
}

/* A tunnel became free: what the loop does next with it. */
static void next_request(struct tunnel *t) {
    if (R.loop == L_CLOSED) { if (!R.stopping) send_request(t, now_s()); }
    else if (R.loop == L_COUNT) { if (R.sent < A.count) send_request(t, now_s()); }
    else if (R.bl_len) {   /* open loop: requests scheduled in the window are served even while draining */
        double at = R.backlog[R.bl_head];
        R.bl_head = (R.bl_head + 1) % (MAX_BACKLOG + 1);
        R.bl_len--;
        send_request(t, at);
    } else R.idle[R.nidle++] = t;
}

/* ------------------------------------------------------------------------------- HTTP/1.1 responses */

static int parse_head(struct tunnel *t, const char *h, size_t n) {
    /* status-line = HTTP-version SP status-code SP [ reason-phrase ] (RFC 9112 4) */
    if (n < 12 || memcmp(h, "HTTP/1.", 7) || h[8] != ' ' || !isdigit((unsigned char)h[9]) ||
        !isdigit((unsigned char)h[10]) || !isdigit((unsigned char)h[11])) {
        fail("tunnel %u: not an HTTP/1.1 response: \"%.20s\"", t->sid, h);
        return -1;
    }
    t->status = (h[9] - '0') * 100 + (h[10] - '0') * 10 + (h[11] - '0');
    long long length = -1;
    int chunked = 0;
    const char *p = memchr(h, '\n', n), *end = h + n;
    while (p && ++p < end) {
        const char *eol = memchr(p, '\n', end - p);
        if (!eol) break;
        size_t len = eol - p;
        if (len >= 15 && !strncasecmp(p, "content-length:", 15)) {
            const char *v = p + 15;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            char *stop;
            length = strtoll(v, &stop, 10);
            if (stop == v || length < 0) { fail("tunnel %u: bad Content-Length", t->sid); return -1; }
        } else if (len >= 18 && !strncasecmp(p, "transfer-encoding:", 18)) {
            chunked = memmem(p, len, "chunked", 7) != NULL;
        }
        p = eol;
    }
    if (t->status / 100 == 1) {  /* 1xx interim: the real response follows (101 would change protocol) */
        if (t->status == 101) { fail("tunnel %u: 101 Switching Protocols", t->sid); return -1; }
        t->ps = P_HEAD;
        return 0;
    }
    if (t->status == 204 || t->status == 304) t->ps = P_IDLE;
    else if (chunked) t->ps = P_CHUNK_SIZE;
    else if (length >= 0) { t->remaining = length; t->ps = length ? P_BODY : P_IDLE; }
    else { fail("tunnel %u: response %d has no Content-Length and is not chunked", t->sid, t->status); return -1; }
    return 0;
}

static void take_body(struct tunnel *t, const unsigned char *p, size_t n) {
    size_t k = n < BODY_KEY_MAX - t->blen ? n : BODY_KEY_MAX - t->blen;
    memcpy(t->body + t->blen, p, k);
    t->blen += k;
}

static void complete(struct tunnel *t) {
    t->busy = 0;
    t->ps = P_IDLE;
    record(t);
    next_request(t);
}

/* Bytes of t's tunnel, as they come: any split, several responses (never more than asked for). */
static void feed(struct tunnel *t, const unsigned char *p, size_t n) {
    while (n && !R.error[0]) {
        if (t->ps == P_IDLE) { fail("tunnel %u: %zu response bytes without a request", t->sid, n); return; }
        if (t->ps == P_HEAD || t->ps == P_CHUNK_SIZE || t->ps == P_TRAILER) {
            /* A line-oriented part: collect up to the end of the head (CRLFCRLF) or of one line (LF). */
            size_t from = t->hlen, take = n < HEAD_MAX - t->hlen ? n : HEAD_MAX - t->hlen;
            memcpy(t->head + t->hlen, p, take);
            t->hlen += take;
            const char *found = NULL;
            size_t endlen = 0;
            size_t scan = from > 3 ? from - 3 : 0;
            if (t->ps == P_HEAD) {
                found = memmem(t->head + scan, t->hlen - scan, "\r\n\r\n", 4);
                endlen = 4;
            } else {
                found = memchr(t->head + from, '\n', t->hlen - from);
                endlen = 1;
            }
            if (!found) {
                if (t->hlen == HEAD_MAX) { fail("tunnel %u: response head over %d bytes", t->sid, HEAD_MAX); return; }
                return;            /* all of p is in the head buffer */
            }
            size_t used = (found - t->head) + endlen;   /* bytes of head[] that belong to this part */
            size_t consumed = used - from;
            p += consumed; n -= consumed;
            t->hlen = 0;
            if (t->ps == P_HEAD) {
                if (parse_head(t, t->head, used) < 0) return;
                if (t->ps == P_IDLE) { complete(t); goto done; }
            } else if (t->ps == P_CHUNK_SIZE) {
                char *stop;
                long long size = strtoll(t->head, &stop, 16);
                if (stop == t->head || size < 0) { fail("tunnel %u: bad chunk size", t->sid); return; }
                if (size) { t->remaining = size; t->ps = P_CHUNK_DATA; } else t->ps = P_TRAILER;
            } else if (used <= 2) {  /* P_TRAILER: the empty line ends the message */
                complete(t);
                goto done;
            }
            continue;
        }
        size_t k = (long long)n < t->remaining ? n : (size_t)t->remaining;
        if (t->ps != P_CHUNK_CRLF) take_body(t, p, k);   /* the CRLF after a chunk's data is framing */
        p += k; n -= k; t->remaining -= k;
        if (t->remaining) return;
        if (t->ps == P_BODY) { complete(t); goto done; }
        else if (t->ps == P_CHUNK_DATA) { t->ps = P_CHUNK_CRLF; t->remaining = 2; }
        else t->ps = P_CHUNK_SIZE;
        continue;
    done:
        /* A response is complete; the next request (if any) was sent just now, so bytes already here
         * cannot be its answer: one request in flight per tunnel, never more responses than asked. */
        if (n) { fail("tunnel %u: %zu response bytes without a request", t->sid, n); return; }
    }
}

/* ------------------------------------------------------------------------------- HPACK (:status only) */

static int hpack_int(const unsigned char **p, const unsigned char *end, int prefix, uint64_t *out) {
    uint64_t max = (1u << prefix) - 1, v = **p & max;
    (*p)++;
    if (v == max) {
        int shift = 0;
        do {
            if (*p >= end || shift > 28) return -1;
            v += (uint64_t)(**p & 0x7f) << shift;
            shift += 7;
        } while (*(*p)++ & 0x80);
    }
    *out = v;
    return 0;
}

static int put_hpack_int(unsigned char *out, int prefix, int flags, uint64_t v) {
    uint64_t max = (1u << prefix) - 1;
    if (v < max) { out[0] = flags | v; return 1; }
    int n = 0;
    out[n++] = flags | max;
    v -= max;
    while (v >= 128) { out[n++] = (v & 0x7f) | 0x80; v >>= 7; }
    out[n++] = v;
    return n;
}

/* RFC 7541 Appendix B: the Huffman codes of '0'..'9' are 00000, 00001, 00010 (5 bits) and 011001..011111
 * (6 bits); a status is 3 of them then EOS padding (1 bits). Enough to name a non-200 answer. */
static int huffman_digits(const unsigned char *p, size_t n) {
    uint32_t bits = 0;
    int have = 0, value = 0;
    size_t i = 0;
    for (int d = 0; d < 3; d++) {
        while (have < 6 && i < n) { bits = (bits << 8) | p[i++]; have += 8; }
        if (have < 5) return -1;
        int five = (bits >> (have - 5)) & 0x1f;
        if (five <= 2) { value = value * 10 + five; have -= 5; continue; }
        if (have < 6) return -1;
        int six = (bits >> (have - 6)) & 0x3f;
        if (six < 0x19 || six > 0x1f) return -1;
        value = value * 10 + (six - 0x19 + 3);
        have -= 6;
    }
    return value;
}

/* The :status of a response header block, assuming (as every server here does) it comes first. */
static int header_status(const unsigned char *p, const unsigned char *end) {
    static const int indexed[] = {200, 204, 206, 304, 400, 404, 500};   /* static table 8..14 */
    uint64_t v;
    while (p < end && (*p & 0xe0) == 0x20)   /* dynamic table size updates */
        if (hpack_int(&p, end, 5, &v) < 0) return -1;
    if (p >= end) return -1;
    if (*p & 0x80) {
        if (hpack_int(&p, end, 7, &v) < 0) return -1;
        return v >= 8 && v <= 14 ? indexed[v - 8] : -1;
    }
    int prefix = (*p & 0xc0) == 0x40 ? 6 : 4;   /* with incremental indexing, or without / never indexed */
    if (hpack_int(&p, end, prefix, &v) < 0 || v < 8 || v > 14 || p >= end) return -1;
    int huff = *p & 0x80;
    if (hpack_int(&p, end, 7, &v) < 0 || (uint64_t)(end - p) < v) return -1;
    if (huff) return huffman_digits(p, v);
    if (v != 3 || !isdigit(p[0]) || !isdigit(p[1]) || !isdigit(p[2])) return -1;
    return (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
}

/* ------------------------------------------------------------------------------- HTTP/2 frames in */

static struct tunnel *stream_of(struct conn *c, uint32_t sid, int type) {
    uint32_t i = (sid - 1) / 2;
    if (sid == 0 || !(sid & 1) || i >= (uint32_t)c->ntunnels) {
        fail("frame type %d on stream %u, which this client never opened", type, sid);
        return NULL;
    }
    return c->tunnels[i];
}

static void on_frame(struct conn *c, int type, int flags, uint32_t sid, unsigned char *p, size_t n) {
    if (!c->settings_seen) {
        if (type != F_SETTINGS || (flags & ACK)) {
            fail("the server did not open with SETTINGS (RFC 9113 3.4): not HTTP/2?");
            return;
        }
        c->settings_seen = 1;
    }
    size_t start = 0, end = n;
    if ((type == F_DATA || type == F_HEADERS) && (flags & PADDED)) {
        if (!n || p[0] >= n) { fail("bad padding on stream %u", sid); return; }
        start = 1; end = n - p[0];
    }
    if (type == F_HEADERS && (flags & PRIORITY_FLAG)) start += 5;
    if (start > end) { fail("short HEADERS frame on stream %u", sid); return; }
    switch (type) {
    case F_DATA: {
        struct tunnel *t = stream_of(c, sid, type);
        if (!t) return;
        c->unacked += n;
        t->unacked += n;
        if (!t->open) { fail("DATA on stream %u before its CONNECT was answered", sid); return; }
        feed(t, p + start, end - start);
        if (flags & END_STREAM) fail("tunnel %u ended by the server (END_STREAM) during the run", sid);
        if (t->unacked >= WINDOW_RETURN) { window_update(c, sid, t->unacked); t->unacked = 0; }
        if (c->unacked >= WINDOW_RETURN) { window_update(c, 0, c->unacked); c->unacked = 0; }
        return;
    }
    case F_HEADERS: {
        struct tunnel *t = stream_of(c, sid, type);
        if (!t) return;
        if (t->open) { fail("HEADERS (trailers) on open tunnel %u", sid); return; }
        int status = header_status(p + start, p + end);
        if (status != 200) {
            if (status < 0) fail("CONNECT on stream %u not answered 200 (status not readable)", sid);
            else fail("CONNECT on stream %u answered %d", sid, status);
            return;
        }
        if (flags & END_STREAM) { fail("CONNECT on stream %u answered 200 with END_STREAM", sid); return; }
        t->open = 1;
        return;
    }
    case F_RST:
        fail("stream %u reset by the server (RST_STREAM, error code %u)", sid,
             n >= 4 ? (unsigned)(p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]) : 0u);
        return;
    case F_SETTINGS:
        if (flags & ACK) return;
        if (n % 6) { fail("SETTINGS frame of %zu bytes", n); return; }
        for (size_t i = 0; i < n; i += 6) {
            int id = p[i] << 8 | p[i + 1];
            uint32_t v = (uint32_t)p[i + 2] << 24 | p[i + 3] << 16 | p[i + 4] << 8 | p[i + 5];
            if (id == S_INITIAL_WINDOW) {   /* RFC 9113 6.9.2: the difference applies to open streams */
                int64_t delta = (int64_t)v - c->peer_initial;
                c->peer_initial = v;
                for (int k = 0; k < c->ntunnels; k++) c->tunnels[k]->send_window += delta;
            } else if (id == S_MAX_FRAME) c->peer_max_frame = v;
            else if (id == S_MAX_CONCURRENT && (uint32_t)c->ntunnels > v)
                fail("the server allows %u streams per connection, %d asked (use --streams-per-conn)", v, c->ntunnels);
        }
        put_frame(c, F_SETTINGS, ACK, 0, NULL, 0);
        for (int k = 0; k < c->ntunnels; k++)
            if (c->tunnels[k]->pending) try_send_h2(c->tunnels[k]);
        return;
    case F_PUSH:
        fail("PUSH_PROMISE although SETTINGS_ENABLE_PUSH = 0");
        return;
    case F_PING:
        if (!(flags & ACK)) {
            if (n != 8) { fail("PING of %zu bytes", n); return; }
            put_frame(c, F_PING, ACK, 0, p, 8);
        }
        return;
    case F_GOAWAY: {
        unsigned last = n >= 8 ? (unsigned)((p[0] & 0x7f) << 24 | p[1] << 16 | p[2] << 8 | p[3]) : 0;
        unsigned code = n >= 8 ? (unsigned)(p[4] << 24 | p[5] << 16 | p[6] << 8 | p[7]) : 0;
        char debug[64] = "";
        size_t dn = n > 8 ? n - 8 : 0, k;
        for (k = 0; k < dn && k < sizeof debug - 1; k++) debug[k] = isprint(p[8 + k]) && p[8 + k] != '"' ? p[8 + k] : '?';
        debug[k] = 0;
        fail("GOAWAY from the server (last stream %u, error code %u%s%s)", last, code, k ? ": " : "", debug);
        return;
    }
    case F_WINDOW_UPDATE: {
        if (n != 4) { fail("WINDOW_UPDATE of %zu bytes", n); return; }
        uint32_t inc = (uint32_t)(p[0] & 0x7f) << 24 | p[1] << 16 | p[2] << 8 | p[3];
        if (sid == 0) {
            c->send_window += inc;
            for (int k = 0; k < c->ntunnels; k++)
                if (c->tunnels[k]->pending) try_send_h2(c->tunnels[k]);
        } else {
            struct tunnel *t = stream_of(c, sid, type);
            if (!t) return;
            t->send_window += inc;
            if (t->pending) try_send_h2(t);
        }
        return;
    }
    default:
        return;   /* PRIORITY, CONTINUATION (our :status is in the first fragment), unknown: ignored */
    }
}

static void on_conn_readable(struct conn *c) {
    for (;;) {
        int r = SSL_read(c->ssl, c->rbuf + c->rhave, sizeof c->rbuf - c->rhave);
        if (r <= 0) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) break;
            if (!R.stopping || R.inflight_counted) fail("the server closed the HBONE connection");
            return;
        }
        c->rhave += r;
        size_t pos = 0;
        while (c->rhave - pos >= 9 && !R.error[0]) {
            unsigned char *h = c->rbuf + pos;
            size_t n = (size_t)h[0] << 16 | h[1] << 8 | h[2];
            if (n > MAX_FRAME_RECV) {
                fail("frame of %zu bytes over our SETTINGS_MAX_FRAME_SIZE %d: the server is not speaking HTTP/2 "
                     "(first bytes \"%.8s\")", n, MAX_FRAME_RECV, (const char *)h);
                return;
            }
            if (c->rhave - pos - 9 < n) break;
            uint32_t sid = (uint32_t)(h[5] & 0x7f) << 24 | h[6] << 16 | h[7] << 8 | h[8];
            on_frame(c, h[3], h[4], sid, h + 9, n);
            pos += 9 + n;
        }
        memmove(c->rbuf, c->rbuf + pos, c->rhave - pos);
        c->rhave -= pos;
        if (R.error[0]) return;
    }
}

static void on_plain_readable(struct tunnel *t) {
    unsigned char buf[65536];
    for (;;) {
        ssize_t n = recv(t->fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            fail("connection %u: %s", t->sid, strerror(errno));
            return;
        }
        if (n == 0) {
            /* A server may close a connection that has nothing more to answer: the run is over for it
             * (count reached, or the measured window ended and its last response is in). */
            if (!t->busy && (R.stopping || (R.loop == L_COUNT && R.sent >= A.count))) {
                epoll_ctl(R.ep, EPOLL_CTL_DEL, t->fd, NULL);
                return;
            }
            fail("connection %u closed by the server", t->sid);
            return;
        }
        feed(t, buf, n);
        if (R.error[0]) return;
    }
}

/* ------------------------------------------------------------------------------- set-up */

/* Exactly n bytes of the SOCKS5 reply (the socket is still blocking, with SETUP_TIMEOUT_S timeouts). */
static int socks_read(int fd, unsigned char *b, size_t n) {
    for (size_t have = 0; have < n;) {
        ssize_t r = recv(fd, b + have, n - have, 0);
        if (r == 0) { fail("SOCKS5 proxy %s:%d closed the connection during the handshake", A.socks_host, A.socks_port); return -1; }
        if (r < 0) {
            if (errno == EINTR) continue;
            fail("SOCKS5 proxy %s:%d: %s", A.socks_host, A.socks_port,
                 errno == EAGAIN ? "no answer within the set-up timeout" : strerror(errno));
            return -1;
        }
        have += r;
    }
    return 0;
}

static int socks_write(int fd, const unsigned char *b, size_t n) {
    if (send(fd, b, n, MSG_NOSIGNAL) != (ssize_t)n) {   /* a few bytes into an empty send buffer */
        fail("SOCKS5 proxy %s:%d: write failed: %s", A.socks_host, A.socks_port, strerror(errno));
        return -1;
    }
    return 0;
}

/* RFC 1928 on a connected socket: greeting with the one method "no authentication" (3), CONNECT to
 * --connect's IPv4 address (4), the reply read whole (its bound address: IPv4, domain or IPv6) so the
 * first byte after it is the server's. Reply code != 0 (6: 1 general failure, 2 not allowed by ruleset,
 * 5 refused, ...) is a failure naming the code. */
static int socks5_connect(int fd) {
    static const char *const why[] = {"succeeded", "general failure", "not allowed by ruleset",
                                      "network unreachable", "host unreachable", "connection refused",
                                      "TTL expired", "command not supported", "address type not supported"};
    unsigned char b[262];
    if (socks_write(fd, (const unsigned char *)"\x05\x01\x00", 3) < 0 || socks_read(fd, b, 2) < 0) return -1;
    if (b[0] != 5 || b[1] != 0) {
        fail("SOCKS5 proxy %s:%d refused 'no authentication' (answered %02x %02x)", A.socks_host, A.socks_port, b[0], b[1]);
        return -1;
    }
    unsigned char req[10] = {5, 1, 0, 1};
    inet_pton(AF_INET, A.host, req + 4);
    req[8] = A.port >> 8; req[9] = A.port & 0xff;
    if (socks_write(fd, req, sizeof req) < 0 || socks_read(fd, b, 4) < 0) return -1;
    if (b[0] != 5) { fail("SOCKS5 proxy %s:%d: reply version %d, not 5", A.socks_host, A.socks_port, b[0]); return -1; }
    if (b[1] != 0) {
        fail("SOCKS5 proxy %s:%d: CONNECT to %s:%d refused: reply %#04x (%s)", A.socks_host, A.socks_port, A.host,
             A.port, b[1], b[1] < sizeof why / sizeof *why ? why[b[1]] : "unassigned");
        return -1;
    }
    size_t rest;
    if (b[3] == 1) rest = 4 + 2;
    else if (b[3] == 4) rest = 16 + 2;
    else if (b[3] == 3) { if (socks_read(fd, b, 1) < 0) return -1; rest = b[0] + 2; }
    else { fail("SOCKS5 proxy %s:%d: reply address type %d", A.socks_host, A.socks_port, b[3]); return -1; }
    return socks_read(fd, b, rest);
}

static int tcp_connect(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { fail("socket(): %s", strerror(errno)); return -1; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = (time_t)SETUP_TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (A.source_ip) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        if (inet_pton(AF_INET, A.source_ip, &src.sin_addr) != 1 || bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            fail("bind to --source-ip %s: %s", A.source_ip, strerror(errno));
            close(fd);
            return -1;
        }
    }
    const char *host = A.socks_port ? A.socks_host : A.host;
    int port = A.socks_port ? A.socks_port : A.port;
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &dst.sin_addr);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) {
        fail("connect to %s%s:%d: %s", A.socks_port ? "SOCKS5 proxy " : "", host, port, strerror(errno));
        close(fd);
        return -1;
    }
    if (A.socks_port && socks5_connect(fd) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void set_nonblocking(int fd) {
    struct timeval tv = {0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) fail("O_NONBLOCK: %s", strerror(errno));
}

static SSL_CTX *make_ctx(void) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) return NULL;
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);   /* DESIGN 3: TLS 1.3 */
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);          /* the server's chain to our CA */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    static const unsigned char alpn[] = {2, 'h', '2'};
    if (SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn) != 0 ||
        SSL_CTX_load_verify_locations(ctx, A.ca, NULL) != 1 ||
        SSL_CTX_use_certificate_chain_file(ctx, A.cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, A.key, SSL_FILETYPE_PEM) != 1) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* The CONNECT header block (RFC 7541 literals without indexing: nothing to keep in step with the peer). */
static size_t connect_block(unsigned char *b, size_t cap) {
    size_t n = 0;
    unsigned char tp[16 + 8];
    char trace[64];
    if (getrandom(tp, sizeof tp, 0) != (ssize_t)sizeof tp) memset(tp, 0x5a, sizeof tp);
    tp[0] |= 1; tp[16] |= 1;   /* W3C: all-zero ids are invalid */
    int k = snprintf(trace, sizeof trace, "00-");
    for (int i = 0; i < 16; i++) k += snprintf(trace + k, sizeof trace - k, "%02x", tp[i]);
    k += snprintf(trace + k, sizeof trace - k, "-");
    for (int i = 16; i < 24; i++) k += snprintf(trace + k, sizeof trace - k, "%02x", tp[i]);
    snprintf(trace + k, sizeof trace - k, "-00");
    const char *names[MAX_HEADERS + 1], *values[MAX_HEADERS + 1];
    size_t nlen[MAX_HEADERS + 1];
    int nh = 0;
    for (int i = 0; i < A.nconnect_headers; i++) {
        const char *colon = strchr(A.connect_headers[i], ':');
        names[nh] = A.connect_headers[i];
        nlen[nh] = colon - A.connect_headers[i];
        values[nh] = colon + 1;
        while (*values[nh] == ' ') values[nh]++;
        nh++;
    }
    names[nh] = "traceparent"; nlen[nh] = 11; values[nh] = trace; nh++;
    size_t a = strlen(A.authority);
    if (cap < 32 + a) return 0;
    b[n++] = 0x02; n += put_hpack_int(b + n, 7, 0, 7); memcpy(b + n, "CONNECT", 7); n += 7;   /* :method (2) */
    b[n++] = 0x01; n += put_hpack_int(b + n, 7, 0, a); memcpy(b + n, A.authority, a); n += a; /* :authority (1) */
    for (int i = 0; i < nh; i++) {
        size_t v = strlen(values[i]);
        if (n + nlen[i] + v + 16 > cap) return 0;
        b[n++] = 0x00;                                    /* literal without indexing, new name */
        n += put_hpack_int(b + n, 7, 0, nlen[i]);
        for (size_t j = 0; j < nlen[i]; j++) b[n++] = tolower((unsigned char)names[i][j]);   /* RFC 9113 8.2.1 */
        n += put_hpack_int(b + n, 7, 0, v);
        memcpy(b + n, values[i], v); n += v;
    }
    return n;
}

static int setup_h2(void) {
    SSL_CTX *ctx = make_ctx();
    if (!ctx) { fail("could not load --ca/--cert/--key"); return -1; }
    int per = A.streams_per_conn;
    R.nconns = (A.tunnels + per - 1) / per;
    R.conns = calloc(R.nconns, sizeof *R.conns);
    for (int ci = 0; ci < R.nconns; ci++) {
        struct conn *c = &R.conns[ci];
        c->fd = tcp_connect();
        if (c->fd < 0) return -1;
        c->ssl = SSL_new(ctx);
        SSL_set_fd(c->ssl, c->fd);
        if (SSL_connect(c->ssl) != 1) {
            unsigned long e = ERR_get_error();
            fail("TLS handshake with %s:%d failed: %s", A.host, A.port, e ? ERR_reason_error_string(e) : "connection closed");
            return -1;
        }
        const unsigned char *proto;
        unsigned plen;
        SSL_get0_alpn_selected(c->ssl, &proto, &plen);
        if (plen != 2 || memcmp(proto, "h2", 2)) { fail("the server did not select ALPN h2"); return -1; }
        c->send_window = 65535;   /* RFC 9113 6.9.2 initial values until the peer's SETTINGS say otherwise */
        c->peer_initial = 65535;
        c->peer_max_frame = 16384;
        int first = ci * A.tunnels / R.nconns, last = (ci + 1) * A.tunnels / R.nconns;
        c->ntunnels = last - first;
        c->tunnels = calloc(c->ntunnels, sizeof *c->tunnels);
        buf_append(c, PREFACE, sizeof PREFACE - 1);
        unsigned char s[12] = {0, S_ENABLE_PUSH, 0, 0, 0, 0,
                               0, S_INITIAL_WINDOW, STREAM_WINDOW >> 24, (STREAM_WINDOW >> 16) & 0xff, 0, 0};
        put_frame(c, F_SETTINGS, 0, 0, s, 12);   /* push off, 16 MiB stream windows */
        window_update(c, 0, CONN_WINDOW_BOOST);
        for (int k = 0; k < c->ntunnels; k++) {
            struct tunnel *t = &R.tunnels[first + k];
            t->c = c;
            t->sid = 2 * k + 1;
            t->send_window = 65535;
            c->tunnels[k] = t;
            unsigned char block[1024];
            size_t bn = connect_block(block, sizeof block);
            if (!bn) { fail("CONNECT headers too long"); return -1; }
            put_frame(c, F_HEADERS, END_HEADERS, t->sid, block, bn);
        }
        set_nonblocking(c->fd);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)K_CONN << 32) | ci};
        epoll_ctl(R.ep, EPOLL_CTL_ADD, c->fd, &ev);
        flush_conn(c);
    }
    SSL_CTX_free(ctx);   /* each SSL holds its own reference */
    return R.error[0] ? -1 : 0;
}

static int setup_plain(void) {
    for (int i = 0; i < A.tunnels; i++) {
        struct tunnel *t = &R.tunnels[i];
        t->sid = i + 1;
        t->fd = tcp_connect();
        if (t->fd < 0) return -1;
        set_nonblocking(t->fd);
        t->open = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)K_PLAIN << 32) | i};
        epoll_ctl(R.ep, EPOLL_CTL_ADD, t->fd, &ev);
    }
    return 0;
}

/* ------------------------------------------------------------------------------- the loop */

static int timer_fd = -1;

static void arm_timer(double at) {
    struct itimerspec its = {0};
    its.it_value.tv_sec = (time_t)at;
    its.it_value.tv_nsec = (long)((at - (time_t)at) * 1e9);
    if (!its.it_value.tv_sec && !its.it_value.tv_nsec) its.it_value.tv_nsec = 1;
    timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
}

/* One round: wait (at most until `deadline`), handle what is ready, flush what it queued. */
static void poll_once(double deadline) {
    struct epoll_event evs[256];
    double left = deadline - now_s();
    int ms = left <= 0 ? 0 : (int)(left * 1000) + 1;
    if (ms > IDLE_TIMEOUT_MS) ms = IDLE_TIMEOUT_MS;
    int n = epoll_wait(R.ep, evs, 256, ms);
    if (n < 0) {
        if (errno != EINTR) fail("epoll_wait: %s", strerror(errno));
        return;
    }
    if (n == 0 && ms == IDLE_TIMEOUT_MS) { fail("no response for %d s", IDLE_TIMEOUT_MS / 1000); return; }
    for (int i = 0; i < n && !R.error[0]; i++) {
        uint32_t kind = evs[i].data.u64 >> 32, idx = (uint32_t)evs[i].data.u64;
        if (kind == K_CONN) {
            struct conn *c = &R.conns[idx];
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_conn_readable(c);
        } else if (kind == K_PLAIN) on_plain_readable(&R.tunnels[idx]);
        else if (kind == K_TIMER) { uint64_t x; if (read(timer_fd, &x, sizeof x) < 0) {} }
    }
    for (int i = 0; i < R.nconns && !R.error[0]; i++)
        if (R.conns[i].wlen) flush_conn(&R.conns[i]);
}

static int all_open(void) {
    for (int i = 0; i < A.tunnels; i++) if (!R.tunnels[i].open) return 0;
    return 1;
}

static int busy_counted(void) {
    for (int i = 0; i < A.tunnels; i++)
        if (R.tunnels[i].busy && (R.loop == L_COUNT || R.tunnels[i].started >= R.t0)) return 1;
    return 0;
}

static struct rusage ru0, ru1;
static double pid_cpu0[MAX_CPU_PIDS], pid_cpu1[MAX_CPU_PIDS];

/* utime + stime of a process (all its threads) from /proc/PID/stat, fields 14 and 15 after the LAST
 * ')' (proc(5)); -1 if it is gone. */
static double proc_cpu_s(int pid) {
    char path[64], text[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    char *p = strrchr(text, ')');
    unsigned long long ut, st;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2) return -1;
    return (double)(ut + st) / sysconf(_SC_CLK_TCK);
}

/* The measured window's edges: our own CPU, and that of the --cpu-pid processes (the parties under
 * test), sampled at the same instants, so their CPU per request covers exactly the counted requests. */
static void sample_cpu(struct rusage *ru, double *pids) {
    getrusage(RUSAGE_SELF, ru);
    for (int i = 0; i < A.ncpu_pids; i++) pids[i] = proc_cpu_s(A.cpu_pids[i]);
}

static void run(void) {
    double setup_end = now_s() + SETUP_TIMEOUT_S;
    while (!all_open() && !R.error[0]) {
        if (now_s() > setup_end) { fail("CONNECTs not all answered within %.0f s", SETUP_TIMEOUT_S); return; }
        poll_once(setup_end);
    }
    if (R.error[0]) return;
    double start = now_s();
    if (R.loop == L_COUNT) {
        R.measuring_started = 1;
        R.t0 = start;
        sample_cpu(&ru0, pid_cpu0);
        for (int i = 0; i < A.tunnels && R.sent < A.count; i++) send_request(&R.tunnels[i], start);
        for (int i = 0; i < R.nconns; i++) flush_conn(&R.conns[i]);
        while (R.completed < A.count && !R.error[0]) poll_once(now_s() + IDLE_TIMEOUT_MS / 1000.0);
        R.t1 = now_s();
        sample_cpu(&ru1, pid_cpu1);
        return;
    }
    R.t0 = start + WARMUP_S;
    R.t1 = R.t0 + A.seconds;
    if (R.loop == L_CLOSED) {
        for (int i = 0; i < A.tunnels; i++) send_request(&R.tunnels[i], start);
        for (int i = 0; i < R.nconns; i++) flush_conn(&R.conns[i]);
        while (!R.error[0]) {
            double now = now_s();
            if (!R.measuring_started && now >= R.t0) { R.measuring_started = 1; R.t0 = now; R.t1 = now + A.seconds; sample_cpu(&ru0, pid_cpu0); }
            if (R.measuring_started && now >= R.t1) break;
            poll_once(R.measuring_started ? R.t1 : R.t0);
        }
    } else {
        R.idle = malloc(sizeof *R.idle * A.tunnels);
        R.backlog = malloc(sizeof *R.backlog * (MAX_BACKLOG + 1));
        for (int i = A.tunnels - 1; i >= 0; i--) R.idle[R.nidle++] = &R.tunnels[i];
        timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)K_TIMER << 32};
        epoll_ctl(R.ep, EPOLL_CTL_ADD, timer_fd, &ev);
        double interval = 1.0 / A.rate;
        long long due_n = 0;
        while (!R.error[0]) {
            double now = now_s();
            if (!R.measuring_started && now >= R.t0) { R.measuring_started = 1; sample_cpu(&ru0, pid_cpu0); }
            for (double due = start + due_n * interval; due <= now && due < R.t1; due = start + ++due_n * interval) {
                if (R.nidle) send_request(R.idle[--R.nidle], due);
                else if (R.bl_len == MAX_BACKLOG) { fail("overloaded: %d requests waiting for a free tunnel", MAX_BACKLOG); break; }
                else { R.backlog[(R.bl_head + R.bl_len++) % (MAX_BACKLOG + 1)] = due; }
            }
            for (int i = 0; i < R.nconns; i++) flush_conn(&R.conns[i]);
            if (now >= R.t1) break;
            double next = start + due_n * interval;
            if (next > R.t1) next = R.t1;
            arm_timer(next);
            poll_once(next + 1.0);
        }
        if (!R.measuring_started) { R.measuring_started = 1; sample_cpu(&ru0, pid_cpu0); }
    }
    sample_cpu(&ru1, pid_cpu1);
    /* Drain: requests of the measured window still in flight finish (their latency counts). */
    R.stopping = 1;
    double drain_end = now_s() + DRAIN_S;
    while (!R.error[0] && (R.inflight_counted = busy_counted() || R.bl_len) && now_s() < drain_end) poll_once(drain_end);
    if (!R.error[0] && (busy_counted() || R.bl_len))
        fail("requests of the measured window still unanswered %.1f s after it", DRAIN_S);
}

/* ------------------------------------------------------------------------------- main */

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static double percentile(double *v, long long n, double q) {   /* as benchmarks.stats.percentile */
    double pos = (n - 1) * q / 100;
    long long lo = (long long)pos, hi = lo + (pos > lo);
    return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

static double tv_s(const struct timeval *tv) { return tv->tv_sec + tv->tv_usec / 1e6; }

static void json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = *s;
        if (ch == '"' || ch == '\\') printf("\\%c", ch);
        else if (ch < 0x20 || ch > 0x7e) printf("\\u%04x", ch);
        else putchar(ch);
    }
    putchar('"');
}

static int usage(const char *why) {
    fprintf(stderr, "hbone_httpload: %s\nusage: hbone_httpload --connect IP:PORT (--authority IP:PORT --ca CA --cert C "
                    "--key K [--source-ip IP] [--connect-header 'n: v']... | --plain [--socks IP:PORT [--source-ip IP]]) [--host H] [--header 'N: v']... "
                    "[--tunnels N] [--rate R] [--seconds S] [--count N] [--streams-per-conn M] [--cpu-pid PID]...\n", why);
    return 2;
}

int main(int argc, char **argv) {
    static char host[64];
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(k, "--plain")) { A.plain = 1; continue; }
        if (!v) return usage("missing value");
        i++;
        if (!strcmp(k, "--connect")) {
            const char *colon = strrchr(v, ':');
            if (!colon || colon - v >= (long)sizeof host) return usage("--connect IP:PORT");
            memcpy(host, v, colon - v); host[colon - v] = 0;
            A.host = host; A.port = atoi(colon + 1);
            struct in_addr ia;
            if (inet_pton(AF_INET, host, &ia) != 1 || A.port <= 0 || A.port > 65535) return usage("--connect IPv4:PORT");
        } else if (!strcmp(k, "--authority")) A.authority = v;
        else if (!strcmp(k, "--ca")) A.ca = v;
        else if (!strcmp(k, "--cert")) A.cert = v;
        else if (!strcmp(k, "--key")) A.key = v;
        else if (!strcmp(k, "--source-ip")) A.source_ip = v;
        else if (!strcmp(k, "--socks")) {
            const char *colon = strrchr(v, ':');
            if (!colon || colon - v >= (long)sizeof A.socks_host) return usage("--socks IP:PORT");
            memcpy(A.socks_host, v, colon - v); A.socks_host[colon - v] = 0;
            A.socks_port = atoi(colon + 1);
            struct in_addr ia;
            if (inet_pton(AF_INET, A.socks_host, &ia) != 1 || A.socks_port <= 0 || A.socks_port > 65535)
                return usage("--socks IPv4:PORT");
        }
        else if (!strcmp(k, "--host")) A.http_host = v;
        else if (!strcmp(k, "--tunnels")) A.tunnels = atoi(v);
        else if (!strcmp(k, "--rate")) A.rate = atof(v);
        else if (!strcmp(k, "--seconds")) A.seconds = atof(v);
        else if (!strcmp(k, "--count")) A.count = atoi(v);
        else if (!strcmp(k, "--streams-per-conn")) A.streams_per_conn = atoi(v);
        else if (!strcmp(k, "--cpu-pid")) {
            if (A.ncpu_pids == MAX_CPU_PIDS || atoi(v) <= 0) return usage("--cpu-pid PID (at most 32)");
            A.cpu_pids[A.ncpu_pids++] = atoi(v);
        }
        else if (!strcmp(k, "--connect-header") || !strcmp(k, "--header")) {
            int h2 = !strcmp(k, "--connect-header");
            if ((h2 ? A.nconnect_headers : A.nheaders) == MAX_HEADERS) return usage("too many headers");
            const char *colon = strchr(v, ':');
            if (!colon || colon == v || strpbrk(v, "\r\n")) return usage("header 'Name: value'");
            if (h2) A.connect_headers[A.nconnect_headers++] = v; else A.headers[A.nheaders++] = v;
        } else return usage("unknown option");
    }
    if (!A.host) return usage("--connect is required");
    if (A.socks_port && !A.plain) return usage("--socks is for --plain (HBONE mode dials --connect itself)");
    if (!A.plain && (!A.authority || !A.ca || !A.cert || !A.key)) return usage("HBONE needs --authority --ca --cert --key");
    if (A.authority && strlen(A.authority) > 255) return usage("--authority too long");
    if (A.tunnels < 1 || A.tunnels > MAX_TUNNELS || A.streams_per_conn < 1 || A.seconds <= 0 || A.rate < 0 || A.count < 0)
        return usage("bad number");
    R.loop = A.count ? L_COUNT : A.rate > 0 ? L_OPEN : L_CLOSED;
    if (R.loop == L_COUNT && A.rate > 0) return usage("--count and --rate exclude each other");
    /* The request: as benchmarks/httpload.py's REQUEST_TEMPLATE. */
    char default_host[80];
    snprintf(default_host, sizeof default_host, "%s:%d", A.host, A.port);
    int n = snprintf((char *)R.request, sizeof R.request, "GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: hbone-bench\r\n",
                     A.http_host ? A.http_host : A.plain ? default_host : A.authority);
    for (int i = 0; i < A.nheaders && n < (int)sizeof R.request; i++)
        n += snprintf((char *)R.request + n, sizeof R.request - n, "%s\r\n", A.headers[i]);
    n += snprintf((char *)R.request + n, sizeof R.request - n, "\r\n");
    if (n >= (int)sizeof R.request) return usage("request too long");
    R.request_len = n;

    R.ep = epoll_create1(EPOLL_CLOEXEC);
    R.tunnels = calloc(A.tunnels, sizeof *R.tunnels);
    for (int i = 0; i < A.tunnels; i++) R.tunnels[i].fd = -1;
    if ((A.plain ? setup_plain() : setup_h2()) == 0) run();

    double wall = R.t1 > R.t0 ? R.t1 - R.t0 : 0;
    double user = tv_s(&ru1.ru_utime) - tv_s(&ru0.ru_utime), sys = tv_s(&ru1.ru_stime) - tv_s(&ru0.ru_stime);
    if (!R.measuring_started) user = sys = 0;
    printf("{\"client\": \"%s\", \"loop\": \"%s\", \"tunnels\": %d, \"connections\": %d, \"requests\": %lld, "
           "\"wall_s\": %.6f, \"rps\": %.3f",
           A.plain ? "c-plain" : "c-hbone", R.loop == L_COUNT ? "count" : R.loop == L_OPEN ? "open" : "closed",
           A.tunnels, A.plain ? A.tunnels : R.nconns, R.counted, wall, wall > 0 ? R.counted / wall : 0.0);
    if (R.nlat) {
        qsort(R.lat, R.nlat, sizeof *R.lat, cmp_double);
        printf(", \"p50_ms\": %.4f, \"p99_ms\": %.4f", percentile(R.lat, R.nlat, 50) * 1e3, percentile(R.lat, R.nlat, 99) * 1e3);
    } else printf(", \"p50_ms\": null, \"p99_ms\": null");
    printf(", \"statuses\": {");
    int first = 1;
    for (int s = 0; s < 600; s++)
        if (R.statuses[s]) { printf("%s\"%d\": %lld", first ? "" : ", ", s, R.statuses[s]); first = 0; }
    printf("}, \"bodies\": {");
    for (int i = 0; i < R.nbody_keys; i++) {
        if (i) printf(", ");
        json_string(R.body_keys[i]);
        printf(": %lld", R.body_counts[i]);
    }
    if (R.body_counts[BODY_KINDS]) printf("%s\"other\": %lld", R.nbody_keys ? ", " : "", R.body_counts[BODY_KINDS]);
    printf("}, \"errors\": %d, \"cpu_user_s\": %.4f, \"cpu_sys_s\": %.4f", R.error[0] ? 1 : 0, user, sys);
    if (A.ncpu_pids) {   /* each --cpu-pid's CPU seconds over the measured window (null: it vanished) */
        printf(", \"pid_cpu_s\": {");
        for (int i = 0; i < A.ncpu_pids; i++) {
            printf("%s\"%d\": ", i ? ", " : "", A.cpu_pids[i]);
            if (R.measuring_started && pid_cpu0[i] >= 0 && pid_cpu1[i] >= 0) printf("%.4f", pid_cpu1[i] - pid_cpu0[i]);
            else printf("null");
        }
        printf("}");
    }
    if (R.error[0]) { printf(", \"error\": "); json_string(R.error); }
    printf("}\n");
    fflush(stdout);
    if (R.error[0]) {
        fprintf(stderr, "hbone_httpload: %lld requests completed, then: %s\n", R.completed, R.error);
        return 1;
    }
    return 0;
}
