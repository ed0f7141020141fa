/*
 * bench/ref/pingpong.c: the floor of any vhost-user round trip, for
 * bench/vhost-user-blk. Two processes share one memory page (MAP_SHARED,
 * before fork) and two eventfds, as a vhost-user driver and back-end share
 * guest memory, a kick and a call eventfd:
 *
 *   driver:   word[0] = seq; write(kick, 1); read(call) ... word[1] == seq + 1?
 *   back-end: read(kick); word[1] = word[0] + 1; write(call, 1)
 *
 * Both block in read(2) on their eventfd (the kernel wakes them; no polling),
 * which is what an event-driven driver and back-end do per request at queue
 * depth 1. Every reply is checked.
 *
 *   pingpong [ITERS [WARMUP [IMPL]]]
 *
 * Prints one line on stdout:
 *   RESULT {"impl":IMPL,"iters":N,"ns":TOTAL,"us_per_rt":MEAN,"rt_per_s":..,
 *           "p50_us":..,"p99_us":..,"min_us":..}
 * (each round trip timed with CLOCK_MONOTONIC; the percentiles are of those).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
  perror(what);
  exit(1);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void ev_wait(int fd) {
  uint64_t v;
  for (;;) {
    ssize_t n = read(fd, &v, sizeof v);
    if (n == (ssize_t)sizeof v) return;
    if (n < 0 && errno == EINTR) continue;
    die("read eventfd");
  }
}

static void ev_signal(int fd) {
  uint64_t one = 1;
  if (write(fd, &one, sizeof one) != (ssize_t)sizeof one) die("write eventfd");
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  long iters = argc > 1 ? atol(argv[1]) : 200000;
  long warmup = argc > 2 ? atol(argv[2]) : 20000;
  const char *impl = argc > 3 ? argv[3] : "c-eventfd-pingpong";
  if (iters < 1 || warmup < 0) {
    fprintf(stderr, "usage: pingpong [ITERS [WARMUP [IMPL]]]\n");
    return 2;
  }
  volatile uint64_t *word = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (word == MAP_FAILED) die("mmap");
  int kick = eventfd(0, 0), call = eventfd(0, 0);
  if (kick < 0 || call < 0) die("eventfd");
  long total = iters + warmup;
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    for (long i = 0; i < total; i++) {
      ev_wait(kick);
      __atomic_store_n(&word[1], __atomic_load_n(&word[0], __ATOMIC_ACQUIRE) + 1, __ATOMIC_RELEASE);
      ev_signal(call);
    }
    _exit(0);
  }
  uint64_t *lat = malloc(sizeof *lat * (size_t)iters);
  if (!lat) die("malloc");
  uint64_t start = 0;
  for (long i = 0; i < total; i++) {
    if (i == warmup) start = now_ns();
    uint64_t t0 = now_ns();
    __atomic_store_n(&word[0], (uint64_t)i, __ATOMIC_RELEASE);
    ev_signal(kick);
    ev_wait(call);
    if (__atomic_load_n(&word[1], __ATOMIC_ACQUIRE) != (uint64_t)i + 1) {
      fprintf(stderr, "pingpong: round %ld: reply %llu\n", i, (unsigned long long)word[1]);
      return 1;
    }
    if (i >= warmup) lat[i - warmup] = now_ns() - t0;
  }
  uint64_t ns = now_ns() - start;
  int status;
  if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) die("child");
  qsort(lat, (size_t)iters, sizeof *lat, cmp_u64);
  double mean = (double)ns / 1000.0 / (double)iters;
  printf("RESULT {\"impl\":\"%s\",\"iters\":%ld,\"ns\":%llu,\"us_per_rt\":%.3f,\"rt_per_s\":%.0f,\"p50_us\":%.3f,\"p99_us\":%.3f,\"min_us\":%.3f}\n", impl, iters,
         (unsigned long long)ns, mean, 1e6 / mean, lat[iters / 2] / 1000.0, lat[(size_t)((double)iters * 0.99)] / 1000.0, lat[0] / 1000.0);
  return 0;
}
