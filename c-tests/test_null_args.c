/* Every function that takes a pointer, given NULL where one is required,
 * returns DC_ERR_INVALID_ARGUMENT with a message instead of crashing.
 * check_null_coverage.py keeps this list complete as the header grows. */
#include "check.h"

#define NULL_ARG(expr)                                                     \
  do {                                                                     \
    CHECK_STATUS(expr, DC_ERR_INVALID_ARGUMENT);                           \
    CHECK(strstr(dc_last_error_message(), "NULL") != NULL);                \
  } while (0)

static uint64_t begin_hook(const char *title, void *ud) {
  (void)title;
  (void)ud;
  return 0;
}

int main(void) {
  dc_store *s = NULL;
  dc_work *w = NULL;
  dc_buf buf = {0};
  dc_buf_array arr = {0};
  bool flag = false;
  int64_t i64 = 0;
  int32_t i32 = 0;
  uint64_t u64 = 0;
  double secs = 0;
  int fd = 0;
  dc_status st = 0;
  const char *key = "k";
  const char *keys[1] = {"k"};
  const char *null_keys[1] = {NULL};
  const uint8_t *vals[1] = {(const uint8_t *)"v"};
  size_t lens[1] = {1};
  dc_store_timeout_guard *guard = NULL;

  CHECK_OK(dc_hash_store_new(&s));
  CHECK_OK(dc_work_new(0, DC_OP_TYPE_RECV, NULL, -1, &w));

  /* Stores. */
  NULL_ARG(dc_hash_store_new(NULL));
  NULL_ARG(dc_file_store_new(NULL, -1, &s));
  NULL_ARG(dc_file_store_new("/tmp/never-created", -1, NULL));
  NULL_ARG(dc_prefix_store_new(NULL, s, &s));
  NULL_ARG(dc_prefix_store_new("p", NULL, &s));
  NULL_ARG(dc_prefix_store_new("p", s, NULL));
  NULL_ARG(dc_store_clone(NULL, &s));
  NULL_ARG(dc_store_clone(s, NULL));
  NULL_ARG(dc_store_set(NULL, key, (const uint8_t *)"v", 1));
  NULL_ARG(dc_store_set(s, NULL, (const uint8_t *)"v", 1));
  NULL_ARG(dc_store_set(s, key, NULL, 1));
  NULL_ARG(dc_store_get(NULL, key, &buf));
  NULL_ARG(dc_store_get(s, NULL, &buf));
  NULL_ARG(dc_store_get(s, key, NULL));
  NULL_ARG(dc_store_add(NULL, key, 1, &i64));
  NULL_ARG(dc_store_add(s, NULL, 1, &i64));
  NULL_ARG(dc_store_add(s, key, 1, NULL));
  NULL_ARG(dc_store_compare_set(NULL, key, NULL, 0, NULL, 0, &buf));
  NULL_ARG(dc_store_compare_set(s, NULL, NULL, 0, NULL, 0, &buf));
  NULL_ARG(dc_store_compare_set(s, key, NULL, 1, NULL, 0, &buf));
  NULL_ARG(dc_store_compare_set(s, key, NULL, 0, NULL, 1, &buf));
  NULL_ARG(dc_store_compare_set(s, key, NULL, 0, NULL, 0, NULL));
  NULL_ARG(dc_store_delete_key(NULL, key, &flag));
  NULL_ARG(dc_store_delete_key(s, NULL, &flag));
  NULL_ARG(dc_store_delete_key(s, key, NULL));
  NULL_ARG(dc_store_check(NULL, keys, 1, &flag));
  NULL_ARG(dc_store_check(s, NULL, 1, &flag));
  NULL_ARG(dc_store_check(s, null_keys, 1, &flag));
  NULL_ARG(dc_store_check(s, keys, 1, NULL));
  NULL_ARG(dc_store_wait(NULL, keys, 1, 10));
  NULL_ARG(dc_store_wait(s, NULL, 1, 10));
  NULL_ARG(dc_store_num_keys(NULL, &i64));
  NULL_ARG(dc_store_num_keys(s, NULL));
  NULL_ARG(dc_store_append(NULL, key, (const uint8_t *)"v", 1));
  NULL_ARG(dc_store_append(s, NULL, (const uint8_t *)"v", 1));
  NULL_ARG(dc_store_append(s, key, NULL, 1));
  NULL_ARG(dc_store_multi_get(NULL, keys, 1, &buf));
  NULL_ARG(dc_store_multi_get(s, NULL, 1, &buf));
  NULL_ARG(dc_store_multi_get(s, keys, 1, NULL));
  NULL_ARG(dc_store_multi_set(NULL, keys, vals, lens, 1));
  NULL_ARG(dc_store_multi_set(s, NULL, vals, lens, 1));
  NULL_ARG(dc_store_multi_set(s, keys, NULL, lens, 1));
  NULL_ARG(dc_store_multi_set(s, keys, vals, NULL, 1));
  NULL_ARG(dc_store_queue_push(NULL, key, (const uint8_t *)"v", 1));
  NULL_ARG(dc_store_queue_push(s, NULL, (const uint8_t *)"v", 1));
  NULL_ARG(dc_store_queue_push(s, key, NULL, 1));
  NULL_ARG(dc_store_queue_pop(NULL, key, false, &buf));
  NULL_ARG(dc_store_queue_pop(s, NULL, false, &buf));
  NULL_ARG(dc_store_queue_pop(s, key, false, NULL));
  NULL_ARG(dc_store_queue_len(NULL, key, &i64));
  NULL_ARG(dc_store_queue_len(s, NULL, &i64));
  NULL_ARG(dc_store_queue_len(s, key, NULL));
  NULL_ARG(dc_store_list_keys(NULL, &arr));
  NULL_ARG(dc_store_list_keys(s, NULL));
  int64_t deleted = 0;
  NULL_ARG(dc_store_list_prefix(NULL, "p", &arr));
  NULL_ARG(dc_store_list_prefix(s, NULL, &arr));
  NULL_ARG(dc_store_list_prefix(s, "p", NULL));
  NULL_ARG(dc_store_delete_prefix(NULL, "p", &deleted));
  NULL_ARG(dc_store_delete_prefix(s, NULL, &deleted));
  NULL_ARG(dc_store_delete_prefix(s, "p", NULL));
  NULL_ARG(dc_store_barrier(NULL, key, 1, 10));
  NULL_ARG(dc_store_barrier(s, NULL, 1, 10));
  NULL_ARG(dc_store_get_timeout(NULL, &i64));
  NULL_ARG(dc_store_get_timeout(s, NULL));
  NULL_ARG(dc_store_set_timeout(NULL, 10));
  NULL_ARG(dc_store_timeout_guard_new(NULL, 10, &guard));
  NULL_ARG(dc_store_timeout_guard_new(s, 10, NULL));
  NULL_ARG(dc_store_get_async(NULL, key, &w));
  NULL_ARG(dc_store_get_async(s, NULL, &w));
  NULL_ARG(dc_store_get_async(s, key, NULL));
  NULL_ARG(dc_store_wait_async(NULL, keys, 1, 10, &w));
  NULL_ARG(dc_store_wait_async(s, NULL, 1, 10, &w));
  NULL_ARG(dc_store_wait_async(s, keys, 1, 10, NULL));
  NULL_ARG(dc_store_queue_pop_async(NULL, key, &w));
  NULL_ARG(dc_store_queue_pop_async(s, NULL, &w));
  NULL_ARG(dc_store_queue_pop_async(s, key, NULL));
  NULL_ARG(dc_store_barrier_async(NULL, key, 1, 10, &w));
  NULL_ARG(dc_store_barrier_async(s, NULL, 1, 10, &w));
  NULL_ARG(dc_store_barrier_async(s, key, 1, 10, NULL));

  /* TCPStore. */
  dc_tcp_store_options opts;
  dc_client_counter counters[1];
  size_t n_counters = 0;
  uint16_t port = 0;
  NULL_ARG(dc_tcp_store_options_init(NULL, sizeof(dc_tcp_store_options)));
  CHECK_OK(dc_tcp_store_options_init(&opts, sizeof opts));
  NULL_ARG(dc_tcp_store_new(NULL, &s));
  NULL_ARG(dc_tcp_store_new(&opts, NULL));
  opts.host = NULL;
  NULL_ARG(dc_tcp_store_new(&opts, &s));
  NULL_ARG(dc_tcp_store_port(NULL, &port));
  NULL_ARG(dc_tcp_store_port(s, NULL));
  NULL_ARG(dc_tcp_store_wait_for_workers(NULL));
  dc_server_stats stats = {.struct_size = sizeof(dc_server_stats)};
  NULL_ARG(dc_tcp_store_server_stats(NULL, &stats));
  NULL_ARG(dc_tcp_store_server_stats(s, NULL));
  dc_buf text = {0};
  NULL_ARG(dc_tcp_store_server_metrics(NULL, &text));
  NULL_ARG(dc_tcp_store_server_metrics(s, NULL));
  NULL_ARG(dc_tcp_store_counters(NULL, counters, 1, &n_counters));
  NULL_ARG(dc_tcp_store_counters(s, NULL, 1, &n_counters));
  NULL_ARG(dc_tcp_store_counters(s, counters, 1, NULL));
  dc_session_options session;
  NULL_ARG(dc_session_options_init(NULL, sizeof(dc_session_options)));
  CHECK_OK(dc_session_options_init(&session, sizeof session));
  session.rank = 0;
  NULL_ARG(dc_tcp_store_open_session(s, &session)); /* group NULL */
  session.group = "g/";
  NULL_ARG(dc_tcp_store_open_session(NULL, &session));
  NULL_ARG(dc_tcp_store_open_session(s, NULL));
  NULL_ARG(dc_tcp_store_close_session(NULL));
  dc_store *view = NULL;
  NULL_ARG(dc_tcp_store_leased(NULL, &view));
  NULL_ARG(dc_tcp_store_leased(s, NULL));
  uint64_t epoch = 0;
  size_t n_members = 0;
  dc_member member;
  NULL_ARG(dc_tcp_store_members(NULL, &epoch, NULL, 0, &n_members));
  NULL_ARG(dc_tcp_store_members(s, NULL, NULL, 0, &n_members));
  NULL_ARG(dc_tcp_store_members(s, &epoch, NULL, 1, &n_members));
  NULL_ARG(dc_tcp_store_members(s, &epoch, &member, 1, NULL));
  dc_work *watch = NULL;
  NULL_ARG(dc_tcp_store_watch_members(NULL, 0, &watch));
  NULL_ARG(dc_tcp_store_watch_members(s, 0, NULL));
  NULL_ARG(dc_tcp_store_report_error(NULL, "m"));
  NULL_ARG(dc_tcp_store_report_error(s, NULL));
  /* EtcdStore sessions: NULL, or a store that is not an EtcdStore. */
  NULL_ARG(dc_etcd_store_open_session(NULL, &session));
  NULL_ARG(dc_etcd_store_open_session(s, NULL));
  CHECK_STATUS(dc_etcd_store_open_session(s, &session), DC_ERR_INVALID_ARGUMENT); /* a TCPStore */
  NULL_ARG(dc_etcd_store_close_session(NULL));
  NULL_ARG(dc_etcd_store_report_error(NULL, "m"));
  NULL_ARG(dc_etcd_store_report_error(s, NULL));
  NULL_ARG(dc_etcd_store_leased(NULL, &view));
  CHECK_STATUS(dc_etcd_store_leased(s, &view), DC_ERR_INVALID_ARGUMENT); /* a TCPStore */

  /* Elastic helpers. */
  NULL_ARG(dc_elastic_barrier(NULL, 1, "b", 10));
  NULL_ARG(dc_elastic_barrier(s, 1, NULL, 10));
  NULL_ARG(dc_elastic_barrier_traced(NULL, 1, "b", 10, 0, 10));
  NULL_ARG(dc_elastic_barrier_traced(s, 1, NULL, 10, 0, 10));
  NULL_ARG(dc_elastic_synchronize(NULL, (const uint8_t *)"d", 1, 0, 1, "p", 10, &arr));
  NULL_ARG(dc_elastic_synchronize(s, NULL, 1, 0, 1, "p", 10, &arr));
  NULL_ARG(dc_elastic_synchronize(s, (const uint8_t *)"d", 1, 0, 1, NULL, 10, &arr));
  NULL_ARG(dc_elastic_synchronize(s, (const uint8_t *)"d", 1, 0, 1, "p", 10, NULL));
  NULL_ARG(dc_elastic_get_all(NULL, 0, "p", 1, &arr));
  NULL_ARG(dc_elastic_get_all(s, 0, NULL, 1, &arr));
  NULL_ARG(dc_elastic_get_all(s, 0, "p", 1, NULL));

  /* RPC and RRefs (no group is joined: every call fails on its NULL first). */
  dc_rpc *rpc = NULL;
  dc_rref *rref = NULL;
  dc_rpc_options ro;
  dc_rref_debug_info info = {.struct_size = sizeof(dc_rref_debug_info)};
  const dc_rref *null_rrefs[1] = {NULL};
  NULL_ARG(dc_rpc_options_init(NULL, sizeof(dc_rpc_options)));
  NULL_ARG(dc_rpc_init(NULL, "w", 0, 1, NULL, &rpc));
  NULL_ARG(dc_rpc_init(s, NULL, 0, 1, NULL, &rpc));
  NULL_ARG(dc_rpc_init(s, "w", 0, 1, NULL, NULL));
  NULL_ARG(dc_rpc_register_function(NULL, "f", NULL, NULL));
  NULL_ARG(dc_rpc_shutdown(NULL, true, 10));
  NULL_ARG(dc_rpc_sync(NULL, "w", "f", NULL, 0, NULL, 0, 10, &buf));
  NULL_ARG(dc_rpc_async(NULL, "w", "f", NULL, 0, NULL, 0, 10, &w));
  NULL_ARG(dc_rpc_remote(NULL, "w", "f", NULL, 0, NULL, 0, 10, &rref));
  NULL_ARG(dc_rpc_worker_id(NULL, "w", &i32));
  NULL_ARG(dc_rpc_self_name(NULL, &buf));
  NULL_ARG(dc_rpc_debug_info(NULL, &info));
  NULL_ARG(dc_rpc_reply_set(NULL, NULL, 0));
  NULL_ARG(dc_rpc_reply_set_error(NULL, "x"));
  NULL_ARG(dc_rref_new(NULL, NULL, 0, &rref));
  NULL_ARG(dc_rref_clone(NULL, &rref));
  NULL_ARG(dc_rref_to_here(NULL, 10, &buf));
  NULL_ARG(dc_rref_local_value(NULL, &buf));
  NULL_ARG(dc_rref_owner_id(NULL, &i32));
  NULL_ARG(dc_rref_owner_name(NULL, &buf));
  NULL_ARG(dc_rref_is_owner(NULL, &flag));
  NULL_ARG(dc_rref_confirmed_by_owner(NULL, &flag));
  (void)ro;
  (void)null_rrefs;
  dc_rpc_free(NULL);
  dc_rref_free(NULL);

  /* Work. */
  NULL_ARG(dc_work_new(0, 0, NULL, -1, NULL));
  NULL_ARG(dc_work_new_future(NULL));
  NULL_ARG(dc_work_is_completed(NULL, &flag));
  NULL_ARG(dc_work_is_completed(w, NULL));
  NULL_ARG(dc_work_is_success(NULL, &flag));
  NULL_ARG(dc_work_is_success(w, NULL));
  NULL_ARG(dc_work_error(NULL, &st, &buf));
  NULL_ARG(dc_work_error(w, NULL, &buf));
  NULL_ARG(dc_work_wait(NULL, 10));
  NULL_ARG(dc_work_finish(NULL, DC_OK, NULL));
  NULL_ARG(dc_work_finish_and_throw(NULL, DC_OK, NULL));
  NULL_ARG(dc_work_finish_with_result(NULL, (const uint8_t *)"r", 1));
  NULL_ARG(dc_work_finish_with_result(w, NULL, 1));
  NULL_ARG(dc_work_abort(NULL));
  NULL_ARG(dc_work_synchronize(NULL));
  NULL_ARG(dc_work_source_rank(NULL, &i32));
  NULL_ARG(dc_work_source_rank(w, NULL));
  NULL_ARG(dc_work_set_source_rank(NULL, 1));
  NULL_ARG(dc_work_result(NULL, &buf));
  NULL_ARG(dc_work_result(w, NULL));
  NULL_ARG(dc_work_duration(NULL, &secs));
  NULL_ARG(dc_work_duration(w, NULL));
  NULL_ARG(dc_work_sequence_number(NULL, &u64));
  NULL_ARG(dc_work_sequence_number(w, NULL));
  NULL_ARG(dc_work_rank(NULL, &i32));
  NULL_ARG(dc_work_rank(w, NULL));
  NULL_ARG(dc_work_op_type(NULL, &i32));
  NULL_ARG(dc_work_op_type(w, NULL));
  NULL_ARG(dc_work_timeout(NULL, &i64));
  NULL_ARG(dc_work_timeout(w, NULL));
  NULL_ARG(dc_work_add_done_callback(NULL, NULL, NULL));
  NULL_ARG(dc_work_add_done_callback(w, NULL, NULL));
  NULL_ARG(dc_work_fd(NULL, &fd));
  NULL_ARG(dc_work_fd(w, NULL));
  NULL_ARG(dc_set_profiler_hooks(begin_hook, NULL, NULL));
  /* EtcdStore. */
  dc_etcd_store_options etcd_opts;
  NULL_ARG(dc_etcd_store_options_init(NULL, sizeof(dc_etcd_store_options)));
  CHECK_OK(dc_etcd_store_options_init(&etcd_opts, sizeof etcd_opts));
  NULL_ARG(dc_etcd_store_new(NULL, &s));
  NULL_ARG(dc_etcd_store_new(&etcd_opts, NULL));
  etcd_opts.num_endpoints = 1; /* with NULL endpoints */
  NULL_ARG(dc_etcd_store_new(&etcd_opts, &s));

  /* A NULL log callback is no error: it sends lines back to stderr. */
  CHECK_OK(dc_set_log_callback(DC_LOG_LEVEL_WARN, NULL, NULL));

  /* Nothing above changed the store or the work. */
  CHECK_OK(dc_store_num_keys(s, &i64));
  CHECK(i64 == 0);
  CHECK_OK(dc_work_is_completed(w, &flag));
  CHECK(!flag);

  /* Freeing NULL is a no-op; never-NULL getters. */
  dc_store_free(NULL);
  dc_work_free(NULL);
  dc_buf_free(NULL);
  dc_buf_array_free(NULL);
  dc_store_timeout_guard_free(NULL);
  CHECK(dc_last_error_message() != NULL);
  CHECK(dc_status_str(12345) != NULL);
  CHECK(dc_version() != NULL);

  dc_work_free(w);
  dc_store_free(s);
  printf("test_null_args: ok\n");
  return 0;
}
