/* A TCPStore server guarded through the C options: a shared secret (right,
 * wrong, missing), an allow list that is not one, quotas, and the metrics
 * an embedded server gives. */
#include <stdio.h>
#include <string.h>

#include "check.h"

static const uint8_t SECRET[] = "a shared secret";

static dc_tcp_store_options options(uint16_t port) {
  dc_tcp_store_options opts;
  CHECK_OK(dc_tcp_store_options_init(&opts, sizeof opts));
  opts.host = "127.0.0.1";
  opts.port = port;
  opts.timeout_ms = 5000;
  return opts;
}

int main(void) {
  dc_tcp_store_options opts = options(0);
  opts.is_server = true;
  opts.bind_address = "127.0.0.1";
  opts.secret = SECRET;
  opts.secret_len = sizeof SECRET - 1;
  opts.max_keys = 2;
  dc_store *server = NULL;
  CHECK_OK(dc_tcp_store_new(&opts, &server));
  uint16_t port = 0;
  CHECK_OK(dc_tcp_store_port(server, &port));

  /* The right secret: in. */
  dc_tcp_store_options client_opts = options(port);
  client_opts.secret = SECRET;
  client_opts.secret_len = sizeof SECRET - 1;
  dc_store *client = NULL;
  CHECK_OK(dc_tcp_store_new(&client_opts, &client));
  CHECK_OK(dc_store_set(client, "k", (const uint8_t *)"v", 1));

  /* Quotas: a second key fits, a third does not, and the store goes on. */
  int64_t n = 0;
  CHECK_OK(dc_store_add(client, "counter", 1, &n));
  CHECK_STATUS(dc_store_add(client, "third", 1, &n), DC_ERR_QUOTA_EXCEEDED);
  CHECK(strstr(dc_last_error_message(), "maximum of 2 keys") != NULL);
  CHECK_OK(dc_store_add(client, "counter", 1, &n));
  CHECK(n == 2);

  /* A wrong secret, no secret: refused at once, saying why. */
  dc_store *refused = NULL;
  client_opts.secret = (const uint8_t *)"a guess";
  client_opts.secret_len = 7;
  CHECK_STATUS(dc_tcp_store_new(&client_opts, &refused), DC_ERR_PERMISSION_DENIED);
  CHECK(strstr(dc_last_error_message(), "wrong secret") != NULL);
  client_opts.secret = NULL;
  CHECK_STATUS(dc_tcp_store_new(&client_opts, &refused), DC_ERR_INVALID_ARGUMENT); /* NULL, 7 bytes */
  client_opts.secret_len = 0;
  CHECK_STATUS(dc_tcp_store_new(&client_opts, &refused), DC_ERR_PERMISSION_DENIED);
  CHECK(strstr(dc_last_error_message(), "requires authentication") != NULL);
  CHECK(refused == NULL);

  /* Bad guard options are the caller's error. */
  client_opts.secret = SECRET;
  client_opts.secret_len = 0;
  CHECK_STATUS(dc_tcp_store_new(&client_opts, &refused), DC_ERR_INVALID_ARGUMENT);
  dc_tcp_store_options bad = options(0);
  bad.is_server = true;
  bad.allow = "10.0.0.1/8";
  CHECK_STATUS(dc_tcp_store_new(&bad, &refused), DC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(dc_last_error_message(), "did you mean 10.0.0.0/8?") != NULL);

  /* Metrics: Prometheus text, every name prefixed. */
  dc_buf text = {0};
  CHECK_OK(dc_tcp_store_server_metrics(server, &text));
  CHECK(text.data[text.len] == '\0');
  CHECK(strstr((const char *)text.data, "distcore_quota_refusals_total{quota=\"keys\"} 1") != NULL);
  CHECK(strstr((const char *)text.data, "distcore_connections_refused_total{reason=\"authentication_failed\"} 1") !=
        NULL);
  dc_buf_free(&text);
  CHECK_STATUS(dc_tcp_store_server_metrics(client, &text), DC_ERR_INVALID_ARGUMENT);

  dc_store_free(client);
  dc_store_free(server);
  printf("test_guards: ok\n");
  return 0;
}
