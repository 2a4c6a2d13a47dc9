/* FileStore through the C API: handles in this process and in worker
 * processes (this program re-executed as "test_file_store worker PATH
 * RANK") sharing one file, the refcount, and bad files. */
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

#define WORLD 3

static const uint8_t *bytes(const char *s) { return (const uint8_t *)s; }

static int worker(const char *path, int rank) {
  dc_store *s = NULL;
  int64_t n = 0;
  if (dc_file_store_new(path, WORLD, &s) != DC_OK) return 1;
  for (int i = 0; i < 20; i++)
    if (dc_store_add(s, "counter", 1, &n) != DC_OK) return 1;
  char key[16];
  snprintf(key, sizeof key, "rank%d", rank);
  if (dc_store_set(s, key, bytes("here"), 4) != DC_OK) return 1;
  if (dc_elastic_barrier(s, WORLD, "done", 30000) != DC_OK) return 1;
  dc_store_free(s);
  return 0;
}

static bool exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "worker") == 0) return worker(argv[2], atoi(argv[3]));
  char dir[] = "/tmp/dc-file-store-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[256];
  snprintf(path, sizeof path, "%s/store", dir);

  dc_store *s = NULL;
  CHECK_OK(dc_file_store_new(path, WORLD, &s));
  pid_t pids[WORLD - 1];
  for (int i = 0; i < WORLD - 1; i++) {
    pids[i] = fork();
    CHECK(pids[i] >= 0);
    if (pids[i] == 0) {
      char rank[8];
      snprintf(rank, sizeof rank, "%d", i + 1);
      execl(argv[0], argv[0], "worker", path, rank, (char *)NULL);
      _exit(127);
    }
  }
  int64_t n = 0;
  for (int i = 0; i < 20; i++) CHECK_OK(dc_store_add(s, "counter", 1, &n));
  CHECK_OK(dc_elastic_barrier(s, WORLD, "done", 30000));
  for (int i = 0; i < WORLD - 1; i++) {
    int status = 0;
    CHECK(waitpid(pids[i], &status, 0) == pids[i]);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  dc_buf buf = {0};
  CHECK_OK(dc_store_get(s, "counter", &buf));
  CHECK_BUF(buf, "60");
  dc_buf_free(&buf);
  const char *keys[2] = {"rank1", "rank2"};
  bool flag = false;
  CHECK_OK(dc_store_check(s, keys, 2, &flag));
  CHECK(flag);
  CHECK_OK(dc_store_queue_push(s, "q", bytes("job"), 3));
  CHECK_OK(dc_store_queue_pop(s, "q", false, &buf));
  CHECK_BUF(buf, "job");
  dc_buf_free(&buf);
  CHECK_STATUS(dc_store_queue_pop(s, "q", false, &buf), DC_ERR_QUEUE_EMPTY);
  dc_store_set_timeout(s, 50);
  CHECK_STATUS(dc_store_get(s, "missing", &buf), DC_ERR_TIMEOUT);
  CHECK(strstr(dc_last_error_message(), "Timeout waiting for key: missing") != NULL);
  CHECK(exists(path));
  dc_store_free(s); /* the third of three handles: the file goes */
  CHECK(!exists(path));

  /* Bad paths and files. */
  char missing[300];
  snprintf(missing, sizeof missing, "%s/no/such/dir/store", dir);
  CHECK_STATUS(dc_file_store_new(missing, -1, &s), DC_ERR_IO);
  char junk[256];
  snprintf(junk, sizeof junk, "%s/junk", dir);
  FILE *f = fopen(junk, "w");
  CHECK(f != NULL);
  fputs("definitely not a store log", f);
  fclose(f);
  CHECK_STATUS(dc_file_store_new(junk, -1, &s), DC_ERR_INVALID_ARGUMENT);
  CHECK(remove(junk) == 0);
  CHECK(rmdir(dir) == 0);
  printf("test_file_store: ok\n");
  return 0;
}
