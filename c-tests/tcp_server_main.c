/* A TCPStore server embedded in a C program, for the PyTorch interop tests:
 *   tcp_server_main [WORLD_SIZE]
 * prints "port N" once listening, "joined" once WORLD_SIZE handles (itself
 * included) counted in, then serves until stdin closes; on the way out it
 * prints "stats connections=C pending_waits=W keys=K". */
#include <stdlib.h>

#include "check.h"

int main(int argc, char **argv) {
  dc_tcp_store_options opts;
  dc_store *server = NULL;
  uint16_t port = 0;
  CHECK_OK(dc_tcp_store_options_init(&opts, sizeof opts));
  opts.is_server = true;
  opts.bind_address = "127.0.0.1";
  opts.timeout_ms = 60000;
  opts.world_size = argc > 1 ? atoi(argv[1]) : -1;
  opts.wait_for_workers = false;
  CHECK_OK(dc_tcp_store_new(&opts, &server));
  CHECK_OK(dc_tcp_store_port(server, &port));
  printf("port %u\n", port);
  fflush(stdout);
  if (opts.world_size > 0) {
    CHECK_OK(dc_tcp_store_wait_for_workers(server));
    printf("joined\n");
    fflush(stdout);
  }
  char line[256];
  while (fgets(line, sizeof line, stdin) != NULL) {
    if (strncmp(line, "stats", 5) == 0) {
      dc_server_stats st = {.struct_size = sizeof(dc_server_stats)};
      CHECK_OK(dc_tcp_store_server_stats(server, &st));
      printf("stats connections=%llu pending_waits=%llu keys=%llu\n", (unsigned long long)st.connections,
             (unsigned long long)st.pending_waits, (unsigned long long)st.keys);
      fflush(stdout);
    }
  }
  dc_store_free(server);
  return 0;
}
