/* Liveness sessions from C (docs/liveness.md): a member process that dies
 * fails the other members' blocked calls at once with DC_ERR_PEER_FAILED,
 * naming it; one that reports an error reaches them with its message; the
 * keys it wrote through its leased view die with it; the options are
 * checked. The members are fork()ed children with handles of
 * their own. */
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

/* Groups named so are recoverable. */
static bool is_recoverable(const char *group) { return strncmp(group, "recover", 7) == 0; }

/* Opens rank `rank` of `group` (world size 3; a TTL of `ttl_ms`, 0: none;
 * recoverable if the group's name says so) on `store`. */
static void join(dc_store *store, const char *group, int32_t rank, int64_t ttl_ms) {
  dc_session_options opts;
  CHECK_OK(dc_session_options_init(&opts, sizeof opts));
  opts.group = group;
  opts.rank = rank;
  opts.world_size = 3;
  opts.ttl_ms = ttl_ms;
  opts.recoverable = is_recoverable(group);
  CHECK_OK(dc_tcp_store_open_session(store, &opts));
}

/* Rank 1 in a child: joins `group` (with a TTL of `ttl_ms`), writes
 * `<group>addr1` through its leased view, tells the parent on `ready`, then (once the parent writes a byte on `go`) reports
 * `report` or, with NULL, kills itself with SIGKILL. */
static pid_t member(uint16_t port, const char *group, const char *report, int64_t ttl_ms,
                    int go[2]) {
  int ready[2];
  CHECK(pipe(ready) == 0 && pipe(go) == 0);
  fflush(NULL);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    alarm(60);
    dc_store *store = tcp_store(false, port);
    join(store, group, 1, ttl_ms);
    dc_store *leased = NULL;
    CHECK_OK(dc_tcp_store_leased(store, &leased));
    char key[64];
    snprintf(key, sizeof key, "%saddr1", group);
    CHECK_OK(dc_store_set(leased, key, (const uint8_t *)"10.0.0.1", 8));
    CHECK(write(ready[1], "r", 1) == 1);
    char c;
    CHECK(read(go[0], &c, 1) == 1);
    if (report == NULL) {
      kill(getpid(), SIGKILL);
    }
    CHECK_OK(dc_tcp_store_report_error(store, report));
    pause();
    _exit(0);
  }
  char c;
  CHECK(read(ready[0], &c, 1) == 1);
  close(ready[0]);
  close(ready[1]);
  return pid;
}

/* Rank 0 blocks in a get on `group` (a key never set) while rank 1 (a
 * child) fails as `report` says, or, with `ttl_ms`, is frozen (SIGSTOP):
 * the get returns DC_ERR_PEER_FAILED with a message holding `expect`. */
static void blocked_get_fails(uint16_t port, const char *group, const char *report,
                              int64_t ttl_ms, const char *expect) {
  dc_store *store = tcp_store(false, port);
  join(store, group, 0, 0);
  int go[2];
  pid_t pid = member(port, group, report, ttl_ms, go);
  if (ttl_ms > 0) {
    CHECK(kill(pid, SIGSTOP) == 0);
  } else {
    CHECK(write(go[1], "g", 1) == 1);
  }
  dc_buf value = {0};
  CHECK_STATUS(dc_store_get(store, "never-set", &value), DC_ERR_PEER_FAILED);
  const char *message = dc_last_error_message();
  char pid_text[32];
  snprintf(pid_text, sizeof pid_text, "pid %d", (int)pid);
  CHECK(strstr(message, "rank 1") != NULL);
  CHECK(strstr(message, pid_text) != NULL);
  CHECK(strstr(message, expect) != NULL);
  /* Later calls of the group fail the same way; closing does not. */
  CHECK_STATUS(dc_store_set(store, "k", (const uint8_t *)"v", 1), DC_OK);
  CHECK_STATUS(dc_store_get(store, "k", &value), DC_ERR_PEER_FAILED);
  CHECK_OK(dc_tcp_store_close_session(store));
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
  close(go[0]);
  close(go[1]);
  dc_store_free(store);
}

/* The keys a member wrote through its leased view are there while it lives
 * and gone once it is killed; `observer` is in no session. */
static void leased_keys_die_with_their_member(dc_store *observer, uint16_t port) {
  const char *key[] = {"leased/addr1"};
  int go[2];
  pid_t pid = member(port, "leased/", NULL, 0, go);
  bool present = false;
  CHECK_OK(dc_store_check(observer, key, 1, &present));
  CHECK(present);
  CHECK(write(go[1], "g", 1) == 1);
  waitpid(pid, NULL, 0);
  for (int i = 0; i < 200 && present; i++) {
    usleep(10 * 1000);
    CHECK_OK(dc_store_check(observer, key, 1, &present));
  }
  CHECK(!present);
  /* Writes through a view whose handle has no session are refused. */
  dc_store *leased = NULL;
  CHECK_OK(dc_tcp_store_leased(observer, &leased));
  CHECK_STATUS(dc_store_set(leased, "k", (const uint8_t *)"v", 1), DC_ERR_INVALID_STATE);
  dc_store_free(leased);
  close(go[0]);
  close(go[1]);
}

/* A recoverable group goes on without a killed member: the survivor's
 * watch completes, the membership shows it alone at a later epoch. */
static void recoverable_group_goes_on(uint16_t port) {
  dc_store *store = tcp_store(false, port);
  join(store, "recover/", 0, 0);
  int go[2];
  pid_t pid = member(port, "recover/", NULL, 0, go);
  uint64_t epoch = 0;
  dc_member members[4];
  size_t n = 0;
  CHECK_OK(dc_tcp_store_members(store, &epoch, members, 4, &n));
  CHECK(n == 2 && members[0].rank == 0 && members[1].rank == 1);
  CHECK(members[1].pid == (uint32_t)pid);
  dc_work *watch = NULL;
  CHECK_OK(dc_tcp_store_watch_members(store, epoch, &watch));
  CHECK(write(go[1], "g", 1) == 1);
  waitpid(pid, NULL, 0);
  CHECK_OK(dc_work_wait(watch, 10000));
  dc_work_free(watch);
  uint64_t later = 0;
  CHECK_OK(dc_tcp_store_members(store, &later, NULL, 0, &n));
  CHECK(later > epoch && n == 1);
  /* The survivor's calls go on. */
  CHECK_OK(dc_store_set(store, "recover/k", (const uint8_t *)"v", 1));
  dc_buf value = {0};
  CHECK_OK(dc_store_get(store, "recover/k", &value));
  dc_buf_free(&value);
  /* A fate-sharing group has no membership to read. */
  CHECK_OK(dc_tcp_store_close_session(store));
  join(store, "plain/", 0, 0);
  CHECK_STATUS(dc_tcp_store_members(store, &epoch, NULL, 0, &n), DC_ERR_INVALID_STATE);
  CHECK_OK(dc_tcp_store_close_session(store));
  close(go[0]);
  close(go[1]);
  dc_store_free(store);
}

int main(void) {
  dc_store *server = tcp_store(true, 0);
  uint16_t port = 0;
  CHECK_OK(dc_tcp_store_port(server, &port));

  blocked_get_fails(port, "killed/", NULL, 0, "connection was lost");
  blocked_get_fails(port, "reported/", "loss is NaN", 0, "it reported: loss is NaN");
  blocked_get_fails(port, "frozen/", NULL, 1000, "within its TTL");
  leased_keys_die_with_their_member(server, port);
  recoverable_group_goes_on(port);

  /* Options are checked before anything is sent. */
  dc_session_options opts;
  CHECK_OK(dc_session_options_init(&opts, sizeof opts));
  CHECK_STATUS(dc_tcp_store_open_session(server, &opts), DC_ERR_INVALID_ARGUMENT);
  opts.group = "job/";
  CHECK_STATUS(dc_tcp_store_open_session(server, &opts), DC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(dc_last_error_message(), "rank") != NULL);
  opts.rank = 3;
  opts.world_size = 3;
  CHECK_STATUS(dc_tcp_store_open_session(server, &opts), DC_ERR_INVALID_ARGUMENT);
  opts.rank = 0;
  opts.ttl_ms = 10;
  CHECK_STATUS(dc_tcp_store_open_session(server, &opts), DC_ERR_INVALID_ARGUMENT);
  CHECK(strstr(dc_last_error_message(), "TTL") != NULL);
  opts.struct_size = 3;
  CHECK_STATUS(dc_tcp_store_open_session(server, &opts), DC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(dc_tcp_store_close_session(server), DC_ERR_INVALID_STATE);
  /* A session that leaves gracefully. */
  join(server, "job/", 0, 0);
  CHECK_OK(dc_tcp_store_close_session(server));
  dc_store_free(server);
  puts("sessions ok");
  return 0;
}
