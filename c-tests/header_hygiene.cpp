/* The header next to user code that uses the names a C program commonly
 * does: it must define and declare nothing outside dc_ / DC_ / DISTCORE_.
 * Compiled as C99 and as C++17 with -Wall -Wextra -pedantic -Werror; the
 * C++ build also includes the C++ wrapper, whose names live in namespace
 * distcore (its only macros are DISTCORE_ ones) and which includes no POSIX
 * header. */
#include <distcore.h>
#include <distcore.hpp>

/* The wrapper is standard C++ only: no POSIX header comes with it (its
 * macros and names, read, write, close..., would be the user's problem). */
#if defined(__cplusplus) && (defined(_UNISTD_H) || defined(_FCNTL_H) || defined(_SYS_SOCKET_H))
#error "distcore.hpp includes a POSIX header"
#endif

enum state { READY, NOT_READY, RUNNING, STOP_WAITING, WAIT_CANCELED };
enum { VALIDATE_MAGIC = 1, HELLO_NONCE = 2, HELLO_ACK = 3, DEFAULT_MAX_VALUE_LEN = 4 };

/* Common names the wrapper must not take from the global namespace. */
struct Store {};
struct Work {};
struct Error {};
static int check(int x) { return x; }

int main(void) {
  enum state s = READY;
  Store st;
  Work w;
  Error e;
  (void)st, (void)w, (void)e;
  return check((int)s + VALIDATE_MAGIC + HELLO_NONCE + HELLO_ACK + DEFAULT_MAX_VALUE_LEN - 10 + DC_OK +
               (distcore::kVersionMajor == DC_VERSION_MAJOR ? 0 : 1));
}
