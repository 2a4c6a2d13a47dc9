// C++ use of the C API through <distcore.hpp>: RAII owners for every handle
// and buffer, errors as exceptions, and std::thread workers sharing one store.
#include <distcore.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define EXPECT(cond)                                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__,     \
                   __LINE__, #cond);                                   \
      return 1;                                                        \
    }                                                                  \
  } while (0)

using namespace std::chrono_literals;

int main() {
  distcore::HashStore store;
  distcore::PrefixStore job("job", store);

  // Workers on threads, each with its own handle (a clone).
  std::vector<std::thread> workers;
  for (int rank = 0; rank < 4; ++rank) {
    workers.emplace_back([&job, rank] {
      distcore::Store mine = job.clone();
      mine.set("rank" + std::to_string(rank), std::to_string(rank * 10));
      mine.add("joined", 1);
      mine.barrier("ready", 4, 10s);
    });
  }
  for (auto& t : workers) t.join();
  EXPECT(store.get("job/joined") == "4");
  EXPECT(job.get("rank3") == "30");

  // An async get completed by a later set.
  distcore::Work w = job.get_async("late");
  job.set("late", "value");
  w.wait(10s);
  EXPECT(w.result() == "value");

  // Errors become exceptions carrying the status; the guard restores the timeout.
  {
    distcore::StoreTimeoutGuard guard = job.timeout_guard(20ms);
    EXPECT(job.timeout() == 20ms);
    try {
      job.get("missing");
      EXPECT(false);
    } catch (const distcore::Error& e) {
      EXPECT(e.status() == DC_ERR_TIMEOUT);
      EXPECT(std::strstr(e.what(), "wait timeout after 20ms") != nullptr);
    }
  }
  EXPECT(store.timeout() == 300s);

  // Ownership: moves leave the source empty, release() hands the C handle
  // over (freed here by the C API), and an adopted handle is freed by its owner.
  distcore::Store moved = std::move(job);
  EXPECT(!job && moved);
  EXPECT(moved.get("rank1") == "10");
  dc_store* raw = moved.release();
  EXPECT(!moved && raw != nullptr);
  distcore::Store adopted(raw);
  EXPECT(adopted.native_handle() == raw);
  EXPECT(adopted.get("rank2") == "20");
  distcore::Work w2 = std::move(w);
  EXPECT(!w && w2 && w2.is_completed());
  dc_work* raw_work = w2.release();
  dc_work_free(raw_work);

  // A call on an empty handle throws instead of crashing.
  try {
    job.set("k", "v");
    EXPECT(false);
  } catch (const distcore::InvalidArgument& e) {
    EXPECT(e.status() == DC_ERR_INVALID_ARGUMENT);
  }
  std::printf("test_raii: ok\n");
  return 0;
}
