/* HashStore, PrefixStore, the async calls and the elastic helpers through
 * the C API, with pthreads as workers. */
#include <poll.h>
#include <pthread.h>
#include <unistd.h>

#include "check.h"

#define WORLD 4

static const uint8_t *bytes(const char *s) { return (const uint8_t *)s; }

static void basic_ops(dc_store *s) {
  dc_buf buf = {0};
  int64_t n = 0;
  bool flag = false;

  CHECK_OK(dc_store_set(s, "k1", bytes("v1"), 2));
  CHECK_OK(dc_store_get(s, "k1", &buf));
  CHECK_BUF(buf, "v1");
  dc_buf_free(&buf);
  CHECK(buf.data == NULL);

  CHECK_OK(dc_store_add(s, "cnt", 5, &n));
  CHECK(n == 5);
  CHECK_OK(dc_store_add(s, "cnt", -2, &n));
  CHECK(n == 3);
  CHECK_OK(dc_store_get(s, "cnt", &buf));
  CHECK_BUF(buf, "3");
  dc_buf_free(&buf);
  CHECK_STATUS(dc_store_add(s, "k1", 1, &n), DC_ERR_INVALID_ARGUMENT);

  CHECK_OK(dc_store_compare_set(s, "cs", bytes("x"), 1, bytes("y"), 1, &buf));
  CHECK_BUF(buf, "x");
  dc_buf_free(&buf);
  CHECK_OK(dc_store_compare_set(s, "cs", NULL, 0, bytes("first"), 5, &buf));
  CHECK_BUF(buf, "first");
  dc_buf_free(&buf);
  CHECK_OK(dc_store_compare_set(s, "cs", bytes("first"), 5, bytes("2nd"), 3, &buf));
  CHECK_BUF(buf, "2nd");
  dc_buf_free(&buf);

  CHECK_OK(dc_store_append(s, "ap", bytes("x"), 1));
  CHECK_OK(dc_store_append(s, "ap", bytes("yz"), 2));
  const char *mkeys[3] = {"m1", "m2", "ap"};
  const uint8_t *mvals[2] = {bytes("1"), bytes("22")};
  size_t mlens[2] = {1, 2};
  CHECK_OK(dc_store_multi_set(s, mkeys, mvals, mlens, 2));
  dc_buf out[3];
  CHECK_OK(dc_store_multi_get(s, mkeys, 3, out));
  CHECK_BUF(out[0], "1");
  CHECK_BUF(out[1], "22");
  CHECK_BUF(out[2], "xyz");
  for (int i = 0; i < 3; i++) dc_buf_free(&out[i]);

  const char *both[2] = {"k1", "nope"};
  CHECK_OK(dc_store_check(s, both, 1, &flag));
  CHECK(flag);
  CHECK_OK(dc_store_check(s, both, 2, &flag));
  CHECK(!flag);
  CHECK_STATUS(dc_store_wait(s, both, 2, 50), DC_ERR_TIMEOUT);
  CHECK(strstr(dc_last_error_message(), "wait timeout after 50ms") != NULL);

  CHECK_OK(dc_store_delete_key(s, "k1", &flag));
  CHECK(flag);
  CHECK_OK(dc_store_delete_key(s, "k1", &flag));
  CHECK(!flag);

  /* Queues. */
  CHECK_STATUS(dc_store_queue_pop(s, "q", false, &buf), DC_ERR_QUEUE_EMPTY);
  CHECK_OK(dc_store_queue_push(s, "q", bytes("a"), 1));
  CHECK_OK(dc_store_queue_push(s, "q", bytes("b"), 1));
  CHECK_OK(dc_store_queue_len(s, "q", &n));
  CHECK(n == 2);
  CHECK_OK(dc_store_queue_pop(s, "q", true, &buf));
  CHECK_BUF(buf, "a");
  dc_buf_free(&buf);
  CHECK_OK(dc_store_queue_pop(s, "q", false, &buf));
  CHECK_BUF(buf, "b");
  dc_buf_free(&buf);

  /* Timeouts and the scoped guard. */
  int64_t ms = 0;
  CHECK_OK(dc_store_get_timeout(s, &ms));
  CHECK(ms == 300000);
  dc_store_timeout_guard *guard = NULL;
  CHECK_OK(dc_store_timeout_guard_new(s, 30, &guard));
  CHECK_STATUS(dc_store_get(s, "missing", &buf), DC_ERR_TIMEOUT);
  CHECK_STATUS(dc_store_queue_pop(s, "q", true, &buf), DC_ERR_TIMEOUT);
  dc_store_timeout_guard_free(guard);
  CHECK_OK(dc_store_get_timeout(s, &ms));
  CHECK(ms == 300000);
  CHECK_STATUS(dc_store_set_timeout(s, -3), DC_ERR_INVALID_ARGUMENT);
}

static void prefix_view(dc_store *base) {
  dc_store *p = NULL;
  dc_buf buf = {0};
  dc_buf_array keys = {0};
  CHECK_OK(dc_prefix_store_new("job", base, &p));
  CHECK_OK(dc_store_set(p, "a", bytes("1"), 1));
  CHECK_OK(dc_store_get(base, "job/a", &buf));
  CHECK_BUF(buf, "1");
  dc_buf_free(&buf);
  CHECK_OK(dc_store_list_keys(p, &keys));
  CHECK(keys.len == 1);
  CHECK_BUF(keys.items[0], "a");
  dc_buf_array_free(&keys);
  CHECK(keys.items == NULL);
  dc_store_free(p);
  /* The base survives its view. */
  CHECK_OK(dc_store_get(base, "job/a", &buf));
  dc_buf_free(&buf);
}

static bool fd_readable(int fd, int ms) {
  struct pollfd p = {.fd = fd, .events = POLLIN};
  return poll(&p, 1, ms) == 1;
}

/* list_prefix and delete_prefix, through a PrefixStore too. */
static void prefixes(dc_store *base) {
  dc_store *p = NULL;
  dc_buf_array keys = {0};
  int64_t deleted = -1;
  CHECK_OK(dc_prefix_store_new("run", base, &p));
  CHECK_OK(dc_store_set(p, "rank/0", bytes("a"), 1));
  CHECK_OK(dc_store_set(p, "rank/1", bytes("b"), 1));
  CHECK_OK(dc_store_set(p, "rankless", bytes("c"), 1));
  CHECK_OK(dc_store_list_prefix(p, "rank/", &keys));
  CHECK(keys.len == 2);
  dc_buf_array_free(&keys);
  CHECK_OK(dc_store_list_prefix(base, "run/rank", &keys));
  CHECK(keys.len == 3);
  dc_buf_array_free(&keys);
  CHECK_OK(dc_store_delete_prefix(p, "rank/", &deleted));
  CHECK(deleted == 2);
  CHECK_OK(dc_store_list_prefix(p, "", &keys));
  CHECK(keys.len == 1);
  CHECK_BUF(keys.items[0], "rankless");
  dc_buf_array_free(&keys);
  dc_store_free(p);
}

static void async_calls(dc_store *s) {
  dc_work *get = NULL, *wait = NULL, *late = NULL;
  dc_buf buf = {0};
  int fd = -1;
  const char *keys[1] = {"async-key"};
  CHECK_OK(dc_store_get_async(s, "async-key", &get));
  CHECK_OK(dc_store_wait_async(s, keys, 1, DC_TIMEOUT_DEFAULT, &wait));
  CHECK_OK(dc_work_fd(get, &fd));
  CHECK(!fd_readable(fd, 20));
  CHECK_OK(dc_store_set(s, "async-key", bytes("later"), 5));
  CHECK(fd_readable(fd, 10000));
  CHECK_OK(dc_work_wait(get, DC_TIMEOUT_FOREVER));
  CHECK_OK(dc_work_result(get, &buf));
  CHECK_BUF(buf, "later");
  dc_buf_free(&buf);
  CHECK_OK(dc_work_wait(wait, 10000));
  CHECK_STATUS(dc_work_result(wait, &buf), DC_ERR_NOT_SUPPORTED);

  const char *never[1] = {"never"};
  CHECK_OK(dc_store_wait_async(s, never, 1, 20, &late));
  CHECK_STATUS(dc_work_wait(late, 10000), DC_ERR_TIMEOUT);
  dc_work_free(get);
  dc_work_free(wait);
  dc_work_free(late);
}

struct worker_arg {
  dc_store *store;
  int rank;
  int failed;
};

static void *elastic_worker(void *p) {
  struct worker_arg *a = p;
  char data[16];
  dc_buf_array all = {0};
  int n = snprintf(data, sizeof data, "r%d", a->rank);
  if (dc_elastic_barrier(a->store, WORLD, "c/bar", 10000) != DC_OK) goto fail;
  if (dc_store_barrier(a->store, "c/native", WORLD, 10000) != DC_OK) goto fail;
  if (dc_elastic_synchronize(a->store, (const uint8_t *)data, (size_t)n, a->rank,
                             WORLD, "c/sync/", 10000, &all) != DC_OK)
    goto fail;
  if (all.len != WORLD) goto fail;
  for (int i = 0; i < WORLD; i++) {
    snprintf(data, sizeof data, "r%d", i);
    if (all.items[i].len != strlen(data) || memcmp(all.items[i].data, data, all.items[i].len))
      goto fail;
  }
  dc_buf_array_free(&all);
  return NULL;
fail:
  fprintf(stderr, "rank %d: %s\n", a->rank, dc_last_error_message());
  dc_buf_array_free(&all);
  a->failed = 1;
  return NULL;
}

static void elastic_helpers(dc_store *s) {
  pthread_t t[WORLD];
  struct worker_arg args[WORLD];
  for (int i = 0; i < WORLD; i++) {
    args[i] = (struct worker_arg){.rank = i};
    CHECK_OK(dc_store_clone(s, &args[i].store));
    CHECK(pthread_create(&t[i], NULL, elastic_worker, &args[i]) == 0);
  }
  for (int i = 0; i < WORLD; i++) {
    CHECK(pthread_join(t[i], NULL) == 0);
    CHECK(!args[i].failed);
    dc_store_free(args[i].store);
  }
  dc_buf buf = {0};
  CHECK_OK(dc_store_get(s, "c/bar/last_member", &buf));
  CHECK_BUF(buf, "<val_ignored>");
  dc_buf_free(&buf);

  /* A barrier nobody else joins times out with the store's error. */
  CHECK_STATUS(dc_elastic_barrier(s, 2, "c/lonely", 30), DC_ERR_TIMEOUT);
  CHECK_STATUS(dc_elastic_barrier_traced(s, 2, "c/traced", 30, 0, 30), DC_ERR_TIMEOUT);
  CHECK(strstr(dc_last_error_message(), "missing_ranks=[1]") != NULL);
}

int main(void) {
  dc_store *s = NULL;
  CHECK_OK(dc_hash_store_new(&s));
  basic_ops(s);
  prefix_view(s);
  prefixes(s);
  async_calls(s);
  elastic_helpers(s);
  dc_store_free(s);
  printf("test_store: ok\n");
  return 0;
}
