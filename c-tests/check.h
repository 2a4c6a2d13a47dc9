/* Minimal assertions for the C tests: print where and why, then exit 1. */
#ifndef DISTCORE_CHECK_H
#define DISTCORE_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <distcore.h>

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__,     \
              #cond);                                                      \
      exit(1);                                                             \
    }                                                                      \
  } while (0)

/* Checks that `expr` returns the status `want`. */
#define CHECK_STATUS(expr, want)                                           \
  do {                                                                     \
    dc_status got_ = (expr);                                               \
    if (got_ != (want)) {                                                  \
      fprintf(stderr, "%s:%d: %s returned %d (%s: %s), expected %d\n",     \
              __FILE__, __LINE__, #expr, got_, dc_status_str(got_),        \
              dc_last_error_message(), (want));                            \
      exit(1);                                                             \
    }                                                                      \
  } while (0)

#define CHECK_OK(expr) CHECK_STATUS(expr, DC_OK)

/* Checks that a dc_buf holds exactly the NUL-terminated text `want`. */
#define CHECK_BUF(buf, want)                                               \
  do {                                                                     \
    CHECK((buf).len == strlen(want));                                      \
    CHECK(memcmp((buf).data, (want), (buf).len) == 0);                     \
    CHECK((buf).data[(buf).len] == 0);                                     \
  } while (0)

/* A TCPStore handle on loopback with a 30 s timeout: a server (port 0: an
 * ephemeral one) or a client of `port`. Fails the test if it cannot. */
static inline dc_store *tcp_store(bool is_server, uint16_t port) {
  dc_tcp_store_options opts;
  CHECK_OK(dc_tcp_store_options_init(&opts, sizeof opts));
  opts.is_server = is_server;
  opts.port = port;
  opts.timeout_ms = 30000;
  dc_store *s = NULL;
  CHECK_OK(dc_tcp_store_new(&opts, &s));
  return s;
}

#endif
