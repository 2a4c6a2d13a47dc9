/* An etcd member for the C and C++ tests: started on free loopback ports
 * with its data under `dir` (etcd from the Debian package etcd-server; a
 * test fails without it), killed by its PID by the test. */
#ifndef DISTCORE_ETCD_MEMBER_H
#define DISTCORE_ETCD_MEMBER_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include "check.h"

/* A loopback port free now. */
static uint16_t etcd_member_free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  CHECK(fd >= 0 && bind(fd, (struct sockaddr *)&addr, sizeof addr) == 0);
  CHECK(getsockname(fd, (struct sockaddr *)&addr, &len) == 0);
  close(fd);
  return ntohs(addr.sin_port);
}

/* Starts a one-member cluster with its data in `dir`; writes its client
 * "127.0.0.1:PORT" into `endpoint`. Its PID (it may still be starting). */
static pid_t start_etcd(const char *dir, char *endpoint, size_t size) {
  uint16_t client = etcd_member_free_port(), peer = etcd_member_free_port();
  char client_url[64], peer_url[64], cluster[80], data[512];
  snprintf(client_url, sizeof client_url, "http://127.0.0.1:%u", client);
  snprintf(peer_url, sizeof peer_url, "http://127.0.0.1:%u", peer);
  snprintf(cluster, sizeof cluster, "t=%s", peer_url);
  snprintf(data, sizeof data, "%s/data", dir);
  snprintf(endpoint, size, "127.0.0.1:%u", client);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    CHECK(freopen("/dev/null", "w", stdout) != NULL);
    CHECK(freopen("/dev/null", "w", stderr) != NULL);
    execlp("etcd", "etcd", "--name", "t", "--data-dir", data, "--listen-client-urls", client_url,
           "--advertise-client-urls", client_url, "--listen-peer-urls", peer_url,
           "--initial-advertise-peer-urls", peer_url, "--initial-cluster", cluster, (char *)NULL);
    _exit(127); /* etcd is not installed */
  }
  return pid;
}

#endif
