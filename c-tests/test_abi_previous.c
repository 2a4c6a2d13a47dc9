/* A program built against the header of an earlier release (the committed
 * abi/distcore-<version>.h) runs with the library being tested: the
 * versioned structs it passes and receives are as its header knew them,
 * and the fields added since keep their defaults. When a release grows a
 * struct, this keeps proving the older size still works. */
#include "distcore-1.0.0.h" /* first: check.h's own #include is then a no-op */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

static dc_status echo(const uint8_t *args, size_t len, const dc_rref *const *rrefs, size_t n,
                      int32_t caller, dc_rpc_reply *reply, void *user_data) {
  (void)rrefs, (void)n, (void)caller, (void)user_data;
  return dc_rpc_reply_set(reply, args, len);
}

int main(void) {
  /* The library is at least the header's version, of the same major. */
  unsigned major = 0, minor = 0;
  CHECK(sscanf(dc_version(), "%u.%u", &major, &minor) == 2);
  CHECK(major == DC_VERSION_MAJOR && minor + 1 > DC_VERSION_MINOR);

  /* Options of this header's size: init writes no more, new reads no more. */
  struct {
    dc_tcp_store_options opts;
    unsigned char canary[64];
  } padded;
  memset(padded.canary, 0xAB, sizeof padded.canary);
  CHECK_OK(dc_tcp_store_options_init(&padded.opts, sizeof padded.opts));
  CHECK(padded.opts.struct_size == sizeof padded.opts);
  for (size_t i = 0; i < sizeof padded.canary; i++) CHECK(padded.canary[i] == 0xAB);
  padded.opts.is_server = true;
  padded.opts.timeout_ms = 30000;
  dc_store *server = NULL, *client = NULL;
  CHECK_OK(dc_tcp_store_new(&padded.opts, &server));
  uint16_t port = 0;
  CHECK_OK(dc_tcp_store_port(server, &port));
  padded.opts.is_server = false;
  padded.opts.port = port;
  CHECK_OK(dc_tcp_store_new(&padded.opts, &client));
  CHECK_OK(dc_store_set(client, "k", (const uint8_t *)"v", 1));
  dc_buf value = {0};
  CHECK_OK(dc_store_get(server, "k", &value));
  CHECK_BUF(value, "v");
  dc_buf_free(&value);

  /* Stats of this header's size. */
  dc_server_stats stats;
  memset(&stats, 0, sizeof stats);
  stats.struct_size = sizeof stats;
  CHECK_OK(dc_tcp_store_server_stats(server, &stats));
  CHECK(stats.struct_size == sizeof stats);
  CHECK(stats.keys == 1 && stats.connections >= 1);

  /* A struct_size no header had is refused with how to set it. */
  stats.struct_size = 3;
  CHECK_STATUS(dc_tcp_store_server_stats(server, &stats), DC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(dc_last_error_message(), "struct_size") != NULL);
  padded.opts.struct_size = 0;
  CHECK_STATUS(dc_tcp_store_new(&padded.opts, &client), DC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(dc_last_error_message(), "dc_tcp_store_options_init") != NULL);

  /* RPC options and debug info of this header's size. */
  dc_rpc_function_entry functions[] = {{"echo", echo, NULL}};
  dc_rpc_options ro;
  CHECK_OK(dc_rpc_options_init(&ro, sizeof ro));
  ro.functions = functions;
  ro.num_functions = 1;
  dc_rpc *rpc = NULL;
  CHECK_OK(dc_rpc_init(client, "only", 0, 1, &ro, &rpc));
  dc_buf out = {0};
  CHECK_OK(dc_rpc_sync(rpc, "only", "echo", (const uint8_t *)"hi", 2, NULL, 0, DC_TIMEOUT_DEFAULT,
                       &out));
  CHECK_BUF(out, "hi");
  dc_buf_free(&out);
  dc_rref_debug_info info;
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK_OK(dc_rpc_debug_info(rpc, &info));
  CHECK(info.struct_size == sizeof info);
  CHECK_OK(dc_rpc_shutdown(rpc, true, DC_TIMEOUT_DEFAULT));
  dc_rpc_free(rpc);

  dc_store_free(client);
  dc_store_free(server);
  printf("test_abi_previous: ok\n");
  return 0;
}
