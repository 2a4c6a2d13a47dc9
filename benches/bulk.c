/* The physical floor of the large-value scenario: a value sent over
 * loopback TCP and echoed back (as set + get move it), between two threads
 * with blocking sockets, counting both directions.
 *   bulk MIB REPS -> "reused X fresh Y" (MB/s)
 * reused: both ends receive into buffers written before (a pure copy);
 * fresh: each receive goes into a newly allocated buffer, as a store that
 * keeps the value and a client that returns it must, with transparent huge
 * pages asked for as distcore does. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static size_t len;
static int reps, fresh;

static void xfer(int fd, char *b, int sending) {
  for (size_t done = 0; done < len;) {
    ssize_t n = sending ? write(fd, b + done, len - done) : read(fd, b + done, len - done);
    if (n <= 0) exit(1);
    done += (size_t)n;
  }
}

static char *buffer(char *reused) {
  if (!fresh) return reused;
  char *p = calloc(1, len);
  uintptr_t start = ((uintptr_t)p + 4095) & ~(uintptr_t)4095, end = ((uintptr_t)p + len) & ~(uintptr_t)4095;
  if (len >= (4u << 20) && end > start) madvise((void *)start, end - start, MADV_HUGEPAGE);
  return p;
}

static void *echo(void *arg) {
  int fd = *(int *)arg;
  char *kept = malloc(len);
  memset(kept, 1, len);
  for (int i = 0; i < reps; i++) {
    char *b = buffer(kept);
    xfer(fd, b, 0);
    xfer(fd, b, 1);
    if (b != kept) free(b);
  }
  free(kept);
  return NULL;
}

static double run(void) {
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t al = sizeof a;
  if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1) || getsockname(l, (struct sockaddr *)&a, &al)) exit(1);
  int c = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(c, (struct sockaddr *)&a, sizeof a)) exit(1);
  int s = accept(l, NULL, NULL);
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  pthread_t t;
  pthread_create(&t, NULL, echo, &s);
  char *value = malloc(len);
  memset(value, 'z', len);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < reps; i++) {
    xfer(c, value, 1);
    char *b = buffer(value);
    xfer(c, b, 0);
    if (b != value) free(b);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  pthread_join(t, NULL);
  close(c), close(s), close(l);
  free(value);
  double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  return 2.0 * reps * (double)len / 1e6 / secs;
}

int main(int argc, char **argv) {
  len = (size_t)(argc > 1 ? atoi(argv[1]) : 64) << 20;
  reps = argc > 2 ? atoi(argv[2]) : 5;
  fresh = 0;
  double reused = run();
  fresh = 1;
  printf("reused %.1f fresh %.1f\n", reused, run());
  return 0;
}
