/* fork(): a child process has only the thread that forked, so handles the
 * parent made refuse every call with DC_ERR_INVALID_STATE (and freeing
 * them releases nothing of the parent's), while handles the child makes
 * work, including the process-wide threads they need (the timer, the
 * store's async waiter), which the child starts afresh. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

/* Starts the parent's timer and async waiter threads. */
static void use_background_threads(dc_store *tcp, dc_store *hash) {
  dc_work *w = NULL;
  CHECK_OK(dc_store_set(tcp, "ready", (const uint8_t *)"1", 1));
  CHECK_OK(dc_store_get_async(tcp, "ready", &w));
  CHECK_OK(dc_work_wait(w, 30000));
  dc_work_free(w);
  CHECK_OK(dc_store_set_timeout(hash, 10));
  CHECK_OK(dc_store_get_async(hash, "never", &w));
  CHECK_STATUS(dc_work_wait(w, 30000), DC_ERR_TIMEOUT);
  dc_work_free(w);
}

static int child(dc_store *parent_tcp, dc_store *parent_hash, dc_work *parent_work, uint16_t port) {
  alarm(60); /* a hang fails the test instead of stalling it */
  /* The parent's handles refuse, with a message that says why. */
  CHECK_STATUS(dc_store_set(parent_tcp, "k", (const uint8_t *)"v", 1), DC_ERR_INVALID_STATE);
  CHECK(strstr(dc_last_error_message(), "fork()") != NULL);
  CHECK_STATUS(dc_store_num_keys(parent_hash, &(int64_t){0}), DC_ERR_INVALID_STATE);
  CHECK_STATUS(dc_work_wait(parent_work, 10), DC_ERR_INVALID_STATE);
  /* Freeing them returns at once (the server's thread is the parent's). */
  dc_store_free(parent_tcp);
  dc_store_free(parent_hash);
  dc_work_free(parent_work);

  /* New handles work, background threads included. */
  dc_store *tcp = tcp_store(false, port);
  dc_store *hash = NULL;
  CHECK_OK(dc_hash_store_new(&hash));
  use_background_threads(tcp, hash);
  CHECK_OK(dc_store_set(tcp, "child", (const uint8_t *)"ok", 2));
  dc_store_free(hash);
  dc_store_free(tcp);
  return 0;
}

int main(void) {
  dc_store *server = tcp_store(true, 0);
  uint16_t port = 0;
  CHECK_OK(dc_tcp_store_port(server, &port));
  dc_store *hash = NULL;
  CHECK_OK(dc_hash_store_new(&hash));
  use_background_threads(server, hash);
  dc_work *pending = NULL;
  CHECK_OK(dc_work_new_future(&pending));

  fflush(NULL);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) _exit(child(server, hash, pending, port));

  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  /* The parent's handles are untouched by the child's frees. */
  dc_buf value = {0};
  CHECK_OK(dc_store_get(server, "child", &value));
  CHECK_BUF(value, "ok");
  dc_buf_free(&value);
  CHECK_OK(dc_work_finish(pending, DC_OK, NULL));
  dc_work_free(pending);
  dc_store_free(hash);
  dc_store_free(server);
  printf("test_fork: ok\n");
  return 0;
}
