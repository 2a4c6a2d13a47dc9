/* Work through the C API: lifecycle, errors, callbacks, the ready fd, the
 * profiler hooks, and waiters on many threads. */
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>

#include "check.h"

static atomic_int begins, ends, callbacks;

static uint64_t on_begin(const char *title, void *ud) {
  CHECK(strcmp(title, "allreduce:profiled") == 0);
  CHECK(ud == &begins);
  return (uint64_t)atomic_fetch_add(&begins, 1) + 1000;
}

static void on_end(const char *title, uint64_t token, void *ud) {
  (void)title;
  (void)ud;
  CHECK(token >= 1000);
  atomic_fetch_add(&ends, 1);
}

static void on_done(const dc_work *w, void *ud) {
  bool done = false;
  CHECK_OK(dc_work_is_completed(w, &done));
  CHECK(done);
  atomic_fetch_add((atomic_int *)ud, 1);
}

static void *waiter(void *p) {
  dc_work *w = p;
  return (void *)(intptr_t)dc_work_wait(w, 30000);
}

static void *finisher(void *p) {
  dc_work *w = p;
  return (void *)(intptr_t)dc_work_finish_with_result(w, (const uint8_t *)"res", 3);
}

int main(void) {
  dc_work *w = NULL;
  dc_buf buf = {0};
  bool flag = true;
  int32_t i32 = 0;
  int64_t i64 = 0;
  uint64_t seq1 = 0, seq2 = 0;
  double secs = -1;

  /* Lifecycle. */
  CHECK_OK(dc_work_new(3, DC_OP_TYPE_ALLREDUCE, NULL, 500, &w));
  CHECK_OK(dc_work_rank(w, &i32));
  CHECK(i32 == 3);
  CHECK_OK(dc_work_op_type(w, &i32));
  CHECK(i32 == DC_OP_TYPE_ALLREDUCE);
  CHECK(strcmp(dc_op_type_name(i32), "ALLREDUCE") == 0);
  CHECK_OK(dc_work_timeout(w, &i64));
  CHECK(i64 == 500);
  CHECK_OK(dc_work_sequence_number(w, &seq1));
  CHECK_OK(dc_work_is_completed(w, &flag));
  CHECK(!flag);
  CHECK_STATUS(dc_work_wait(w, 10), DC_ERR_TIMEOUT);
  CHECK(strcmp(dc_last_error_message(), "Operation timed out!") == 0);
  CHECK_STATUS(dc_work_duration(w, &secs), DC_ERR_INVALID_STATE);
  CHECK_STATUS(dc_work_source_rank(w, &i32), DC_ERR_NOT_SUPPORTED);
  CHECK(strstr(dc_last_error_message(), "recv or recv-from-any") != NULL);
  CHECK_OK(dc_work_synchronize(w));
  CHECK_OK(dc_work_add_done_callback(w, on_done, &callbacks));
  CHECK_OK(dc_work_finish(w, DC_OK, NULL));
  CHECK(atomic_load(&callbacks) == 1);
  CHECK_OK(dc_work_add_done_callback(w, on_done, &callbacks));
  CHECK(atomic_load(&callbacks) == 2);
  CHECK_OK(dc_work_is_success(w, &flag));
  CHECK(flag);
  CHECK_OK(dc_work_duration(w, &secs));
  CHECK(secs >= 0);
  CHECK_STATUS(dc_work_result(w, &buf), DC_ERR_NOT_SUPPORTED);
  CHECK(strcmp(dc_last_error_message(), "result() not implemented.") == 0);
  CHECK_STATUS(dc_work_finish(w, DC_OK, NULL), DC_ERR_INVALID_STATE);
  dc_work_free(w);

  /* Failure, finish_and_throw, abort. */
  dc_status st = DC_OK;
  CHECK_OK(dc_work_new(0, DC_OP_TYPE_SEND, NULL, -1, &w));
  CHECK_OK(dc_work_sequence_number(w, &seq2));
  CHECK(seq2 > seq1);
  CHECK_STATUS(dc_work_finish_and_throw(w, DC_ERR_NETWORK, "peer died"), DC_ERR_NETWORK);
  CHECK(strcmp(dc_last_error_message(), "peer died") == 0);
  for (int i = 0; i < 3; i++) CHECK_STATUS(dc_work_wait(w, -1), DC_ERR_NETWORK);
  CHECK_OK(dc_work_error(w, &st, &buf));
  CHECK(st == DC_ERR_NETWORK);
  CHECK_BUF(buf, "peer died");
  dc_buf_free(&buf);
  dc_work_free(w);
  CHECK_OK(dc_work_new(0, DC_OP_TYPE_BARRIER, NULL, -1, &w));
  CHECK_OK(dc_work_abort(w));
  CHECK_STATUS(dc_work_wait(w, -1), DC_ERR_ABORTED);
  dc_work_free(w);

  /* Receives know their source. */
  CHECK_OK(dc_work_new(1, DC_OP_TYPE_RECV_ANY_SOURCE, NULL, -1, &w));
  CHECK_OK(dc_work_set_source_rank(w, 7));
  CHECK_OK(dc_work_source_rank(w, &i32));
  CHECK(i32 == 7);
  dc_work_free(w);

  /* A future work: many waiters, one finisher on another thread, the fd. */
  int fd = -1;
  CHECK_OK(dc_work_new_future(&w));
  CHECK_OK(dc_work_rank(w, &i32));
  CHECK(i32 == -1);
  CHECK_OK(dc_work_fd(w, &fd));
  pthread_t waiters[8], fin;
  for (int i = 0; i < 8; i++) CHECK(pthread_create(&waiters[i], NULL, waiter, w) == 0);
  CHECK(pthread_create(&fin, NULL, finisher, w) == 0);
  void *ret = NULL;
  for (int i = 0; i < 8; i++) {
    CHECK(pthread_join(waiters[i], &ret) == 0);
    CHECK((intptr_t)ret == DC_OK);
  }
  CHECK(pthread_join(fin, &ret) == 0);
  CHECK((intptr_t)ret == DC_OK);
  struct pollfd p = {.fd = fd, .events = POLLIN};
  CHECK(poll(&p, 1, 0) == 1);
  CHECK_OK(dc_work_result(w, &buf));
  CHECK_BUF(buf, "res");
  dc_buf_free(&buf);
  dc_work_free(w);

  /* Profiler hooks: begin at creation, end once at finish or free. */
  CHECK_OK(dc_set_profiler_hooks(on_begin, on_end, &begins));
  CHECK_OK(dc_work_new(0, DC_OP_TYPE_ALLREDUCE, "allreduce:profiled", -1, &w));
  CHECK(atomic_load(&begins) == 1 && atomic_load(&ends) == 0);
  CHECK_OK(dc_work_finish(w, DC_OK, NULL));
  CHECK(atomic_load(&ends) == 1);
  CHECK_STATUS(dc_work_finish(w, DC_OK, NULL), DC_ERR_INVALID_STATE);
  CHECK(atomic_load(&ends) == 1);
  dc_work_free(w);
  CHECK_OK(dc_work_new(0, DC_OP_TYPE_ALLREDUCE, "allreduce:profiled", -1, &w));
  dc_work_free(w); /* unfinished: the span ends with the last handle */
  CHECK(atomic_load(&begins) == 2 && atomic_load(&ends) == 2);
  CHECK_OK(dc_work_new(0, DC_OP_TYPE_ALLREDUCE, NULL, -1, &w));
  CHECK(atomic_load(&begins) == 2); /* no title, no span */
  dc_work_free(w);
  CHECK_OK(dc_set_profiler_hooks(NULL, NULL, NULL));

  CHECK_STATUS(dc_work_new(0, 42, NULL, -1, &w), DC_ERR_INVALID_ARGUMENT);

  /* The timeout rule of every function: -1 default (a work has none), 0
   * forever, other negatives invalid. */
  CHECK_STATUS(dc_work_new(0, DC_OP_TYPE_SEND, NULL, -2, &w), DC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(dc_last_error_message(), "timeout -2 ms") != NULL);
  for (int64_t none = DC_TIMEOUT_DEFAULT; none <= DC_TIMEOUT_FOREVER; none++) {
    CHECK_OK(dc_work_new(0, DC_OP_TYPE_SEND, NULL, none, &w));
    CHECK_OK(dc_work_timeout(w, &i64));
    CHECK(i64 == DC_TIMEOUT_FOREVER);
    dc_work_free(w);
  }
  printf("test_work: ok\n");
  return 0;
}
