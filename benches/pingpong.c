/* The physical floor: the median round trip of one byte over loopback TCP
 * between two threads with TCP_NODELAY, blocking sockets.
 *   pingpong OPS -> "rtt median_us p99_us" */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int ops;

static void *echo(void *arg) {
  int fd = *(int *)arg;
  char b;
  for (int i = 0; i < ops; i++) {
    if (read(fd, &b, 1) != 1 || write(fd, &b, 1) != 1) break;
  }
  return NULL;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  ops = argc > 1 ? atoi(argv[1]) : 20000;
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t al = sizeof a;
  if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1) || getsockname(l, (struct sockaddr *)&a, &al)) return 1;
  int c = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(c, (struct sockaddr *)&a, sizeof a)) return 1;
  int s = accept(l, NULL, NULL);
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  pthread_t t;
  pthread_create(&t, NULL, echo, &s);
  double *us = malloc(sizeof(double) * ops);
  char b = 'p';
  for (int i = 0; i < ops; i++) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (write(c, &b, 1) != 1 || read(c, &b, 1) != 1) return 1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    us[i] = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
  }
  pthread_join(t, NULL);
  qsort(us, ops, sizeof(double), cmp);
  printf("rtt %.2f %.2f\n", us[ops / 2], us[ops * 99 / 100]);
  return 0;
}
