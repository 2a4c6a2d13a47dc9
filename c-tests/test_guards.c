/* A TCPStore server guarded through the C options: a shared secret (right,
 * wrong, missing), an allow list that is not one, quotas, the metrics
 * an embedded server gives, and TLS (the certificates of tests/tls). */
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

#ifndef DC_TEST_TLS_DIR
#error "DC_TEST_TLS_DIR (the tests/tls directory) must be defined"
#endif
#define TLS_FILE(name) DC_TEST_TLS_DIR "/" name

/* A TLS server whose own handle connects over TLS, a TLS client sharing its
 * store, a client in clear refused, and TLS files that do not go together. */
static void test_tls(void) {
  dc_tcp_store_options opts = options(0);
  opts.is_server = true;
  opts.bind_address = "127.0.0.1";
  opts.tls_cert_file = TLS_FILE("server.pem");
  opts.tls_key_file = TLS_FILE("server.key");
  opts.tls_ca_file = TLS_FILE("ca.pem");
  dc_store *server = NULL;
  CHECK_OK(dc_tcp_store_new(&opts, &server));
  uint16_t port = 0;
  CHECK_OK(dc_tcp_store_port(server, &port));
  CHECK_OK(dc_store_set(server, "k", (const uint8_t *)"v", 1));

  /* A client trusting the CA: in, over TLS. */
  dc_tcp_store_options client_opts = options(port);
  client_opts.tls_ca_file = TLS_FILE("ca.pem");
  dc_store *client = NULL;
  CHECK_OK(dc_tcp_store_new(&client_opts, &client));
  dc_buf value = {0};
  CHECK_OK(dc_store_get(client, "k", &value));
  CHECK_BUF(value, "v");
  dc_buf_free(&value);
  CHECK_OK(dc_store_set(client, "k2", (const uint8_t *)"over TLS", 8));
  CHECK_OK(dc_store_get(server, "k2", &value));
  CHECK_BUF(value, "over TLS");
  dc_buf_free(&value);

  /* In clear: refused at once, saying that TLS is required. */
  dc_tcp_store_options clear_opts = options(port);
  dc_store *refused = NULL;
  CHECK_STATUS(dc_tcp_store_new(&clear_opts, &refused), DC_ERR_PERMISSION_DENIED);
  CHECK(strstr(dc_last_error_message(), "TLS") != NULL);
  CHECK(refused == NULL);

  /* A client's certificate without its key: the caller's error. */
  dc_tcp_store_options bad = options(port);
  bad.tls_ca_file = TLS_FILE("ca.pem");
  bad.tls_cert_file = TLS_FILE("client.pem");
  CHECK_STATUS(dc_tcp_store_new(&bad, &refused), DC_ERR_INVALID_ARGUMENT);
  CHECK(refused == NULL);

  /* The server went on serving. */
  CHECK_OK(dc_store_get(client, "k", &value));
  CHECK_BUF(value, "v");
  dc_buf_free(&value);
  dc_store_free(client);
  dc_store_free(server);
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
  test_tls();
  printf("test_guards: ok\n");
  return 0;
}
