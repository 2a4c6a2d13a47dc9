/* RPC and RRefs through the C API: three worker processes (this program
 * re-executed as "test_rpc worker PORT RANK") meeting through a TCPStore,
 * through the fork flows, ending with every RRef counter at zero. */
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

static dc_rpc *join(uint16_t port, int rank, dc_store **store_out) {
  dc_tcp_store_options so;
  CHECK_OK(dc_tcp_store_options_init(&so, sizeof so));
  so.port = port;
  so.timeout_ms = 30000;
  CHECK_OK(dc_tcp_store_new(&so, store_out));
  dc_rpc_function_entry fns[] = {
      {"echo", echo, NULL}, {"fetch", fetch, NULL}, {"fail", fail, NULL}};
  dc_rpc_options ro;
  CHECK_OK(dc_rpc_options_init(&ro, sizeof ro));
  ro.rpc_timeout_ms = 30000;
  ro.functions = fns;
  ro.num_functions = 3;
  char name[16];
  snprintf(name, sizeof name, "worker%d", rank);
  dc_rpc *rpc = NULL;
  CHECK_OK(dc_rpc_init(*store_out, name, rank, WORLD, &ro, &rpc));
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
  dc_rpc *rpc = join(port, rank, &store);
  /* Workers 1 and 2 serve; everyone meets again at shutdown. */
  dc_rpc_shutdown(rpc, true, 30000);
  wait_for_zero(rpc);
  dc_rpc_free(rpc);
  dc_store_free(store);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "worker") == 0) return worker((uint16_t)atoi(argv[2]), atoi(argv[3]));
  dc_tcp_store_options so;
  dc_store *server = NULL;
  uint16_t port = 0;
  CHECK_OK(dc_tcp_store_options_init(&so, sizeof so));
  so.is_server = true;
  so.bind_address = "127.0.0.1";
  CHECK_OK(dc_tcp_store_new(&so, &server));
  CHECK_OK(dc_tcp_store_port(server, &port));
  pid_t pids[WORLD - 1];
  for (int i = 0; i < WORLD - 1; i++) {
    pids[i] = fork();
    CHECK(pids[i] >= 0);
    if (pids[i] == 0) {
      char p[8], r[8];
      snprintf(p, sizeof p, "%u", port);
      snprintf(r, sizeof r, "%d", i + 1);
      execl(argv[0], argv[0], "worker", p, r, (char *)NULL);
      _exit(127);
    }
  }
  dc_store *store = NULL;
  dc_rpc *rpc = join(port, 0, &store);
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
  printf("test_rpc: ok\n");
  return 0;
}
