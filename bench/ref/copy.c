/*
 * C reference for bench/vfio-user-client: how fast bytes move where the
 * vfio-user client moves them.
 *
 *   copy socket CHUNK TOTAL WARMUP [WINDOW]
 *     Two processes (socketpair + fork), blocking I/O, TOTAL bytes in
 *     CHUNK-byte pieces, twice (three times with WINDOW):
 *       stream: the parent write()s chunk after chunk, the child read()s each
 *               chunk in full; at the end the child answers with a 16-byte
 *               report. Raw socket throughput, one direction, from and into
 *               one CHUNK-sized buffer (cache-hot).
 *       window: the same stream, but the parent sends from and the child
 *               receives into a WINDOW-byte memfd mapping (MAP_SHARED, touched
 *               first), chunk after chunk through it: the same memory traffic
 *               as message DMA between two WINDOW-sized DMA windows.
 *       rpc:    the parent sends a 16-byte request {seq, count}, the child
 *               answers with a 16-byte header and CHUNK bytes, the parent
 *               reads them in full before the next request: the shape of
 *               vfio-user's DMA_READ (one request, one reply, one at a time).
 *     Every chunk carries its sequence number in its first and last 8 bytes
 *     (stamped by the sender, checked by the receiver) and the receiver
 *     compares one chunk in 64 with the sender's pattern byte for byte; the
 *     child counts what it got wrong and reports it. WARMUP bytes go first,
 *     untimed.
 *
 *   copy memcpy BLOCK OFFSET TOTAL
 *     One process: a 64 KiB memfd mapped MAP_SHARED (like the sample device's
 *     BAR2 as a client maps it); memcpy of BLOCK bytes at OFFSET out of the
 *     mapping into a malloc'd buffer (read) and back into it (write),
 *     TOTAL / BLOCK times each, after a warm-up of a tenth of that. The data is
 *     checked after each loop (the last block read equals what the mapping
 *     holds; the mapping holds the last block written).
 *
 * Prints one line, RESULT {json}, with the nanoseconds of each timed loop.
 * Built by bench/vfio-user-client.ts with `cc -O2` into bench/ref/bin/copy.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define REGION_SIZE 65536
#define CHECK_EVERY 64

static void die(const char *what) {
  fprintf(stderr, "copy.c: %s: %s\n", what, strerror(errno));
  exit(2);
}

static void fail(const char *what) {
  fprintf(stderr, "copy.c: verification failed: %s\n", what);
  exit(3);
}

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static double cpu_us(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

/* Keeps the compiler from dropping or merging copies whose result it cannot see used. */
static inline void clobber(void *p) { __asm__ volatile("" : : "r"(p) : "memory"); }

static void write_all(int fd, const void *buf, size_t len) {
  const uint8_t *p = buf;
  while (len > 0) {
    ssize_t r = write(fd, p, len);
    if (r < 0) {
      if (errno == EINTR) continue;
      die("write");
    }
    p += r;
    len -= (size_t)r;
  }
}

/* Returns 0 at end of stream before the first byte, else reads exactly len bytes. */
static int read_all(int fd, void *buf, size_t len) {
  uint8_t *p = buf;
  size_t got = 0;
  while (got < len) {
    ssize_t r = read(fd, p + got, len - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      die("read");
    }
    if (r == 0) {
      if (got == 0) return 0;
      fail("short read at end of stream");
    }
    got += (size_t)r;
  }
  return 1;
}

static void fill_pattern(uint8_t *b, size_t n, uint32_t seed) {
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b[i] = (uint8_t)x;
  }
}

static void stamp(uint8_t *chunk, size_t n, uint64_t seq) {
  memcpy(chunk, &seq, 8);
  memcpy(chunk + n - 8, &seq, 8);
}

/* Is the chunk seq's? Every CHECK_EVERY-th chunk is compared in full with the pattern. */
static int check_chunk(const uint8_t *chunk, const uint8_t *pattern, size_t n, uint64_t seq) {
  uint64_t a, b;
  memcpy(&a, chunk, 8);
  memcpy(&b, chunk + n - 8, 8);
  if (a != seq || b != seq) return 0;
  if (seq % CHECK_EVERY == 0 && memcmp(chunk + 8, pattern + 8, n - 16) != 0) return 0;
  return 1;
}

/* A touched MAP_SHARED memfd mapping of n bytes (what DMA windows are). */
static uint8_t *window_map(size_t n) {
  int fd = memfd_create("copy-window", MFD_CLOEXEC);
  if (fd < 0) die("memfd_create");
  if (ftruncate(fd, (off_t)n) < 0) die("ftruncate");
  uint8_t *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) die("mmap");
  close(fd);
  memset(p, 0, n);
  return p;
}

/*
 * The stream's receiver: reads `chunks` chunks into a buffer of `window`
 * bytes (chunk after chunk through it), then reports {bad, seen}.
 */
static void stream_child(int sock, size_t chunk, size_t window, uint64_t chunks, const uint8_t *pattern) {
  uint8_t *buf = window > chunk ? window_map(window) : malloc(chunk);
  if (!buf) die("malloc");
  uint64_t bad = 0;
  size_t at = 0;
  for (uint64_t seq = 0; seq < chunks; seq++) {
    if (!read_all(sock, buf + at, chunk)) fail("stream ended early");
    if (!check_chunk(buf + at, pattern, chunk, seq)) bad++;
    at = (at + chunk) % window;
  }
  uint64_t report[2] = {bad, chunks};
  write_all(sock, report, sizeof report);
}

/* One stream run (see the top): returns its ns and parent CPU us. */
static void stream_run(size_t chunk, size_t window, uint64_t chunks, uint64_t wchunks, const uint8_t *pattern,
                       double *ns, double *cpu) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
  fflush(stdout);
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    close(sv[0]);
    stream_child(sv[1], chunk, window, wchunks + chunks, pattern);
    _exit(0);
  }
  close(sv[1]);
  uint8_t *src = window > chunk ? window_map(window) : malloc(chunk);
  if (!src) die("malloc");
  for (size_t at = 0; at < window; at += chunk) memcpy(src + at, pattern, chunk);
  double t0 = 0, c0 = 0;
  size_t at = 0;
  for (uint64_t seq = 0; seq < wchunks + chunks; seq++) {
    if (seq == wchunks) {
      t0 = now_ns();
      c0 = cpu_us();
    }
    stamp(src + at, chunk, seq);
    write_all(sv[0], src + at, chunk);
    at = (at + chunk) % window;
  }
  uint64_t report[2];
  if (!read_all(sv[0], report, sizeof report)) fail("stream: no report");
  *ns = now_ns() - t0;
  *cpu = cpu_us() - c0;
  int status;
  if (waitpid(pid, &status, 0) < 0) die("waitpid");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail("stream child failed");
  if (report[0] != 0) fail("stream: chunks arrived wrong");
  if (report[1] != wchunks + chunks) fail("stream: the child saw a different number of chunks");
  close(sv[0]);
}

/* The rpc server: answers each {seq, count} with a header and count bytes; {~0, 0} ends. */
static void rpc_child(int sock, size_t chunk, const uint8_t *pattern) {
  uint8_t *buf = malloc(16 + chunk);
  if (!buf) die("malloc");
  memcpy(buf + 16, pattern, chunk);
  uint64_t bad = 0, seen = 0;
  for (;;) {
    uint64_t req[2];
    if (!read_all(sock, req, sizeof req)) fail("rpc: the parent went away");
    if (req[0] == UINT64_MAX) {
      uint64_t report[2] = {bad, seen};
      write_all(sock, report, sizeof report);
      break;
    }
    if (req[0] != seen || req[1] != chunk) bad++;
    seen++;
    memcpy(buf, req, 16);
    stamp(buf + 16, chunk, req[0]);
    write_all(sock, buf, 16 + chunk);
  }
  free(buf);
}

static int socket_mode(size_t chunk, uint64_t total, uint64_t warmup, size_t window) {
  if (chunk < 16 || total % chunk != 0 || warmup % chunk != 0 || (window != 0 && window % chunk != 0)) {
    fprintf(stderr, "copy socket: CHUNK >= 16, TOTAL, WARMUP and WINDOW multiples of CHUNK\n");
    return 1;
  }
  uint64_t chunks = total / chunk, wchunks = warmup / chunk;
  uint8_t *pattern = malloc(chunk);
  uint8_t *buf = malloc(16 + chunk);
  if (!pattern || !buf) die("malloc");
  fill_pattern(pattern, chunk, 7);

  /* --- stream, and stream through windows --- */
  double stream_ns, stream_cpu, window_ns = 0, window_cpu = 0;
  stream_run(chunk, chunk, chunks, wchunks, pattern, &stream_ns, &stream_cpu);
  if (window > chunk) stream_run(chunk, window, chunks, wchunks, pattern, &window_ns, &window_cpu);
  int sv[2];
  pid_t pid;
  int status;
  uint64_t report[2];

  /* --- rpc --- */
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
  fflush(stdout);
  pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    close(sv[0]);
    rpc_child(sv[1], chunk, pattern);
    _exit(0);
  }
  close(sv[1]);
  uint64_t bad = 0;
  double rpc_t0 = 0, rc0 = 0;
  for (uint64_t seq = 0; seq < wchunks + chunks; seq++) {
    if (seq == wchunks) {
      rpc_t0 = now_ns();
      rc0 = cpu_us();
    }
    uint64_t req[2] = {seq, chunk};
    write_all(sv[0], req, sizeof req);
    if (!read_all(sv[0], buf, 16 + chunk)) fail("rpc: no reply");
    uint64_t hdr[2];
    memcpy(hdr, buf, 16);
    if (hdr[0] != seq || hdr[1] != chunk || !check_chunk(buf + 16, pattern, chunk, seq)) bad++;
  }
  double rpc_ns = now_ns() - rpc_t0;
  double rpc_cpu = cpu_us() - rc0;
  uint64_t stop[2] = {UINT64_MAX, 0};
  write_all(sv[0], stop, sizeof stop);
  if (!read_all(sv[0], report, sizeof report)) fail("rpc: no report");
  if (waitpid(pid, &status, 0) < 0) die("waitpid");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail("rpc child failed");
  if (bad != 0 || report[0] != 0) fail("rpc: replies arrived wrong");
  if (report[1] != wchunks + chunks) fail("rpc: the child saw a different number of requests");
  close(sv[0]);

  printf("RESULT {\"impl\":\"c-socket\",\"iters\":%llu,\"chunk\":%zu,\"bytes\":%llu,\"ns\":%.0f,"
         "\"us_per_rt\":%.3f,\"rt_per_s\":%.0f,\"stream_ns\":%.0f,\"rpc_ns\":%.0f,"
         "\"stream_parent_cpu_us\":%.0f,\"rpc_parent_cpu_us\":%.0f,\"window\":%zu,\"window_ns\":%.0f,"
         "\"window_parent_cpu_us\":%.0f}\n",
         (unsigned long long)chunks, chunk, (unsigned long long)total, stream_ns, stream_ns / (double)chunks / 1e3,
         (double)chunks / (stream_ns / 1e9), stream_ns, rpc_ns, stream_cpu, rpc_cpu, window, window_ns, window_cpu);
  free(pattern);
  free(buf);
  return 0;
}

static int memcpy_mode(size_t block, size_t offset, uint64_t total) {
  if (block == 0 || offset + block > REGION_SIZE || total % block != 0) {
    fprintf(stderr, "copy memcpy: OFFSET + BLOCK <= %d, TOTAL a multiple of BLOCK\n", REGION_SIZE);
    return 1;
  }
  int fd = memfd_create("copy-bar2", MFD_CLOEXEC);
  if (fd < 0) die("memfd_create");
  if (ftruncate(fd, REGION_SIZE) < 0) die("ftruncate");
  uint8_t *map = mmap(NULL, REGION_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) die("mmap");
  uint8_t *area = map + offset;
  uint8_t *local = malloc(block), *src0 = malloc(block), *src1 = malloc(block), *expect = malloc(block);
  if (!local || !src0 || !src1 || !expect) die("malloc");
  fill_pattern(expect, block, 11);
  fill_pattern(src0, block, 12);
  fill_pattern(src1, block, 13);
  memcpy(area, expect, block);
  uint64_t n = total / block, warm = n / 10 + 1;

  /* read: mapping -> local */
  double t0 = 0;
  for (uint64_t i = 0; i < warm + n; i++) {
    if (i == warm) t0 = now_ns();
    memcpy(local, area, block);
    clobber(local);
  }
  double read_ns = now_ns() - t0;
  if (memcmp(local, expect, block) != 0) fail("memcpy read: the block differs from the mapping's bytes");

  /* write: local -> mapping, alternating two sources */
  for (uint64_t i = 0; i < warm + n; i++) {
    if (i == warm) t0 = now_ns();
    memcpy(area, (i & 1) ? src1 : src0, block);
    clobber(area);
  }
  double write_ns = now_ns() - t0;
  if (memcmp(area, ((warm + n - 1) & 1) ? src1 : src0, block) != 0) fail("memcpy write: the mapping differs from the last block");

  printf("RESULT {\"impl\":\"c-memcpy\",\"iters\":%llu,\"block\":%zu,\"bytes\":%llu,\"ns\":%.0f,"
         "\"us_per_rt\":%.3f,\"rt_per_s\":%.0f,\"read_ns\":%.0f,\"write_ns\":%.0f}\n",
         (unsigned long long)n, block, (unsigned long long)total, read_ns + write_ns,
         (read_ns + write_ns) / (double)n / 1e3, (double)n / ((read_ns + write_ns) / 1e9), read_ns, write_ns);
  munmap(map, REGION_SIZE);
  close(fd);
  free(local);
  free(src0);
  free(src1);
  free(expect);
  return 0;
}

int main(int argc, char **argv) {
  if ((argc == 5 || argc == 6) && strcmp(argv[1], "socket") == 0)
    return socket_mode(strtoull(argv[2], NULL, 10), strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10),
                       argc == 6 ? strtoull(argv[5], NULL, 10) : 0);
  if (argc == 5 && strcmp(argv[1], "memcpy") == 0)
    return memcpy_mode(strtoull(argv[2], NULL, 10), strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10));
  fprintf(stderr, "usage: %s socket CHUNK TOTAL WARMUP [WINDOW] | memcpy BLOCK OFFSET TOTAL\n", argv[0]);
  return 1;
}
