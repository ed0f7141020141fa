/*
 * bench/ref/rtt.c: a vfio-user client of ours, in C, for bench/vfio-user-rtt.
 * Written from the vfio-user specification (docs/interop/vfio-user.rst), not
 * from any implementation.
 *
 *   rtt SOCKET_PATH [ITERS [WARMUP [BATCH [IMPL]]]]
 *
 * Connects to the server's UNIX socket, negotiates VERSION (1.0, capabilities
 * JSON), then sends REGION_READ requests of 1 byte of region 2 at offset 1
 * (the gpio card's input register for pins 0-7, BAR2, an I/O BAR served by a
 * callback), one at a time: each request is written with one send() and its
 * reply read with blocking recv() calls before the next is sent. WARMUP reads
 * are not timed; then ITERS reads in batches of BATCH, each batch timed with
 * CLOCK_MONOTONIC.
 *
 * Every reply is checked: msg_id, command, flags (a plain reply: no error),
 * msg_size (16 + 16 + 1), the echoed offset, region and count, and the data
 * byte, which must be the same in every reply (the register is only read).
 *
 * Prints one line on stdout:
 *   RESULT {"impl":IMPL,"iters":N,"ns":TOTAL,"us_per_rt":MEAN,"rt_per_s":..,
 *           "median_batch_us":..,"min_batch_us":..,"max_batch_us":..,"batches":..,"data":..}
 * us_per_rt is the mean over all timed reads; median_batch_us the median of
 * the per-read mean of each batch (the figure bench/vfio-user-rtt reports).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HDR 16
#define CMD_VERSION 1
#define CMD_REGION_READ 9
#define FLAG_TYPE_MASK 0xf
#define FLAG_REPLY 0x1
#define FLAG_ERROR 0x20

#define REGION 2
#define OFFSET 1
#define COUNT 1
#define REQ_SIZE (HDR + 16)
#define REPLY_SIZE (HDR + 16 + COUNT)

static void put16(uint8_t *b, uint16_t v) { b[0] = v; b[1] = v >> 8; }
static void put32(uint8_t *b, uint32_t v) { for (int i = 0; i < 4; i++) b[i] = v >> (8 * i); }
static void put64(uint8_t *b, uint64_t v) { for (int i = 0; i < 8; i++) b[i] = v >> (8 * i); }
static uint16_t get16(const uint8_t *b) { return (uint16_t)(b[0] | b[1] << 8); }
static uint32_t get32(const uint8_t *b) { return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24; }
static uint64_t get64(const uint8_t *b) { return (uint64_t)get32(b) | (uint64_t)get32(b + 4) << 32; }

static void die(const char *what) {
    fprintf(stderr, "rtt: %s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(1);
}

static void fail(const char *fmt, unsigned long a, unsigned long b) {
    fprintf(stderr, "rtt: ");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\n");
    exit(1);
}

static void send_all(int fd, const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("send");
        }
        p += r;
        n -= (size_t)r;
    }
}

static void recv_all(int fd, uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("recv");
        }
        if (r == 0) {
            errno = 0;
            die("the server closed the connection");
        }
        p += r;
        n -= (size_t)r;
    }
}

/* Reads one whole message (header, then msg_size - 16 bytes) into buf of cap bytes; returns msg_size. */
static size_t recv_msg(int fd, uint8_t *buf, size_t cap) {
    recv_all(fd, buf, HDR);
    size_t size = get32(buf + 4);
    if (size < HDR || size > cap) fail("reply msg_size %lu (buffer %lu)", size, cap);
    recv_all(fd, buf + HDR, size - HDR);
    return size;
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static uint16_t g_id = 1;
static int g_data = -1;

/* One REGION_READ round trip, the reply checked. */
static void region_read(int fd, uint8_t *req, uint8_t *rep) {
    uint16_t id = g_id++;
    put16(req, id);
    send_all(fd, req, REQ_SIZE);
    size_t size = recv_msg(fd, rep, 4096);
    uint32_t flags = get32(rep + 8);
    if (get16(rep) != id) fail("reply id %lu, expected %lu", get16(rep), id);
    if (get16(rep + 2) != CMD_REGION_READ) fail("reply to command %lu, expected %lu", get16(rep + 2), CMD_REGION_READ);
    if ((flags & FLAG_ERROR) || (flags & FLAG_TYPE_MASK) != FLAG_REPLY) fail("reply flags 0x%lx, errno %lu", flags, get32(rep + 12));
    if (flags != FLAG_REPLY) fail("reply flags 0x%lx (expected 0x%lx)", flags, FLAG_REPLY);
    if (size != REPLY_SIZE) fail("reply of %lu bytes, expected %lu", size, REPLY_SIZE);
    if (get64(rep + 16) != OFFSET) fail("reply offset %lu, expected %lu", (unsigned long)get64(rep + 16), OFFSET);
    if (get32(rep + 24) != REGION) fail("reply region %lu, expected %lu", get32(rep + 24), REGION);
    if (get32(rep + 28) != COUNT) fail("reply count %lu, expected %lu", get32(rep + 28), COUNT);
    int d = rep[32];
    if (g_data < 0) g_data = d;
    else if (d != g_data) fail("read 0x%lx, earlier reads 0x%lx (nobody writes)", (unsigned long)d, (unsigned long)g_data);
}

static void version(int fd) {
    static const char json[] = "{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576}}";
    uint8_t msg[HDR + 4 + sizeof json];
    memset(msg, 0, sizeof msg);
    put16(msg, 0);
    put16(msg + 2, CMD_VERSION);
    put32(msg + 4, sizeof msg);
    put32(msg + 8, 0); /* a command */
    put16(msg + HDR, 0);     /* major */
    put16(msg + HDR + 2, 0); /* minor */
    memcpy(msg + HDR + 4, json, sizeof json); /* with its NUL */
    send_all(fd, msg, sizeof msg);
    uint8_t rep[8192];
    size_t size = recv_msg(fd, rep, sizeof rep);
    uint32_t flags = get32(rep + 8);
    if (get16(rep + 2) != CMD_VERSION || (flags & FLAG_TYPE_MASK) != FLAG_REPLY || (flags & FLAG_ERROR))
        fail("VERSION failed: flags 0x%lx, errno %lu", flags, get32(rep + 12));
    if (size < HDR + 4) fail("VERSION reply of %lu bytes (< %lu)", size, HDR + 4);
    if (get16(rep + HDR) != 0) fail("server's major version %lu, ours %lu", get16(rep + HDR), 0);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: rtt SOCKET_PATH [ITERS [WARMUP [BATCH [IMPL]]]]\n");
        return 2;
    }
    const char *path = argv[1];
    long iters = argc > 2 ? atol(argv[2]) : 20000;
    long warmup = argc > 3 ? atol(argv[3]) : 2000;
    long batch = argc > 4 ? atol(argv[4]) : 1000;
    const char *impl = argc > 5 ? argv[5] : "c-client";
    if (iters <= 0 || batch <= 0 || warmup < 0) {
        fprintf(stderr, "rtt: ITERS and BATCH must be > 0, WARMUP >= 0\n");
        return 2;
    }
    long nb = (iters + batch - 1) / batch;
    iters = nb * batch;

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path) {
        errno = ENAMETOOLONG;
        die(path);
    }
    strcpy(sa.sun_path, path);
    /* The server may still be starting: retry for a few seconds. */
    for (int tries = 0;; tries++) {
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) break;
        if ((errno != ENOENT && errno != ECONNREFUSED && errno != EAGAIN) || tries >= 500) die("connect");
        usleep(10000);
    }
    version(fd);

    uint8_t req[REQ_SIZE], rep[4096];
    memset(req, 0, sizeof req);
    put16(req + 2, CMD_REGION_READ);
    put32(req + 4, REQ_SIZE);
    put32(req + 8, 0);
    put64(req + 16, OFFSET);
    put32(req + 24, REGION);
    put32(req + 28, COUNT);

    for (long i = 0; i < warmup; i++) region_read(fd, req, rep);

    double *per = malloc(sizeof(double) * (size_t)nb);
    if (per == NULL) die("malloc");
    double total = 0;
    for (long b = 0; b < nb; b++) {
        double t0 = now_ns();
        for (long i = 0; i < batch; i++) region_read(fd, req, rep);
        double dt = now_ns() - t0;
        total += dt;
        per[b] = dt / (double)batch / 1e3;
    }
    close(fd);
    qsort(per, (size_t)nb, sizeof *per, cmp_double);
    double med = nb % 2 ? per[nb / 2] : (per[nb / 2 - 1] + per[nb / 2]) / 2;
    printf("RESULT {\"impl\":\"%s\",\"iters\":%ld,\"warmup\":%ld,\"batch\":%ld,\"batches\":%ld,\"data\":%d,"
           "\"ns\":%.0f,\"us_per_rt\":%.3f,\"rt_per_s\":%.0f,\"median_batch_us\":%.3f,\"min_batch_us\":%.3f,\"max_batch_us\":%.3f}\n",
           impl, iters, warmup, batch, nb, g_data, total, total / (double)iters / 1e3, (double)iters / (total / 1e9), med, per[0],
           per[nb - 1]);
    free(per);
    return 0;
}
