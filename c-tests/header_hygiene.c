/* The header next to user code that uses the names a C program commonly
 * does: it must define and declare nothing outside dc_ / DC_ / DISTCORE_.
 * Compiled as C99 and as C++17 with -Wall -Wextra -pedantic -Werror. */
#include <distcore.h>

enum state { READY, NOT_READY, RUNNING, STOP_WAITING, WAIT_CANCELED };
enum { VALIDATE_MAGIC = 1, HELLO_NONCE = 2, HELLO_ACK = 3, DEFAULT_MAX_VALUE_LEN = 4 };

int main(void) {
  enum state s = READY;
  return (int)s + VALIDATE_MAGIC + HELLO_NONCE + HELLO_ACK + DEFAULT_MAX_VALUE_LEN - 10 + DC_OK;
}
