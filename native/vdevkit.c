/*
 * vdevkit native addon: the few system calls Node.js cannot make.
 *
 * Thin by design: every function checks its arguments, makes one system
 * call (or a short fixed sequence), and returns. Protocol logic, buffering,
 * ownership and lifetimes of fds live in TypeScript (src/sys/).
 *
 * Conventions:
 *  - Errors are thrown as instances of the JS class registered with
 *    setErrorClass() (SysError), constructed as new C(code, syscall, errno)
 *    where code is the errno name ("EBADF").
 *  - EAGAIN on non-blocking calls is not an error: the call returns -1 so the
 *    hot path never allocates an exception.
 *  - Every fd created here is O_CLOEXEC; sockets and eventfds are O_NONBLOCK.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <node_api.h>
#include <uv.h>

/* Largest number of fds the kernel accepts in one SCM_RIGHTS message. */
#define VDK_SCM_MAX_FD 253
#define VDK_MAX_IOV 64

/* ------------------------------------------------------------------ */
/* Per-instance state (one per Node environment: main thread, workers). */

typedef struct vdk_poll vdk_poll;

typedef struct {
  napi_ref error_ctor; /* SysError class, or NULL until registered */
  vdk_poll *polls;     /* open poll handles, closed at env teardown */
} vdk_instance;

struct vdk_poll {
  uv_poll_t handle;
  napi_env env;
  napi_ref callback;
  napi_async_context async_ctx;
  vdk_instance *inst; /* NULL once detached from the instance list */
  vdk_poll *next;
  vdk_poll *prev;
  int closing;   /* uv_close() has been called */
  int uv_closed; /* ... and its callback has run */
  int finalized; /* the JS external is gone */
};

/* ------------------------------------------------------------------ */
/* Errors */

static const char *errno_name(int err, char *buf, size_t len) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  const char *name = strerrorname_np(err);
  if (name != NULL) return name;
#endif
  snprintf(buf, len, "E%d", err);
  return buf;
}

/* Throws SysError(code, syscall, errno[, message]). Always returns NULL. */
static napi_value throw_errno_msg(napi_env env, int err, const char *syscall, const char *message) {
  vdk_instance *inst = NULL;
  char namebuf[24];
  const char *code = errno_name(err, namebuf, sizeof namebuf);
  napi_value argv[4];
  napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &argv[0]);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &argv[1]);
  napi_create_int32(env, err, &argv[2]);
  if (message != NULL) {
    napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &argv[3]);
  } else {
    napi_get_undefined(env, &argv[3]);
  }
  napi_get_instance_data(env, (void **)&inst);
  napi_value ctor = NULL, error = NULL;
  if (inst != NULL && inst->error_ctor != NULL &&
      napi_get_reference_value(env, inst->error_ctor, &ctor) == napi_ok && ctor != NULL &&
      napi_new_instance(env, ctor, 4, argv, &error) == napi_ok) {
    napi_throw(env, error);
    return NULL;
  }
  napi_value msg;
  char text[256];
  snprintf(text, sizeof text, "%s %s%s%s", syscall, code, message ? ": " : "", message ? message : "");
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
  napi_create_error(env, argv[0], msg, &error);
  napi_set_named_property(env, error, "syscall", argv[1]);
  napi_set_named_property(env, error, "errno", argv[2]);
  napi_throw(env, error);
  return NULL;
}

static napi_value throw_errno(napi_env env, int err, const char *syscall) {
  return throw_errno_msg(env, err, syscall, NULL);
}

#define CHECK_NAPI(call)                                                  \
  do {                                                                    \
    if ((call) != napi_ok) {                                              \
      const napi_extended_error_info *info_ = NULL;                       \
      napi_get_last_error_info(env, &info_);                              \
      bool pending_ = false;                                              \
      napi_is_exception_pending(env, &pending_);                          \
      if (!pending_)                                                      \
        napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE",                \
                              info_ && info_->error_message               \
                                  ? info_->error_message                  \
                                  : "invalid argument");                  \
      return NULL;                                                        \
    }                                                                     \
  } while (0)

#define GET_ARGS(n)                                                       \
  size_t argc = (n);                                                      \
  napi_value argv[(n) > 0 ? (n) : 1];                                     \
  CHECK_NAPI(napi_get_cb_info(env, info, &argc, argv, NULL, NULL))

static napi_value type_error(napi_env env, const char *msg) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

static napi_value range_error(napi_env env, const char *msg) {
  napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
  return NULL;
}

/* Reads a non-negative int32 fd. Returns -1 (with a pending exception) on bad input. */
static int arg_fd(napi_env env, napi_value v) {
  napi_valuetype t;
  int32_t fd;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number) {
    type_error(env, "fd must be a number");
    return -1;
  }
  napi_get_value_int32(env, v, &fd);
  if (fd < 0) {
    throw_errno_msg(env, EBADF, "fd", "negative file descriptor");
    return -1;
  }
  return fd;
}

/* Reads a non-negative integral number no larger than 2^53. */
static int arg_u64(napi_env env, napi_value v, const char *what, uint64_t *out) {
  napi_valuetype t;
  double d;
  if (napi_typeof(env, v, &t) != napi_ok) return -1;
  if (t == napi_bigint) {
    bool lossless;
    napi_get_value_bigint_uint64(env, v, out, &lossless);
    if (!lossless) {
      range_error(env, what);
      return -1;
    }
    return 0;
  }
  if (t != napi_number) {
    type_error(env, what);
    return -1;
  }
  napi_get_value_double(env, v, &d);
  if (!(d >= 0) || d > 9007199254740992.0 || d != (double)(uint64_t)d) {
    range_error(env, what);
    return -1;
  }
  *out = (uint64_t)d;
  return 0;
}

static int arg_bytes(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  bool is_ta = false;
  napi_typedarray_type type;
  napi_value ab;
  size_t off;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta) {
    type_error(env, "expected a Uint8Array");
    return -1;
  }
  napi_get_typedarray_info(env, v, &type, len, (void **)data, &ab, &off);
  if (type != napi_uint8_array) {
    type_error(env, "expected a Uint8Array");
    return -1;
  }
  return 0;
}

static napi_value make_int(napi_env env, int64_t v) {
  napi_value r;
  napi_create_int64(env, v, &r);
  return r;
}

static napi_value make_undefined(napi_env env) {
  napi_value r;
  napi_get_undefined(env, &r);
  return r;
}

/* ------------------------------------------------------------------ */
/* setErrorClass(ctor) */

static napi_value vdk_set_error_class(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  vdk_instance *inst = NULL;
  napi_valuetype t;
  CHECK_NAPI(napi_typeof(env, argv[0], &t));
  if (t != napi_function) return type_error(env, "error class must be a function");
  CHECK_NAPI(napi_get_instance_data(env, (void **)&inst));
  if (inst->error_ctor != NULL) napi_delete_reference(env, inst->error_ctor);
  CHECK_NAPI(napi_create_reference(env, argv[0], 1, &inst->error_ctor));
  return make_undefined(env);
}

/* ------------------------------------------------------------------ */
/* fds */

static napi_value vdk_close(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  /* On Linux the fd is released even when close() reports EINTR/EIO. */
  if (close(fd) < 0 && errno != EINTR) return throw_errno(env, errno, "close");
  return make_undefined(env);
}

static napi_value vdk_dup(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  int r = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (r < 0) return throw_errno(env, errno, "dup");
  return make_int(env, r);
}

/* fstat(fd) -> { size, mode } */
static napi_value vdk_fstat(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  struct stat st;
  if (fstat(fd, &st) < 0) return throw_errno(env, errno, "fstat");
  napi_value obj;
  CHECK_NAPI(napi_create_object(env, &obj));
  napi_set_named_property(env, obj, "size", make_int(env, st.st_size));
  napi_set_named_property(env, obj, "mode", make_int(env, st.st_mode));
  return obj;
}

/* setNonBlock(fd, on): O_NONBLOCK on a received fd before it is polled and read. */
static napi_value vdk_set_nonblock(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  bool on = true;
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  napi_get_value_bool(env, argv[1], &on);
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) return throw_errno(env, errno, "fcntl");
  int nfl = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
  if (nfl != fl && fcntl(fd, F_SETFL, nfl) < 0) return throw_errno(env, errno, "fcntl");
  return make_undefined(env);
}

/* ------------------------------------------------------------------ */
/* UNIX stream sockets */

static int fill_sockaddr(napi_env env, napi_value v, struct sockaddr_un *sa) {
  size_t len = 0;
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) {
    type_error(env, "path must be a string");
    return -1;
  }
  if (len == 0 || len >= sizeof sa->sun_path) {
    throw_errno_msg(env, ENAMETOOLONG, "socket", "socket path empty or longer than 107 bytes");
    return -1;
  }
  napi_get_value_string_utf8(env, v, sa->sun_path, sizeof sa->sun_path, &len);
  if (strlen(sa->sun_path) != len) {
    throw_errno_msg(env, EINVAL, "socket", "socket path contains a NUL byte");
    return -1;
  }
  return 0;
}

/* listen(path, backlog) -> fd. Binding fails with EADDRINUSE if the path exists. */
static napi_value vdk_listen(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  struct sockaddr_un sa;
  int32_t backlog = 128;
  if (fill_sockaddr(env, argv[0], &sa) < 0) return NULL;
  napi_get_value_int32(env, argv[1], &backlog);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return throw_errno(env, errno, "socket");
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    int e = errno;
    close(fd);
    return throw_errno(env, e, "bind");
  }
  if (listen(fd, backlog > 0 ? backlog : 128) < 0) {
    int e = errno;
    close(fd);
    return throw_errno(env, e, "listen");
  }
  return make_int(env, fd);
}

/* accept(fd) -> new fd, or -1 when no connection is pending. */
static napi_value vdk_accept(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  for (;;) {
    int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c >= 0) return make_int(env, c);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return make_int(env, -1);
    /* A connection that died in the queue is not the listener's error. */
    if (errno == ECONNABORTED) continue;
    return throw_errno(env, errno, "accept");
  }
}

/* connect(path) -> fd. A UNIX-socket connect completes at once or fails;
 * EAGAIN (full backlog) is thrown so the caller can retry. */
static napi_value vdk_connect(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  struct sockaddr_un sa;
  if (fill_sockaddr(env, argv[0], &sa) < 0) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return throw_errno(env, errno, "socket");
  int r;
  do {
    r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    int e = errno;
    close(fd);
    return throw_errno(env, e, "connect");
  }
  return make_int(env, fd);
}

/* socketpair() -> [fd, fd] */
static napi_value vdk_socketpair(napi_env env, napi_callback_info info) {
  int sv[2];
  (void)info;
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
    return throw_errno(env, errno, "socketpair");
  napi_value arr;
  CHECK_NAPI(napi_create_array_with_length(env, 2, &arr));
  napi_set_element(env, arr, 0, make_int(env, sv[0]));
  napi_set_element(env, arr, 1, make_int(env, sv[1]));
  return arr;
}

/* setSendBuffer(fd, bytes) -> the SO_SNDBUF the kernel granted (capped by
 * net.core.wmem_max; the kernel doubles what is asked for its bookkeeping).
 * A larger send buffer means fewer sleep/wake-ups for large messages. */
static napi_value vdk_set_send_buffer(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int32_t bytes = 0;
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  CHECK_NAPI(napi_get_value_int32(env, argv[1], &bytes));
  if (bytes <= 0) return range_error(env, "bytes must be positive");
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) < 0) return throw_errno(env, errno, "setsockopt");
  int got = 0;
  socklen_t len = sizeof got;
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &len) < 0) return throw_errno(env, errno, "getsockopt");
  return make_int(env, got);
}

/* checkSocketError(fd): throws the socket's pending error (SO_ERROR, which
 * reading clears), e.g. ECONNRESET when the peer closed with our data
 * unread; returns undefined when there is none. For a poll that reported
 * POLLERR, which libuv passes on as a bare UV_EBADF. */
static napi_value vdk_check_socket_error(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return throw_errno(env, errno, "getsockopt");
  if (err != 0) return throw_errno(env, err, "socket");
  return make_undefined(env);
}

/* shutdown(fd, how) with how 0=read, 1=write, 2=both */
static napi_value vdk_shutdown(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int32_t how = 2;
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  napi_get_value_int32(env, argv[1], &how);
  if (how < 0 || how > 2) return range_error(env, "how must be 0, 1 or 2");
  if (shutdown(fd, how) < 0 && errno != ENOTCONN) return throw_errno(env, errno, "shutdown");
  return make_undefined(env);
}

/*
 * sendmsg(fd, data, fds) -> bytes sent, or -1 when the socket buffer is full.
 * data: a Uint8Array or an array of them (gathered with one iovec each).
 * fds: null/undefined or an array of fd numbers, sent as one SCM_RIGHTS
 * message attached to the first byte of data. The fds stay owned by the
 * caller (the kernel installs duplicates in the receiver).
 */
static napi_value vdk_sendmsg(napi_env env, napi_callback_info info) {
  GET_ARGS(3);
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;

  struct iovec iov[VDK_MAX_IOV];
  size_t niov = 0;
  bool is_array = false;
  napi_is_array(env, argv[1], &is_array);
  if (is_array) {
    uint32_t n = 0;
    napi_get_array_length(env, argv[1], &n);
    if (n > VDK_MAX_IOV) return range_error(env, "too many buffers in one sendmsg");
    for (uint32_t i = 0; i < n; i++) {
      napi_value el;
      uint8_t *p;
      size_t l;
      CHECK_NAPI(napi_get_element(env, argv[1], i, &el));
      if (arg_bytes(env, el, &p, &l) < 0) return NULL;
      if (l == 0) continue;
      iov[niov].iov_base = p;
      iov[niov].iov_len = l;
      niov++;
    }
  } else {
    uint8_t *p;
    size_t l;
    if (arg_bytes(env, argv[1], &p, &l) < 0) return NULL;
    iov[0].iov_base = p;
    iov[0].iov_len = l;
    niov = 1;
  }

  int fds[VDK_SCM_MAX_FD];
  uint32_t nfds = 0;
  napi_valuetype t;
  napi_typeof(env, argv[2], &t);
  if (t != napi_undefined && t != napi_null) {
    bool fds_array = false;
    napi_is_array(env, argv[2], &fds_array);
    if (!fds_array) return type_error(env, "fds must be an array of numbers");
    napi_get_array_length(env, argv[2], &nfds);
    if (nfds > VDK_SCM_MAX_FD)
      return throw_errno_msg(env, EINVAL, "sendmsg", "more than 253 fds in one message");
    for (uint32_t i = 0; i < nfds; i++) {
      napi_value el;
      CHECK_NAPI(napi_get_element(env, argv[2], i, &el));
      fds[i] = arg_fd(env, el);
      if (fds[i] < 0) return NULL;
    }
  }

  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = iov;
  msg.msg_iovlen = niov;
  /* Aligned control buffer large enough for VDK_SCM_MAX_FD fds. */
  union {
    char buf[CMSG_SPACE(sizeof(int) * VDK_SCM_MAX_FD)];
    struct cmsghdr align;
  } control;
  if (nfds > 0) {
    size_t payload = sizeof(int) * nfds;
    memset(control.buf, 0, CMSG_SPACE(payload));
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(payload);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(payload);
    memcpy(CMSG_DATA(c), fds, payload);
  }
  ssize_t r;
  do {
    r = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return make_int(env, -1);
    return throw_errno(env, errno, "sendmsg");
  }
  return make_int(env, r);
}

/*
 * pipe(size) -> [readFd, writeFd]: a non-blocking pipe whose capacity is
 * raised to `size` bytes (F_SETPIPE_SZ) when the system allows it (it is
 * left at the default otherwise). For pipeSend.
 */
static napi_value vdk_pipe(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int32_t size = 0;
  CHECK_NAPI(napi_get_value_int32(env, argv[0], &size));
  int p[2];
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) return throw_errno(env, errno, "pipe2");
  if (size > 0) (void)fcntl(p[1], F_SETPIPE_SZ, size); /* best effort: EPERM above pipe-max-size */
  napi_value arr, a, b;
  CHECK_NAPI(napi_create_array_with_length(env, 2, &arr));
  a = make_int(env, p[0]);
  b = make_int(env, p[1]);
  napi_set_element(env, arr, 0, a);
  napi_set_element(env, arr, 1, b);
  return arr;
}

/*
 * pipeSend(sock, pipeR, pipeW, parts, refs, state) -> bytes taken from parts.
 *
 * Sends parts (Uint8Arrays, in order) through a pipe into the stream socket
 * `sock`: parts whose refs[i] is 1 are vmsplice()d into the pipe (the pipe,
 * then the socket buffer, refer to that memory: the peer reads it when it
 * reads, not as it was now), the others are write()n into it (copied);
 * memory vmsplice cannot pin (EFAULT/EINVAL: e.g. memfd_secret or device
 * memory) is copied too. splice() then moves the pipe's contents into the
 * socket without a copy. state is a Float64Array: state[0] = bytes in the
 * pipe before the call (they go first), set on return to the bytes still in
 * the pipe (the socket was full: call again, with no parts, when it is
 * writable); state[1] = bytes taken from parts, also when it throws. Returns
 * state[1]. Throws on a socket error (EPIPE: the peer is gone). splice has no
 * MSG_NOSIGNAL: SIGPIPE is blocked around it and a SIGPIPE it raised is
 * consumed, as sendmsg's MSG_NOSIGNAL would have it.
 */
static napi_value vdk_pipe_send(napi_env env, napi_callback_info info) {
  GET_ARGS(6);
  int sock = arg_fd(env, argv[0]);
  if (sock < 0) return NULL;
  int pr = arg_fd(env, argv[1]);
  if (pr < 0) return NULL;
  int pw = arg_fd(env, argv[2]);
  if (pw < 0) return NULL;
  uint32_t n = 0;
  bool is_array = false;
  napi_is_array(env, argv[3], &is_array);
  if (!is_array) return type_error(env, "parts must be an array of Uint8Arrays");
  napi_get_array_length(env, argv[3], &n);
  if (n > VDK_MAX_IOV) return range_error(env, "too many parts in one pipeSend");
  struct iovec parts[VDK_MAX_IOV];
  for (uint32_t i = 0; i < n; i++) {
    napi_value el;
    CHECK_NAPI(napi_get_element(env, argv[3], i, &el));
    if (arg_bytes(env, el, (uint8_t **)&parts[i].iov_base, &parts[i].iov_len) < 0) return NULL;
  }
  /* refs and state after the parts: getters on the array could not detach them under us. */
  uint8_t *refs = NULL;
  size_t nrefs = 0;
  if (arg_bytes(env, argv[4], &refs, &nrefs) < 0) return NULL;
  if (nrefs < n) return range_error(env, "refs is shorter than parts");
  bool is_ta = false;
  napi_typedarray_type type;
  size_t slen = 0, soff;
  double *state = NULL;
  napi_value sab;
  if (napi_is_typedarray(env, argv[5], &is_ta) != napi_ok || !is_ta) return type_error(env, "state must be a Float64Array");
  napi_get_typedarray_info(env, argv[5], &type, &slen, (void **)&state, &sab, &soff);
  if (type != napi_float64_array || slen < 2) return type_error(env, "state must be a Float64Array of 2");
  if (!(state[0] >= 0) || state[0] > 1e15) return range_error(env, "state[0] must be the bytes in the pipe");

  size_t pending = (size_t)state[0];
  size_t taken = 0;
  uint32_t i = 0;
  size_t off = 0;
  int err = 0;
  const char *failed = NULL;
  sigset_t pipe_set, old_set;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old_set);
  for (;;) {
    while (i < n && off == parts[i].iov_len) {
      i++;
      off = 0;
    }
    if (i < n) {
      struct iovec v = {(uint8_t *)parts[i].iov_base + off, parts[i].iov_len - off};
      ssize_t r;
      bool ref = refs[i] != 0;
      do {
        r = ref ? vmsplice(pw, &v, 1, SPLICE_F_NONBLOCK) : write(pw, v.iov_base, v.iov_len);
        if (r < 0 && ref && (errno == EFAULT || errno == EINVAL)) {
          ref = false; /* memory that cannot be pinned: copy it */
          r = write(pw, v.iov_base, v.iov_len);
        }
      } while (r < 0 && errno == EINTR);
      if (r > 0) {
        off += (size_t)r;
        taken += (size_t)r;
        pending += (size_t)r;
        continue;
      }
      if (r < 0 && errno != EAGAIN) {
        err = errno;
        failed = ref ? "vmsplice" : "write";
        break;
      }
      /* the pipe is full: move some of it into the socket */
    }
    if (pending == 0) break;
    ssize_t sp;
    do {
      sp = splice(pr, NULL, sock, NULL, pending, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    } while (sp < 0 && errno == EINTR);
    if (sp > 0) {
      pending -= (size_t)sp;
      continue;
    }
    if (sp < 0 && errno == EAGAIN) break; /* the socket is full */
    err = sp == 0 ? 0 : errno; /* 0: splice moved nothing from a non-empty pipe */
    failed = "splice";
    break;
  }
  /* A SIGPIPE splice raised went to this thread only, and none can have been pending for it
   * unless SIGPIPE was blocked already (then it is not ours to take): consume it before
   * unblocking. Only after a failure, so a SIGPIPE sent to the process meanwhile (kill) is left
   * for another thread. sigtimedwait takes the thread's own pending signal first. */
  if (failed != NULL && !sigismember(&old_set, SIGPIPE)) {
    struct timespec zero = {0, 0};
    while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &old_set, NULL);
  state[0] = (double)pending;
  state[1] = (double)taken;
  if (failed != NULL) {
    if (err == 0) return throw_errno_msg(env, EIO, "splice", "splice moved nothing from a non-empty pipe");
    return throw_errno(env, err, failed);
  }
  return make_int(env, (int64_t)taken);
}

/*
 * recvmsg(fd, buf, offset, length, fdsOut) -> bytes read (0 at end of
 * stream), or -1 when nothing is available.
 * fdsOut is an Int32Array: fdsOut[0] receives the number of fds that came
 * with these bytes, fdsOut[1..] the fds (O_CLOEXEC, now owned by the caller).
 * Room for fdsOut.length - 1 fds is offered to the kernel. If more arrived
 * (MSG_CTRUNC) the ones that fit are closed here and ENOBUFS is thrown: the
 * stream has lost fds and can no longer be trusted.
 * recvmsg(fd, buf, offset, length, fdsOut, tail, tailOffset, tailLength):
 * a scatter read, the bytes past `length` landing in tail[tailOffset..]
 * (a placed payload's rest, then the next message's prefix, in one call).
 */
static napi_value vdk_recvmsg(napi_env env, napi_callback_info info) {
  GET_ARGS(8);
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  uint8_t *buf;
  size_t buflen;
  uint32_t offset = 0, length = 0;
  if (arg_bytes(env, argv[1], &buf, &buflen) < 0) return NULL;
  CHECK_NAPI(napi_get_value_uint32(env, argv[2], &offset));
  CHECK_NAPI(napi_get_value_uint32(env, argv[3], &length));
  if ((size_t)offset > buflen || (size_t)length > buflen - offset)
    return range_error(env, "offset/length outside the buffer");
  if (length == 0) return range_error(env, "length must be positive");

  bool is_ta = false;
  napi_typedarray_type type;
  size_t fdcap = 0, off;
  int32_t *fdout = NULL;
  napi_value ab;
  napi_is_typedarray(env, argv[4], &is_ta);
  if (!is_ta) return type_error(env, "fdsOut must be an Int32Array");
  napi_get_typedarray_info(env, argv[4], &type, &fdcap, (void **)&fdout, &ab, &off);
  if (type != napi_int32_array || fdcap < 1) return type_error(env, "fdsOut must be a non-empty Int32Array");
  size_t maxfds = fdcap - 1;
  if (maxfds > VDK_SCM_MAX_FD) maxfds = VDK_SCM_MAX_FD;

  union {
    char buf[CMSG_SPACE(sizeof(int) * VDK_SCM_MAX_FD)];
    struct cmsghdr align;
  } control;
  struct iovec iov[2] = {{buf + offset, length}, {NULL, 0}};
  size_t niov = 1;
  napi_valuetype tt = napi_undefined;
  if (argc > 5) napi_typeof(env, argv[5], &tt);
  if (tt != napi_undefined && tt != napi_null) {
    uint8_t *tail;
    size_t taillen;
    uint32_t toff = 0, tlen = 0;
    if (arg_bytes(env, argv[5], &tail, &taillen) < 0) return NULL;
    CHECK_NAPI(napi_get_value_uint32(env, argv[6], &toff));
    CHECK_NAPI(napi_get_value_uint32(env, argv[7], &tlen));
    if ((size_t)toff > taillen || (size_t)tlen > taillen - toff)
      return range_error(env, "tail offset/length outside the tail buffer");
    if (tlen > 0) {
      iov[1].iov_base = tail + toff;
      iov[1].iov_len = tlen;
      niov = 2;
    }
  }
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = iov;
  msg.msg_iovlen = niov;
  if (maxfds > 0) {
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * maxfds);
  }
  ssize_t r;
  do {
    r = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  } while (r < 0 && errno == EINTR);
  fdout[0] = 0;
  if (r < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return make_int(env, -1);
    return throw_errno(env, errno, "recvmsg");
  }
  size_t got = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    int *p = (int *)CMSG_DATA(c);
    for (size_t i = 0; i < n; i++) {
      if (got < maxfds) {
        fdout[1 + got++] = p[i];
      } else {
        close(p[i]); /* cannot happen with a correct control size; never leak */
      }
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    for (size_t i = 0; i < got; i++) close(fdout[1 + i]);
    fdout[0] = 0;
    return throw_errno_msg(env, ENOBUFS, "recvmsg", "control data truncated: the peer sent more fds than allowed");
  }
  fdout[0] = (int32_t)got;
  return make_int(env, r);
}

/* ------------------------------------------------------------------ */
/* Readiness watchers (uv_poll) */

static void poll_unlink(vdk_poll *p) {
  if (p->inst == NULL) return;
  if (p->prev) p->prev->next = p->next;
  else p->inst->polls = p->next;
  if (p->next) p->next->prev = p->prev;
  p->inst = NULL;
  p->next = p->prev = NULL;
}

/* The struct is freed once both the uv handle is closed and the JS external
 * that points at it has been finalized, whichever comes last. */
static void poll_on_close(uv_handle_t *h) {
  vdk_poll *p = (vdk_poll *)h->data;
  if (p->callback != NULL) napi_delete_reference(p->env, p->callback);
  if (p->async_ctx != NULL) napi_async_destroy(p->env, p->async_ctx);
  p->callback = NULL;
  p->async_ctx = NULL;
  p->uv_closed = 1;
  if (p->finalized) free(p);
}

/* Teardown path: the env is going away, so release without calling into N-API. */
static void poll_on_close_teardown(uv_handle_t *h) {
  vdk_poll *p = (vdk_poll *)h->data;
  p->callback = NULL;
  p->async_ctx = NULL;
  p->uv_closed = 1;
  if (p->finalized) free(p);
}

static void poll_on_event(uv_poll_t *h, int status, int events) {
  vdk_poll *p = (vdk_poll *)h->data;
  if (p->closing) return;
  napi_env env = p->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv, argv[2], result;
  if (napi_get_reference_value(env, p->callback, &cb) == napi_ok && cb != NULL) {
    napi_get_global(env, &recv); /* napi_make_callback needs an object receiver */
    napi_create_int32(env, status, &argv[0]);
    napi_create_int32(env, events, &argv[1]);
    napi_status s = napi_make_callback(env, p->async_ctx, recv, cb, 2, argv, &result);
    if (s == napi_pending_exception) {
      napi_value exc;
      napi_get_and_clear_last_exception(env, &exc);
      napi_fatal_exception(env, exc);
    }
  }
  napi_close_handle_scope(env, scope);
}

static void poll_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  vdk_poll *p = (vdk_poll *)data;
  p->finalized = 1;
  if (!p->closing) {
    /* Dropped without pollClose(): close it now; poll_on_close frees. */
    p->closing = 1;
    poll_unlink(p);
    uv_close((uv_handle_t *)&p->handle, poll_on_close);
  } else if (p->uv_closed) {
    free(p);
  }
}

static vdk_poll *arg_poll(napi_env env, napi_value v) {
  void *data = NULL;
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external) {
    type_error(env, "expected a poll handle");
    return NULL;
  }
  napi_get_value_external(env, v, &data);
  vdk_poll *p = (vdk_poll *)data;
  if (p == NULL || p->closing) {
    throw_errno_msg(env, EBADF, "poll", "poll handle is closed");
    return NULL;
  }
  return p;
}

/* pollNew(fd, callback(status, events)) -> handle */
static napi_value vdk_poll_new(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  napi_valuetype t;
  CHECK_NAPI(napi_typeof(env, argv[1], &t));
  if (t != napi_function) return type_error(env, "callback must be a function");
  /* uv_poll_init on a closed fd aborts in some libuv versions: check first. */
  if (fcntl(fd, F_GETFD) < 0) return throw_errno(env, errno, "poll");

  uv_loop_t *loop;
  CHECK_NAPI(napi_get_uv_event_loop(env, &loop));
  vdk_poll *p = calloc(1, sizeof *p);
  if (p == NULL) return throw_errno(env, ENOMEM, "poll");
  int r = uv_poll_init(loop, &p->handle, fd);
  if (r < 0) {
    free(p);
    return throw_errno(env, -r, "poll");
  }
  p->handle.data = p;
  p->env = env;
  napi_value name;
  napi_create_string_utf8(env, "vdevkit:poll", NAPI_AUTO_LENGTH, &name);
  napi_create_reference(env, argv[1], 1, &p->callback);
  napi_async_init(env, NULL, name, &p->async_ctx);

  vdk_instance *inst = NULL;
  napi_get_instance_data(env, (void **)&inst);
  p->inst = inst;
  p->next = inst->polls;
  if (inst->polls) inst->polls->prev = p;
  inst->polls = p;

  napi_value ext;
  if (napi_create_external(env, p, poll_finalize, NULL, &ext) != napi_ok) {
    p->finalized = 1;
    p->closing = 1;
    poll_unlink(p);
    uv_close((uv_handle_t *)&p->handle, poll_on_close);
    return NULL;
  }
  return ext;
}

/* pollStart(handle, events): 1 = readable, 2 = writable; 0 stops. */
static napi_value vdk_poll_start(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  vdk_poll *p = arg_poll(env, argv[0]);
  if (p == NULL) return NULL;
  int32_t ev = 0;
  napi_get_value_int32(env, argv[1], &ev);
  int uvev = 0;
  if (ev & 1) uvev |= UV_READABLE;
  if (ev & 2) uvev |= UV_WRITABLE;
  int r = uvev ? uv_poll_start(&p->handle, uvev, poll_on_event) : uv_poll_stop(&p->handle);
  if (r < 0) return throw_errno(env, -r, "poll");
  return make_undefined(env);
}

/* pollClose(handle): stops and releases the watcher; idempotent. */
static napi_value vdk_poll_close(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  void *data = NULL;
  napi_valuetype t;
  CHECK_NAPI(napi_typeof(env, argv[0], &t));
  if (t != napi_external) return type_error(env, "expected a poll handle");
  napi_get_value_external(env, argv[0], &data);
  vdk_poll *p = (vdk_poll *)data;
  if (p != NULL && !p->closing) {
    p->closing = 1;
    poll_unlink(p);
    uv_poll_stop(&p->handle);
    uv_close((uv_handle_t *)&p->handle, poll_on_close);
  }
  return make_undefined(env);
}

/* ------------------------------------------------------------------ */
/* Shared memory: memfd, ftruncate, mmap as external ArrayBuffer, munmap */

typedef struct vdk_mapping {
  void *addr;
  size_t len;
  int unmapped;
  int guard; /* slot in g_guards, or -1 when the mapping is not guarded */
  struct vdk_mapping *next;
} vdk_mapping;

/*
 * SIGBUS containment for mappings of a peer's fd (the wl_shm approach of
 * libwayland-server): a peer that truncates its memfd under our mapping turns
 * every access to the lost pages into SIGBUS. The handler looks the fault
 * address up in g_guards (a fixed table read without locks: a signal handler
 * may not take a mutex) and, when it lies in a guarded mapping, maps anonymous
 * zero pages MAP_FIXED over the whole mapping and sets the slot's flag: the
 * access completes (reads give zeros, writes go nowhere) and the owner, seeing
 * the flag, fails the connection. Any other SIGBUS goes to the previous
 * handler, or kills the process as it would have.
 */
#define VDK_GUARD_SLOTS 4096
typedef struct {
  uintptr_t addr; /* 0 = free; written under g_mappings_lock, read by the handler */
  size_t len;
  volatile sig_atomic_t faulted;
} vdk_guard;
static vdk_guard g_guards[VDK_GUARD_SLOTS];
static struct sigaction g_prev_sigbus;
static pthread_once_t g_sigbus_once = PTHREAD_ONCE_INIT;
static volatile sig_atomic_t g_sigbus_contained = 0;

static void sigbus_handler(int sig, siginfo_t *si, void *uctx) {
  if (si != NULL && si->si_code > 0) { /* raised by the kernel for a fault, not kill() */
    uintptr_t a = (uintptr_t)si->si_addr;
    for (int i = 0; i < VDK_GUARD_SLOTS; i++) {
      uintptr_t base = __atomic_load_n(&g_guards[i].addr, __ATOMIC_ACQUIRE);
      if (base == 0) continue;
      size_t len = __atomic_load_n(&g_guards[i].len, __ATOMIC_ACQUIRE);
      if (a < base || a - base >= len) continue;
      int saved = errno;
      void *r = mmap((void *)base, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      errno = saved;
      if (r != MAP_FAILED) {
        g_guards[i].faulted = 1;
        g_sigbus_contained = g_sigbus_contained + 1;
        return; /* the faulting access is retried, now on zero pages */
      }
      break;
    }
  }
  if ((g_prev_sigbus.sa_flags & SA_SIGINFO) && g_prev_sigbus.sa_sigaction != NULL) {
    g_prev_sigbus.sa_sigaction(sig, si, uctx);
    return;
  }
  if (g_prev_sigbus.sa_handler != SIG_DFL && g_prev_sigbus.sa_handler != SIG_IGN && g_prev_sigbus.sa_handler != NULL) {
    g_prev_sigbus.sa_handler(sig);
    return;
  }
  /* Not ours: die of SIGBUS as without this handler (the access faults again, or raise for kill()). */
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, NULL);
  if (si == NULL || si->si_code <= 0) raise(SIGBUS);
}

static void sigbus_install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = sigbus_handler;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, &g_prev_sigbus);
}

/* Called with g_mappings_lock held. -1 when the table is full (the mapping is then unguarded). */
static int guard_add_locked(void *addr, size_t len) {
  pthread_once(&g_sigbus_once, sigbus_install);
  for (int i = 0; i < VDK_GUARD_SLOTS; i++) {
    if (__atomic_load_n(&g_guards[i].addr, __ATOMIC_RELAXED) != 0) continue;
    g_guards[i].faulted = 0;
    __atomic_store_n(&g_guards[i].len, len, __ATOMIC_RELEASE);
    __atomic_store_n(&g_guards[i].addr, (uintptr_t)addr, __ATOMIC_RELEASE);
    return i;
  }
  return -1;
}

static void guard_remove_locked(vdk_mapping *m) {
  if (m->guard >= 0) __atomic_store_n(&g_guards[m->guard].addr, (uintptr_t)0, __ATOMIC_RELEASE);
  m->guard = -1;
}

/* Live mappings, process-wide (workers included): munmap() finds a mapping by address. */
static vdk_mapping *g_mappings = NULL;
static pthread_mutex_t g_mappings_lock = PTHREAD_MUTEX_INITIALIZER;

static void mapping_remove_locked(vdk_mapping *m) {
  for (vdk_mapping **pp = &g_mappings; *pp != NULL; pp = &(*pp)->next) {
    if (*pp == m) {
      *pp = m->next;
      guard_remove_locked(m);
      return;
    }
  }
}

static void mapping_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)data;
  vdk_mapping *m = (vdk_mapping *)hint;
  pthread_mutex_lock(&g_mappings_lock);
  if (!m->unmapped) {
    m->unmapped = 1;
    mapping_remove_locked(m);
    munmap(m->addr, m->len);
  }
  pthread_mutex_unlock(&g_mappings_lock);
  free(m);
}

static napi_value vdk_memfd_create(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  char name[250];
  size_t len;
  bool sealing = false;
  CHECK_NAPI(napi_get_value_string_utf8(env, argv[0], name, sizeof name, &len));
  napi_get_value_bool(env, argv[1], &sealing);
  int fd = memfd_create(name, MFD_CLOEXEC | (sealing ? MFD_ALLOW_SEALING : 0));
  if (fd < 0) return throw_errno(env, errno, "memfd_create");
  return make_int(env, fd);
}

static napi_value vdk_ftruncate(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  uint64_t size;
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  if (arg_u64(env, argv[1], "size must be a non-negative integer", &size) < 0) return NULL;
  if (ftruncate(fd, (off_t)size) < 0) return throw_errno(env, errno, "ftruncate");
  return make_undefined(env);
}

/* addSeals(fd, seals): F_ADD_SEALS, for memfds created with sealing allowed. */
static napi_value vdk_add_seals(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  int32_t seals = 0;
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  napi_get_value_int32(env, argv[1], &seals);
  if (fcntl(fd, F_ADD_SEALS, seals) < 0) return throw_errno(env, errno, "fcntl");
  return make_undefined(env);
}

/*
 * mmap(fd, offset, length, readOnly) -> ArrayBuffer over a MAP_SHARED mapping.
 * For regular files (memfd included) the range must lie inside the file:
 * touching a page past the end would raise SIGBUS, so it is refused here.
 */
static napi_value vdk_mmap(napi_env env, napi_callback_info info) {
  GET_ARGS(5);
  uint64_t offset, length;
  bool read_only = false;
  bool guarded = false;
  napi_get_value_bool(env, argv[4], &guarded);
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  if (arg_u64(env, argv[1], "offset must be a non-negative integer", &offset) < 0) return NULL;
  if (arg_u64(env, argv[2], "length must be a non-negative integer", &length) < 0) return NULL;
  napi_get_value_bool(env, argv[3], &read_only);
  if (length == 0) return throw_errno_msg(env, EINVAL, "mmap", "length must be positive");
  long page = sysconf(_SC_PAGESIZE);
  if (offset % (uint64_t)page != 0)
    return throw_errno_msg(env, EINVAL, "mmap", "offset must be a multiple of the page size");
  struct stat st;
  if (fstat(fd, &st) < 0) return throw_errno(env, errno, "mmap");
  if (S_ISREG(st.st_mode) && (offset > (uint64_t)st.st_size || length > (uint64_t)st.st_size - offset))
    return throw_errno_msg(env, EINVAL, "mmap", "range lies beyond the end of the file");

  vdk_mapping *m = calloc(1, sizeof *m);
  if (m == NULL) return throw_errno(env, ENOMEM, "mmap");
  void *addr = mmap(NULL, (size_t)length, PROT_READ | (read_only ? 0 : PROT_WRITE), MAP_SHARED, fd,
                    (off_t)offset);
  if (addr == MAP_FAILED) {
    int e = errno;
    free(m);
    return throw_errno(env, e, "mmap");
  }
  m->addr = addr;
  m->len = (size_t)length;
  m->guard = -1;
  napi_value ab;
  napi_status s = napi_create_external_arraybuffer(env, addr, (size_t)length, mapping_finalize, m, &ab);
  if (s != napi_ok) {
    munmap(addr, (size_t)length);
    free(m);
    CHECK_NAPI(s);
  }
  pthread_mutex_lock(&g_mappings_lock);
  m->next = g_mappings;
  g_mappings = m;
  if (guarded) m->guard = guard_add_locked(addr, (size_t)length);
  pthread_mutex_unlock(&g_mappings_lock);
  return ab;
}

/*
 * mappingState(arrayBuffer) -> 0 live and intact, 1 faulted (the peer shrank the
 * file: the mapping now holds zero pages), -1 not a live mapping, -2 live but
 * unguarded (not mapped with guard, or the guard table was full).
 */
static napi_value vdk_mapping_state(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  bool is_ab = false;
  void *data = NULL;
  size_t len = 0;
  CHECK_NAPI(napi_is_arraybuffer(env, argv[0], &is_ab));
  if (!is_ab) return type_error(env, "expected an ArrayBuffer from mmap()");
  CHECK_NAPI(napi_get_arraybuffer_info(env, argv[0], &data, &len));
  int state = -1;
  pthread_mutex_lock(&g_mappings_lock);
  if (data != NULL) {
    for (vdk_mapping *m = g_mappings; m != NULL; m = m->next) {
      if (m->addr == data && m->len == len) {
        state = m->guard < 0 ? -2 : (g_guards[m->guard].faulted ? 1 : 0);
        break;
      }
    }
  }
  pthread_mutex_unlock(&g_mappings_lock);
  return make_int(env, state);
}

/* sigbusContained() -> how many SIGBUS faults the handler has turned into zero pages. */
static napi_value vdk_sigbus_contained(napi_env env, napi_callback_info info) {
  (void)info;
  return make_int(env, g_sigbus_contained);
}

/* munmap(arrayBuffer): detaches the buffer (views become empty) and unmaps.
 * Returns false if the buffer is not a live mapping (already unmapped). */
static napi_value vdk_munmap(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  bool is_ab = false;
  void *data = NULL;
  size_t len = 0;
  napi_value r;
  CHECK_NAPI(napi_is_arraybuffer(env, argv[0], &is_ab));
  if (!is_ab) return type_error(env, "expected an ArrayBuffer from mmap()");
  CHECK_NAPI(napi_get_arraybuffer_info(env, argv[0], &data, &len));
  vdk_mapping *m = NULL;
  pthread_mutex_lock(&g_mappings_lock);
  if (data != NULL) {
    for (m = g_mappings; m != NULL; m = m->next)
      if (m->addr == data && m->len == len) break;
  }
  if (m != NULL) {
    m->unmapped = 1;
    mapping_remove_locked(m);
  }
  pthread_mutex_unlock(&g_mappings_lock);
  if (m == NULL) {
    napi_get_boolean(env, false, &r);
    return r;
  }
  /* m may be freed by the finalizer from here on: use the saved values. */
  napi_detach_arraybuffer(env, argv[0]);
  munmap(data, len);
  napi_get_boolean(env, true, &r);
  return r;
}

/* ------------------------------------------------------------------ */
/* eventfd */

static napi_value vdk_eventfd(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  uint32_t initval = 0;
  bool semaphore = false;
  napi_get_value_uint32(env, argv[0], &initval);
  napi_get_value_bool(env, argv[1], &semaphore);
  int fd = eventfd(initval, EFD_CLOEXEC | EFD_NONBLOCK | (semaphore ? EFD_SEMAPHORE : 0));
  if (fd < 0) return throw_errno(env, errno, "eventfd");
  return make_int(env, fd);
}

/* eventfdRead(fd) -> counter value (>= 1), or -1 when the counter is zero. */
static napi_value vdk_eventfd_read(napi_env env, napi_callback_info info) {
  GET_ARGS(1);
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  uint64_t v;
  ssize_t r;
  do {
    r = read(fd, &v, sizeof v);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN) return make_int(env, -1);
    return throw_errno(env, errno, "read");
  }
  if (r != sizeof v) return throw_errno_msg(env, EINVAL, "read", "not an eventfd");
  napi_value out;
  if (v <= 9007199254740991ULL) napi_create_int64(env, (int64_t)v, &out);
  else napi_create_bigint_uint64(env, v, &out);
  return out;
}

/* eventfdWrite(fd, value) -> true, or false when the counter would overflow. */
static napi_value vdk_eventfd_write(napi_env env, napi_callback_info info) {
  GET_ARGS(2);
  uint64_t v;
  int fd = arg_fd(env, argv[0]);
  if (fd < 0) return NULL;
  if (arg_u64(env, argv[1], "value must be a non-negative integer", &v) < 0) return NULL;
  ssize_t r;
  do {
    r = write(fd, &v, sizeof v);
  } while (r < 0 && errno == EINTR);
  napi_value out;
  if (r < 0) {
    if (errno == EAGAIN) {
      napi_get_boolean(env, false, &out);
      return out;
    }
    return throw_errno(env, errno, "write");
  }
  if (r != sizeof v) return throw_errno_msg(env, EINVAL, "write", "not an eventfd");
  napi_get_boolean(env, true, &out);
  return out;
}

/* ------------------------------------------------------------------ */
/* Module setup */

static void instance_cleanup(void *arg) {
  vdk_instance *inst = (vdk_instance *)arg;
  /* The env is tearing down: stop every watcher so the loop can close. */
  vdk_poll *p = inst->polls;
  inst->polls = NULL;
  while (p != NULL) {
    vdk_poll *next = p->next;
    p->inst = NULL;
    if (!p->closing) {
      p->closing = 1;
      uv_poll_stop(&p->handle);
      uv_close((uv_handle_t *)&p->handle, poll_on_close_teardown);
    }
    p = next;
  }
}

static void instance_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  vdk_instance *inst = (vdk_instance *)data;
  if (inst->error_ctor != NULL) napi_delete_reference(env, inst->error_ctor);
  free(inst);
}

#define EXPORT_FN(name, fn)                                                       \
  do {                                                                            \
    napi_value f_;                                                                \
    napi_create_function(env, name, NAPI_AUTO_LENGTH, fn, NULL, &f_);             \
    napi_set_named_property(env, exports, name, f_);                              \
  } while (0)

#define EXPORT_INT(name, value) napi_set_named_property(env, exports, name, make_int(env, value))

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  vdk_instance *inst = calloc(1, sizeof *inst);
  if (inst == NULL) return NULL;
  napi_set_instance_data(env, inst, instance_finalize, NULL);
  napi_add_env_cleanup_hook(env, instance_cleanup, inst);

  EXPORT_FN("setErrorClass", vdk_set_error_class);
  EXPORT_FN("close", vdk_close);
  EXPORT_FN("dup", vdk_dup);
  EXPORT_FN("fstat", vdk_fstat);
  EXPORT_FN("setNonBlock", vdk_set_nonblock);
  EXPORT_FN("listen", vdk_listen);
  EXPORT_FN("accept", vdk_accept);
  EXPORT_FN("connect", vdk_connect);
  EXPORT_FN("socketpair", vdk_socketpair);
  EXPORT_FN("shutdown", vdk_shutdown);
  EXPORT_FN("setSendBuffer", vdk_set_send_buffer);
  EXPORT_FN("checkSocketError", vdk_check_socket_error);
  EXPORT_FN("sendmsg", vdk_sendmsg);
  EXPORT_FN("recvmsg", vdk_recvmsg);
  EXPORT_FN("pipe", vdk_pipe);
  EXPORT_FN("pipeSend", vdk_pipe_send);
  EXPORT_FN("pollNew", vdk_poll_new);
  EXPORT_FN("pollStart", vdk_poll_start);
  EXPORT_FN("pollClose", vdk_poll_close);
  EXPORT_FN("memfdCreate", vdk_memfd_create);
  EXPORT_FN("ftruncate", vdk_ftruncate);
  EXPORT_FN("addSeals", vdk_add_seals);
  EXPORT_FN("mmap", vdk_mmap);
  EXPORT_FN("munmap", vdk_munmap);
  EXPORT_FN("mappingState", vdk_mapping_state);
  EXPORT_FN("sigbusContained", vdk_sigbus_contained);
  EXPORT_FN("eventfd", vdk_eventfd);
  EXPORT_FN("eventfdRead", vdk_eventfd_read);
  EXPORT_FN("eventfdWrite", vdk_eventfd_write);

  EXPORT_INT("SCM_MAX_FD", VDK_SCM_MAX_FD);
  EXPORT_INT("PAGE_SIZE", sysconf(_SC_PAGESIZE));
  EXPORT_INT("F_SEAL_SEAL", F_SEAL_SEAL);
  EXPORT_INT("F_SEAL_SHRINK", F_SEAL_SHRINK);
  EXPORT_INT("F_SEAL_GROW", F_SEAL_GROW);
  EXPORT_INT("F_SEAL_WRITE", F_SEAL_WRITE);
  return exports;
}
