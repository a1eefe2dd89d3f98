/*
 * openloop: an HTTP/1.1 load generator that costs the machine little CPU (benchmarks/overload.py runs it).
 *
 *   openloop --port 8000 --rate 3000 --requests 6000 [--max-connections 2000] [--timeout 30] REQUEST...
 *   openloop --port 8000 --concurrency 16 --requests 1500 --duration 8 [--warmup 32] REQUEST...
 *
 * Each REQUEST file holds one complete raw HTTP/1.1 request, head and body (with its Content-Length); request i
 * sends file i % count, so the files are taken in turn.
 *
 * Open loop (--rate R): request i starts at origin + i/R, whatever the server does, --requests in all. It goes
 * out on an idle kept-alive connection, or on a new one while fewer than --max-connections are open; past the
 * cap it waits for a connection, and that wait counts in its latency (a real client's queue would hold it).
 * Closed loop (--concurrency N): N requests in flight at any time, each started as another ends, --warmup untimed
 * requests first, then until --requests have started or --duration seconds have passed.
 *
 * One request in flight per connection, never pipelined. A response ends at its Content-Length (or, without one,
 * when the server closes); `Connection: close` closes the connection after it. A kept-alive connection that the
 * server closed while it sat idle is found out when a request is sent on it: if nothing of the response has
 * arrived, the request is sent once more on a new connection, as HTTP clients do. A request not answered within
 * --timeout seconds of its start counts as status 0 and its connection is closed.
 *
 * Output, on stdout: one line per timed request, in the order they started,
 *   <start s> <latency s> <status>
 * (start: the scheduled start, open loop, or when it was sent, closed loop, from the origin; latency: from that
 * start to the end of the response; status: the HTTP status, 0 for an error or a timeout), then summary lines
 * "# <name> <value>": counts of errors by kind, connections, and, open loop, whether it kept to its schedule:
 * how late each arrival was handled (late_*_ms: the generator's own lag, which adds to every latency it records)
 * and the rate it really offered.
 *
 * One thread, one epoll set, edge-triggered non-blocking sockets; epoll_pwait2's nanosecond timeout wakes it for
 * the next arrival (epoll_wait's millisecond one on a kernel without it). Linux only; builds with glibc 2.35 or
 * later, also statically (`cc -O2 -static`, to carry to a machine without a compiler: benchmarks/openloop.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX 8192 /* a response head longer than this is a protocol error */
#define EVENTS_MAX 256

enum error_kind { E_CONNECT, E_CLOSED, E_RESET, E_PROTOCOL, E_TIMEOUT, E_KINDS };
static const char *ERROR_NAMES[E_KINDS] = {"connect", "closed", "reset", "protocol", "timeout"};

struct request {
    double start;   /* scheduled start (open loop) or when it was sent (closed loop), monotonic seconds */
    double noticed; /* when the loop handled its arrival: noticed - start is the generator's lag */
    double latency; /* from start to the end of the response (or the error) */
    int status;     /* HTTP status; 0: error or timeout */
    int conn;       /* the connection slot carrying it; -1 while it waits for one, or once done */
    char done;
    char resent;    /* sent again after a stale kept-alive connection (once at most) */
    char waited;    /* found every connection busy at the cap */
};

enum state { FREE, CONNECTING, BUSY, IDLE };

struct conn {
    int fd;
    enum state state;
    uint32_t generation; /* bumped on close: an event already fetched for an earlier socket in this slot is stale */
    long req;            /* the request in flight, -1 if none */
    size_t sent;         /* bytes of its request written so far */
    long served;         /* responses completed here: a kept-alive connection may have been closed by the server */
    int idle_pos;        /* index in idle[] while IDLE */
    /* the response */
    size_t head_len; /* bytes in head[] so far, while reading the head */
    int in_body;
    long long body_left; /* body bytes still to come; -1: until the server closes */
    int status;
    int close_after; /* Connection: close, or HTTP/1.0 */
    char head[HEAD_MAX];
};

/* Options */
static const char *host = "127.0.0.1";
static const char *port;
static double rate;     /* open loop: requests per second */
static long concurrency; /* closed loop: requests in flight */
static long n_timed = 1000;
static long n_warmup;
static double duration = INFINITY;
static double timeout_s = 60.0;
static long max_connections = 2000;

/* The requests to send, from the files */
static struct blob {
    char *data;
    size_t len;
} *files;
static long n_files;

/* State */
static struct addrinfo *server;
static int ep;
static struct request *reqs;
static long n_reqs;                /* warm-up + timed */
static long arrived;               /* requests [0, arrived) have arrived (been scheduled or sent) */
static long wait_head;             /* requests [wait_head, arrived) without a connection yet (or timed out) */
static long oldest;                /* every request before this one is done: the next to time out */
static long n_done;
static struct conn *conns;
static int *free_slots, n_free;
static int *idle, n_idle;
static long n_open, max_open, n_opened, n_resent;
static long errors[E_KINDS];
static double origin, stop_at; /* the timed window starts at origin; closed loop: no new request after stop_at */
static int timed;              /* closed loop: the warm-up is over */
static char scratch[1 << 16];  /* response bodies are read here and dropped */

static void die(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("openloop: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    exit(2);
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void send_some(struct conn *c, uint32_t events);
static void receive_some(struct conn *c, uint32_t events);

/* ---- connections ---------------------------------------------------------------------------------------- */

static void close_conn(struct conn *c) {
    close(c->fd); /* also leaves the epoll set */
    if (c->state == IDLE) {
        int last = idle[--n_idle];
        idle[c->idle_pos] = last;
        conns[last].idle_pos = c->idle_pos;
    }
    c->state = FREE;
    c->req = -1;
    c->generation++;
    free_slots[n_free++] = (int)(c - conns);
    n_open--;
}

static void reset_response(struct conn *c) {
    c->sent = 0;
    c->head_len = 0;
    c->in_body = 0;
    c->body_left = -1;
    c->status = 0;
    c->close_after = 0;
}

/* The end of request i: record it, and in a closed loop start the next one. */
static void finish(long i, int status);

/* Open a connection to carry request i (its slot is free: the caller checked the cap). */
static void connect_for(long i) {
    int fd = socket(server->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        errors[E_CONNECT]++;
        finish(i, 0);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* a small request goes out at once */
    int slot = free_slots[--n_free];
    struct conn *c = &conns[slot];
    c->fd = fd;
    c->req = i;
    c->served = 0;
    reset_response(c);
    reqs[i].conn = slot;
    n_open++;
    n_opened++;
    if (n_open > max_open) max_open = n_open;
    /* Edge-triggered, registered once for the connection's life: no epoll_ctl per request. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.u64 = (uint64_t)c->generation << 32 | (uint32_t)slot};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    if (connect(fd, server->ai_addr, server->ai_addrlen) == 0) {
        c->state = BUSY;
        send_some(c, EPOLLOUT);
    } else if (errno == EINPROGRESS) {
        c->state = CONNECTING; /* EPOLLOUT says when it is done */
    } else {
        c->state = BUSY;
        close_conn(c);
        errors[E_CONNECT]++;
        finish(i, 0);
    }
}

/* A request failed on connection c: send it again once if the connection was a stale kept-alive one. */
static void fail(struct conn *c, enum error_kind kind) {
    long i = c->req;
    int stale = c->served > 0 && c->head_len == 0 && !c->in_body && (kind == E_CLOSED || kind == E_RESET);
    close_conn(c);
    if (i < 0) return;
    reqs[i].conn = -1;
    if (stale && !reqs[i].resent) {
        reqs[i].resent = 1;
        n_resent++;
        connect_for(i); /* the slot just freed carries it */
        return;
    }
    errors[kind]++;
    finish(i, 0);
}

/* Start request i on idle connection c. */
static void send_on(struct conn *c, long i) {
    c->req = i;
    c->state = BUSY;
    reset_response(c);
    reqs[i].conn = (int)(c - conns);
    send_some(c, EPOLLOUT);
}

/* Write what the socket takes now; EPOLLOUT brings the rest. */
static void send_some(struct conn *c, uint32_t events) {
    if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
    const struct blob *r = &files[c->req % n_files];
    while (c->sent < r->len) {
        ssize_t n = send(c->fd, r->data + c->sent, r->len - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (errno == EAGAIN) {
            return;
        } else if (errno != EINTR) {
            fail(c, E_RESET); /* EPIPE, ECONNRESET: a closed connection */
            return;
        }
    }
}

/* ---- responses -------------------------------------------------------------------------------------------- */

/* Does header line `line` (of `len` bytes) have name `name` (lower case, with its colon)? Then its value. */
static const char *header_value(const char *line, size_t len, const char *name, size_t *value_len) {
    size_t n = strlen(name);
    if (len < n || strncasecmp(line, name, n) != 0) return NULL;
    const char *v = line + n;
    while (v < line + len && (*v == ' ' || *v == '\t')) v++;
    *value_len = (size_t)(line + len - v);
    return v;
}

static int contains_token(const char *value, size_t len, const char *token) {
    size_t n = strlen(token);
    for (size_t k = 0; k + n <= len; k++)
        if (strncasecmp(value + k, token, n) == 0) return 1;
    return 0;
}

/* Parse the response head (its first `size` bytes, ending in the blank line): status, body length, close. */
static int parse_head(struct conn *c, size_t size) {
    int minor;
    if (sscanf(c->head, "HTTP/1.%d %d", &minor, &c->status) != 2 || c->status < 100) return 0;
    c->close_after = minor == 0;
    c->body_left = -1;
    /* The header lines, after the status line */
    const char *line = (const char *)memchr(c->head, '\n', size) + 1, *end = c->head + size;
    while (line < end) {
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        size_t len = (size_t)(eol - line), vlen;
        if (len > 0 && line[len - 1] == '\r') len--;
        const char *v;
        if ((v = header_value(line, len, "content-length:", &vlen))) {
            char *stop;
            c->body_left = strtoll(v, &stop, 10);
            if (stop == v || c->body_left < 0) return 0;
        } else if ((v = header_value(line, len, "connection:", &vlen))) {
            if (contains_token(v, vlen, "close")) c->close_after = 1;
            else if (contains_token(v, vlen, "keep-alive")) c->close_after = 0;
        } else if ((v = header_value(line, len, "transfer-encoding:", &vlen))) {
            return 0; /* chunked bodies: not needed by the servers measured here */
        }
        line = eol + 1;
    }
    if (c->status < 200 || c->status == 204 || c->status == 304) c->body_left = 0;
    if (c->body_left < 0) c->close_after = 1; /* the body runs until the server closes */
    return 1;
}

/* The response on c is complete: record it; keep the connection for the next request unless it must close. */
static void complete(struct conn *c, int must_close) {
    long i = c->req;
    int status = c->status;
    c->served++;
    c->req = -1;
    reqs[i].conn = -1;
    if (must_close || c->close_after || c->sent < files[i % n_files].len) {
        close_conn(c);
    } else {
        c->state = IDLE;
        c->idle_pos = n_idle;
        idle[n_idle++] = (int)(c - conns);
    }
    finish(i, status);
}

/* Read what has arrived: the head into c->head, the body into scratch (dropped), until the response ends. */
static void receive_some(struct conn *c, uint32_t events) {
    if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
    /* The server shut its side: nothing more will come after this response, so do not keep the connection. */
    int peer_closed = (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
    for (;;) {
        char *buf = c->in_body ? scratch : c->head + c->head_len;
        size_t room = c->in_body ? sizeof scratch : HEAD_MAX - 1 - c->head_len; /* 1: room for sscanf's NUL */
        if (room == 0) {
            fail(c, E_PROTOCOL);
            return;
        }
        ssize_t n = recv(c->fd, buf, room, 0);
        if (n < 0) {
            if (errno == EAGAIN) return; /* edge-triggered: drained, the next edge brings more */
            if (errno == EINTR) continue;
            fail(c, E_RESET);
            return;
        }
        if (n == 0) { /* the server closed */
            if (c->in_body && c->body_left < 0) complete(c, 1);
            else fail(c, E_CLOSED);
            return;
        }
        if (!c->in_body) {
            size_t from = c->head_len > 3 ? c->head_len - 3 : 0; /* the blank line may straddle two reads */
            c->head_len += (size_t)n;
            c->head[c->head_len] = '\0';
            char *blank = memmem(c->head + from, c->head_len - from, "\r\n\r\n", 4);
            if (blank == NULL) continue;
            size_t size = (size_t)(blank + 4 - c->head);
            if (!parse_head(c, size)) {
                fail(c, E_PROTOCOL);
                return;
            }
            c->in_body = 1;
            n = (ssize_t)(c->head_len - size); /* body bytes that came with the head */
        }
        if (c->body_left >= 0) {
            if (n > c->body_left) c->close_after = 1; /* bytes past the response: never reuse this connection */
            c->body_left -= n < c->body_left ? n : c->body_left;
            if (c->body_left == 0) {
                complete(c, peer_closed);
                return;
            }
        }
    }
}

static void on_event(uint64_t data, uint32_t events) {
    struct conn *c = &conns[(uint32_t)data];
    if (c->state == FREE || c->generation != (uint32_t)(data >> 32)) return; /* closed earlier in this batch */
    switch (c->state) {
    case IDLE: /* the server closed a kept-alive connection (its keep-alive timeout), or sent stray bytes */
        if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) close_conn(c);
        return;
    case CONNECTING: {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            long i = c->req;
            close_conn(c);
            reqs[i].conn = -1;
            errors[E_CONNECT]++;
            finish(i, 0);
            return;
        }
        if (!(events & EPOLLOUT)) return;
        c->state = BUSY; /* connected: send */
    }
        /* fall through */
    case BUSY: {
        uint32_t generation = c->generation;
        send_some(c, events);
        /* A response can come before the request is all sent (an early refusal): read while sending. */
        if (c->generation == generation && c->state == BUSY) receive_some(c, events);
        return;
    }
    case FREE:
        return;
    }
}

/* ---- schedule ------------------------------------------------------------------------------------------------ */

static void arrive(double now) {
    reqs[arrived].start = now;
    reqs[arrived].noticed = now;
    arrived++;
}

static void begin_timed(double now) {
    timed = 1;
    origin = now;
    stop_at = now + duration;
    for (long k = 0; k < concurrency && arrived < n_reqs; k++) arrive(now);
}

/* Closed loop: one request ended, so start the next one (warm-up, then timed). */
static void closed_next(double now) {
    if (!timed) {
        if (arrived < n_warmup) arrive(now);
        else if (n_done == n_warmup) begin_timed(now);
    } else if (arrived < n_reqs && now < stop_at) {
        arrive(now);
    }
}

static void finish(long i, int status) {
    struct request *r = &reqs[i];
    double now = now_s();
    r->latency = now - r->start;
    r->status = status;
    r->done = 1;
    r->conn = -1;
    n_done++;
    if (concurrency) closed_next(now);
}

/* Open loop: every request whose start has come arrives now, whatever the state of the connections. */
static void open_arrivals(double now) {
    while (arrived < n_reqs && origin + arrived / rate <= now) {
        reqs[arrived].start = origin + arrived / rate;
        reqs[arrived].noticed = now;
        arrived++;
    }
}

/* Give waiting requests a connection: an idle one, else a new one under the cap; past it they keep waiting. */
static void dispatch(double now) {
    while (wait_head < arrived) {
        struct request *r = &reqs[wait_head];
        if (r->done) { /* timed out while it waited */
            wait_head++;
            continue;
        }
        if (n_idle > 0) {
            send_on(&conns[idle[--n_idle]], wait_head);
        } else if (n_open < max_connections) {
            connect_for(wait_head);
        } else {
            r->waited = 1;
            return;
        }
        if (now != r->noticed) r->waited = 1; /* noticed in an earlier turn of the loop: it waited */
        wait_head++;
    }
}

/* Requests past their timeout fail, and their connections close (an answer may still be on the way). The oldest
 * request is always the first to time out: starts only grow with the index. */
static void expire(double now) {
    for (; oldest < arrived; oldest++) {
        struct request *r = &reqs[oldest];
        if (r->done) continue;
        if (now < r->start + timeout_s) return;
        if (r->conn >= 0) {
            struct conn *c = &conns[r->conn];
            c->req = -1;
            close_conn(c);
        }
        errors[E_TIMEOUT]++;
        finish(oldest, 0);
    }
}

/* When the loop must wake without an event: the next arrival, or the oldest request's timeout. */
static double next_wake(void) {
    double wake = INFINITY;
    if (!concurrency && arrived < n_reqs) wake = origin + arrived / rate;
    if (oldest < arrived && reqs[oldest].start + timeout_s < wake) wake = reqs[oldest].start + timeout_s;
    return wake;
}

static int finished(void) {
    return concurrency ? timed && n_done == arrived : n_done == n_reqs;
}

/* epoll_pwait2, or where the kernel lacks it (ENOSYS: before 5.11, or a sandbox such as gVisor) epoll_wait, whose
 * timeout is whole milliseconds: rounded up, an arrival is handled up to 1 ms late, which late_*_ms shows. */
static int wait_events(struct epoll_event *events, const struct timespec *wait) {
    static int coarse = 0;
    if (!coarse) {
        int n = epoll_pwait2(ep, events, EVENTS_MAX, wait, NULL);
        if (n >= 0 || errno != ENOSYS) return n;
        coarse = 1;
    }
    int ms = wait == NULL ? -1 : (int)(wait->tv_sec * 1000 + (wait->tv_nsec + 999999) / 1000000);
    return epoll_wait(ep, events, EVENTS_MAX, ms);
}

static void run(void) {
    struct epoll_event events[EVENTS_MAX];
    origin = now_s();
    if (concurrency) {
        if (n_warmup == 0) begin_timed(origin);
        for (long k = 0; k < concurrency && arrived < n_warmup; k++) arrive(origin);
    }
    for (;;) {
        double now = now_s();
        if (!concurrency) open_arrivals(now);
        dispatch(now);
        expire(now);
        if (finished()) return;
        double wake = next_wake() - now_s();
        struct timespec wait = {0, 0};
        if (wake > 0 && isfinite(wake)) {
            wait.tv_sec = (time_t)wake;
            wait.tv_nsec = (long)((wake - (double)wait.tv_sec) * 1e9);
        }
        int n = wait_events(events, isfinite(wake) ? &wait : NULL);
        if (n < 0 && errno != EINTR) die("epoll_pwait2: %s", strerror(errno));
        for (int k = 0; k < n; k++) on_event(events[k].data.u64, events[k].events);
    }
}

/* ---- set-up and report --------------------------------------------------------------------------------------- */

static void read_file(const char *path, struct blob *out) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) die("%s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    rewind(f);
    out->data = malloc(size > 0 ? (size_t)size : 1);
    out->len = (size_t)size;
    if (size <= 0 || fread(out->data, 1, out->len, f) != out->len) die("%s: empty or unreadable", path);
    fclose(f);
}

static void usage(void) {
    fputs("usage: openloop --port P [--host H] (--rate R | --concurrency N [--duration S] [--warmup W])\n"
          "                --requests N [--max-connections M] [--timeout S] REQUEST_FILE...\n",
          stderr);
    exit(2);
}

static void parse_options(int argc, char **argv) {
    static const struct option options[] = {
        {"host", required_argument, 0, 'h'},        {"port", required_argument, 0, 'p'},
        {"rate", required_argument, 0, 'r'},        {"concurrency", required_argument, 0, 'c'},
        {"requests", required_argument, 0, 'n'},    {"duration", required_argument, 0, 'd'},
        {"warmup", required_argument, 0, 'w'},      {"timeout", required_argument, 0, 't'},
        {"max-connections", required_argument, 0, 'm'}, {0, 0, 0, 0},
    };
    int o;
    while ((o = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = optarg; break;
        case 'r': rate = atof(optarg); break;
        case 'c': concurrency = atol(optarg); break;
        case 'n': n_timed = atol(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': n_warmup = atol(optarg); break;
        case 't': timeout_s = atof(optarg); break;
        case 'm': max_connections = atol(optarg); break;
        default: usage();
        }
    }
    if (port == NULL || optind == argc || (rate > 0) == (concurrency > 0) || n_timed < 0 || n_warmup < 0 ||
        timeout_s <= 0 || max_connections < 1)
        usage();
    if (rate > 0 && n_warmup > 0) die("--warmup is for the closed loop (--concurrency)");
    if (concurrency) max_connections = concurrency; /* one connection per request in flight */
    n_files = argc - optind;
    files = calloc((size_t)n_files, sizeof *files);
    for (long k = 0; k < n_files; k++) read_file(argv[optind + k], &files[k]);
}

static void set_up(void) {
    /* A numeric address first: resolving one needs no name service, so a static build (which cannot load glibc's
     * NSS modules) runs anywhere against 127.0.0.1. */
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST};
    int rc = getaddrinfo(host, port, &hints, &server);
    if (rc == EAI_NONAME) {
        hints.ai_flags = 0;
        rc = getaddrinfo(host, port, &hints, &server);
    }
    if (rc != 0) die("%s:%s: %s", host, port, gai_strerror(rc));
    /* One descriptor per connection, and a few for stdio and epoll. */
    struct rlimit limit;
    getrlimit(RLIMIT_NOFILE, &limit);
    rlim_t need = (rlim_t)max_connections + 16;
    if (limit.rlim_cur < need) {
        if (limit.rlim_max < need) die("--max-connections %ld needs %lu descriptors; the hard limit is %lu",
                                       max_connections, (unsigned long)need, (unsigned long)limit.rlim_max);
        limit.rlim_cur = need;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
    signal(SIGPIPE, SIG_IGN); /* a closed connection is an error to record, not a reason to die */
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1: %s", strerror(errno));
    n_reqs = n_warmup + n_timed;
    reqs = calloc((size_t)n_reqs + 1, sizeof *reqs);
    conns = calloc((size_t)max_connections, sizeof *conns);
    free_slots = malloc((size_t)max_connections * sizeof *free_slots);
    idle = malloc((size_t)max_connections * sizeof *idle);
    if (reqs == NULL || conns == NULL || free_slots == NULL || idle == NULL) die("out of memory");
    for (long k = max_connections - 1; k >= 0; k--) free_slots[n_free++] = (int)k;
    for (long k = 0; k < n_reqs; k++) reqs[k].conn = -1;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Linear-interpolated percentile of sorted values (numpy's default, as benchmarks/loadgen.py computes it). */
static double percentile(const double *sorted, long n, double q) {
    if (n == 0) return NAN;
    double position = (double)(n - 1) * q / 100;
    long low = (long)position, high = low + 1 < n ? low + 1 : n - 1;
    return sorted[low] + (sorted[high] - sorted[low]) * (position - (double)low);
}

static void report(void) {
    long first = n_warmup, count = arrived - first;
    double last_end = origin;
    for (long i = first; i < arrived; i++) {
        const struct request *r = &reqs[i];
        printf("%.6f %.6f %d\n", r->start - origin, r->latency, r->status);
        if (r->start + r->latency > last_end) last_end = r->start + r->latency;
    }
    printf("# mode %s\n", concurrency ? "closed" : "open");
    printf("# requests %ld\n", count);
    printf("# elapsed_s %.6f\n", last_end - origin); /* from the origin to the end of the last response */
    for (int k = 0; k < E_KINDS; k++) printf("# error_%s %ld\n", ERROR_NAMES[k], errors[k]);
    printf("# resent %ld\n", n_resent);
    printf("# connections_opened %ld\n", n_opened);
    printf("# connections_max %ld\n", max_open);
    if (!concurrency && count > 0) {
        double *late = malloc((size_t)count * sizeof *late);
        long waited = 0;
        for (long i = 0; i < count; i++) {
            late[i] = (reqs[first + i].noticed - reqs[first + i].start) * 1e3;
            waited += reqs[first + i].waited;
        }
        qsort(late, (size_t)count, sizeof *late, by_value);
        printf("# late_p50_ms %.3f\n", percentile(late, count, 50));
        printf("# late_p99_ms %.3f\n", percentile(late, count, 99));
        printf("# late_max_ms %.3f\n", late[count - 1]);
        printf("# waited_for_connection %ld\n", waited);
        /* The rate the arrivals were really handled at: below --rate if the generator fell behind. */
        double span = reqs[first + count - 1].noticed - reqs[first].noticed;
        printf("# offered_rate %.3f\n", count > 1 && span > 0 ? (double)(count - 1) / span : NAN);
        free(late);
    }
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    printf("# cpu_s %.3f\n", usage.ru_utime.tv_sec + usage.ru_utime.tv_usec * 1e-6 + usage.ru_stime.tv_sec +
                                 usage.ru_stime.tv_usec * 1e-6);
}

int main(int argc, char **argv) {
    parse_options(argc, argv);
    set_up();
    run();
    report();
    return 0;
}
