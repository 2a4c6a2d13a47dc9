/* dc_set_log_callback: distcore's log lines (and only distcore's: none of
 * its dependencies', even at TRACE) reach the host's callback, at the level
 * asked for, from distcore's own threads; INFO tells a server's start and
 * stop; NULL sends them back to stderr, and once the call returns the old
 * callback is not called again; a callback cannot change the callback. */
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "check.h"

static atomic_int lines, disconnects, started, stopped, reentrant_status = -1;
static pthread_t caller_thread;
static atomic_bool from_other_thread;

static void on_log(dc_log_level level, const char *target, const char *message, void *user_data) {
  CHECK(user_data == &lines);
  CHECK(level >= DC_LOG_LEVEL_ERROR && level <= DC_LOG_LEVEL_TRACE);
  if (strcmp(target, "distcore") != 0 && strncmp(target, "distcore::", 10) != 0) {
    fprintf(stderr, "a line of %s: %s\n", target, message);
    CHECK(!"a line that is not distcore's");
  }
  atomic_fetch_add(&lines, 1);
  if (level == DC_LOG_LEVEL_INFO && strstr(message, "TCPStore server listening on") != NULL)
    atomic_fetch_add(&started, 1);
  if (level == DC_LOG_LEVEL_INFO && strstr(message, "stopped") != NULL)
    atomic_fetch_add(&stopped, 1);
  if (strstr(message, "disconnected") != NULL) {
    atomic_fetch_add(&disconnects, 1);
    /* Changing the callback from inside it is refused, not a deadlock. */
    atomic_store(&reentrant_status, dc_set_log_callback(DC_LOG_LEVEL_WARN, NULL, NULL));
  }
  if (!pthread_equal(pthread_self(), caller_thread)) atomic_store(&from_other_thread, true);
}

int main(void) {
  caller_thread = pthread_self();
  CHECK_STATUS(dc_set_log_callback(42, on_log, &lines), DC_ERR_INVALID_ARGUMENT);
  CHECK_OK(dc_set_log_callback(DC_LOG_LEVEL_INFO, on_log, &lines));
  dc_store *server = tcp_store(true, 0);
  CHECK(atomic_load(&started) == 1);

  /* Every line, the event loop's registrations included (mio logs those at
   * TRACE under its own name: never delivered). The server logs a client's
   * disconnection at debug level, on its thread. */
  CHECK_OK(dc_set_log_callback(DC_LOG_LEVEL_TRACE, on_log, &lines));
  uint16_t port = 0;
  CHECK_OK(dc_tcp_store_port(server, &port));
  dc_store_free(tcp_store(false, port));
  for (int i = 0; i < 3000 && atomic_load(&disconnects) == 0; i++) usleep(1000);
  CHECK(atomic_load(&disconnects) > 0);
  CHECK(atomic_load(&from_other_thread));
  CHECK(atomic_load(&reentrant_status) == DC_ERR_INVALID_STATE);

  /* Above the line's level: not delivered. */
  CHECK_OK(dc_set_log_callback(DC_LOG_LEVEL_WARN, on_log, &lines));
  int before = atomic_load(&disconnects);
  dc_store_free(tcp_store(false, port));
  usleep(100 * 1000);
  CHECK(atomic_load(&disconnects) == before);

  /* Back to stderr: the callback is never called again. */
  CHECK_OK(dc_set_log_callback(DC_LOG_LEVEL_DEBUG, NULL, NULL));
  before = atomic_load(&lines);
  dc_store_free(tcp_store(false, port));
  usleep(100 * 1000);
  CHECK(atomic_load(&lines) == before);
  CHECK_OK(dc_set_log_callback(DC_LOG_LEVEL_INFO, on_log, &lines));
  dc_store_free(server);
  CHECK(atomic_load(&stopped) == 1);
  CHECK_OK(dc_set_log_callback(DC_LOG_LEVEL_WARN, NULL, NULL));

  printf("test_log: ok\n");
  return 0;
}
