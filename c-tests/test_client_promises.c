/* What the header promises a C caller of a store handle, tried the way a
 * careless or unlucky program would: many threads on one handle, an async
 * get followed by a set, a work freed while another thread waits on it,
 * absurd lengths on every function that takes bytes, requests over the
 * server's limits, ADD on text, remote() to oneself. Run under valgrind too. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <unistd.h>

#include "check.h"

#define THREADS 64
#define ROUNDS 20
#define HUGE_LEN ((size_t)1 << 62)

static const uint8_t *bytes(const char *s) { return (const uint8_t *)s; }

static dc_store *tcp_server(uint64_t max_value_size) {
  dc_tcp_store_options opts;
  dc_store *s = NULL;
  CHECK_OK(dc_tcp_store_options_init(&opts, sizeof opts));
  opts.is_server = true;
  opts.bind_address = "127.0.0.1";
  opts.timeout_ms = 30000;
  opts.max_value_size = max_value_size;
  CHECK_OK(dc_tcp_store_new(&opts, &s));
  return s;
}

/* Thread i sets its keys and gets its neighbour's, which blocks until the
 * neighbour has set them: gets and sets interleave on one handle. */
struct ring {
  dc_store *store;
  int index;
};

static void *ring_thread(void *arg) {
  struct ring *r = arg;
  char key[32], value[32];
  for (int j = 0; j < ROUNDS; j++) {
    snprintf(key, sizeof key, "ring/%d/%d", r->index, j);
    snprintf(value, sizeof value, "%d.%d", r->index, j);
    CHECK_OK(dc_store_set(r->store, key, bytes(value), strlen(value)));
    int next = (r->index + 1) % THREADS;
    snprintf(key, sizeof key, "ring/%d/%d", next, j);
    snprintf(value, sizeof value, "%d.%d", next, j);
    dc_buf got = {0};
    CHECK_OK(dc_store_get(r->store, key, &got));
    CHECK_BUF(got, value);
    dc_buf_free(&got);
  }
  return NULL;
}

static void threads_share_one_handle(dc_store *s) {
  pthread_t threads[THREADS];
  struct ring rings[THREADS];
  for (int i = 0; i < THREADS; i++) {
    rings[i] = (struct ring){s, i};
    CHECK(pthread_create(&threads[i], NULL, ring_thread, &rings[i]) == 0);
  }
  for (int i = 0; i < THREADS; i++) CHECK(pthread_join(threads[i], NULL) == 0);
}

static void async_get_then_set(dc_store *s) {
  dc_work *w = NULL;
  CHECK_OK(dc_store_get_async(s, "async/k", &w));
  /* The set must not wait for the pending get. */
  CHECK_OK(dc_store_set(s, "async/k", bytes("v"), 1));
  CHECK_OK(dc_work_wait(w, 30000));
  dc_buf got = {0};
  CHECK_OK(dc_work_result(w, &got));
  CHECK_BUF(got, "v");
  dc_buf_free(&got);
  dc_work_free(w);
}

struct waiter {
  dc_work *work;
  int64_t timeout_ms;
  dc_status status;
  atomic_int started;
};

static void *wait_thread(void *arg) {
  struct waiter *w = arg;
  atomic_store(&w->started, 1);
  w->status = dc_work_wait(w->work, w->timeout_ms);
  return NULL;
}

/* Returns once `w`'s thread is about to call dc_work_wait, and a while
 * after (its call holds the work from its first instructions): on a loaded
 * machine, or under valgrind, a thread may start long after it was
 * created. */
static void until_waiting(struct waiter *w) {
  while (!atomic_load(&w->started)) {
    usleep(1000);
  }
  usleep(100 * 1000);
}

/* The handle is freed while another thread is inside dc_work_wait on it:
 * that waiter is unaffected. */
static void free_during_wait(dc_store *s) {
  struct waiter w = {NULL, 30000, -1, 0};
  pthread_t t;
  CHECK_OK(dc_store_get_async(s, "fdw/k", &w.work));
  CHECK(pthread_create(&t, NULL, wait_thread, &w) == 0);
  until_waiting(&w);
  dc_work_free(w.work);
  CHECK_OK(dc_store_set(s, "fdw/k", bytes("v"), 1));
  CHECK(pthread_join(t, NULL) == 0);
  CHECK(w.status == DC_OK);

  struct waiter u = {NULL, 1000, -1, 0};
  CHECK_OK(dc_work_new_future(&u.work));
  CHECK(pthread_create(&t, NULL, wait_thread, &u) == 0);
  until_waiting(&u);
  dc_work_free(u.work);
  CHECK(pthread_join(t, NULL) == 0);
  CHECK(u.status == DC_ERR_TIMEOUT);
}

/* An aborted async get lets go of its connection's waiter on the server. */
static void abort_releases(dc_store *server) {
  dc_work *w = NULL;
  dc_server_stats stats = {.struct_size = sizeof(dc_server_stats)};
  CHECK_OK(dc_store_get_async(server, "never", &w));
  for (int i = 0; i < 1000; i++) {
    CHECK_OK(dc_tcp_store_server_stats(server, &stats));
    if (stats.pending_waits == 1) break;
    usleep(10 * 1000);
  }
  CHECK(stats.pending_waits == 1);
  CHECK_OK(dc_work_abort(w));
  for (int i = 0; i < 1000; i++) {
    CHECK_OK(dc_tcp_store_server_stats(server, &stats));
    if (stats.pending_waits == 0) break;
    usleep(10 * 1000);
  }
  CHECK(stats.pending_waits == 0);
  CHECK_STATUS(dc_work_wait(w, 1000), DC_ERR_ABORTED);
  dc_work_free(w);
}

/* Every function that takes bytes refuses an impossible length, and the
 * handle lives. */
static void huge_lengths(dc_store *s) {
  const uint8_t *p = bytes("x");
  dc_buf out = {0};
  CHECK_STATUS(dc_store_set(s, "h", p, HUGE_LEN), DC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(dc_last_error_message(), "DC_MAX_BYTES_LEN") != NULL);
  CHECK_STATUS(dc_store_append(s, "h", p, HUGE_LEN), DC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(dc_store_queue_push(s, "h", p, HUGE_LEN), DC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(dc_store_compare_set(s, "h", p, HUGE_LEN, p, 1, &out), DC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(dc_store_compare_set(s, "h", p, 1, p, HUGE_LEN, &out), DC_ERR_INVALID_ARGUMENT);
  const char *keys[] = {"h"};
  const uint8_t *values[] = {p};
  size_t lens[] = {HUGE_LEN};
  CHECK_STATUS(dc_store_multi_set(s, keys, values, lens, 1), DC_ERR_INVALID_ARGUMENT);
  dc_buf_array all = {0};
  CHECK_STATUS(dc_elastic_synchronize(s, p, HUGE_LEN, 0, 1, "sync/", 1000, &all),
               DC_ERR_INVALID_ARGUMENT);
  CHECK_OK(dc_store_set(s, "h", p, 1));
  CHECK_OK(dc_store_get(s, "h", &out));
  CHECK_BUF(out, "x");
  dc_buf_free(&out);
}

static void huge_work_result(void) {
  dc_work *w = NULL;
  CHECK_OK(dc_work_new_future(&w));
  CHECK_STATUS(dc_work_finish_with_result(w, bytes("x"), HUGE_LEN), DC_ERR_INVALID_ARGUMENT);
  CHECK_OK(dc_work_finish_with_result(w, bytes("x"), 1));
  dc_work_free(w);
}

static void limits_and_errors_keep_the_handle(void) {
  dc_store *s = tcp_server(1024);
  uint8_t big[1025];
  memset(big, 'b', sizeof big);
  CHECK_STATUS(dc_store_set(s, "big", big, sizeof big), DC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(dc_last_error_message(), "limit") != NULL);
  CHECK_OK(dc_store_set(s, "big", big, 1024));
  CHECK_STATUS(dc_store_append(s, "big", big, 1), DC_ERR_INVALID_ARGUMENT);

  CHECK_OK(dc_store_set(s, "text", bytes("abc"), 3));
  int64_t n = 0;
  CHECK_STATUS(dc_store_add(s, "text", 1, &n), DC_ERR_INVALID_ARGUMENT);
  CHECK_OK(dc_store_add(s, "count", 5, &n));
  CHECK(n == 5);
  dc_buf out = {0};
  CHECK_OK(dc_store_get(s, "big", &out));
  CHECK(out.len == 1024);
  dc_buf_free(&out);
  dc_store_free(s);
}

/* Worker-local RPC: remote() to oneself and the byte-taking RPC calls. */
static dc_status echo(const uint8_t *args, size_t len, const dc_rref *const *rrefs, size_t n,
                      int32_t caller, dc_rpc_reply *reply, void *user_data) {
  (void)rrefs, (void)n, (void)caller, (void)user_data;
  if (dc_rpc_reply_set(reply, args, HUGE_LEN) != DC_ERR_INVALID_ARGUMENT) return DC_ERR_INTERNAL;
  return dc_rpc_reply_set(reply, args, len);
}

static void rpc_to_oneself(dc_store *s) {
  dc_rpc_function_entry functions[] = {{"echo", echo, NULL}};
  dc_rpc_options ro;
  dc_rpc *rpc = NULL;
  CHECK_OK(dc_rpc_options_init(&ro, sizeof ro));
  ro.functions = functions;
  ro.num_functions = 1;
  CHECK_OK(dc_rpc_init(s, "self", 0, 1, &ro, &rpc));
  dc_buf out = {0};
  dc_work *w = NULL;
  dc_rref *r = NULL;
  CHECK_STATUS(dc_rpc_sync(rpc, "self", "echo", bytes("x"), HUGE_LEN, NULL, 0, 10000, &out),
               DC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(dc_rpc_async(rpc, "self", "echo", bytes("x"), HUGE_LEN, NULL, 0, 10000, &w),
               DC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(dc_rpc_remote(rpc, "self", "echo", bytes("x"), HUGE_LEN, NULL, 0, 10000, &r),
               DC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(dc_rref_new(rpc, bytes("x"), HUGE_LEN, &r), DC_ERR_INVALID_ARGUMENT);
  CHECK_OK(dc_rpc_sync(rpc, "self", "echo", bytes("hi"), 2, NULL, 0, 10000, &out));
  CHECK_BUF(out, "hi");
  dc_buf_free(&out);

  for (int i = 0; i < 1001; i++) {
    CHECK_OK(dc_rpc_remote(rpc, "self", "echo", bytes("v"), 1, NULL, 0, 10000, &r));
    CHECK_OK(dc_rref_to_here(r, 10000, &out));
    CHECK_BUF(out, "v");
    dc_buf_free(&out);
    dc_rref_free(r);
  }
  dc_rref_debug_info d = {.struct_size = sizeof(dc_rref_debug_info)};
  for (int i = 0; i < 1000; i++) {
    CHECK_OK(dc_rpc_debug_info(rpc, &d));
    if (d.num_owner_rrefs == 0 && d.num_pending_futures == 0 && d.num_pending_users == 0) break;
    usleep(10 * 1000);
  }
  if (d.num_owner_rrefs != 0)
    fprintf(stderr, "owners left after remote() to self: %llu\n", (unsigned long long)d.num_owner_rrefs);
  CHECK(d.num_owner_rrefs == 0);
  CHECK(d.num_pending_futures == 0);
  CHECK(d.num_pending_users == 0);
  CHECK_OK(dc_rpc_shutdown(rpc, true, 30000));
  dc_rpc_free(rpc);
}

int main(void) {
  dc_store *tcp = tcp_server(0);
  dc_store *hash = NULL;
  CHECK_OK(dc_hash_store_new(&hash));

  threads_share_one_handle(tcp);
  async_get_then_set(tcp);
  async_get_then_set(hash);
  free_during_wait(tcp);
  abort_releases(tcp);
  huge_lengths(tcp);
  huge_lengths(hash);
  huge_work_result();
  limits_and_errors_keep_the_handle();
  rpc_to_oneself(hash);

  dc_store_free(hash);
  dc_store_free(tcp);
  printf("client promises kept\n");
  return 0;
}
