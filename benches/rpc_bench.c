/* rpc_sync and remote()+to_here latency of distcore's RPC agent driven from
 * C: the library's own cost, without a Python callback on either side
 * (benches/rpc_bench.py measures both systems from Python).
 *   rpc_bench CALLS -> "distcore-c<TAB>call<TAB>median_us" lines
 * Two processes (this one and a fork) meet through a TCPStore on 127.0.0.1. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <distcore.h>

static void check(dc_status st, const char *what) {
  if (st != DC_OK) {
    fprintf(stderr, "rpc_bench: %s: %s\n", what, dc_last_error_message());
    exit(1);
  }
}

static dc_status echo(const uint8_t *args, size_t len, const dc_rref *const *rrefs, size_t n, int32_t caller,
                      dc_rpc_reply *reply, void *ud) {
  (void)rrefs, (void)n, (void)caller, (void)ud;
  return dc_rpc_reply_set(reply, args, len);
}

static dc_rpc *join(dc_store *store, int rank) {
  dc_rpc_function_entry fns[] = {{"echo", echo, NULL}};
  dc_rpc_options o;
  check(dc_rpc_options_init(&o, sizeof o), "options");
  o.rpc_timeout_ms = 120000;
  o.functions = fns;
  o.num_functions = 1;
  dc_rpc *rpc = NULL;
  check(dc_rpc_init(store, rank ? "w1" : "w0", rank, 2, &o, &rpc), "dc_rpc_init");
  return rpc;
}

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

typedef void (*call_fn)(dc_rpc *rpc, const uint8_t *payload, size_t len);

static void call_sync(dc_rpc *rpc, const uint8_t *payload, size_t len) {
  dc_buf out = {0};
  check(dc_rpc_sync(rpc, "w1", "echo", payload, len, NULL, 0, DC_TIMEOUT_DEFAULT, &out), "dc_rpc_sync");
  if (out.len != len) {
    fprintf(stderr, "rpc_bench: short reply\n");
    exit(1);
  }
  dc_buf_free(&out);
}

static void call_remote(dc_rpc *rpc, const uint8_t *payload, size_t len) {
  dc_rref *ref = NULL;
  check(dc_rpc_remote(rpc, "w1", "echo", payload, len, NULL, 0, DC_TIMEOUT_DEFAULT, &ref), "dc_rpc_remote");
  dc_buf out = {0};
  check(dc_rref_to_here(ref, DC_TIMEOUT_DEFAULT, &out), "dc_rref_to_here");
  dc_buf_free(&out);
  dc_rref_free(ref);
}

static void timed(const char *name, int calls, dc_rpc *rpc, call_fn fn, size_t len) {
  uint8_t *payload = malloc(len);
  memset(payload, 'x', len);
  for (int i = 0; i < (calls / 10 > 20 ? calls / 10 : 20); i++) fn(rpc, payload, len);
  double *us = malloc(sizeof(double) * calls);
  for (int i = 0; i < calls; i++) {
    double t = now_us();
    fn(rpc, payload, len);
    us[i] = now_us() - t;
  }
  qsort(us, calls, sizeof(double), cmp);
  printf("distcore-c\t%s\t%.1f\n", name, us[calls / 2]);
  fflush(stdout);
  free(us);
  free(payload);
}

static dc_store *tcp_store(bool is_server, uint16_t port) {
  dc_tcp_store_options o;
  check(dc_tcp_store_options_init(&o, sizeof o), "options");
  o.host = "127.0.0.1";
  o.port = port;
  o.is_server = is_server;
  o.timeout_ms = 120000;
  dc_store *store = NULL;
  check(dc_tcp_store_new(&o, &store), "TCPStore");
  return store;
}

int main(int argc, char **argv) {
  int calls = argc > 1 ? atoi(argv[1]) : 2000;
  int port_pipe[2];
  if (pipe(port_pipe)) return 1;
  /* Fork before any library thread exists; the parent tells the child
   * the store's port. */
  pid_t child = fork();
  if (child == 0) {
    uint16_t port = 0;
    if (read(port_pipe[0], &port, sizeof port) != sizeof port) _exit(1);
    dc_store *store = tcp_store(false, port);
    dc_rpc *rpc = join(store, 1);
    check(dc_rpc_shutdown(rpc, true, DC_TIMEOUT_DEFAULT), "shutdown");
    dc_rpc_free(rpc);
    dc_store_free(store);
    _exit(0);
  }
  dc_store *store = tcp_store(true, 0);
  uint16_t port = 0;
  check(dc_tcp_store_port(store, &port), "port");
  if (write(port_pipe[1], &port, sizeof port) != sizeof port) return 1;
  dc_rpc *rpc = join(store, 0);
  timed("rpc_sync 64 B", calls, rpc, call_sync, 64);
  timed("rpc_sync 64 KiB", calls, rpc, call_sync, 64 << 10);
  timed("rpc_sync 1 MiB", calls, rpc, call_sync, 1 << 20);
  timed("remote + to_here 64 B", calls, rpc, call_remote, 64);
  check(dc_rpc_shutdown(rpc, true, DC_TIMEOUT_DEFAULT), "shutdown");
  dc_rpc_free(rpc);
  int status = 0;
  if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status)) {
    fprintf(stderr, "rpc_bench: the worker process failed\n");
    return 1;
  }
  dc_store_free(store);
  return 0;
}
