// Members of one job for bench.py's liveness scenario, many in one
// process: COUNT ranks (FIRST .. FIRST+COUNT-1 of WORLD), each with its own
// TCPStore handle (libdistcore's C API) and liveness session in GROUP
// (TTL_MS, 0: none), each blocked in an async call driven by the library's
// one async thread: a get of a key nobody sets, or the store barrier
// GROUP"barrier" of WORLD members (which the victim, blocked in a get in a
// process of its own, never reaches). A callback takes each completion's
// CLOCK_MONOTONIC time, so the figure is the server telling every member,
// not N processes waking up on two cores.
//
//   liveness_ranks PORT GROUP WORLD FIRST COUNT TTL_MS get|barrier TIMEOUT_S
//     -> "ready COUNT fds F"  (F: this process's open descriptors)
//     once every call returned (or TIMEOUT_S passed):
//     -> "done COUNT named K" (K: failed with DC_ERR_PEER_FAILED naming rank
//        WORLD-1), "first <status> <message>", and "times NS NS ..." (each
//        member's completion, CLOCK_MONOTONIC ns; 0: never completed)
//
// With the call `hold` (bench.py's flood and keep-alive cost, table 12c)
// every member is blocked in a get of a key nobody sets, as with `get`,
// but the process holds them until a line (or EOF) on its standard input,
// reporting any call that returns meanwhile at once (none should: each is
// a false failure while every member is alive):
//     -> "ready COUNT fds F", then for each call that returned early
//        "early MEMBER RANK NS <status> <message>"
//     on a line (or EOF) on stdin:
//     -> "held COUNT completed K" (K: calls that returned, 0 expected) and
//        "first <status> <message>", then closes every session gracefully
//        (the group is not failed) and prints
//        "closed COUNT failed F first <status> <message>".
#define _GNU_SOURCE
#include <dirent.h>
#include <poll.h>
#include <distcore.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

struct member {
  dc_store* store;
  int rank;
  dc_work* work;
  _Atomic long long done_ns;
  dc_status status;
  char message[160];
};

static atomic_long completed;
static char victim[64];  // "rank WORLD-1 of group": the error must name it

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

// Runs on the library's async thread: keep it short.
static void on_done(const dc_work* work, void* user_data) {
  struct member* m = user_data;
  long long t = now_ns();
  dc_buf message = {0};
  dc_work_error(work, &m->status, &message);
  snprintf(m->message, sizeof m->message, "%.*s", (int)message.len, message.data ? (char*)message.data : "");
  dc_buf_free(&message);
  atomic_store(&m->done_ns, t);
  atomic_fetch_add(&completed, 1);
}

static int open_fds(void) {
  int n = 0;
  DIR* d = opendir("/proc/self/fd");
  while (d && readdir(d)) n++;
  if (d) closedir(d);
  return n - 3;  // ".", ".." and the directory's own descriptor
}

static void die(const char* what, long i) {
  fprintf(stderr, "member %ld: %s: %s\n", i, what, dc_last_error_message());
  exit(1);
}

// Connects member `i` as `rank`, opens its session, and starts its call.
static void join(struct member* m, long i, int port, const char* group, int world, int rank, long ttl_ms,
                 int barrier, long timeout_s) {
  m->rank = rank;
  dc_tcp_store_options opts;
  dc_tcp_store_options_init(&opts, sizeof opts);
  opts.host = "127.0.0.1";
  opts.port = (uint16_t)port;
  opts.timeout_ms = timeout_s * 1000;
  if (dc_tcp_store_new(&opts, &m->store)) die("connect", i);
  dc_session_options session;
  dc_session_options_init(&session, sizeof session);
  session.group = group;
  session.rank = rank;
  session.world_size = world;
  session.ttl_ms = ttl_ms;
  if (dc_tcp_store_open_session(m->store, &session)) die("open_session", i);
  char key[256];
  dc_status s;
  if (barrier) {
    snprintf(key, sizeof key, "%sbarrier", group);
    s = dc_store_barrier_async(m->store, key, world, DC_TIMEOUT_DEFAULT, &m->work);
  } else {
    snprintf(key, sizeof key, "%snever-set", group);
    s = dc_store_get_async(m->store, key, &m->work);
  }
  if (s || dc_work_add_done_callback(m->work, on_done, m)) die("start the call", i);
}

// `hold`: reports early completions until a line (or EOF) on stdin, then
// how many returned, and closes every session gracefully.
static void hold(struct member* members, long count) {
  char* reported = calloc(count, 1);
  char line[64];
  for (;;) {
    struct pollfd in = {.fd = 0, .events = POLLIN};
    int ready = poll(&in, 1, 200);
    for (long i = 0; i < count; i++) {
      struct member* m = &members[i];
      long long t = atomic_load(&m->done_ns);
      if (t && !reported[i]) {
        reported[i] = 1;
        printf("early %ld %d %lld %s %s\n", i, m->rank, t, dc_status_str(m->status), m->message);
        fflush(stdout);
      }
    }
    if (ready > 0) break;
  }
  if (!fgets(line, sizeof line, stdin)) line[0] = 0;
  long completed_now = atomic_load(&completed);
  struct member* first_done = NULL;
  for (long i = 0; i < count; i++)
    if (atomic_load(&members[i].done_ns) && (!first_done || members[i].done_ns < first_done->done_ns))
      first_done = &members[i];
  printf("held %ld completed %ld\n", count, completed_now);
  printf("first %s %s\n", first_done ? dc_status_str(first_done->status) : "-",
         first_done ? first_done->message : "none completed");
  fflush(stdout);
  long failed = 0;
  dc_status first_status = DC_OK;
  char first_message[160] = "";
  for (long i = 0; i < count; i++) {
    dc_status s = dc_tcp_store_close_session(members[i].store);
    if (s != DC_OK && failed++ == 0) {
      first_status = s;
      snprintf(first_message, sizeof first_message, "member %ld: %s", i, dc_last_error_message());
    }
  }
  printf("closed %ld failed %ld first %s %s\n", count - failed, failed, failed ? dc_status_str(first_status) : "-",
         failed ? first_message : "none failed");
  fflush(stdout);
  free(reported);
}

int main(int argc, char** argv) {
  if (argc < 9) {
    fprintf(stderr, "usage: liveness_ranks PORT GROUP WORLD FIRST COUNT TTL_MS get|barrier|hold TIMEOUT_S\n");
    return 2;
  }
  struct rlimit lim;
  getrlimit(RLIMIT_NOFILE, &lim);
  lim.rlim_cur = lim.rlim_max;
  setrlimit(RLIMIT_NOFILE, &lim);
  int port = atoi(argv[1]);
  const char* group = argv[2];
  int world = atoi(argv[3]), first = atoi(argv[4]);
  long count = atol(argv[5]), ttl_ms = atol(argv[6]), timeout_s = atol(argv[8]);
  int barrier = strcmp(argv[7], "barrier") == 0;
  snprintf(victim, sizeof victim, "rank %d of group", world - 1);
  struct member* members = calloc(count, sizeof *members);
  for (long i = 0; i < count; i++) join(&members[i], i, port, group, world, first + (int)i, ttl_ms, barrier, timeout_s);
  printf("ready %ld fds %d\n", count, open_fds());
  fflush(stdout);
  if (strcmp(argv[7], "hold") == 0) {
    hold(members, count);
    _exit(0);
  }
  long long deadline = now_ns() + (timeout_s + 10) * 1000000000LL;
  while (atomic_load(&completed) < count && now_ns() < deadline) usleep(1000);
  long named = 0;
  struct member* first_done = NULL;
  for (long i = 0; i < count; i++) {
    struct member* m = &members[i];
    if (!atomic_load(&m->done_ns)) continue;
    named += m->status == DC_ERR_PEER_FAILED && strstr(m->message, victim) != NULL;
    if (!first_done || m->done_ns < first_done->done_ns) first_done = m;
  }
  printf("done %ld named %ld\n", count, named);
  printf("first %s %s\n", first_done ? dc_status_str(first_done->status) : "-",
         first_done ? first_done->message : "none completed");
  printf("times");
  for (long i = 0; i < count; i++) printf(" %lld", (long long)atomic_load(&members[i].done_ns));
  printf("\n");
  fflush(stdout);
  // Exit without freeing: the handles' sessions end with the process.
  _exit(0);
}
