// The C++ wrapper <distcore.hpp> end to end: every store type, exceptions
// carrying status and message, Work (async store calls, then-callbacks,
// futures, fds, profiler hooks), a TCPStore server and clients (in clear and
// over TLS), the elastic helpers, RPC between two workers of this process
// (one on a std::thread) with RRefs, log callbacks and the version check.
#include <distcore.hpp>

#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace std::chrono_literals;

// test_cpp_wrapper_tu2.cpp, another translation unit including the header.
const void* distcore_tu2_log_state();
const void* distcore_tu2_profiler_state();
std::string distcore_tu2_roundtrip(const distcore::Store& store);

namespace {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define EXPECT(cond)                                                                          \
  do {                                                                                        \
    if (!(cond)) throw Failure(std::string(__FILE__ ":") + std::to_string(__LINE__) + ": " #cond); \
  } while (0)

// Runs `body`, which must throw an `E`, and returns it.
template <class E, class F>
E expect_throw(F&& body, int line) {
  try {
    body();
  } catch (const E& e) {
    return e;
  } catch (const std::exception& e) {
    throw Failure("line " + std::to_string(line) + ": wrong exception: " + e.what());
  }
  throw Failure("line " + std::to_string(line) + ": no exception");
}
#define EXPECT_THROW(E, body) expect_throw<E>([&] { body; }, __LINE__)

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

#define EXPECT_CONTAINS(text, part)                                                             \
  do {                                                                                          \
    std::string text_(text);                                                                    \
    if (!contains(text_, part))                                                                 \
      throw Failure(std::string(__FILE__ ":") + std::to_string(__LINE__) + ": \"" + text_ +     \
                    "\" does not contain \"" + (part) + "\"");                                  \
  } while (0)

void test_version_and_timeouts() {
  std::string v(distcore::version());
  EXPECT(v == std::to_string(DC_VERSION_MAJOR) + "." + std::to_string(DC_VERSION_MINOR) + "." +
                  std::to_string(DC_VERSION_PATCH));
  distcore::Version rv = distcore::runtime_version();
  EXPECT(rv.major_version == distcore::kVersionMajor && rv.minor_version == distcore::kVersionMinor);
  EXPECT(distcore::version_compatible());
  distcore::check_version();

  // One wrapper per program, however many units include it.
  EXPECT(distcore_tu2_log_state() == &distcore::detail::log_state());
  EXPECT(distcore_tu2_profiler_state() == &distcore::detail::profiler_state());
  distcore::HashStore shared;
  EXPECT(distcore_tu2_roundtrip(shared) == "second unit");
  EXPECT(shared.get("tu2") == "second unit");
  EXPECT(distcore::status_str(DC_ERR_TIMEOUT) == "timed out");
  EXPECT(distcore::op_type_name(DC_OP_TYPE_ALLREDUCE) == "ALLREDUCE");
  EXPECT(distcore::op_type_name(static_cast<dc_op_type>(55)).empty());

  EXPECT(distcore::kDefault.ms() == DC_TIMEOUT_DEFAULT && distcore::kDefault.is_default());
  EXPECT(distcore::kForever.ms() == DC_TIMEOUT_FOREVER && distcore::kForever.is_forever());
  EXPECT(distcore::Timeout(1500us).ms() == 2);  // rounded up, never to "forever"
  EXPECT(distcore::Timeout(2s).ms() == 2000);
  EXPECT(distcore::Timeout(0ms) == distcore::kForever);
  EXPECT(distcore::Timeout() == distcore::kDefault);
  EXPECT(distcore::Timeout(std::chrono::hours::max()) == distcore::kForever);  // beyond int64_t ms
  EXPECT(distcore::Timeout(std::chrono::duration<double>(0.0004)).ms() == 1);
  auto e = EXPECT_THROW(distcore::InvalidArgument, distcore::Timeout(-5ms));
  EXPECT(e.status() == DC_ERR_INVALID_ARGUMENT);

  // check() turns a status into the matching exception with the C message.
  auto e2 = EXPECT_THROW(distcore::Error, distcore::check(dc_hash_store_new(nullptr)));
  EXPECT(e2.status() == DC_ERR_INVALID_ARGUMENT);
  try {
    distcore::check(dc_hash_store_new(nullptr));
    EXPECT(false);
  } catch (const distcore::InvalidArgument& ia) {
    EXPECT(std::strlen(ia.what()) > 0);
  }
}

// Every Store operation, on any store type.
void exercise_store(const distcore::Store& s) {
  s.set("k", "v");
  EXPECT(s.get("k") == "v");
  std::string binary("a\0b", 3);
  s.set("bin", binary);
  EXPECT(s.get("bin") == binary);
  const unsigned char raw[] = {1, 2, 0, 3};
  s.set("raw", raw, sizeof raw);
  EXPECT(s.get("raw") == std::string("\x01\x02\x00\x03", 4));
  std::vector<uint8_t> vec = {9, 8};
  s.set("vec", vec);
  EXPECT(s.get("vec") == "\x09\x08");

  EXPECT(s.add("n", 41) == 41);
  EXPECT(s.add("n", 1) == 42);
  auto bad_add = EXPECT_THROW(distcore::InvalidArgument, s.add("k", 1));
  EXPECT(bad_add.status() == DC_ERR_INVALID_ARGUMENT);

  EXPECT(s.compare_set("k", "v", "w") == "w");
  EXPECT(s.compare_set("k", "nope", "x") == "w");
  EXPECT(s.compare_set("fresh", "", "new") == "new");

  EXPECT(s.delete_key("fresh"));
  EXPECT(!s.delete_key("fresh"));
  EXPECT(s.check({"k", "n"}));
  EXPECT(!s.check({"k", "absent"}));
  s.wait({"k", "n"});
  s.wait({"k"}, 1s);

  s.append("log", "ab");
  s.append("log", std::string_view("cd"));
  s.append("log", "ef", 2);
  EXPECT(s.get("log") == "abcdef");

  s.multi_set({"m1", "m2"}, {"one", "two"});
  std::vector<std::string> got = s.multi_get({"m2", "m1"});
  EXPECT(got.size() == 2 && got[0] == "two" && got[1] == "one");
  EXPECT_THROW(distcore::InvalidArgument, s.multi_set({"a"}, {}));

  int64_t before = s.num_keys();
  s.set("another", "x");
  EXPECT(s.num_keys() == before + 1);
  std::vector<std::string> keys = s.list_keys();
  bool found = false;
  for (const auto& k : keys) found = found || k == "another";
  EXPECT(found);
  s.set("sweep/a", "1");
  s.set("sweep/b", "2");
  EXPECT(s.list_prefix("sweep/").size() == 2);
  EXPECT(s.delete_prefix("sweep/") == 2);
  EXPECT(s.list_prefix("sweep/").empty());

  s.queue_push("q", "first");
  s.queue_push("q", std::string("second"));
  EXPECT(s.queue_len("q") == 2);
  EXPECT(s.queue_pop("q") == "first");
  EXPECT(s.queue_pop("q", false) == "second");
  auto empty = EXPECT_THROW(distcore::QueueEmpty, s.queue_pop("q", false));
  EXPECT(empty.status() == DC_ERR_QUEUE_EMPTY);
  EXPECT(!s.try_queue_pop("q").has_value());
  s.queue_push("q", "third");
  EXPECT(s.try_queue_pop("q").value() == "third");

  s.barrier("solo", 1, 5s);

  // Keys go to C NUL-terminated: one with a NUL inside is refused, not cut.
  EXPECT_THROW(distcore::InvalidArgument, s.set(std::string("a\0b", 3), "v"));
  EXPECT_THROW(distcore::InvalidArgument, s.check({std::string("a\0b", 3)}));
  EXPECT(!s.check({"a"}));

  // Timeouts: the guard, set_timeout, and the errors they produce.
  std::chrono::milliseconds original = s.timeout();
  {
    distcore::StoreTimeoutGuard guard = s.timeout_guard(30ms);
    EXPECT(s.timeout() == 30ms);
    auto t = EXPECT_THROW(distcore::TimeoutError, s.get("never"));
    EXPECT(t.status() == DC_ERR_TIMEOUT);
    // c10d's wording: "wait timeout after 30ms, keys: never" (HashStore,
    // TCPStore), "Timeout waiting for key: never after 30 ms" (FileStore).
    EXPECT_CONTAINS(t.what(), "never");
    std::string what = t.what();
    EXPECT(contains(what, "wait timeout after 30ms") || contains(what, "after 30 ms"));
    // One base class catches them all.
    auto base = EXPECT_THROW(distcore::Error, s.queue_pop("empty-queue"));
    EXPECT(base.status() == DC_ERR_TIMEOUT);
    EXPECT_THROW(distcore::TimeoutError, s.wait({"never"}, 20ms));
  }
  EXPECT(s.timeout() == original);
  s.set_timeout(7s);
  EXPECT(s.timeout() == 7s);
  s.set_timeout(distcore::kForever);
  EXPECT(s.timeout() == 0ms);
  EXPECT_THROW(distcore::InvalidArgument, s.set_timeout(distcore::kDefault));
  s.set_timeout(original);

  // Async calls.
  distcore::Work g = s.get_async("late");
  std::atomic<int> called{0};
  std::string from_callback;
  g.then([&](const distcore::WorkView& w) {
    from_callback = w.result();
    called++;
  });
  EXPECT(!g.is_completed());
  s.set("late", "arrived");
  g.wait(10s);
  EXPECT(g.is_success());
  EXPECT(g.result() == "arrived");
  for (int i = 0; i < 500 && called.load() == 0; ++i) std::this_thread::sleep_for(10ms);
  EXPECT(called.load() == 1 && from_callback == "arrived");

  distcore::Work wk = s.wait_async({"late", "k"});
  wk.wait(10s);
  EXPECT(wk.is_success());
  EXPECT(wk.error().status == DC_OK && wk.error().message.empty());

  distcore::Work qp = s.queue_pop_async("aq");
  s.queue_push("aq", "elem");
  qp.wait(10s);
  EXPECT(qp.result() == "elem");

  distcore::Work b = s.barrier_async("abar", 1);
  b.wait(10s);
  EXPECT(b.is_completed());

  // An aborted async get: wait() throws Aborted, error() reports it.
  distcore::Work ab;
  {
    // Short, so that a FileStore's background get ends soon after the abort.
    distcore::StoreTimeoutGuard guard = s.timeout_guard(200ms);
    ab = s.get_async("never-set");
  }
  ab.abort();
  auto aborted = EXPECT_THROW(distcore::Aborted, ab.wait());
  EXPECT(aborted.status() == DC_ERR_ABORTED);
  EXPECT(ab.error().status == DC_ERR_ABORTED && !ab.error().message.empty());
  EXPECT(!ab.is_success());
  EXPECT_THROW(distcore::Aborted, ab.throw_if_failed());
}

void test_hash_and_prefix_stores() {
  distcore::HashStore hash;
  exercise_store(hash);
  distcore::PrefixStore prefix("pre", hash);
  exercise_store(prefix);
  prefix.set("x", "1");
  EXPECT(hash.get("pre/x") == "1");
  distcore::Store clone = hash.clone();
  EXPECT(clone.get("pre/x") == "1");
  distcore::PrefixStore nested("inner", prefix);
  nested.set("y", "2");
  EXPECT(hash.get("pre/inner/y") == "2");
}

void test_file_store() {
  char dir[] = "/tmp/dc-cpp-wrapper-XXXXXX";
  EXPECT(mkdtemp(dir) != nullptr);
  std::string path = std::string(dir) + "/store";
  {
    distcore::FileStore fs(path);
    exercise_store(fs);
    distcore::FileStore other(path);
    EXPECT(other.get("k") == "w");
    distcore::PrefixStore ps("p", other);
    ps.set("z", "3");
    EXPECT(fs.get("p/z") == "3");
  }
  std::string not_a_store = std::string(dir) + "/garbage";
  {
    std::ofstream out(not_a_store);
    out << "this is not a FileStore log\n";
  }
  auto bad = EXPECT_THROW(distcore::InvalidArgument, (void)distcore::FileStore(not_a_store));
  EXPECT(bad.status() == DC_ERR_INVALID_ARGUMENT && std::strlen(bad.what()) > 0);
  auto io = EXPECT_THROW(distcore::Error, (void)distcore::FileStore(std::string(dir) + "/no/such/dir/store"));
  EXPECT(io.status() == DC_ERR_IO);
  unlink(not_a_store.c_str());
  unlink(path.c_str());
  rmdir(dir);
}

void test_work() {
  // dc_work_new: rank, op type, title, timeout.
  std::atomic<int> begins{0}, ends{0};
  std::string seen_title;
  std::mutex title_mutex;
  distcore::set_profiler_hooks(
      [&](std::string_view title) {
        std::lock_guard<std::mutex> lock(title_mutex);
        seen_title = std::string(title);
        return static_cast<uint64_t>(++begins);
      },
      [&](std::string_view, uint64_t token) {
        if (token != 0) ends++;
        throw distcore::Error(DC_ERR_INTERNAL, "dropped at the boundary");
      });
  {
    distcore::Work w(3, DC_OP_TYPE_ALLREDUCE, "my allreduce", 5s);
    EXPECT(begins.load() == 1 && seen_title == "my allreduce");
    EXPECT(w.rank() == 3);
    EXPECT(w.op_type() == DC_OP_TYPE_ALLREDUCE);
    EXPECT(w.timeout() == 5s);
    EXPECT(!w.is_completed());
    auto t = EXPECT_THROW(distcore::TimeoutError, w.wait(20ms));
    EXPECT_CONTAINS(t.what(), "Operation timed out!");
    EXPECT_THROW(distcore::InvalidState, w.result());
    EXPECT_THROW(distcore::InvalidState, w.duration());
    EXPECT_THROW(distcore::NotSupported, w.source_rank());
    int fd = w.fd();
    EXPECT(fd >= 0);
    pollfd p{fd, POLLIN, 0};
    EXPECT(poll(&p, 1, 0) == 0);
    w.finish_with_result("payload");
    EXPECT(poll(&p, 1, 1000) == 1);
    EXPECT(ends.load() == 1);
    w.wait();
    EXPECT(w.result() == "payload");
    EXPECT(w.result_bytes() == std::vector<uint8_t>({'p', 'a', 'y', 'l', 'o', 'a', 'd'}));
    EXPECT(w.duration().count() >= 0.0);
    EXPECT_THROW(distcore::InvalidState, w.finish());
    w.synchronize();
  }
  distcore::clear_profiler_hooks();
  EXPECT_THROW(distcore::InvalidArgument, distcore::set_profiler_hooks([](std::string_view) { return uint64_t{0}; }, nullptr));

  // Without a title or timeout; a receive's source rank.
  distcore::Work recv(0, DC_OP_TYPE_RECV);
  EXPECT(recv.timeout() == 0ms);
  EXPECT_THROW(distcore::InvalidState, recv.source_rank());
  recv.set_source_rank(2);
  EXPECT(recv.source_rank() == 2);
  recv.finish();
  EXPECT(recv.is_success());
  EXPECT_THROW(distcore::NotSupported, recv.result());
  distcore::Work later(0, DC_OP_TYPE_BARRIER);
  EXPECT(later.sequence_number() > recv.sequence_number());
  later.finish(DC_OK);
  EXPECT(later.is_success());

  // Futures: callbacks before and after completion, errors, exceptions.
  distcore::Work f = distcore::Work::future();
  EXPECT(f.rank() == -1 && f.op_type() == DC_OP_TYPE_UNKNOWN);
  std::vector<std::string> events;
  f.then([&](const distcore::WorkView& w) {
    events.push_back("first:" + std::to_string(w.is_success()) + ":" + w.error().message);
  });
  f.add_done_callback([&](const distcore::WorkView&) {
    events.push_back("throws");
    throw std::runtime_error("dropped at the boundary");
  });
  f.finish(DC_ERR_IO, "disk on fire");
  EXPECT(events.size() == 2 && events[0] == "first:0:disk on fire" && events[1] == "throws");
  f.then([&](const distcore::WorkView& w) { events.push_back("late:" + std::to_string(w.error().status)); });
  EXPECT(events.size() == 3 && events[2] == "late:" + std::to_string(DC_ERR_IO));
  auto io = EXPECT_THROW(distcore::IoError, f.wait());
  EXPECT(std::string(io.what()) == "disk on fire" && io.status() == DC_ERR_IO);
  EXPECT_THROW(distcore::IoError, f.result());

  // finish() with no message: the status's description; finish_and_throw.
  distcore::Work g = distcore::Work::future();
  g.finish(DC_ERR_REMOTE);
  EXPECT(g.error().status == DC_ERR_REMOTE);
  distcore::Work h = distcore::Work::future();
  auto thrown = EXPECT_THROW(distcore::ShutDown, h.finish_and_throw(DC_ERR_SHUT_DOWN, "bye"));
  EXPECT(std::string(thrown.what()) == "bye");
  EXPECT_THROW(distcore::ShutDown, h.wait());

  // Completed on another thread; the view hands out the C handle.
  distcore::Work t = distcore::Work::future();
  distcore::WorkView view = t.view();
  EXPECT(view.native_handle() == t.native_handle());
  std::thread finisher([&t] { t.finish_with_result(std::string_view("from a thread")); });
  t.wait(10s);
  finisher.join();
  EXPECT(view.result() == "from a thread");

  // Moves and reset.
  distcore::Work a = distcore::Work::future();
  distcore::Work b = std::move(a);
  EXPECT(!a && b);
  a = std::move(b);
  EXPECT(a && !b);
  a.finish();
  a.reset();
  EXPECT(!a);
}

void test_tcp_store() {
  // The C++ defaults are dc_tcp_store_options_init's.
  distcore::TCPStoreOptions defaults;
  dc_tcp_store_options c;
  distcore::check(dc_tcp_store_options_init(&c, sizeof c));
  EXPECT(defaults.host == c.host);
  EXPECT(defaults.port == c.port);
  EXPECT(defaults.is_server == c.is_server);
  EXPECT(defaults.world_size == c.world_size);
  EXPECT(defaults.wait_for_workers == c.wait_for_workers);
  EXPECT(defaults.timeout.ms() == c.timeout_ms);
  EXPECT(defaults.multi_tenant == c.multi_tenant);
  EXPECT(defaults.master_listen_fd == c.master_listen_fd);
  EXPECT(defaults.bind_address.empty() && c.bind_address == nullptr);
  EXPECT(defaults.max_value_size == c.max_value_size);

  distcore::TCPStoreOptions server_opts;
  server_opts.is_server = true;
  server_opts.bind_address = "127.0.0.1";
  server_opts.wait_for_workers = false;
  server_opts.timeout = 20s;
  distcore::TCPStore server(server_opts);
  uint16_t port = server.port();
  EXPECT(port != 0);

  distcore::TCPStoreOptions client_opts;
  client_opts.port = port;
  client_opts.timeout = 20s;
  distcore::TCPStore client(client_opts);
  EXPECT(client.port() == port);
  exercise_store(client);
  EXPECT(server.get("k") == "w");
  distcore::PrefixStore over_tcp("tcp", client);
  exercise_store(over_tcp);

  std::vector<distcore::ClientCounter> counters = client.counters();
  bool saw_set = false;
  for (const auto& ctr : counters) saw_set = saw_set || (ctr.op == "set" && ctr.count > 0);
  EXPECT(saw_set);
  dc_server_stats stats = server.server_stats();
  EXPECT(stats.struct_size == sizeof stats);
  EXPECT(stats.connections >= 1);
  EXPECT(stats.keys >= 1);
  auto no_server = EXPECT_THROW(distcore::InvalidArgument, client.server_stats());
  EXPECT(no_server.status() == DC_ERR_INVALID_ARGUMENT);
  client.wait_for_workers();  // no world size: nothing to wait for

  // Liveness sessions: a member's reported error reaches another member's
  // blocked get as PeerFailedError carrying it.
  {
    distcore::TCPStore member = client.clone();
    client.open_session("cpp-job/", 0, 2);
    member.open_session("cpp-job/", 1, 2);
    std::thread reporter([&member] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      member.report_error("out of memory on rank 1");
    });
    auto failed = EXPECT_THROW(distcore::PeerFailedError, client.get("cpp-job/never-set"));
    reporter.join();
    EXPECT(failed.status() == DC_ERR_PEER_FAILED);
    EXPECT(std::string(failed.what()).find("out of memory on rank 1") != std::string::npos);
    client.close_session();
    EXPECT_THROW(distcore::InvalidState, member.close_session());
  }
  // A recoverable group: a member's failure changes the membership.
  {
    distcore::TCPStore member = client.clone();
    client.open_session("cpp-recover/", 0, -1, 0, 0, true);
    member.open_session("cpp-recover/", 1, -1, 0, 0, true);
    distcore::TCPStore::Members before = client.members();
    EXPECT(before.members.size() == 2 && before.members[1].rank == 1);
    distcore::Work watch = client.watch_members(before.epoch);
    member.report_error("rank 1 leaves the quorum");
    watch.wait(std::chrono::milliseconds(10000));
    distcore::TCPStore::Members after = client.members();
    EXPECT(after.epoch > before.epoch && after.members.size() == 1);
    client.set("cpp-recover/k", "v");  // the survivor goes on
    client.close_session();
  }
  // Keys written through a leased view die with the session.
  {
    distcore::TCPStore member = client.clone();
    distcore::TCPStore leased = member.leased();
    EXPECT_THROW(distcore::InvalidState, leased.set("cpp-lease/addr", "x"));
    member.open_session("cpp-lease/", 0);
    leased.set("cpp-lease/addr", "10.0.0.1");
    EXPECT(client.get("cpp-lease/addr") == "10.0.0.1");
    member.close_session();
    EXPECT(!client.check({"cpp-lease/addr"}));
  }

  // A TCPStore clone is a TCPStore (a new connection).
  distcore::TCPStore clone = client.clone();
  EXPECT(clone.port() == port && clone.get("k") == "w");

  // An async get whose callback runs on distcore's async thread.
  std::atomic<bool> done{false};
  std::thread::id callback_thread;
  distcore::Work w = client.get_async("tcp-late");
  w.then([&](const distcore::WorkView& v) {
    callback_thread = std::this_thread::get_id();
    done = v.is_success();
  });
  clone.set("tcp-late", "yes");
  w.wait(10s);
  for (int i = 0; i < 500 && !done.load(); ++i) std::this_thread::sleep_for(10ms);
  EXPECT(done.load() && callback_thread != std::this_thread::get_id());

  // The elastic helpers, two ranks on two threads.
  std::string thread_error;
  std::vector<std::string> synced_by_1, all_by_1;
  std::thread rank1([&] {
    try {
      distcore::TCPStore mine(client_opts);
      distcore::elastic::barrier(mine, 2, "eb", 10s);
      synced_by_1 = distcore::elastic::synchronize(mine, "data1", 1, 2, "sync/", 10s);
      mine.set("ga/1", "v1");
      all_by_1 = distcore::elastic::get_all(mine, 1, "ga/", 2);
    } catch (const std::exception& e) {
      thread_error = e.what();
    }
  });
  distcore::elastic::barrier(server, 2, "eb", 10s);
  std::vector<std::string> synced = distcore::elastic::synchronize(server, "data0", 0, 2, "sync/", 10s);
  server.set("ga/0", "v0");
  std::vector<std::string> all = distcore::elastic::get_all(server, 0, "ga/", 2);
  rank1.join();
  EXPECT(thread_error.empty());
  EXPECT(synced == std::vector<std::string>({"data0", "data1"}));
  EXPECT(synced_by_1 == synced);
  EXPECT(all == std::vector<std::string>({"v0", "v1"}));
  EXPECT(all_by_1 == all);
  auto traced = EXPECT_THROW(distcore::TimeoutError,
                             distcore::elastic::barrier_traced(server, 2, "lonely", 100ms, 0, 100ms));
  EXPECT_CONTAINS(traced.what(), "Timed out waiting on barrier on rank 0");
  EXPECT_CONTAINS(traced.what(), "missing_ranks=[1]");

  // A client with nobody to talk to: a network error after its timeout.
  distcore::TCPStoreOptions lonely;
  lonely.port = port;
  lonely.host = "127.0.0.1";
  lonely.timeout = 300ms;
  {
    distcore::TCPStoreOptions tmp_opts = server_opts;
    tmp_opts.timeout = 5s;
    distcore::TCPStore tmp(tmp_opts);
    lonely.port = tmp.port();
  }
  auto refused = EXPECT_THROW(distcore::Error, distcore::TCPStore(lonely).get("k"));
  EXPECT(refused.status() == DC_ERR_NETWORK || refused.status() == DC_ERR_TIMEOUT);
}

void test_guarded_tcp_store() {
  distcore::TCPStoreOptions o;
  o.is_server = true;
  o.bind_address = "127.0.0.1";
  o.wait_for_workers = false;
  o.timeout = 10s;
  o.secret = std::string("with\0nul", 8);  // any bytes
  o.max_keys = 1;
  distcore::TCPStore server(o);
  server.set("k", "v");
  EXPECT_THROW(distcore::QuotaExceeded, server.add("another", 1));
  distcore::TCPStoreOptions co;
  co.port = server.port();
  co.timeout = 10s;
  co.secret = "wrong";
  auto e = EXPECT_THROW(distcore::PermissionDenied, distcore::TCPStore client(co));
  EXPECT_CONTAINS(std::string(e.what()), "wrong secret");
  const std::string metrics = server.server_metrics();
  EXPECT_CONTAINS(metrics, "distcore_quota_refusals_total{quota=\"keys\"} 1");
  // A bad option still gives the listening socket's fd back to the system.
  int fds[2];
  EXPECT(::pipe(fds) == 0);
  ::close(fds[1]);
  distcore::TCPStoreOptions bad;
  bad.is_server = true;
  bad.master_listen_fd = fds[0];
  bad.host = std::string("a\0b", 3);
  EXPECT_THROW(distcore::InvalidArgument, distcore::TCPStore leaked(bad));
  EXPECT(::fcntl(fds[0], F_GETFD) == -1);
}

// The test certificates (tests/tls), from CMakeLists.txt.
#ifndef DC_TEST_TLS_DIR
#error "DC_TEST_TLS_DIR (the tests/tls directory) must be defined"
#endif

void test_tls_tcp_store() {
  const std::string dir = DC_TEST_TLS_DIR;
  distcore::TCPStoreOptions o;
  o.is_server = true;
  o.bind_address = "127.0.0.1";
  o.wait_for_workers = false;
  o.timeout = 10s;
  o.tls_cert_file = dir + "/server.pem";
  o.tls_key_file = dir + "/server.key";
  o.tls_ca_file = dir + "/ca.pem";  // the server's own handle connects over TLS too
  distcore::TCPStore server(o);
  server.set("k", "v");
  distcore::TCPStoreOptions co;
  co.port = server.port();
  co.timeout = 10s;
  co.tls_ca_file = dir + "/ca.pem";
  distcore::TCPStore client(co);
  EXPECT(client.get("k") == "v");
  const std::string big(3 << 20, 'x');
  client.set("big", big);
  EXPECT(server.get("big") == big);
  // In clear to a server that requires TLS: refused at once, saying why.
  distcore::TCPStoreOptions clear;
  clear.port = server.port();
  clear.timeout = 10s;
  auto e = EXPECT_THROW(distcore::PermissionDenied, distcore::TCPStore refused(clear));
  EXPECT_CONTAINS(std::string(e.what()), "only over TLS");
  // A certificate without its key is the caller's error, as is a NUL in a path.
  distcore::TCPStoreOptions bad = co;
  bad.tls_cert_file = dir + "/client.pem";
  EXPECT_THROW(distcore::InvalidArgument, distcore::TCPStore refused(bad));
  bad = co;
  bad.tls_ca_file = std::string("ca\0.pem", 6);
  EXPECT_THROW(distcore::InvalidArgument, distcore::TCPStore refused(bad));
  EXPECT(client.get("k") == "v");
}

void test_log_callback() {
  struct Line {
    dc_log_level level;
    std::string target, message;
  };
  std::mutex mutex;
  std::vector<Line> lines;
  distcore::set_log_callback(DC_LOG_LEVEL_TRACE, [&](dc_log_level level, std::string_view target,
                                                     std::string_view message) {
    std::lock_guard<std::mutex> lock(mutex);
    lines.push_back(Line{level, std::string(target), std::string(message)});
  });
  // Replacing the callback frees the previous one once it no longer runs.
  distcore::set_log_callback(DC_LOG_LEVEL_DEBUG, [&](dc_log_level level, std::string_view target,
                                                     std::string_view message) {
    std::lock_guard<std::mutex> lock(mutex);
    lines.push_back(Line{level, std::string(target), std::string(message)});
    throw std::runtime_error("dropped at the boundary");  // never reaches distcore
  });
  {
    distcore::TCPStoreOptions o;
    o.is_server = true;
    o.bind_address = "127.0.0.1";
    o.wait_for_workers = false;
    o.timeout = 10s;
    distcore::TCPStore server(o);
    distcore::TCPStoreOptions co;
    co.port = server.port();
    co.timeout = 10s;
    {
      distcore::TCPStore client(co);
      client.set("a", "b");
    }  // the server logs the disconnect at DEBUG
    bool seen = false;
    for (int i = 0; i < 500 && !seen; ++i) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        for (const Line& l : lines) {
          seen = seen || (l.level == DC_LOG_LEVEL_DEBUG && contains(l.target, "distcore") &&
                          (contains(l.message, "disconnected") || contains(l.message, "closing")));
        }
      }
      if (!seen) std::this_thread::sleep_for(10ms);
    }
    EXPECT(seen);
  }
  EXPECT_THROW(distcore::InvalidArgument, distcore::set_log_callback(static_cast<dc_log_level>(42), nullptr));
  distcore::set_log_callback(DC_LOG_LEVEL_OFF, nullptr);
  distcore::reset_log_callback();
}

// RPC: worker0 here, worker1 on a thread, both in this process.
distcore::RpcOptions rpc_options() {
  distcore::RpcOptions o;
  o.rpc_timeout = 30s;
  o.num_worker_threads = 2;
  o.functions.emplace_back("echo", [](std::string_view args, const std::vector<distcore::RRefView>&, int32_t) {
    return std::string(args);
  });
  o.functions.emplace_back("who", [](std::string_view, const std::vector<distcore::RRefView>&, int32_t caller) {
    return "caller " + std::to_string(caller);
  });
  o.functions.emplace_back(
      "fetch", [](std::string_view, const std::vector<distcore::RRefView>& rrefs, int32_t) -> std::string {
        if (rrefs.size() != 1) throw distcore::InvalidArgument("fetch wants one RRef");
        if (!rrefs[0].confirmed_by_owner()) throw distcore::InvalidState("not confirmed");
        distcore::RRef kept = rrefs[0].clone();  // an owning handle, freed on return
        return kept.to_here();
      });
  o.functions.emplace_back("fail", [](std::string_view, const std::vector<distcore::RRefView>&, int32_t) -> std::string {
    throw distcore::InvalidState("failed on purpose");
  });
  o.functions.emplace_back("std_throw",
                           [](std::string_view, const std::vector<distcore::RRefView>&, int32_t) -> std::string {
                             throw std::out_of_range("index 7 out of range");
                           });
  o.functions.emplace_back("int_throw",
                           [](std::string_view, const std::vector<distcore::RRefView>&, int32_t) -> std::string {
                             throw 7;
                           });
  return o;
}

void wait_for_zero(const distcore::Rpc& rpc) {
  for (int i = 0; i < 3000; ++i) {
    dc_rref_debug_info d = rpc.debug_info();
    if (d.num_owner_rrefs == 0 && d.num_pending_futures == 0 && d.num_pending_users == 0 && d.num_forks == 0)
      return;
    std::this_thread::sleep_for(10ms);
  }
  throw Failure("RRef counters never reached zero");
}

void test_rpc() {
  distcore::TCPStoreOptions so;
  so.is_server = true;
  so.bind_address = "127.0.0.1";
  so.wait_for_workers = false;
  so.timeout = 30s;
  distcore::TCPStore server(so);
  distcore::TCPStoreOptions co;
  co.port = server.port();
  co.timeout = 30s;

  std::string worker_error;
  std::thread worker1([&] {
    try {
      distcore::TCPStore store(co);
      distcore::Rpc rpc(store, "worker1", 1, 2, rpc_options());
      rpc.shutdown(true, 30s);  // serves until worker0 shuts down too
      wait_for_zero(rpc);
    } catch (const std::exception& e) {
      worker_error = e.what();
    }
  });
  distcore::TCPStore store(co);
  distcore::Rpc rpc(store, "worker0", 0, 2, rpc_options());
  EXPECT(rpc.self_name() == "worker0");
  EXPECT(rpc.worker_id("worker1") == 1);
  EXPECT_THROW(distcore::Error, rpc.worker_id("nobody"));

  EXPECT(rpc.sync("worker1", "echo", "ping") == "ping");
  EXPECT(rpc.sync("worker1", "echo", std::string("a\0b", 3)) == std::string("a\0b", 3));
  EXPECT(rpc.sync("worker1", "who") == "caller 0");
  auto remote = EXPECT_THROW(distcore::RemoteError, rpc.sync("worker1", "fail"));
  EXPECT(remote.status() == DC_ERR_REMOTE && std::string(remote.what()) == "failed on purpose");
  auto std_remote = EXPECT_THROW(distcore::RemoteError, rpc.sync("worker1", "std_throw"));
  EXPECT_CONTAINS(std_remote.what(), "index 7 out of range");
  auto unknown = EXPECT_THROW(distcore::RemoteError, rpc.sync("worker1", "int_throw"));
  EXPECT_CONTAINS(unknown.what(), "unknown C++ exception");
  EXPECT_THROW(distcore::Error, rpc.sync("worker1", "no-such-function"));

  distcore::Work w = rpc.async("worker1", "echo", "async");
  std::atomic<bool> called{false};
  w.then([&](const distcore::WorkView& v) { called = v.is_success(); });
  w.wait();
  EXPECT(w.result() == "async");
  for (int i = 0; i < 500 && !called.load(); ++i) std::this_thread::sleep_for(10ms);
  EXPECT(called.load());

  // A function registered after init, called on this worker itself.
  rpc.register_function("late", [](std::string_view args, const std::vector<distcore::RRefView>&, int32_t caller) {
    return "late:" + std::string(args) + ":" + std::to_string(caller);
  });
  EXPECT(rpc.sync("worker0", "late", "x") == "late:x:0");

  {
    // remote() on worker1; to_here; passed back to its owner and to ourselves.
    distcore::RRef r = rpc.remote("worker1", "echo", "held by worker1");
    EXPECT(r.to_here(10s) == "held by worker1");
    EXPECT(!r.is_owner());
    EXPECT(r.owner_id() == 1);
    EXPECT(r.owner_name() == "worker1");
    EXPECT_THROW(distcore::InvalidState, r.local_value());
    EXPECT(rpc.sync("worker1", "fetch", {}, {r}) == "held by worker1");
    distcore::RRef copy = r.clone();
    EXPECT(copy.to_here() == "held by worker1");
    EXPECT(r.confirmed_by_owner());

    // An RRef owned here, shared with worker1 and with ourselves.
    distcore::RRef mine = rpc.rref("owned by worker0");
    EXPECT(mine.is_owner() && mine.confirmed_by_owner());
    EXPECT(mine.local_value() == "owned by worker0");
    EXPECT(mine.owner_name() == "worker0");
    EXPECT(rpc.sync("worker1", "fetch", {}, {mine}) == "owned by worker0");
    EXPECT(rpc.sync("worker0", "fetch", {}, {mine.view()}) == "owned by worker0");
    auto wrong = EXPECT_THROW(distcore::RemoteError, rpc.sync("worker1", "fetch", {}, {r, mine}));
    EXPECT_CONTAINS(wrong.what(), "fetch wants one RRef");

    // A remote() whose function fails: to_here reports it.
    distcore::RRef bad = rpc.remote("worker1", "fail");
    auto err = EXPECT_THROW(distcore::RemoteError, bad.to_here());
    EXPECT_CONTAINS(err.what(), "failed on purpose");
    dc_rref_debug_info d = rpc.debug_info();
    EXPECT(d.struct_size == sizeof d);
  }
  rpc.shutdown(true, 30s);
  wait_for_zero(rpc);
  worker1.join();
  EXPECT(worker_error.empty());
  auto down = EXPECT_THROW(distcore::ShutDown, rpc.sync("worker1", "echo"));
  EXPECT(down.status() == DC_ERR_SHUT_DOWN);
}

}  // namespace

int main() {
  struct Step {
    const char* name;
    void (*run)();
  };
  const Step steps[] = {
      {"version_and_timeouts", test_version_and_timeouts},
      {"hash_and_prefix_stores", test_hash_and_prefix_stores},
      {"file_store", test_file_store},
      {"work", test_work},
      {"tcp_store", test_tcp_store},
      {"guarded_tcp_store", test_guarded_tcp_store},
      {"tls_tcp_store", test_tls_tcp_store},
      {"log_callback", test_log_callback},
      {"rpc", test_rpc},
  };
  for (const Step& step : steps) {
    try {
      step.run();
      std::printf("test_cpp_wrapper: %s ok\n", step.name);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "test_cpp_wrapper: %s FAILED: %s\n", step.name, e.what());
      return 1;
    }
  }
  std::printf("test_cpp_wrapper: ok\n");
  return 0;
}
