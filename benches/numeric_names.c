/* Preloaded into the PyTorch processes of the benchmarks: getnameinfo
 * answers numerically (NI_NUMERICHOST).
 *
 * PyTorch formats every peer address it logs with getnameinfo, a reverse DNS
 * lookup, whether or not the log line is printed; its libuv server does so
 * on its one event-loop thread. On a machine whose resolver does not answer
 * (a sandbox without network), each lookup waits out the resolver's 5 s
 * timeout, and the figures would measure that wait instead of the store.
 * A working resolver answers in well under a millisecond; this shim stands
 * in for one. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <sys/socket.h>

typedef int (*getnameinfo_fn)(const struct sockaddr *, socklen_t, char *, socklen_t, char *,
                              socklen_t, int);

int getnameinfo(const struct sockaddr *addr, socklen_t addrlen, char *host, socklen_t hostlen,
                char *serv, socklen_t servlen, int flags) {
  static getnameinfo_fn real;
  if (!real) real = (getnameinfo_fn)dlsym(RTLD_NEXT, "getnameinfo");
  return real(addr, addrlen, host, hostlen, serv, servlen, flags | NI_NUMERICHOST);
}
