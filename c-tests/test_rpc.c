/* RPC and RRefs through the C API: three worker processes (this program
 * re-executed as "test_rpc worker PORT RANK") meeting through a TCPStore,
 * through the fork flows, ending with every RRef counter at zero. Then a
 * worker killed with SIGKILL ("test_rpc victim PORT 1") fails the call
 * pending on it at once with DC_ERR_PEER_FAILED naming it. */
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define WORLD 3

static const uint8_t *bytes(const char *s) { return (const uint8_t *)s; }

/* echo(args) -> args */
static dc_status echo(const uint8_t *args, size_t len, const dc_rref *const *rrefs, size_t n, int32_t caller,
                      dc_rpc_reply *reply, void *ud) {
  (void)rrefs, (void)n, (void)caller, (void)ud;
  return dc_rpc_reply_set(reply, args, len);
}

/* fetch(rref) -> rref.to_here() */
static dc_status fetch(const uint8_t *args, size_t len, const dc_rref *const *rrefs, size_t n, int32_t caller,
                       dc_rpc_reply *reply, void *ud) {
  (void)args, (void)len, (void)caller, (void)ud;
  if (n != 1) {
    dc_rpc_reply_set_error(reply, "fetch wants one RRef");
    return DC_ERR_INVALID_ARGUMENT;
  }
  bool confirmed = false;
  dc_rref_confirmed_by_owner(rrefs[0], &confirmed);
  if (!confirmed) {
    dc_rpc_reply_set_error(reply, "an RRef argument was not confirmed");
    return DC_ERR_INVALID_STATE;
  }
  dc_buf value = {0};
  dc_status st = dc_rref_to_here(rrefs[0], DC_TIMEOUT_DEFAULT, &value);
  if (st == DC_OK) st = dc_rpc_reply_set(reply, value.data, value.len);
  dc_buf_free(&value);
  return st;
}

static dc_status fail(const uint8_t *args, size_t len, const dc_rref *const *rrefs, size_t n, int32_t caller,
                      dc_rpc_reply *reply, void *ud) {
  (void)args, (void)len, (void)rrefs, (void)n, (void)caller, (void)ud;
  dc_rpc_reply_set_error(reply, "failed on purpose");
  return DC_ERR_REMOTE;
}

/* block() sets the key "blocked" on its store (the user data), then
 * never returns. */
static dc_status block(const uint8_t *args, size_t len, const dc_rref *const *rrefs, size_t n, int32_t caller,
                       dc_rpc_reply *reply, void *store) {
  (void)args, (void)len, (void)rrefs, (void)n, (void)caller, (void)reply;
  CHECK_OK(dc_store_set(store, "blocked", bytes("1"), 1));
  sleep(120);
  return DC_OK;
}

/* Joins as "worker<rank>" a group of `world` meeting on the TCPStore at
 * `port` (the handle in *store_out); calls time out after 30 s. */
static dc_rpc *join(uint16_t port, int rank, int world, dc_store **store_out) {
  dc_tcp_store_options so;
  CHECK_OK(dc_tcp_store_options_init(&so, sizeof so));
  so.port = port;
  so.timeout_ms = 30000;
  CHECK_OK(dc_tcp_store_new(&so, store_out));
  dc_rpc_function_entry fns[] = {
      {"echo", echo, NULL}, {"fetch", fetch, NULL}, {"fail", fail, NULL}, {"block", block, *store_out}};
  dc_rpc_options ro;
  CHECK_OK(dc_rpc_options_init(&ro, sizeof ro));
  ro.rpc_timeout_ms = 30000;
  ro.functions = fns;
  ro.num_functions = 4;
  char name[16];
  snprintf(name, sizeof name, "worker%d", rank);
  dc_rpc *rpc = NULL;
  CHECK_OK(dc_rpc_init(*store_out, name, rank, world, &ro, &rpc));
  return rpc;
}

static void wait_for_zero(dc_rpc *rpc) {
  for (int i = 0; i < 3000; i++) {
    dc_rref_debug_info d = {.struct_size = sizeof(dc_rref_debug_info)};
    CHECK_OK(dc_rpc_debug_info(rpc, &d));
    if (d.num_owner_rrefs == 0 && d.num_pending_futures == 0 && d.num_pending_users == 0 && d.num_forks == 0)
      return;
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  CHECK(!"RRef counters never reached zero");
}

static int worker(uint16_t port, int rank) {
  dc_store *store = NULL;
  dc_rpc *rpc = join(port, rank, WORLD, &store);
  /* Workers 1 and 2 serve; everyone meets again at shutdown. */
  dc_rpc_shutdown(rpc, true, 30000);
  wait_for_zero(rpc);
  dc_rpc_free(rpc);
  dc_store_free(store);
  return 0;
}

/* Worker 1 of a group of two, to be killed: serves until then. */
static int victim(uint16_t port) {
  alarm(60);
  dc_store *store = NULL;
  join(port, 1, 2, &store);
  pause(); /* until killed */
  return 1;
}

/* A TCPStore server on loopback, on an ephemeral port (in *port). */
static dc_store *serve(uint16_t *port) {
  dc_tcp_store_options so;
  dc_store *server = NULL;
  CHECK_OK(dc_tcp_store_options_init(&so, sizeof so));
  so.is_server = true;
  so.bind_address = "127.0.0.1";
  CHECK_OK(dc_tcp_store_new(&so, &server));
  CHECK_OK(dc_tcp_store_port(server, port));
  return server;
}

/* Runs this program as `mode PORT RANK` in a child. */
static pid_t spawn(const char *self, const char *mode, uint16_t port, int rank) {
  fflush(NULL);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    char p[8], r[8];
    snprintf(p, sizeof p, "%u", port);
    snprintf(r, sizeof r, "%d", rank);
    execl(self, self, mode, p, r, (char *)NULL);
    _exit(127);
  }
  return pid;
}

static double seconds_since(const struct timespec *start) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

/* Worker 1 is killed (SIGKILL) while worker 0 waits on a call to it: the
 * call fails at once with DC_ERR_PEER_FAILED naming it (its RPC timeout is
 * 30 s), and so do later calls and to_here on an RRef it owns. */
static void a_killed_worker_fails_what_waits_on_it_at_once(const char *self) {
  uint16_t port = 0;
  dc_store *server = serve(&port);
  pid_t pid = spawn(self, "victim", port, 1);
  dc_store *store = NULL;
  dc_rpc *rpc = join(port, 0, 2, &store);
  dc_rref *held = NULL;
  dc_buf out = {0};
  CHECK_OK(dc_rpc_remote(rpc, "worker1", "echo", bytes("held"), 4, NULL, 0, DC_TIMEOUT_DEFAULT, &held));
  CHECK_OK(dc_rref_to_here(held, DC_TIMEOUT_DEFAULT, &out));
  dc_buf_free(&out);
  dc_work *w = NULL;
  CHECK_OK(dc_rpc_async(rpc, "worker1", "block", NULL, 0, NULL, 0, DC_TIMEOUT_DEFAULT, &w));
  CHECK_OK(dc_store_get(store, "blocked", &out));
  dc_buf_free(&out);
  struct timespec killed;
  clock_gettime(CLOCK_MONOTONIC, &killed);
  CHECK(kill(pid, SIGKILL) == 0);
  CHECK_STATUS(dc_work_wait(w, DC_TIMEOUT_DEFAULT), DC_ERR_PEER_FAILED);
  double elapsed = seconds_since(&killed);
  printf("test_rpc: the pending call failed %.1f ms after the kill\n", elapsed * 1e3);
  CHECK(elapsed < 2.0);
  CHECK(strstr(dc_last_error_message(), "RPC worker 'worker1' (id 1, address 127.0.0.1:") != NULL);
  CHECK(strstr(dc_last_error_message(), "connection lost") != NULL);
  CHECK_STATUS(dc_rref_to_here(held, DC_TIMEOUT_DEFAULT, &out), DC_ERR_PEER_FAILED);
  CHECK(strstr(dc_last_error_message(), "RPC worker 'worker1'") != NULL);
  CHECK_STATUS(dc_rpc_sync(rpc, "worker1", "echo", NULL, 0, NULL, 0, DC_TIMEOUT_DEFAULT, &out), DC_ERR_PEER_FAILED);
  CHECK(seconds_since(&killed) < 2.0);
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  dc_work_free(w);
  dc_rref_free(held);
  CHECK_OK(dc_rpc_shutdown(rpc, false, 10000));
  dc_rpc_free(rpc);
  dc_store_free(store);
  dc_store_free(server);
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "worker") == 0) return worker((uint16_t)atoi(argv[2]), atoi(argv[3]));
  if (argc == 4 && strcmp(argv[1], "victim") == 0) return victim((uint16_t)atoi(argv[2]));
  uint16_t port = 0;
  dc_store *server = serve(&port);
  pid_t pids[WORLD - 1];
  for (int i = 0; i < WORLD - 1; i++) pids[i] = spawn(argv[0], "worker", port, i + 1);
  dc_store *store = NULL;
  dc_rpc *rpc = join(port, 0, WORLD, &store);
  dc_buf out = {0};
  int32_t id = -1;
  CHECK_OK(dc_rpc_worker_id(rpc, "worker2", &id));
  CHECK(id == 2);

  CHECK_OK(dc_rpc_sync(rpc, "worker1", "echo", bytes("ping"), 4, NULL, 0, DC_TIMEOUT_DEFAULT, &out));
  CHECK_BUF(out, "ping");
  dc_buf_free(&out);
  CHECK_STATUS(dc_rpc_sync(rpc, "worker1", "fail", NULL, 0, NULL, 0, DC_TIMEOUT_DEFAULT, &out), DC_ERR_REMOTE);
  CHECK(strcmp(dc_last_error_message(), "failed on purpose") == 0);
  dc_work *w = NULL;
  CHECK_OK(dc_rpc_async(rpc, "worker2", "echo", bytes("async"), 5, NULL, 0, DC_TIMEOUT_DEFAULT, &w));
  CHECK_OK(dc_work_wait(w, DC_TIMEOUT_DEFAULT));
  CHECK_OK(dc_work_result(w, &out));
  CHECK_BUF(out, "async");
  dc_buf_free(&out);
  dc_work_free(w);

  /* remote() on worker1; to_here; shared with worker2 (user -> third);
   * sent back to its owner (phantom fork). */
  dc_rref *r = NULL;
  CHECK_OK(dc_rpc_remote(rpc, "worker1", "echo", bytes("held by worker1"), 15, NULL, 0, DC_TIMEOUT_DEFAULT, &r));
  CHECK_OK(dc_rref_to_here(r, DC_TIMEOUT_DEFAULT, &out));
  CHECK_BUF(out, "held by worker1");
  dc_buf_free(&out);
  bool is_owner = true;
  CHECK_OK(dc_rref_is_owner(r, &is_owner));
  CHECK(!is_owner);
  CHECK_OK(dc_rref_owner_name(r, &out));
  CHECK_BUF(out, "worker1");
  dc_buf_free(&out);
  const dc_rref *args[1] = {r};
  CHECK_OK(dc_rpc_sync(rpc, "worker2", "fetch", NULL, 0, args, 1, DC_TIMEOUT_DEFAULT, &out));
  CHECK_BUF(out, "held by worker1");
  dc_buf_free(&out);
  CHECK_OK(dc_rpc_sync(rpc, "worker1", "fetch", NULL, 0, args, 1, DC_TIMEOUT_DEFAULT, &out));
  CHECK_BUF(out, "held by worker1");
  dc_buf_free(&out);
  CHECK_STATUS(dc_rref_local_value(r, &out), DC_ERR_INVALID_STATE);

  /* The owner shares its own RRef (early fork registration), also with itself. */
  dc_rref *mine = NULL;
  CHECK_OK(dc_rref_new(rpc, bytes("owned by worker0"), 16, &mine));
  const dc_rref *margs[1] = {mine};
  CHECK_OK(dc_rpc_sync(rpc, "worker2", "fetch", NULL, 0, margs, 1, DC_TIMEOUT_DEFAULT, &out));
  CHECK_BUF(out, "owned by worker0");
  dc_buf_free(&out);
  CHECK_OK(dc_rpc_sync(rpc, "worker0", "fetch", NULL, 0, margs, 1, DC_TIMEOUT_DEFAULT, &out));
  CHECK_BUF(out, "owned by worker0");
  dc_buf_free(&out);

  /* A remote() whose function fails: to_here reports it. */
  dc_rref *bad = NULL;
  CHECK_OK(dc_rpc_remote(rpc, "worker2", "fail", NULL, 0, NULL, 0, DC_TIMEOUT_DEFAULT, &bad));
  CHECK_STATUS(dc_rref_to_here(bad, DC_TIMEOUT_DEFAULT, &out), DC_ERR_REMOTE);
  CHECK(strstr(dc_last_error_message(), "failed on purpose") != NULL);

  dc_rref_free(r);
  dc_rref_free(mine);
  dc_rref_free(bad);
  CHECK_OK(dc_rpc_shutdown(rpc, true, 30000));
  wait_for_zero(rpc);
  for (int i = 0; i < WORLD - 1; i++) {
    int status = 0;
    CHECK(waitpid(pids[i], &status, 0) == pids[i]);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  CHECK_STATUS(dc_rpc_sync(rpc, "worker1", "echo", NULL, 0, NULL, 0, DC_TIMEOUT_DEFAULT, &out), DC_ERR_SHUT_DOWN);
  dc_rpc_free(rpc);
  dc_store_free(store);
  dc_store_free(server);
  a_killed_worker_fails_what_waits_on_it_at_once(argv[0]);
  printf("test_rpc: ok\n");
  return 0;
}
