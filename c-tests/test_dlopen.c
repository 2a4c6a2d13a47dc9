/* Loads libdistcore.so with dlopen/dlsym only (no link-time dependency), as
 * an FFI host would, and drives a store and a work through it. */
#include <dlfcn.h>

#include "check.h"

#define LOAD(lib, name) ((__typeof__(&name))load_symbol(lib, #name))

static void *load_symbol(void *lib, const char *name) {
  void *sym = dlsym(lib, name);
  if (sym == NULL) {
    fprintf(stderr, "dlsym(%s): %s\n", name, dlerror());
    exit(1);
  }
  return sym;
}

int main(int argc, char **argv) {
  CHECK(argc == 2);
  void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) {
    fprintf(stderr, "dlopen(%s): %s\n", argv[1], dlerror());
    return 1;
  }
  const char *version = LOAD(lib, dc_version)();
  CHECK(version != NULL && strlen(version) >= 5);

  dc_store *s = NULL;
  dc_buf buf = {0};
  CHECK(LOAD(lib, dc_hash_store_new)(&s) == DC_OK);
  CHECK(LOAD(lib, dc_store_set)(s, "k", (const uint8_t *)"dl", 2) == DC_OK);
  CHECK(LOAD(lib, dc_store_get)(s, "k", &buf) == DC_OK);
  CHECK_BUF(buf, "dl");
  LOAD(lib, dc_buf_free)(&buf);
  CHECK(LOAD(lib, dc_store_set)(NULL, "k", NULL, 0) == DC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(LOAD(lib, dc_last_error_message)(), "NULL") != NULL);
  CHECK(strcmp(LOAD(lib, dc_status_str)(DC_ERR_TIMEOUT), "timed out") == 0);

  dc_work *w = NULL;
  CHECK(LOAD(lib, dc_store_get_async)(s, "k", &w) == DC_OK);
  CHECK(LOAD(lib, dc_work_wait)(w, 10000) == DC_OK);
  CHECK(LOAD(lib, dc_work_result)(w, &buf) == DC_OK);
  CHECK_BUF(buf, "dl");
  LOAD(lib, dc_buf_free)(&buf);
  LOAD(lib, dc_work_free)(w);
  LOAD(lib, dc_store_free)(s);
  CHECK(dlclose(lib) == 0);
  printf("test_dlopen: ok (distcore %s)\n", version);
  return 0;
}
