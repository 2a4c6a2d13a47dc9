/* EtcdStore through the C API, against a real etcd member this test starts
 * (etcd from the Debian package etcd-server; the test fails without it) on
 * loopback ports, in a temporary directory, and kills by PID at the end. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

static uint16_t free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof addr;
  CHECK(fd >= 0 && bind(fd, (struct sockaddr *)&addr, sizeof addr) == 0);
  CHECK(getsockname(fd, (struct sockaddr *)&addr, &len) == 0);
  close(fd);
  return ntohs(addr.sin_port);
}

static pid_t start_etcd(const char *dir, char *endpoint, size_t size) {
  uint16_t client = free_port(), peer = free_port();
  char client_url[64], peer_url[64], cluster[80], data[512];
  snprintf(client_url, sizeof client_url, "http://127.0.0.1:%u", client);
  snprintf(peer_url, sizeof peer_url, "http://127.0.0.1:%u", peer);
  snprintf(cluster, sizeof cluster, "t=%s", peer_url);
  snprintf(data, sizeof data, "%s/data", dir);
  snprintf(endpoint, size, "127.0.0.1:%u", client);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    freopen("/dev/null", "w", stdout);
    freopen("/dev/null", "w", stderr);
    execlp("etcd", "etcd", "--name", "t", "--data-dir", data, "--listen-client-urls", client_url,
           "--advertise-client-urls", client_url, "--listen-peer-urls", peer_url,
           "--initial-advertise-peer-urls", peer_url, "--initial-cluster", cluster, (char *)NULL);
    _exit(127); /* etcd is not installed */
  }
  return pid;
}

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
