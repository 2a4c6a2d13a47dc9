// Simulates N ranks of a job meeting on one TCPStore server, from one
// process and one epoll loop (threads would make the clients, not the
// server, the bottleneck). Each rank does what PyTorch's client does:
// connect (retrying a refused or reset connection with PyTorch's backoff:
// 500 ms, x1.5, jitter 0.5), VALIDATE, PING, then ADD "init/" 1; once every
// rank has joined, the store barrier of torch.distributed.elastic: ADD
// <prefix>num_members 1, the last arrival SETs <prefix>last_member, and
// everyone WAITs for it.
//
//   ranks HOST PORT N PREFIX TIMEOUT_S
//     -> "joined J failed F refused R seconds S"   (R: connections refused
//        or reset and retried), then waits for a line on stdin, then
//        -> "barrier B failed F seconds S"
//
// Ranks connect from source addresses 127.0.0.2 .. 127.0.0.201 (ports
// chosen per 4-tuple), so N may exceed one address's ephemeral ports.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum phase { CONNECTING, JOINING, JOINED, ARRIVING, WAITING, DONE, FAILED, BACKOFF };

struct rank {
  int fd;
  enum phase phase;
  double retry_at;
  double backoff;
  int need;  // reply bytes still expected
  int got;
  unsigned char reply[8];
};

static struct sockaddr_in server;
static int epfd;
static const char* prefix;
static long world;
static long refused;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static size_t put_bytes(unsigned char* out, const char* s, size_t n) {
  uint64_t len = n;
  memcpy(out, &len, 8);
  memcpy(out + 8, s, n);
  return 8 + n;
}

static size_t add_request(unsigned char* out, const char* key, int64_t delta) {
  out[0] = 0x04;
  size_t n = 1 + put_bytes(out + 1, key, strlen(key));
  memcpy(out + n, &delta, 8);
  return n + 8;
}

static int send_all(int fd, const unsigned char* buf, size_t n) {
  return send(fd, buf, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
}

static void retry_later(struct rank* r);

static void start_connect(struct rank* r, long i) {
  r->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  int one = 1;
  setsockopt(r->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(r->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
  struct sockaddr_in src = {.sin_family = AF_INET};
  src.sin_addr.s_addr = htonl(0x7F000002 + (uint32_t)(i % 200));
  bind(r->fd, (struct sockaddr*)&src, sizeof src);
  r->phase = CONNECTING;
  r->got = 0;
  struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u64 = (uint64_t)i};
  epoll_ctl(epfd, EPOLL_CTL_ADD, r->fd, &ev);
  if (connect(r->fd, (struct sockaddr*)&server, sizeof server) < 0 && errno != EINPROGRESS) {
    retry_later(r);
  }
}

// A refused or reset connection: close it and retry after PyTorch's backoff.
static void retry_later(struct rank* r) {
  refused++;
  if (r->fd >= 0) close(r->fd);
  r->fd = -1;
  double jitter = 1.0 + 0.5 * (2.0 * drand48() - 1.0);
  r->retry_at = now() + r->backoff * jitter;
  r->backoff = r->backoff * 1.5 > 60.0 ? 60.0 : r->backoff * 1.5;
  r->phase = BACKOFF;
}

static void expect(struct rank* r, int bytes) {
  r->need = bytes;
  r->got = 0;
}

// Reads what the server sent; returns 1 when the expected reply is complete.
static int read_reply(struct rank* r) {
  ssize_t n = recv(r->fd, r->reply + r->got, r->need - r->got, 0);
  if (n <= 0) return n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK) ? -1 : 0;
  r->got += n;
  return r->got == r->need;
}

// Runs the loop until every rank is out of `phase`s before `until`, or the
// deadline; returns how many reached `until`.
static long run(struct rank* ranks, long n, enum phase until, double deadline) {
  struct epoll_event events[1024];
  unsigned char buf[256];
  for (;;) {
    long done = 0, busy = 0;
    double t = now(), next = deadline;
    for (long i = 0; i < n; i++) {
      struct rank* r = &ranks[i];
      if (r->phase == BACKOFF) {
        if (r->retry_at <= t) start_connect(r, i);
        else if (r->retry_at < next) next = r->retry_at;
      }
      if (r->phase == until) done++;
      else if (r->phase != FAILED) busy++;
    }
    if (!busy || t >= deadline) return done;
    int timeout = (int)((next - t) * 1000) + 1;
    int k = epoll_wait(epfd, events, 1024, timeout < 100 ? timeout : 100);
    for (int e = 0; e < k; e++) {
      struct rank* r = &ranks[events[e].data.u64];
      if (r->fd < 0) continue;
      if (r->phase == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(r->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { retry_later(r); continue; }
        if (!(events[e].events & EPOLLOUT)) continue;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = events[e].data.u64};
        epoll_ctl(epfd, EPOLL_CTL_MOD, r->fd, &ev);
        unsigned char hello[10] = {0x00, 0xce, 0xf7, 0x85, 0x3c, 0x0d};
        uint32_t nonce = (uint32_t)getpid();
        memcpy(hello + 6, &nonce, 4);
        if (send_all(r->fd, hello, sizeof hello)) { retry_later(r); continue; }
        r->phase = JOINING;
        expect(r, 4);  // the ping
        continue;
      }
      int complete = read_reply(r);
      if (complete < 0) {
        // Reset before joining: refused for want of room, retry. After: failed.
        if (r->phase == JOINING) retry_later(r);
        else { r->phase = FAILED; close(r->fd); r->fd = -1; }
        continue;
      }
      if (!complete) continue;
      if (r->phase == JOINING && r->need == 4) {
        size_t len = add_request(buf, "init/", 1);
        if (send_all(r->fd, buf, len)) { retry_later(r); continue; }
        expect(r, 8);
      } else if (r->phase == JOINING) {
        r->phase = JOINED;
      } else if (r->phase == ARRIVING) {
        int64_t arrived;
        memcpy(&arrived, r->reply, 8);
        char key[256];
        size_t len = 0;
        if (arrived == world) {
          snprintf(key, sizeof key, "/%slast_member", prefix);
          buf[0] = 0x01;
          len = 1 + put_bytes(buf + 1, key, strlen(key));
          len += put_bytes(buf + len, "1", 1);
        }
        snprintf(key, sizeof key, "/%slast_member", prefix);
        buf[len] = 0x06;
        uint64_t one_key = 1;
        memcpy(buf + len + 1, &one_key, 8);
        len += 9 + put_bytes(buf + len + 9, key, strlen(key));
        if (send_all(r->fd, buf, len)) { r->phase = FAILED; continue; }
        r->phase = WAITING;
        expect(r, 1);
      } else if (r->phase == WAITING) {
        r->phase = DONE;
      }
    }
  }
}

int main(int argc, char** argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: ranks HOST PORT N PREFIX TIMEOUT_S\n");
    return 2;
  }
  struct rlimit lim;
  getrlimit(RLIMIT_NOFILE, &lim);
  lim.rlim_cur = lim.rlim_max;
  setrlimit(RLIMIT_NOFILE, &lim);
  server.sin_family = AF_INET;
  server.sin_port = htons(atoi(argv[2]));
  inet_pton(AF_INET, argv[1], &server.sin_addr);
  long n = atol(argv[3]);
  prefix = argv[4];
  world = n;
  double timeout = atof(argv[5]);
  srand48(getpid());
  epfd = epoll_create1(0);
  struct rank* ranks = calloc(n, sizeof *ranks);
  double t0 = now();
  for (long i = 0; i < n; i++) {
    ranks[i].backoff = 0.5;
    start_connect(&ranks[i], i);
  }
  long joined = run(ranks, n, JOINED, t0 + timeout);
  printf("joined %ld failed %ld refused %ld seconds %.3f\n", joined, n - joined, refused, now() - t0);
  fflush(stdout);
  char line[16];
  if (!fgets(line, sizeof line, stdin)) return 0;
  unsigned char buf[256];
  char key[256];
  snprintf(key, sizeof key, "/%snum_members", prefix);
  size_t len = add_request(buf, key, 1);
  double t1 = now();
  for (long i = 0; i < n; i++) {
    if (ranks[i].phase != JOINED) continue;
    if (send_all(ranks[i].fd, buf, len)) { ranks[i].phase = FAILED; continue; }
    ranks[i].phase = ARRIVING;
    expect(&ranks[i], 8);
  }
  long passed = run(ranks, n, DONE, t1 + timeout);
  printf("barrier %ld failed %ld seconds %.3f\n", passed, n - passed, now() - t1);
  fflush(stdout);
  // Hold the connections until told to go (the caller measures the server).
  fgets(line, sizeof line, stdin);
  return 0;
}
