/* The new-connection load client in C: the same exchange as benchmarks/conn_client.py, for less CPU.
 *
 *   conn_client --connect IP:PORT --authority IP:PORT --ca CA --cert C --key K
 *               [--count N] [--concurrency M] [--procs P] [--verify-peer]
 *
 * Built by benchmarks/workers.py at run time (cc -O2 ... -lssl -lcrypto) where a C compiler and the
 * OpenSSL headers exist; otherwise the scenario uses the Python client. Why it exists: on a 2-core
 * machine the client's handshakes compete with the proxy for the same cores. OpenSSL 3.0's own
 * handshake costs ~540 us of CPU per client connection here whatever the language; the Python client
 * adds ~250 us around it (asyncio/uvloop SSL transport, objects, callbacks), this one almost nothing.
 *
 * Each connection: non-blocking TCP connect, full TLS 1.3 handshake with our client certificate (no
 * session reuse: every SSL object is new and given no session), HTTP/2 preface + empty SETTINGS +
 * HEADERS(CONNECT authority) in one write, SETTINGS ACK, and after the 200 (recognised by its one-byte
 * HPACK form 0x88, which nghttp2 and h2 both send) one DATA frame with END_STREAM carrying the
 * benchmarks/wire.py echo request (op 'E', 1 KiB), then 1 KiB back and END_STREAM, GOAWAY, close.
 * --procs forked copies each run an epoll loop with concurrency/procs connections in flight; they
 * start together and the parent prints one JSON object (the Python client's fields).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD_BYTES 1024          /* "1 KiB each way" */
#define IDLE_TIMEOUT_MS 10000       /* no progress on any connection of a copy for this long: give up */
#define READ_BUF 16384              /* one TLS record */
#define MAX_PROCS 64

static const char PREFACE[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
enum { F_DATA = 0, F_HEADERS = 1, F_RST = 3, F_SETTINGS = 4, F_PING = 6, F_GOAWAY = 7 };
enum { END_STREAM = 1, ACK = 1, END_HEADERS = 4, PADDED = 8, PRIORITY = 0x20 };

struct args {
    const char *host, *authority, *ca, *cert, *key;
    int port, count, concurrency, procs, verify_peer;
};

struct result {              /* one per copy, in shared memory */
    int connections, failed;
    double start, end, user_s, sys_s;
    char error[160];
};

enum state { ST_FREE, ST_CONNECTING, ST_HANDSHAKE, ST_EXCHANGE };

struct conn {
    int fd;
    SSL *ssl;
    enum state st;
    double t0;
    int status_seen, received;
    unsigned char buf[READ_BUF * 2];
    size_t have;
};

static unsigned char first_msg[256], data_msg[9 + 9 + PAYLOAD_BYTES];
static size_t first_len, data_len;
static const unsigned char SETTINGS_ACK[9] = {0, 0, 0, F_SETTINGS, ACK, 0, 0, 0, 0};
static const unsigned char GOAWAY_OK[17] = {0, 0, 8, F_GOAWAY, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static size_t put_frame(unsigned char *out, int type, int flags, uint32_t sid, const void *p, size_t n) {
    out[0] = n >> 16; out[1] = n >> 8; out[2] = n; out[3] = type; out[4] = flags;
    out[5] = sid >> 24; out[6] = sid >> 16; out[7] = sid >> 8; out[8] = sid;
    if (n) memcpy(out + 9, p, n);
    return 9 + n;
}

static void build_messages(const char *authority) {
    unsigned char block[160];
    size_t a = strlen(authority), b = 0;
    /* RFC 7541 6.2.2 literal without indexing, indexed name: 2 = :method, 1 = :authority */
    block[b++] = 2; block[b++] = 7; memcpy(block + b, "CONNECT", 7); b += 7;
    block[b++] = 1; block[b++] = a; memcpy(block + b, authority, a); b += a;
    memcpy(first_msg, PREFACE, sizeof PREFACE - 1);
    first_len = sizeof PREFACE - 1;
    first_len += put_frame(first_msg + first_len, F_SETTINGS, 0, 0, NULL, 0);
    first_len += put_frame(first_msg + first_len, F_HEADERS, END_HEADERS, 1, block, b);
    unsigned char body[9 + PAYLOAD_BYTES];
    body[0] = 'E';                                   /* wire.HEADER: op, big-endian u64 length */
    for (int i = 0; i < 8; i++) body[1 + i] = (uint64_t)PAYLOAD_BYTES >> (56 - 8 * i);
    for (int i = 0; i < PAYLOAD_BYTES; i++) body[9 + i] = i & 0xff;   /* wire.PAYLOAD_BLOCK */
    data_len = put_frame(data_msg, F_DATA, END_STREAM, 1, body, sizeof body);
}

static SSL_CTX *make_ctx(const struct args *a) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) return NULL;
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_verify(ctx, a->verify_peer ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    static const unsigned char alpn[] = {2, 'h', '2'};
    if (SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn) != 0 ||
        SSL_CTX_load_verify_locations(ctx, a->ca, NULL) != 1 ||
        SSL_CTX_use_certificate_chain_file(ctx, a->cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, a->key, SSL_FILETYPE_PEM) != 1) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* ----------------------------------------------------------------------------- one copy */
struct copy {
    const struct args *a;
    SSL_CTX *ctx;
    struct sockaddr_in addr;
    int ep, left, inflight, count;
    struct conn *conns;
    double *lat;
    int nlat;
    struct result *res;
};

static void fail(struct copy *c, const char *why) {
    c->res->failed++;
    if (!c->res->error[0]) snprintf(c->res->error, sizeof c->res->error, "%s", why);
}

static void close_conn(struct copy *c, struct conn *k) {
    if (k->ssl) SSL_free(k->ssl);
    if (k->fd >= 0) close(k->fd);   /* also leaves the epoll set */
    k->ssl = NULL; k->fd = -1; k->st = ST_FREE;
    c->inflight--;
}

static int start_conn(struct copy *c, struct conn *k) {
    k->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (k->fd < 0) { fail(c, "socket() failed"); return -1; }
    int one = 1;
    setsockopt(k->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    k->ssl = NULL; k->have = 0; k->status_seen = 0; k->received = 0; k->t0 = now_s();
    c->left--; c->inflight++;
    int r = connect(k->fd, (struct sockaddr *)&c->addr, sizeof c->addr);
    if (r < 0 && errno != EINPROGRESS) { fail(c, "connect() failed"); close_conn(c, k); return -1; }
    k->st = ST_CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = k};
    epoll_ctl(c->ep, EPOLL_CTL_ADD, k->fd, &ev);
    return 0;
}

static int ssl_send(struct conn *k, const void *p, size_t n) {
    /* Tiny writes on a fresh socket: the kernel takes them whole (no WANT_WRITE in practice). */
    return SSL_write(k->ssl, p, n) == (int)n ? 0 : -1;
}

/* Consume whole frames from k->buf; 1 = exchange finished, 0 = need more, -1 = failed. */
static int on_frames(struct copy *c, struct conn *k) {
    size_t pos = 0;
    int rc = 0;
    while (k->have - pos >= 9) {
        unsigned char *h = k->buf + pos;
        size_t n = (h[0] << 16) | (h[1] << 8) | h[2];
        int type = h[3], flags = h[4];
        uint32_t sid = ((h[5] & 0x7f) << 24) | (h[6] << 16) | (h[7] << 8) | h[8];
        if (k->have - pos - 9 < n) {
            if (n + 9 > sizeof k->buf) { fail(c, "frame larger than the read buffer"); return -1; }
            break;
        }
        unsigned char *p = h + 9;
        size_t start = 0, end = n;
        if ((type == F_DATA || type == F_HEADERS) && (flags & PADDED) && n) { start = 1; end = n - p[0]; }
        if (type == F_HEADERS && (flags & PRIORITY)) start += 5;
        pos += 9 + n;
        if (type == F_SETTINGS && !(flags & ACK)) {
            if (ssl_send(k, SETTINGS_ACK, sizeof SETTINGS_ACK)) { fail(c, "write failed"); return -1; }
        } else if (type == F_HEADERS && sid == 1) {
            if (!k->status_seen) {
                if (end <= start || p[start] != 0x88) { fail(c, "CONNECT not answered 200"); return -1; }
                k->status_seen = 1;
                if (ssl_send(k, data_msg, data_len)) { fail(c, "write failed"); return -1; }
            }
            if (flags & END_STREAM) { rc = 1; break; }
        } else if (type == F_DATA && sid == 1) {
            k->received += end > start ? end - start : 0;
            if (flags & END_STREAM) { rc = 1; break; }
        } else if (type == F_PING && !(flags & ACK)) {
            unsigned char pong[17];
            put_frame(pong, F_PING, ACK, 0, p, n == 8 ? 8 : 0);
            if (ssl_send(k, pong, n == 8 ? 17 : 9)) { fail(c, "write failed"); return -1; }
        } else if (type == F_RST || type == F_GOAWAY) {
            fail(c, type == F_RST ? "stream reset" : "GOAWAY before the exchange finished");
            return -1;
        }
    }
    memmove(k->buf, k->buf + pos, k->have - pos);
    k->have -= pos;
    if (rc == 1 && k->received != PAYLOAD_BYTES) { fail(c, "echo: wrong byte count back"); return -1; }
    return rc;
}

static void step(struct copy *c, struct conn *k) {
    if (k->st == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(k->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { fail(c, "TCP connect failed"); close_conn(c, k); return; }
        k->ssl = SSL_new(c->ctx);
        SSL_set_fd(k->ssl, k->fd);
        SSL_set_connect_state(k->ssl);
        k->st = ST_HANDSHAKE;
    }
    if (k->st == ST_HANDSHAKE) {
        int r = SSL_do_handshake(k->ssl);
        if (r != 1) {
            int e = SSL_get_error(k->ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                struct epoll_event ev = {.events = e == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT, .data.ptr = k};
                epoll_ctl(c->ep, EPOLL_CTL_MOD, k->fd, &ev);
                return;
            }
            fail(c, "TLS handshake failed");
            close_conn(c, k);
            return;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = k};
        epoll_ctl(c->ep, EPOLL_CTL_MOD, k->fd, &ev);
        if (ssl_send(k, first_msg, first_len)) { fail(c, "write failed"); close_conn(c, k); return; }
        k->st = ST_EXCHANGE;
    }
    for (;;) {   /* ST_EXCHANGE: drain what OpenSSL can give us */
        int r = SSL_read(k->ssl, k->buf + k->have, sizeof k->buf - k->have);
        if (r <= 0) {
            int e = SSL_get_error(k->ssl, r);
            if (e == SSL_ERROR_WANT_READ) return;
            fail(c, "connection closed before the exchange finished");
            close_conn(c, k);
            return;
        }
        k->have += r;
        int rc = on_frames(c, k);
        if (rc < 0) { close_conn(c, k); return; }
        if (rc == 1) {
            ssl_send(k, GOAWAY_OK, sizeof GOAWAY_OK);
            SSL_shutdown(k->ssl);   /* close_notify, as the Python client's transport.close() sends */
            if (c->nlat < c->count) c->lat[c->nlat++] = now_s() - k->t0;
            c->res->connections++;
            close_conn(c, k);
            return;
        }
    }
}

static void run_copy(struct copy *c, int count, int concurrency) {
    c->left = c->count = count;
    c->conns = calloc(concurrency, sizeof *c->conns);
    for (int i = 0; i < concurrency; i++) { c->conns[i].fd = -1; c->conns[i].st = ST_FREE; }
    c->ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event evs[256];
    for (;;) {
        for (int i = 0; i < concurrency && c->left > 0; i++)
            if (c->conns[i].st == ST_FREE) start_conn(c, &c->conns[i]);
        if (c->inflight == 0) break;
        int n = epoll_wait(c->ep, evs, 256, IDLE_TIMEOUT_MS);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { fail(c, "no progress for 10 s"); break; }
        for (int i = 0; i < n; i++) {
            struct conn *k = evs[i].data.ptr;
            if (k->st != ST_FREE) step(c, k);
        }
    }
}

/* ----------------------------------------------------------------------------- the parent */
static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static double percentile(double *v, int n, double q) {   /* as benchmarks.stats.percentile */
    double pos = (n - 1) * q / 100;
    int lo = (int)pos, hi = lo + (pos > lo);
    return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

static void machine_ticks(long long *busy, long long *total, int *cpus) {
    FILE *f = fopen("/proc/stat", "r");
    long long t[8] = {0};
    char line[512];
    *busy = *total = 0;
    *cpus = 0;
    if (!f) return;
    if (fgets(line, sizeof line, f))
        sscanf(line, "cpu %lld %lld %lld %lld %lld %lld %lld %lld", &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7]);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "cpu", 3) && line[3] >= '0' && line[3] <= '9') (*cpus)++;
    fclose(f);
    for (int i = 0; i < 8; i++) *total += t[i];
    *busy = *total - t[3] - t[4];
}

static double cpu_of(const struct timeval *tv) { return tv->tv_sec + tv->tv_usec / 1e6; }

static int usage(void) {
    fprintf(stderr, "usage: conn_client --connect IP:PORT --authority IP:PORT --ca CA --cert C --key K "
                    "[--count N] [--concurrency M] [--procs P] [--verify-peer]\n");
    return 2;
}

int main(int argc, char **argv) {
    struct args a = {.count = 1000, .concurrency = 32, .procs = 2};
    static char host[64];
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(k, "--verify-peer")) { a.verify_peer = 1; continue; }
        if (!v) return usage();
        i++;
        if (!strcmp(k, "--connect")) {
            const char *colon = strrchr(v, ':');
            if (!colon || colon - v >= (long)sizeof host) return usage();
            memcpy(host, v, colon - v); host[colon - v] = 0;
            a.host = host; a.port = atoi(colon + 1);
        } else if (!strcmp(k, "--authority")) a.authority = v;
        else if (!strcmp(k, "--ca")) a.ca = v;
        else if (!strcmp(k, "--cert")) a.cert = v;
        else if (!strcmp(k, "--key")) a.key = v;
        else if (!strcmp(k, "--count")) a.count = atoi(v);
        else if (!strcmp(k, "--concurrency")) a.concurrency = atoi(v);
        else if (!strcmp(k, "--procs")) a.procs = atoi(v);
        else return usage();
    }
    if (!a.host || !a.authority || !a.ca || !a.cert || !a.key || a.count < 1 || a.concurrency < 1 ||
        a.procs < 1 || strlen(a.authority) > 120)
        return usage();
    if (a.procs > MAX_PROCS) a.procs = MAX_PROCS;
    if (a.procs > a.count) a.procs = a.count;
    if (a.concurrency < a.procs) a.concurrency = a.procs;
    build_messages(a.authority);

    struct result *res = mmap(NULL, sizeof *res * a.procs, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    double *lat = mmap(NULL, sizeof *lat * a.count, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (res == MAP_FAILED || lat == MAP_FAILED) { perror("mmap"); return 1; }
    memset(res, 0, sizeof *res * a.procs);
    int go[2], ready[2];
    if (pipe(go) || pipe(ready)) { perror("pipe"); return 1; }
    pid_t kids[MAX_PROCS];
    int offset = 0;
    for (int p = 0; p < a.procs; p++) {
        int count = a.count / a.procs + (p < a.count % a.procs);
        int conc = a.concurrency / a.procs + (p < a.concurrency % a.procs);
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) {
            close(go[1]); close(ready[0]);
            struct copy c = {.a = &a, .lat = lat + offset, .res = &res[p]};
            c.addr.sin_family = AF_INET;
            c.addr.sin_port = htons(a.port);
            inet_pton(AF_INET, a.host, &c.addr.sin_addr);
            c.ctx = make_ctx(&a);
            char byte = c.ctx ? 'R' : 'X';
            if (write(ready[1], &byte, 1) != 1 || !c.ctx) _exit(1);
            if (read(go[0], &byte, 1) != 1) _exit(1);
            struct rusage r0, r1;
            getrusage(RUSAGE_SELF, &r0);
            res[p].start = now_s();
            run_copy(&c, count, conc);
            res[p].end = now_s();
            getrusage(RUSAGE_SELF, &r1);
            res[p].user_s = cpu_of(&r1.ru_utime) - cpu_of(&r0.ru_utime);
            res[p].sys_s = cpu_of(&r1.ru_stime) - cpu_of(&r0.ru_stime);
            _exit(0);
        }
        kids[p] = pid;
        offset += count;
    }
    close(go[0]); close(ready[1]);
    for (int p = 0; p < a.procs; p++) {
        char byte;
        if (read(ready[0], &byte, 1) != 1 || byte != 'R') {
            fprintf(stderr, "conn_client: a copy could not load its certificates\n");
            for (int q = 0; q < a.procs; q++) kill(kids[q], SIGKILL);
            return 1;
        }
    }
    long long b0, t0, b1, t1;
    int cpus;
    machine_ticks(&b0, &t0, &cpus);
    char gobytes[MAX_PROCS];
    memset(gobytes, 'G', sizeof gobytes);
    if (write(go[1], gobytes, a.procs) != a.procs) { perror("write"); return 1; }
    for (int p = 0; p < a.procs; p++) waitpid(kids[p], NULL, 0);
    machine_ticks(&b1, &t1, &cpus);

    int conns = 0, nlat = 0;
    double start = 0, end = 0, user = 0, sys = 0;
    const char *error = NULL;
    offset = 0;
    for (int p = 0; p < a.procs; p++) {
        int count = a.count / a.procs + (p < a.count % a.procs);
        memmove(lat + nlat, lat + offset, sizeof *lat * res[p].connections);   /* each copy filled its own slice */
        nlat += res[p].connections;
        offset += count;
        conns += res[p].connections;
        if (p == 0 || res[p].start < start) start = res[p].start;
        if (res[p].end > end) end = res[p].end;
        user += res[p].user_s; sys += res[p].sys_s;
        if (!error && res[p].error[0]) error = res[p].error;
    }
    qsort(lat, nlat, sizeof *lat, cmp_double);
    printf("{\"client\": \"c-conn\", \"procs\": %d, \"concurrency\": %d, \"connections\": %d, \"expected\": %d, "
           "\"wall_s\": %.6f, \"cpu_user_s\": %.4f, \"cpu_sys_s\": %.4f, \"verify_peer\": %s",
           a.procs, a.concurrency, conns, a.count, end - start, user, sys, a.verify_peer ? "true" : "false");
    if (t1 > t0) printf(", \"machine_busy_cores\": %.4f", (double)(b1 - b0) / (t1 - t0) * cpus);
    if (nlat) printf(", \"p50_ms\": %.4f, \"p99_ms\": %.4f", percentile(lat, nlat, 50) * 1e3, percentile(lat, nlat, 99) * 1e3);
    if (error) printf(", \"error\": \"%s\"", error);   /* fixed texts: nothing to escape */
    printf("}\n");
    if (error) {
        fprintf(stderr, "conn_client: %d of %d connections completed: %s\n", conns, a.count, error);
        return 1;
    }
    return 0;
}
