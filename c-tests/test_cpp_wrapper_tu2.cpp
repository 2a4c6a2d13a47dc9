// A second translation unit of test_cpp_wrapper including <distcore.hpp>:
// the wrapper is inline throughout, so both units link, and its
// process-wide holders (log callback, profiler hooks) are one per program.
#include <distcore.hpp>

#include <string>

const void* distcore_tu2_log_state() { return &distcore::detail::log_state(); }
const void* distcore_tu2_profiler_state() { return &distcore::detail::profiler_state(); }

std::string distcore_tu2_roundtrip(const distcore::Store& store) {
  store.set("tu2", "second unit");
  return store.get("tu2");
}
