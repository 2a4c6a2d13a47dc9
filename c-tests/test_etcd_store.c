/* EtcdStore through the C API, against a real etcd member this test starts
 * (etcd from the Debian package etcd-server; the test fails without it) on
 * loopback ports, in a temporary directory, and kills by PID at the end. */
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "etcd_member.h"

static dc_store *etcd_store(const char *endpoint, const char *prefix, int64_t timeout_ms) {
  const char *endpoints[1] = {endpoint};
  dc_etcd_store_options opts;
  CHECK_OK(dc_etcd_store_options_init(&opts, sizeof opts));
  opts.endpoints = endpoints;
  opts.num_endpoints = 1;
  opts.prefix = prefix;
  opts.timeout_ms = timeout_ms;
  dc_store *s = NULL;
  dc_status st = dc_etcd_store_new(&opts, &s);
  return st == DC_OK ? s : NULL;
}

int main(void) {
  char dir[] = "/tmp/distcore-etcd-XXXXXX", endpoint[64];
  CHECK(mkdtemp(dir) != NULL);
  pid_t etcd = start_etcd(dir, endpoint, sizeof endpoint);
  dc_store *s = NULL;
  for (int i = 0; i < 600 && s == NULL; i++) {
    int status = 0;
    CHECK(waitpid(etcd, &status, WNOHANG) == 0); /* exited: not installed? */
    s = etcd_store(endpoint, "/c-test", 200);
    if (s == NULL) usleep(50 * 1000);
  }
  CHECK(s != NULL);
  CHECK_OK(dc_store_set_timeout(s, 30000));

  /* The store's operations, PyTorch's semantics. */
  dc_buf value = {0};
  int64_t n = 0;
  CHECK_OK(dc_store_set(s, "k", (const uint8_t *)"v", 1));
  CHECK_OK(dc_store_get(s, "k", &value));
  CHECK_BUF(value, "v");
  dc_buf_free(&value);
  CHECK_OK(dc_store_add(s, "n", 5, &n));
  CHECK(n == 5);
  CHECK_STATUS(dc_store_add(s, "k", 1, &n), DC_ERR_INVALID_ARGUMENT);
  const char *missing[1] = {"never"};
  CHECK_STATUS(dc_store_wait(s, missing, 1, 100), DC_ERR_TIMEOUT);
  CHECK(strcmp(dc_last_error_message(), "wait timeout after 100ms, keys: never") == 0);
  CHECK_OK(dc_store_queue_push(s, "q", (const uint8_t *)"x", 1));
  CHECK_OK(dc_store_queue_pop(s, "q", false, &value));
  CHECK_BUF(value, "x");
  dc_buf_free(&value);
  CHECK_STATUS(dc_store_queue_pop(s, "q", false, &value), DC_ERR_QUEUE_EMPTY);

  /* An async get is released by a set from another handle. */
  dc_store *other = etcd_store(endpoint, "/c-test", 30000);
  CHECK(other != NULL);
  dc_work *w = NULL;
  CHECK_OK(dc_store_get_async(s, "later", &w));
  CHECK_OK(dc_store_set(other, "later", (const uint8_t *)"now", 3));
  CHECK_OK(dc_work_wait(w, 30000));
  CHECK_OK(dc_work_result(w, &value));
  CHECK_BUF(value, "now");
  dc_buf_free(&value);
  dc_work_free(w);

  /* The elastic helpers and RPC rendezvous on it. */
  CHECK_OK(dc_elastic_barrier(s, 1, "bar", 30000));
  dc_rpc *rpc = NULL;
  CHECK_OK(dc_rpc_init(s, "only", 0, 1, NULL, &rpc));
  CHECK_OK(dc_rpc_shutdown(rpc, true, 30000));
  dc_rpc_free(rpc);
  /* Liveness sessions on the EtcdStore (docs/liveness.md, "On etcd"): a
   * member's reported error fails another's blocked wait, naming it; a
   * closed member's leased key goes with its session. */
  dc_session_options so;
  CHECK_OK(dc_session_options_init(&so, sizeof so));
  so.group = "c/";
  so.rank = 2;
  CHECK_STATUS(dc_etcd_store_leased(s, NULL), DC_ERR_INVALID_ARGUMENT);
  dc_store *view = NULL;
  CHECK_STATUS(dc_etcd_store_leased(s, &view), DC_ERR_INVALID_STATE);
  CHECK_OK(dc_etcd_store_open_session(s, &so));
  CHECK_OK(dc_etcd_store_leased(s, &view));
  CHECK_OK(dc_store_set(view, "c/addr/2", (const uint8_t *)"x", 1));
  dc_store_free(view);
  CHECK_OK(dc_etcd_store_close_session(s));
  bool present = true;
  const char *addr[1] = {"c/addr/2"};
  CHECK_OK(dc_store_check(s, addr, 1, &present));
  CHECK(!present);
  CHECK_STATUS(dc_etcd_store_close_session(s), DC_ERR_INVALID_STATE);
  CHECK_STATUS(dc_tcp_store_open_session(s, &so), DC_ERR_INVALID_ARGUMENT); /* not a TCPStore */
  so.rank = 0;
  CHECK_OK(dc_etcd_store_open_session(s, &so));
  so.rank = 1;
  CHECK_OK(dc_etcd_store_open_session(other, &so));
  CHECK_OK(dc_store_wait_async(s, missing, 1, 30000, &w));
  usleep(300 * 1000);
  CHECK_OK(dc_etcd_store_report_error(other, "loss is NaN"));
  CHECK_STATUS(dc_work_wait(w, 30000), DC_ERR_PEER_FAILED);
  CHECK(strstr(dc_last_error_message(), "rank 1 of group 'c/'") != NULL);
  CHECK(strstr(dc_last_error_message(), "loss is NaN") != NULL);
  dc_work_free(w);
  CHECK_STATUS(dc_store_add(s, "n", 1, &n), DC_ERR_PEER_FAILED); /* later calls too */
  CHECK_OK(dc_etcd_store_close_session(s));

  dc_store_free(other);
  dc_store_free(s);

  /* No member answering: a network error within the timeout. */
  kill(etcd, SIGKILL);
  CHECK(waitpid(etcd, NULL, 0) == etcd);
  const char *endpoints[1] = {endpoint};
  dc_etcd_store_options opts;
  CHECK_OK(dc_etcd_store_options_init(&opts, sizeof opts));
  opts.endpoints = endpoints;
  opts.num_endpoints = 1;
  opts.timeout_ms = 300;
  time_t started = time(NULL);
  CHECK_STATUS(dc_etcd_store_new(&opts, &s), DC_ERR_NETWORK);
  CHECK(strstr(dc_last_error_message(), "no etcd member") != NULL);
  CHECK(time(NULL) - started < 5);

  char rm[64];
  snprintf(rm, sizeof rm, "rm -rf %s", dir);
  CHECK(system(rm) == 0);
  printf("test_etcd_store: ok\n");
  return 0;
}
