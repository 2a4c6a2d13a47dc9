/* TCPStore through the C API: a server handle and client handles in this
 * process and in worker processes (this program re-executed as
 * "test_tcp_store worker PORT RANK"), on loopback with an ephemeral port. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

#define WORKERS 3

static const uint8_t *bytes(const char *s) { return (const uint8_t *)s; }

/* A listening socket on an ephemeral loopback port. */
static int listening_socket(uint16_t *port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(fd >= 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof addr;
  CHECK(bind(fd, (struct sockaddr *)&addr, sizeof addr) == 0);
  CHECK(listen(fd, 16) == 0);
  CHECK(getsockname(fd, (struct sockaddr *)&addr, &len) == 0);
  *port = ntohs(addr.sin_port);
  return fd;
}

static bool fd_is_closed(int fd) { return fcntl(fd, F_GETFD) == -1 && errno == EBADF; }

/* A server given master_listen_fd owns it: it serves on it and closes it
 * when it stops, and a call that fails closes it at once. */
static void master_listen_fd_is_owned(void) {
  uint16_t port = 0, served = 0;
  dc_tcp_store_options opts;
  CHECK_OK(dc_tcp_store_options_init(&opts, sizeof opts));
  opts.is_server = true;
  opts.master_listen_fd = listening_socket(&port);
  opts.port = port;
  opts.timeout_ms = 30000;
  dc_store *server = NULL;
  CHECK_OK(dc_tcp_store_new(&opts, &server));
  CHECK_OK(dc_tcp_store_port(server, &served));
  CHECK(served == port);
  CHECK(fd_is_closed(opts.master_listen_fd)); /* the server keeps its own */
  dc_store_free(server);

  opts.master_listen_fd = listening_socket(&port);
  opts.port = port;
  opts.bind_address = "not an address";
  CHECK_STATUS(dc_tcp_store_new(&opts, &server), DC_ERR_INVALID_ARGUMENT);
  CHECK(fd_is_closed(opts.master_listen_fd));
}

static dc_store *connect_client(uint16_t port, int64_t world_size) {
  dc_tcp_store_options opts;
  dc_store *s = NULL;
  CHECK_OK(dc_tcp_store_options_init(&opts, sizeof opts));
  opts.port = port;
  opts.world_size = world_size;
  opts.timeout_ms = 20000;
  CHECK_OK(dc_tcp_store_new(&opts, &s));
  return s;
}

/* A worker process: joins, runs torchelastic's synchronize, and exits 0 if
 * it saw everyone's data. */
static int worker_process(uint16_t port, int rank) {
  dc_store *s = connect_client(port, WORKERS + 1);
  char data[16];
  int n = snprintf(data, sizeof data, "w%d", rank);
  dc_buf_array all = {0};
  if (dc_elastic_synchronize(s, (const uint8_t *)data, (size_t)n, rank, WORKERS + 1, "sync/", 20000,
                             &all) != DC_OK) {
    fprintf(stderr, "worker %d: %s\n", rank, dc_last_error_message());
    return 1;
  }
  int ok = all.len == WORKERS + 1 && all.items[0].len == 6 && memcmp(all.items[0].data, "master", 6) == 0;
  dc_buf_array_free(&all);
  if (dc_store_barrier(s, "done", WORKERS + 1, 20000) != DC_OK) return 1;
  dc_store_free(s);
  return ok ? 0 : 1;
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "worker") == 0)
    return worker_process((uint16_t)atoi(argv[2]), atoi(argv[3]));
  dc_tcp_store_options opts;
  dc_store *server = NULL;
  uint16_t port = 0;
  CHECK_OK(dc_tcp_store_options_init(&opts, sizeof opts));
  opts.is_server = true;
  opts.bind_address = "127.0.0.1";
  opts.world_size = WORKERS + 1;
  opts.wait_for_workers = false; /* children join after the port is known */
  opts.timeout_ms = 20000;
  CHECK_OK(dc_tcp_store_new(&opts, &server));
  CHECK_OK(dc_tcp_store_port(server, &port));
  CHECK(port != 0);

  pid_t pids[WORKERS];
  for (int i = 0; i < WORKERS; i++) {
    pids[i] = fork();
    CHECK(pids[i] >= 0);
    if (pids[i] == 0) {
      char port_arg[8], rank_arg[8];
      snprintf(port_arg, sizeof port_arg, "%u", port);
      snprintf(rank_arg, sizeof rank_arg, "%d", i + 1);
      execl(argv[0], argv[0], "worker", port_arg, rank_arg, (char *)NULL);
      _exit(127);
    }
  }
  CHECK_OK(dc_tcp_store_wait_for_workers(server));

  dc_buf_array all = {0};
  CHECK_OK(dc_elastic_synchronize(server, bytes("master"), 6, 0, WORKERS + 1, "sync/", 20000, &all));
  CHECK(all.len == WORKERS + 1);
  CHECK_BUF(all.items[2], "w2");
  dc_buf_array_free(&all);
  CHECK_OK(dc_store_barrier(server, "done", WORKERS + 1, 20000));
  for (int i = 0; i < WORKERS; i++) {
    int status = 0;
    CHECK(waitpid(pids[i], &status, 0) == pids[i]);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }

  /* Every operation through a client handle. */
  dc_store *c = connect_client(port, -1);
  dc_buf buf = {0};
  int64_t n = 0;
  bool flag = false;
  CHECK_OK(dc_store_set(c, "k", bytes("v"), 1));
  CHECK_OK(dc_store_get(server, "k", &buf));
  CHECK_BUF(buf, "v");
  dc_buf_free(&buf);
  CHECK_OK(dc_store_add(c, "cnt", 41, &n));
  CHECK_OK(dc_store_add(c, "cnt", 1, &n));
  CHECK(n == 42);
  CHECK_OK(dc_store_compare_set(c, "k", bytes("v"), 1, bytes("w"), 1, &buf));
  CHECK_BUF(buf, "w");
  dc_buf_free(&buf);
  CHECK_OK(dc_store_queue_push(c, "q", bytes("x"), 1));
  CHECK_OK(dc_store_queue_pop(server, "q", true, &buf));
  CHECK_BUF(buf, "x");
  dc_buf_free(&buf);
  CHECK_STATUS(dc_store_queue_pop(server, "q", false, &buf), DC_ERR_QUEUE_EMPTY);
  const char *never[1] = {"never"};
  CHECK_STATUS(dc_store_wait(c, never, 1, 100), DC_ERR_TIMEOUT);
  CHECK(strcmp(dc_last_error_message(), "wait timeout after 100ms, keys: /never") == 0);
  CHECK_OK(dc_store_delete_key(c, "k", &flag));
  CHECK(flag);

  dc_work *w = NULL;
  CHECK_OK(dc_store_get_async(c, "late", &w));
  CHECK_OK(dc_store_set(server, "late", bytes("L"), 1));
  CHECK_OK(dc_work_wait(w, 20000));
  CHECK_OK(dc_work_result(w, &buf));
  CHECK_BUF(buf, "L");
  dc_buf_free(&buf);
  dc_work_free(w);

  size_t count = 0;
  CHECK_OK(dc_tcp_store_counters(c, NULL, 0, &count));
  CHECK(count >= 5);
  dc_client_counter counters[32];
  CHECK_OK(dc_tcp_store_counters(c, counters, 32, &count));
  bool saw_set = false;
  for (size_t i = 0; i < count; i++)
    if (strcmp(counters[i].op, "set") == 0) saw_set = counters[i].count == 1;
  CHECK(saw_set);

  /* A HashStore is not a TCPStore. */
  dc_store *h = NULL;
  CHECK_OK(dc_hash_store_new(&h));
  CHECK_STATUS(dc_tcp_store_port(h, &port), DC_ERR_INVALID_ARGUMENT);
  dc_store_free(h);

  master_listen_fd_is_owned();

  /* The server going away is a network error for its clients. */
  dc_store_free(server);
  CHECK_STATUS(dc_store_set(c, "after", bytes("x"), 1), DC_ERR_NETWORK);
  dc_store_free(c);
  printf("test_tcp_store: ok\n");
  return 0;
}
