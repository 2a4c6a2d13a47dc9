// C++ use of the C API: RAII owners for every handle and buffer, errors as
// exceptions, and std::thread workers sharing one store.
#include <distcore.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace dc {

struct Error : std::runtime_error {
  dc_status status;
  Error(dc_status s, const std::string& what) : std::runtime_error(what), status(s) {}
};

inline void check(dc_status s) {
  if (s != DC_OK) throw Error(s, std::string(dc_status_str(s)) + ": " + dc_last_error_message());
}

struct StoreDeleter {
  void operator()(dc_store* s) const { dc_store_free(s); }
};
struct WorkDeleter {
  void operator()(dc_work* w) const { dc_work_free(w); }
};
struct GuardDeleter {
  void operator()(dc_store_timeout_guard* g) const { dc_store_timeout_guard_free(g); }
};
using StorePtr = std::unique_ptr<dc_store, StoreDeleter>;
using WorkPtr = std::unique_ptr<dc_work, WorkDeleter>;
using GuardPtr = std::unique_ptr<dc_store_timeout_guard, GuardDeleter>;

// Owns a dc_buf; converts to std::string.
class Buf {
 public:
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { dc_buf_free(&buf_); }
  dc_buf* out() { return &buf_; }
  std::string str() const { return std::string(reinterpret_cast<const char*>(buf_.data), buf_.len); }

 private:
  dc_buf buf_{};
};

class Store {
 public:
  static Store hash() {
    dc_store* s = nullptr;
    check(dc_hash_store_new(&s));
    return Store(s);
  }
  Store prefixed(const std::string& prefix) const {
    dc_store* s = nullptr;
    check(dc_prefix_store_new(prefix.c_str(), ptr_.get(), &s));
    return Store(s);
  }
  Store clone() const {
    dc_store* s = nullptr;
    check(dc_store_clone(ptr_.get(), &s));
    return Store(s);
  }
  void set(const std::string& k, const std::string& v) const {
    check(dc_store_set(ptr_.get(), k.c_str(), reinterpret_cast<const uint8_t*>(v.data()), v.size()));
  }
  std::string get(const std::string& k) const {
    Buf b;
    check(dc_store_get(ptr_.get(), k.c_str(), b.out()));
    return b.str();
  }
  int64_t add(const std::string& k, int64_t d) const {
    int64_t out = 0;
    check(dc_store_add(ptr_.get(), k.c_str(), d, &out));
    return out;
  }
  WorkPtr get_async(const std::string& k) const {
    dc_work* w = nullptr;
    check(dc_store_get_async(ptr_.get(), k.c_str(), &w));
    return WorkPtr(w);
  }
  GuardPtr timeout_guard(int64_t ms) const {
    dc_store_timeout_guard* g = nullptr;
    check(dc_store_timeout_guard_new(ptr_.get(), ms, &g));
    return GuardPtr(g);
  }
  const dc_store* raw() const { return ptr_.get(); }

 private:
  explicit Store(dc_store* s) : ptr_(s) {}
  StorePtr ptr_;
};

}  // namespace dc

#define EXPECT(cond)                                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__,     \
                   __LINE__, #cond);                                   \
      return 1;                                                        \
    }                                                                  \
  } while (0)

int main() {
  dc::Store store = dc::Store::hash();
  dc::Store job = store.prefixed("job");

  // Workers on threads, each with its own handle (a clone).
  std::vector<std::thread> workers;
  for (int rank = 0; rank < 4; ++rank) {
    workers.emplace_back([&job, rank] {
      dc::Store mine = job.clone();
      mine.set("rank" + std::to_string(rank), std::to_string(rank * 10));
      mine.add("joined", 1);
      dc::check(dc_store_barrier(mine.raw(), "ready", 4, 10000));
    });
  }
  for (auto& t : workers) t.join();
  EXPECT(store.get("job/joined") == "4");
  EXPECT(job.get("rank3") == "30");

  // An async get completed by a later set.
  dc::WorkPtr w = job.get_async("late");
  job.set("late", "value");
  dc::check(dc_work_wait(w.get(), 10000));
  dc::Buf result;
  dc::check(dc_work_result(w.get(), result.out()));
  EXPECT(result.str() == "value");

  // Errors become exceptions carrying the status; the guard restores the timeout.
  {
    dc::GuardPtr guard = job.timeout_guard(20);
    try {
      job.get("missing");
      EXPECT(false);
    } catch (const dc::Error& e) {
      EXPECT(e.status == DC_ERR_TIMEOUT);
      EXPECT(std::strstr(e.what(), "wait timeout after 20ms") != nullptr);
    }
  }
  int64_t ms = 0;
  dc::check(dc_store_get_timeout(store.raw(), &ms));
  EXPECT(ms == 300000);
  std::printf("test_raii: ok\n");
  return 0;
}
