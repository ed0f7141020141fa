/*
 * C reference for bench/transport: 24-byte ping-pong over a UNIX socketpair
 * between two processes (fork), with one fd (an eventfd) attached by
 * SCM_RIGHTS to every 64th message. Blocking I/O on both sides.
 *
 * The parent sends message i (sendmsg), the child receives it (recvmsg),
 * closes any fd that came with it and sends the same 24 bytes back; the
 * parent checks the echo byte for byte. After the warm-up and the timed
 * round trips the parent sends a stop message; the child answers with the
 * number of fds it received, whether they arrived with the right messages,
 * how many more descriptors it has open than before the first message (a
 * leak check) and the CPU time it used during the timed round trips. The
 * parent prints one machine-readable line:
 *
 *   RESULT {"impl":"c","iters":...,"ns":...,"us_per_rt":...,"rt_per_s":...,...}
 *
 * Usage: transport ITERS WARMUP FD_EVERY
 *        transport --micro N   (costs of single system calls, one process;
 *                               for `bench/transport.js --breakdown`)
 * Built by bench/transport.ts with `cc -O2` into bench/ref/bin/transport.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MSG 24
#define KIND_PING 0u
#define KIND_STOP 1u
#define MAX_FDS 253

static void die(const char *what) {
  fprintf(stderr, "transport.c: %s: %s\n", what, strerror(errno));
  exit(2);
}

static void fail(const char *what) {
  fprintf(stderr, "transport.c: verification failed: %s\n", what);
  exit(3);
}

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static uint32_t get32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

/* Same layout as bench/transport.ts: seq, kind, 16 pattern bytes. */
static void build(uint8_t *m, uint32_t seq, uint32_t kind) {
  put32(m, seq);
  put32(m + 4, kind);
  for (int k = 8; k < MSG; k++) m[k] = (uint8_t)(seq * 7u + (uint32_t)k);
}

static int count_open_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  if (d == NULL) return -1;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.') n++;
  closedir(d);
  return n - 1; /* the directory's own descriptor */
}

/*
 * Reads exactly MSG bytes (looping over short reads); closes every fd that
 * arrives and adds their number to *nfds. Returns 0 at end of stream.
 */
static int recv_msg(int sock, uint8_t *buf, int *nfds) {
  size_t off = 0;
  union {
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct cmsghdr align;
  } control;
  while (off < MSG) {
    struct iovec iov = {buf + off, MSG - off};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    ssize_t r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (r < 0) {
      if (errno == EINTR) continue;
      die("recvmsg");
    }
    if (r == 0) return 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      int fds[MAX_FDS];
      memcpy(fds, CMSG_DATA(c), n * sizeof(int));
      for (size_t i = 0; i < n; i++) close(fds[i]);
      *nfds += (int)n;
    }
    if (msg.msg_flags & MSG_CTRUNC) fail("control data truncated");
    off += (size_t)r;
  }
  return 1;
}

static void send_all(int sock, const uint8_t *buf, size_t len, int fd) {
  union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
  } control;
  size_t off = 0;
  while (off < len) {
    struct iovec iov = {(void *)(buf + off), len - off};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd >= 0 && off == 0) {
      memset(control.buf, 0, sizeof control.buf);
      msg.msg_control = control.buf;
      msg.msg_controllen = sizeof control.buf;
      struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t r = sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      die("sendmsg");
    }
    off += (size_t)r;
  }
}

/* CPU time used so far by this process, user and system, in microseconds. */
static void cpu_us(double *user, double *sys) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  *user = (double)ru.ru_utime.tv_sec * 1e6 + (double)ru.ru_utime.tv_usec;
  *sys = (double)ru.ru_stime.tv_sec * 1e6 + (double)ru.ru_stime.tv_usec;
}

static int child(int sock, uint32_t fd_every, uint32_t warmup) {
  uint8_t buf[MSG];
  uint32_t expect = 0, bad = 0;
  int fds_total = 0;
  int open_before = count_open_fds();
  double u0 = 0, s0 = 0, u1, s1;
  if (warmup == 0) cpu_us(&u0, &s0);
  for (;;) {
    int got = 0;
    if (!recv_msg(sock, buf, &got)) return 4; /* parent went away before stop */
    fds_total += got;
    uint32_t seq = get32(buf), kind = get32(buf + 4);
    if (kind == KIND_STOP) {
      cpu_us(&u1, &s1);
      uint8_t reply[MSG];
      memset(reply, 0, sizeof reply);
      put32(reply, (uint32_t)fds_total);
      put32(reply + 4, (uint32_t)(count_open_fds() - open_before));
      put32(reply + 8, bad);
      put32(reply + 12, expect);
      put32(reply + 16, (uint32_t)(u1 - u0));
      put32(reply + 20, (uint32_t)(s1 - s0));
      send_all(sock, reply, MSG, -1);
      return 0;
    }
    if (seq == warmup && warmup > 0) cpu_us(&u0, &s0);
    /* Each message arrives in order, and carries an fd iff seq % fd_every == 0. */
    if (seq != expect || got != (seq % fd_every == 0 ? 1 : 0)) bad++;
    expect++;
    send_all(sock, buf, MSG, -1);
  }
}

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/*
 * --micro: the kernel's share of one message, in one process with no
 * context switch, to set against the same loops in Node (--breakdown).
 */
static int micro(long n) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
  static uint8_t rbuf[65536];
  uint8_t msg[MSG];
  build(msg, 1, KIND_PING);
  union {
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct cmsghdr align;
  } control;
  double t0, t1, pair_ns, eagain_ns, idle_ns, ready_ns;

  t0 = now_ns();
  for (long i = 0; i < n; i++) {
    struct iovec iov = {msg, MSG};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    if (sendmsg(sv[0], &m, MSG_NOSIGNAL | MSG_DONTWAIT) != MSG) die("sendmsg");
    struct iovec riov = {rbuf, sizeof rbuf};
    struct msghdr rm;
    memset(&rm, 0, sizeof rm);
    rm.msg_iov = &riov;
    rm.msg_iovlen = 1;
    rm.msg_control = control.buf;
    rm.msg_controllen = sizeof control.buf;
    if (recvmsg(sv[1], &rm, MSG_CMSG_CLOEXEC | MSG_DONTWAIT) != MSG) die("recvmsg");
  }
  t1 = now_ns();
  pair_ns = (t1 - t0) / (double)n;

  t0 = now_ns();
  for (long i = 0; i < n; i++) {
    struct iovec riov = {rbuf, sizeof rbuf};
    struct msghdr rm;
    memset(&rm, 0, sizeof rm);
    rm.msg_iov = &riov;
    rm.msg_iovlen = 1;
    rm.msg_control = control.buf;
    rm.msg_controllen = sizeof control.buf;
    if (recvmsg(sv[1], &rm, MSG_CMSG_CLOEXEC | MSG_DONTWAIT) != -1) fail("recvmsg on an empty socket");
  }
  t1 = now_ns();
  eagain_ns = (t1 - t0) / (double)n;

  int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) die("epoll_create1");
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = sv[1]};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, sv[1], &ev) < 0) die("epoll_ctl");
  struct epoll_event out[1024];
  t0 = now_ns();
  for (long i = 0; i < n; i++) epoll_pwait(ep, out, 1024, 0, NULL);
  t1 = now_ns();
  idle_ns = (t1 - t0) / (double)n;
  if (send(sv[0], msg, MSG, 0) != MSG) die("send");
  t0 = now_ns();
  for (long i = 0; i < n; i++) epoll_pwait(ep, out, 1024, 0, NULL);
  t1 = now_ns();
  ready_ns = (t1 - t0) / (double)n;
  printf("MICRO {\"impl\":\"c\",\"n\":%ld,\"sendmsg_recvmsg_ns\":%.0f,\"recvmsg_eagain_ns\":%.0f,"
         "\"epoll_pwait0_idle_ns\":%.0f,\"epoll_pwait0_ready_ns\":%.0f}\n",
         n, pair_ns, eagain_ns, idle_ns, ready_ns);
  close(ep);
  close(sv[0]);
  close(sv[1]);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "--micro") == 0) return micro(strtol(argv[2], NULL, 10));
  if (argc != 4) {
    fprintf(stderr, "usage: %s ITERS WARMUP FD_EVERY\n", argv[0]);
    return 1;
  }
  uint32_t iters = (uint32_t)strtoul(argv[1], NULL, 10);
  uint32_t warmup = (uint32_t)strtoul(argv[2], NULL, 10);
  uint32_t fd_every = (uint32_t)strtoul(argv[3], NULL, 10);
  if (iters == 0 || fd_every == 0) {
    fprintf(stderr, "ITERS and FD_EVERY must be positive\n");
    return 1;
  }

  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
  fflush(stdout);
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    close(sv[0]);
    _exit(child(sv[1], fd_every, warmup));
  }
  close(sv[1]);
  int sock = sv[0];
  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) die("eventfd");

  uint8_t msg[MSG], echo[MSG];
  uint32_t total = warmup + iters, fds_sent = 0;
  int dummy = 0;
  double t0 = 0, u0 = 0, s0 = 0, u1, s1;
  for (uint32_t seq = 0; seq < total; seq++) {
    if (seq == warmup) {
      t0 = now_ns();
      cpu_us(&u0, &s0);
    }
    build(msg, seq, KIND_PING);
    int withfd = seq % fd_every == 0;
    send_all(sock, msg, MSG, withfd ? efd : -1);
    fds_sent += (uint32_t)withfd;
    if (!recv_msg(sock, echo, &dummy)) fail("child closed the socket");
    if (memcmp(msg, echo, MSG) != 0) fail("echo differs from the message sent");
  }
  double t1 = now_ns();
  cpu_us(&u1, &s1);
  if (dummy != 0) fail("the parent received fds");

  build(msg, total, KIND_STOP);
  send_all(sock, msg, MSG, -1);
  if (!recv_msg(sock, echo, &dummy)) fail("child closed the socket before its report");
  uint32_t fds_received = get32(echo), bad = get32(echo + 8), seen = get32(echo + 12);
  int32_t fd_leak = (int32_t)get32(echo + 4);
  double child_user = get32(echo + 16), child_sys = get32(echo + 20);
  int status = 0;
  if (waitpid(pid, &status, 0) < 0) die("waitpid");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail("child failed");
  if (fds_received != fds_sent) fail("child received a different number of fds than sent");
  if (bad != 0) fail("child saw messages out of order or fds on the wrong messages");
  if (seen != total) fail("child saw a different number of messages");
  if (fd_leak != 0) fail("child has more descriptors open than at the start");

  double ns = t1 - t0;
  printf("RESULT {\"impl\":\"c\",\"iters\":%u,\"warmup\":%u,\"fd_every\":%u,\"ns\":%.0f,"
         "\"us_per_rt\":%.3f,\"rt_per_s\":%.0f,\"fds_sent\":%u,\"fds_received\":%u,\"fd_leak\":%d,"
         "\"user_us_per_rt\":%.3f,\"sys_us_per_rt\":%.3f}\n",
         iters, warmup, fd_every, ns, ns / iters / 1e3, iters / (ns / 1e9), fds_sent, fds_received, fd_leak,
         ((u1 - u0) + child_user) / iters, ((s1 - s0) + child_sys) / iters);
  return 0;
}
