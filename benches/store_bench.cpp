// One store benchmark driver, compiled twice from this file: against
// distcore's C API (default) and against PyTorch's C++ c10d::TCPStore
// client (-DWITH_TORCH, with the libtorch the pip wheel ships), so both
// clients run exactly the same measurement code.
//
//   store_bench latency    HOST PORT OPS            -> "op median_us p99_us" lines
//   store_bench gets       HOST PORT OPS SECONDS    -> "get median_us p99_us count": up to OPS gets,
//                                                      stopping after SECONDS
//   store_bench throughput HOST PORT CONNS SECONDS  -> "ops N seconds S"
//   store_bench join       HOST PORT N WORLD        -> "loaded", waits for a line, then
//                                                      "joined N failures F seconds S"
//   store_bench barrier    HOST PORT N PREFIX TOTAL -> "ready", waits for a line, then
//                                                      "barrier N seconds S failures F"
//   store_bench large      HOST PORT MIB REPS       -> "mbps X" or "refused <why>"
//   store_bench idle       HOST PORT N              -> opens up to N handles, "ready K", waits for stdin EOF
//   store_bench shared     HOST PORT WAITERS OPS TIMEOUT_MS
//                                                   -> "set median_us p99_us" of OPS sets on one handle
//                                                      while WAITERS threads block in a get on it
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef WITH_TORCH
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#else
#include <distcore.h>
#endif

using Clock = std::chrono::steady_clock;
using Bytes = std::vector<uint8_t>;

static double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

#ifdef WITH_TORCH
class Client {
 public:
  Client(const std::string& host, int port, int world = -1, int timeout_ms = 300000) {
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(port);
    o.isServer = false;
    if (world > 0) o.numWorkers = world;
    o.waitWorkers = world > 0;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    s_ = c10::make_intrusive<c10d::TCPStore>(host, o);
  }
  void set(const std::string& k, const Bytes& v) { s_->set(k, v); }
  Bytes get(const std::string& k) { return s_->get(k); }
  size_t get_size(const std::string& k) { return s_->get(k).size(); }
  int64_t add(const std::string& k, int64_t d) { return s_->add(k, d); }
  bool check(const std::vector<std::string>& ks) { return s_->check(ks); }
  Bytes compare_set(const std::string& k, const Bytes& e, const Bytes& d) { return s_->compareSet(k, e, d); }
  std::vector<Bytes> multi_get(const std::vector<std::string>& ks) { return s_->multiGet(ks); }
  void wait(const std::vector<std::string>& ks) { s_->wait(ks); }

 private:
  c10::intrusive_ptr<c10d::TCPStore> s_;
};
#else
static void check_status(dc_status s) {
  if (s != DC_OK) throw std::runtime_error(dc_last_error_message());
}

class Client {
 public:
  Client(const std::string& host, int port, int world = -1, int timeout_ms = 300000) {
    dc_tcp_store_options o;
    check_status(dc_tcp_store_options_init(&o, sizeof o));
    o.host = host.c_str();
    o.port = static_cast<uint16_t>(port);
    o.world_size = world;
    o.wait_for_workers = world > 0;
    o.timeout_ms = timeout_ms;
    check_status(dc_tcp_store_new(&o, &s_));
  }
  ~Client() { dc_store_free(s_); }
  Client(const Client&) = delete;
  void set(const std::string& k, const Bytes& v) { check_status(dc_store_set(s_, k.c_str(), v.data(), v.size())); }
  Bytes get(const std::string& k) {
    dc_buf b{};
    check_status(dc_store_get(s_, k.c_str(), &b));
    Bytes out(b.data, b.data + b.len);
    dc_buf_free(&b);
    return out;
  }
  // The value as the C API hands it over (a dc_buf), without copying it
  // into a std::vector as get() does.
  size_t get_size(const std::string& k) {
    dc_buf b{};
    check_status(dc_store_get(s_, k.c_str(), &b));
    size_t n = b.len;
    dc_buf_free(&b);
    return n;
  }
  int64_t add(const std::string& k, int64_t d) {
    int64_t out = 0;
    check_status(dc_store_add(s_, k.c_str(), d, &out));
    return out;
  }
  bool check(const std::vector<std::string>& ks) {
    std::vector<const char*> p;
    for (auto& k : ks) p.push_back(k.c_str());
    bool out = false;
    check_status(dc_store_check(s_, p.data(), p.size(), &out));
    return out;
  }
  Bytes compare_set(const std::string& k, const Bytes& e, const Bytes& d) {
    dc_buf b{};
    check_status(dc_store_compare_set(s_, k.c_str(), e.data(), e.size(), d.data(), d.size(), &b));
    Bytes out(b.data, b.data + b.len);
    dc_buf_free(&b);
    return out;
  }
  std::vector<Bytes> multi_get(const std::vector<std::string>& ks) {
    std::vector<const char*> p;
    for (auto& k : ks) p.push_back(k.c_str());
    std::vector<dc_buf> bufs(ks.size());
    check_status(dc_store_multi_get(s_, p.data(), p.size(), bufs.data()));
    std::vector<Bytes> out;
    for (auto& b : bufs) {
      out.emplace_back(b.data, b.data + b.len);
      dc_buf_free(&b);
    }
    return out;
  }
  void wait(const std::vector<std::string>& ks) {
    std::vector<const char*> p;
    for (auto& k : ks) p.push_back(k.c_str());
    check_status(dc_store_wait(s_, p.data(), p.size(), DC_TIMEOUT_DEFAULT));
  }

 private:
  dc_store* s_ = nullptr;
};
#endif

template <typename F>
static void time_op(const char* name, int ops, F&& f) {
  for (int i = 0; i < std::max(ops / 10, 100); i++) f();
  std::vector<double> us(ops);
  for (int i = 0; i < ops; i++) {
    auto t = Clock::now();
    f();
    us[i] = std::chrono::duration<double, std::micro>(Clock::now() - t).count();
  }
  std::sort(us.begin(), us.end());
  std::printf("%s %.2f %.2f\n", name, us[ops / 2], us[std::min(ops - 1, ops * 99 / 100)]);
  std::fflush(stdout);
}

static int latency(const std::string& host, int port, int ops) {
  Client c(host, port);
  Bytes v(64, 'x');
  c.set("lat/get", v);
  c.set("lat/cs", v);
  std::vector<std::string> keys;
  for (int i = 0; i < 16; i++) {
    keys.push_back("lat/m" + std::to_string(i));
    c.set(keys.back(), v);
  }
  time_op("set", ops, [&] { c.set("lat/set", v); });
  time_op("get", ops, [&] { c.get("lat/get"); });
  time_op("add", ops, [&] { c.add("lat/add", 1); });
  time_op("check", ops, [&] { c.check({"lat/get"}); });
  time_op("compare_set", ops, [&] { c.compare_set("lat/cs", v, v); });
  time_op("multi_get16", ops, [&] { c.multi_get(keys); });
  return 0;
}

static int gets(const std::string& host, int port, int ops, double secs) {
  Client c(host, port);
  c.set("lat/get", Bytes(64, 'x'));
  std::vector<double> us;
  auto start = Clock::now();
  while ((int)us.size() < ops && seconds_since(start) < secs) {
    auto t = Clock::now();
    c.get("lat/get");
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t).count());
  }
  std::sort(us.begin(), us.end());
  size_t n = us.size();
  std::printf("get %.2f %.2f %zu\n", us[n / 2], us[std::min(n - 1, n * 99 / 100)], n);
  return 0;
}

static int throughput(const std::string& host, int port, int conns, double secs) {
  {
    Client c(host, port);
    Bytes v(64, 'x');
    for (int i = 0; i < 1000; i++) c.set("tp/" + std::to_string(i), v);
  }
  std::atomic<bool> go{false}, stop{false};
  std::atomic<long> total{0};
  std::atomic<int> connected{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < conns; t++) {
    ts.emplace_back([&, t] {
      Client c(host, port);
      Bytes v(64, 'y');
      unsigned x = 12345u + t;
      long n = 0;
      connected++;
      while (!go) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      while (!stop) {
        x = x * 1103515245u + 12345u;
        std::string k = "tp/" + std::to_string((x >> 8) % 1000);
        if ((x >> 20) % 10 < 8) c.get(k); else c.set(k, v);
        n++;
      }
      total += n;
    });
  }
  // The clock starts once every connection is up.
  while (connected < conns) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  auto t0 = Clock::now();
  go = true;
  std::this_thread::sleep_for(std::chrono::duration<double>(secs));
  stop = true;
  double el = seconds_since(t0);
  for (auto& t : ts) t.join();
  std::printf("ops %ld seconds %.3f\n", total.load(), el);
  return 0;
}

// N handles join concurrently (each counts itself in init/ like a worker)
// once a first line arrives on stdin ("go"), so process start-up is not
// timed.
static int join(const std::string& host, int port, int n, int world) {
  std::printf("loaded\n");
  std::fflush(stdout);
  char go[8];
  if (!std::fgets(go, sizeof go, stdin)) return 1;
  std::atomic<int> failures{0};
  std::vector<std::unique_ptr<Client>> clients(n);
  std::vector<std::thread> ts;
  auto t0 = Clock::now();
  for (int i = 0; i < n; i++) {
    ts.emplace_back([&, i] {
      try {
        clients[i] = std::make_unique<Client>(host, port, world, 600000);
      } catch (const std::exception& e) {
        if (failures++ == 0) std::fprintf(stderr, "join failed: %s\n", e.what());
      }
    });
  }
  for (auto& t : ts) t.join();
  std::printf("joined %d failures %d seconds %.3f\n", n - failures.load(), failures.load(), seconds_since(t0));
  std::fflush(stdout);
  // Hold the connections until told to go (stdin closes).
  char line[8];
  while (std::fgets(line, sizeof line, stdin)) {}
  return 0;
}

// The store-based barrier of PyTorch's libuv tutorial: every handle adds
// itself; the last one sets the release key everybody waits for.
static int barrier(const std::string& host, int port, int n, const std::string& prefix, int total) {
  std::vector<std::unique_ptr<Client>> clients(n);
  std::atomic<int> failures{0};
  {
    std::vector<std::thread> ts;
    for (int i = 0; i < n; i++) ts.emplace_back([&, i] { clients[i] = std::make_unique<Client>(host, port, -1, 600000); });
    for (auto& t : ts) t.join();
  }
  std::printf("ready\n");
  std::fflush(stdout);
  char line[8];
  if (!std::fgets(line, sizeof line, stdin)) return 1;
  auto t0 = Clock::now();
  std::vector<std::thread> ts;
  for (int i = 0; i < n; i++) {
    ts.emplace_back([&, i] {
      try {
        if (clients[i]->add(prefix + "/count", 1) == total) clients[i]->set(prefix + "/done", Bytes{'1'});
        clients[i]->wait({prefix + "/done"});
      } catch (const std::exception& e) {
        if (failures++ == 0) std::fprintf(stderr, "barrier failed: %s\n", e.what());
      }
    });
  }
  for (auto& t : ts) t.join();
  std::printf("barrier %d seconds %.3f failures %d\n", n, seconds_since(t0), failures.load());
  return 0;
}

static int large(const std::string& host, int port, int mib, int reps) {
  Client c(host, port, -1, 120000);
  Bytes v(static_cast<size_t>(mib) << 20, 'z');
  try {
    auto t0 = Clock::now();
    for (int i = 0; i < reps; i++) {
      c.set("large", v);
      if (c.get_size("large") != v.size()) throw std::runtime_error("short value");
    }
    double el = seconds_since(t0);
    std::printf("mbps %.1f\n", 2.0 * reps * mib * 1.048576 / el);
  } catch (const std::exception& e) {
    std::printf("refused %s\n", e.what());
  }
  return 0;
}

// Opens up to N handles (stopping at the first that cannot connect within
// 10 s), prints "ready K", and holds them until stdin closes.
static int idle(const std::string& host, int port, int n) {
  std::vector<std::unique_ptr<Client>> clients;
  try {
    for (int i = 0; i < n; i++) clients.push_back(std::make_unique<Client>(host, port, -1, 10000));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "idle: stopped at %zu connections: %s\n", clients.size(), e.what());
  }
  std::printf("ready %zu\n", clients.size());
  std::fflush(stdout);
  char line[8];
  while (std::fgets(line, sizeof line, stdin)) {}
  return 0;
}

// One handle, WAITERS threads blocked in a get of a key nobody sets (each
// gives up after the handle's timeout), and this thread's sets meanwhile.
static int shared(const std::string& host, int port, int waiters, int ops, int timeout_ms) {
  Client c(host, port, -1, timeout_ms);
  std::vector<std::thread> ts;
  for (int i = 0; i < waiters; i++) {
    ts.emplace_back([&c, i] {
      try {
        c.get("shared/never/" + std::to_string(i));
      } catch (const std::exception&) {
        // The get's timeout: expected.
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  Bytes v(64, 'x');
  std::vector<double> us(ops);
  for (int i = 0; i < ops; i++) {
    auto t = Clock::now();
    c.set("shared/k", v);
    us[i] = std::chrono::duration<double, std::micro>(Clock::now() - t).count();
  }
  std::sort(us.begin(), us.end());
  std::printf("set %.2f %.2f\n", us[ops / 2], us[std::min(ops - 1, ops * 99 / 100)]);
  std::fflush(stdout);
  for (int i = 0; i < waiters; i++) c.set("shared/never/" + std::to_string(i), v);
  for (auto& t : ts) t.join();
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: see the top of store_bench.cpp\n");
    return 2;
  }
  std::string mode = argv[1], host = argv[2];
  int port = std::atoi(argv[3]);
  try {
    if (mode == "latency") return latency(host, port, std::atoi(argv[4]));
    if (mode == "gets") return gets(host, port, std::atoi(argv[4]), std::atof(argv[5]));
    if (mode == "throughput") return throughput(host, port, std::atoi(argv[4]), std::atof(argv[5]));
    if (mode == "join") return join(host, port, std::atoi(argv[4]), std::atoi(argv[5]));
    if (mode == "barrier") return barrier(host, port, std::atoi(argv[4]), argv[5], std::atoi(argv[6]));
    if (mode == "large") return large(host, port, std::atoi(argv[4]), std::atoi(argv[5]));
    if (mode == "idle") return idle(host, port, std::atoi(argv[4]));
    if (mode == "shared")
      return shared(host, port, std::atoi(argv[4]), std::atoi(argv[5]), std::atoi(argv[6]));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "store_bench %s: %s\n", mode.c_str(), e.what());
    return 1;
  }
  std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
  return 2;
}
