// distcore.hpp: a header-only C++17 wrapper over the C ABI of distcore.h.
//
// Handles are move-only RAII classes (Store, Work, Rpc, RRef,
// StoreTimeoutGuard) that free their C handle in the destructor; `.native_handle()`
// returns the C handle and `.release()` gives up its ownership. Every
// failing call throws a distcore::Error (or a subclass per status, e.g.
// TimeoutError) carrying the dc_status and the message of
// dc_last_error_message(). Bytes go in as std::string_view or
// distcore::bytes_view and come out as std::string; timeouts are
// std::chrono durations, distcore::kDefault or distcore::kForever.
//
// Threads and blocking are those of the C functions each method calls (see
// distcore.h): handles are thread-safe; the blocking calls say so.
//
// Everything is inline in namespace distcore: include it from as many
// translation units as you like. Link with libdistcore (CMake:
// distcore::distcore or distcore::cpp).

#ifndef DISTCORE_HPP
#define DISTCORE_HPP

#include "distcore.h"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

static_assert(DC_VERSION_MAJOR == 1, "distcore.hpp wraps major version 1 of distcore.h");

namespace distcore {

// ---------------------------------------------------------------------------
// Versions
// ---------------------------------------------------------------------------

/// The version of distcore.h this program was compiled with.
inline constexpr int kVersionMajor = DC_VERSION_MAJOR;
inline constexpr int kVersionMinor = DC_VERSION_MINOR;
inline constexpr int kVersionPatch = DC_VERSION_PATCH;

/// A "major.minor.patch" version as numbers.
struct Version {
  int major_version = 0;
  int minor_version = 0;
  int patch_version = 0;
};

/// The version of the library that is running, "major.minor.patch" (dc_version).
inline std::string_view version() noexcept { return dc_version(); }

/// The running library's version as numbers (0.0.0 parts for anything unparsable).
inline Version runtime_version() noexcept {
  Version v;
  int* parts[3] = {&v.major_version, &v.minor_version, &v.patch_version};
  std::string_view s = version();
  size_t i = 0;
  for (int* part : parts) {
    int n = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') n = n * 10 + (s[i++] - '0');
    *part = n;
    if (i < s.size() && s[i] == '.') ++i;
  }
  return v;
}

/// Whether the running library can serve this program: the same major
/// version as the header it was built with, and at least as new.
inline bool version_compatible() noexcept {
  Version v = runtime_version();
  if (v.major_version != kVersionMajor) return false;
  if (v.minor_version != kVersionMinor) return v.minor_version > kVersionMinor;
  return v.patch_version >= kVersionPatch;
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A failed distcore call: the dc_status and its message. Catch this to
/// catch every distcore failure; subclasses name the statuses.
class Error : public std::runtime_error {
 public:
  /// An error of `status` with `message` (empty: the status's description).
  Error(dc_status status, const std::string& message)
      : std::runtime_error(message.empty() ? std::string(dc_status_str(status)) : message),
        status_(status) {}
  /// The status code (DC_ERR_*).
  dc_status status() const noexcept { return status_; }
  /// The static description of the status ("timed out", ...).
  const char* status_str() const noexcept { return dc_status_str(status_); }

 private:
  dc_status status_;
};

#define DISTCORE_HPP_ERROR_CLASS(name, code)                                          \
  /** A distcore::Error of status code. */                                            \
  class name : public Error {                                                         \
   public:                                                                            \
    explicit name(const std::string& message) : Error(code, message) {}              \
  };
DISTCORE_HPP_ERROR_CLASS(InvalidArgument, DC_ERR_INVALID_ARGUMENT)
DISTCORE_HPP_ERROR_CLASS(TimeoutError, DC_ERR_TIMEOUT)
DISTCORE_HPP_ERROR_CLASS(NetworkError, DC_ERR_NETWORK)
DISTCORE_HPP_ERROR_CLASS(QueueEmpty, DC_ERR_QUEUE_EMPTY)
DISTCORE_HPP_ERROR_CLASS(NotSupported, DC_ERR_NOT_SUPPORTED)
DISTCORE_HPP_ERROR_CLASS(RemoteError, DC_ERR_REMOTE)
DISTCORE_HPP_ERROR_CLASS(ShutDown, DC_ERR_SHUT_DOWN)
DISTCORE_HPP_ERROR_CLASS(Aborted, DC_ERR_ABORTED)
DISTCORE_HPP_ERROR_CLASS(ProtocolError, DC_ERR_PROTOCOL)
DISTCORE_HPP_ERROR_CLASS(IoError, DC_ERR_IO)
DISTCORE_HPP_ERROR_CLASS(InvalidState, DC_ERR_INVALID_STATE)
DISTCORE_HPP_ERROR_CLASS(InternalError, DC_ERR_INTERNAL)
DISTCORE_HPP_ERROR_CLASS(PermissionDenied, DC_ERR_PERMISSION_DENIED)
DISTCORE_HPP_ERROR_CLASS(QuotaExceeded, DC_ERR_QUOTA_EXCEEDED)
DISTCORE_HPP_ERROR_CLASS(PeerFailedError, DC_ERR_PEER_FAILED)
#undef DISTCORE_HPP_ERROR_CLASS

/// Throws the Error subclass of `status` (distcore::Error for a code
/// distcore does not define) with `message`. `status` must not be DC_OK.
[[noreturn]] inline void throw_error(dc_status status, const std::string& message) {
  switch (status) {
    case DC_ERR_INVALID_ARGUMENT: throw InvalidArgument(message);
    case DC_ERR_TIMEOUT: throw TimeoutError(message);
    case DC_ERR_NETWORK: throw NetworkError(message);
    case DC_ERR_QUEUE_EMPTY: throw QueueEmpty(message);
    case DC_ERR_NOT_SUPPORTED: throw NotSupported(message);
    case DC_ERR_REMOTE: throw RemoteError(message);
    case DC_ERR_SHUT_DOWN: throw ShutDown(message);
    case DC_ERR_ABORTED: throw Aborted(message);
    case DC_ERR_PROTOCOL: throw ProtocolError(message);
    case DC_ERR_IO: throw IoError(message);
    case DC_ERR_INVALID_STATE: throw InvalidState(message);
    case DC_ERR_INTERNAL: throw InternalError(message);
    case DC_ERR_PERMISSION_DENIED: throw PermissionDenied(message);
    case DC_ERR_QUOTA_EXCEEDED: throw QuotaExceeded(message);
    case DC_ERR_PEER_FAILED: throw PeerFailedError(message);
    default: throw Error(status, message);
  }
}

/// Returns if `status` is DC_OK; otherwise throws its Error with
/// dc_last_error_message() (call it right after the failing C call, on the
/// same thread).
inline void check(dc_status status) {
  if (status != DC_OK) throw_error(status, dc_last_error_message());
}

/// The static description of a status code (dc_status_str).
inline std::string_view status_str(dc_status status) noexcept { return dc_status_str(status); }

/// c10d's name of an op type ("ALLREDUCE", ...); empty for a number that is
/// not an op type.
inline std::string_view op_type_name(dc_op_type op_type) noexcept {
  const char* name = dc_op_type_name(op_type);
  return name ? std::string_view(name) : std::string_view();
}

/// Throws InvalidState unless version_compatible(): call it once at start-up
/// to fail early when an older or other-major libdistcore is loaded.
inline void check_version() {
  if (!version_compatible()) {
    throw InvalidState("distcore.hpp was built against distcore " + std::to_string(kVersionMajor) + "." +
                       std::to_string(kVersionMinor) + "." + std::to_string(kVersionPatch) +
                       " but the running library is " + std::string(version()));
  }
}

// ---------------------------------------------------------------------------
// Bytes and timeouts
// ---------------------------------------------------------------------------

/// A borrowed run of bytes: from a std::string_view, a std::string, a
/// NUL-terminated string, a std::vector<uint8_t> or (pointer, length).
class bytes_view {
 public:
  constexpr bytes_view() noexcept = default;
  constexpr bytes_view(const void* data, size_t size) noexcept : data_(data), size_(size) {}
  constexpr bytes_view(std::string_view s) noexcept : data_(s.data()), size_(s.size()) {}
  bytes_view(const std::string& s) noexcept : data_(s.data()), size_(s.size()) {}
  bytes_view(const char* s) noexcept : data_(s), size_(s ? std::strlen(s) : 0) {}
  bytes_view(const std::vector<uint8_t>& v) noexcept : data_(v.data()), size_(v.size()) {}
  /// The first byte (may be NULL when empty).
  constexpr const void* data() const noexcept { return data_; }
  /// The number of bytes.
  constexpr size_t size() const noexcept { return size_; }
  constexpr bool empty() const noexcept { return size_ == 0; }
  /// The bytes as the C functions take them.
  const uint8_t* u8() const noexcept { return static_cast<const uint8_t*>(data_); }

 private:
  const void* data_ = nullptr;
  size_t size_ = 0;
};

/// A timeout as the C functions take it: kDefault (the handle's own,
/// DC_TIMEOUT_DEFAULT), kForever (DC_TIMEOUT_FOREVER; a zero duration is
/// forever too, PyTorch's kNoTimeout) or a positive duration, rounded up to
/// whole milliseconds (one too long for int64_t milliseconds is forever).
/// A negative duration throws InvalidArgument.
class Timeout {
 public:
  /// kDefault.
  constexpr Timeout() noexcept = default;
  /// A duration: 0 is forever; negative throws InvalidArgument.
  template <class Rep, class Period>
  Timeout(std::chrono::duration<Rep, Period> d) : ms_(from_duration(d)) {}  // NOLINT: implicit
  /// A C timeout value passed on as is (DC_TIMEOUT_DEFAULT, 0 or positive ms).
  static constexpr Timeout from_c(int64_t ms) noexcept { return Timeout(ms, 0); }
  /// The C value: DC_TIMEOUT_DEFAULT, DC_TIMEOUT_FOREVER or milliseconds.
  constexpr int64_t ms() const noexcept { return ms_; }
  constexpr bool is_default() const noexcept { return ms_ == DC_TIMEOUT_DEFAULT; }
  constexpr bool is_forever() const noexcept { return ms_ == DC_TIMEOUT_FOREVER; }
  friend constexpr bool operator==(Timeout a, Timeout b) noexcept { return a.ms_ == b.ms_; }
  friend constexpr bool operator!=(Timeout a, Timeout b) noexcept { return a.ms_ != b.ms_; }

 private:
  constexpr Timeout(int64_t ms, int) noexcept : ms_(ms) {}
  template <class Rep, class Period>
  static int64_t from_duration(std::chrono::duration<Rep, Period> d) {
    if (d < std::chrono::duration<Rep, Period>::zero()) {
      throw InvalidArgument("negative timeout: use distcore::kDefault, distcore::kForever or a positive duration");
    }
    using float_ms = std::chrono::duration<double, std::milli>;
    if (float_ms(d) >= float_ms(9.0e18)) return DC_TIMEOUT_FOREVER;  // beyond int64_t ms: forever
    return static_cast<int64_t>(std::chrono::ceil<std::chrono::milliseconds>(d).count());
  }
  int64_t ms_ = DC_TIMEOUT_DEFAULT;
};

/// Use the handle's own timeout (DC_TIMEOUT_DEFAULT).
inline constexpr Timeout kDefault = Timeout::from_c(DC_TIMEOUT_DEFAULT);
/// Wait forever (DC_TIMEOUT_FOREVER, PyTorch's kNoTimeout).
inline constexpr Timeout kForever = Timeout::from_c(DC_TIMEOUT_FOREVER);

namespace detail {

/// A NUL-terminated copy of a key, name, prefix or path for C;
/// InvalidArgument if it contains a NUL byte (C would cut it there).
inline std::string c_string(std::string_view s) {
  if (s.find('\0') != std::string_view::npos) {
    throw InvalidArgument("a key, name, prefix or path must not contain a NUL byte");
  }
  return std::string(s);
}

/// Owns a dc_buf filled by a C call.
class Buf {
 public:
  Buf() noexcept = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { dc_buf_free(&buf_); }
  dc_buf* out() noexcept { return &buf_; }
  std::string str() const {
    return buf_.len ? std::string(reinterpret_cast<const char*>(buf_.data), buf_.len) : std::string();
  }
  std::vector<uint8_t> vec() const {
    return buf_.len ? std::vector<uint8_t>(buf_.data, buf_.data + buf_.len) : std::vector<uint8_t>();
  }

 private:
  dc_buf buf_{};
};

/// Owns a dc_buf_array filled by a C call.
class BufArray {
 public:
  BufArray() noexcept = default;
  BufArray(const BufArray&) = delete;
  BufArray& operator=(const BufArray&) = delete;
  ~BufArray() { dc_buf_array_free(&array_); }
  dc_buf_array* out() noexcept { return &array_; }
  std::vector<std::string> strings() const {
    std::vector<std::string> out;
    out.reserve(array_.len);
    for (size_t i = 0; i < array_.len; ++i) {
      const dc_buf& b = array_.items[i];
      out.emplace_back(b.len ? std::string(reinterpret_cast<const char*>(b.data), b.len) : std::string());
    }
    return out;
  }

 private:
  dc_buf_array array_{};
};

/// NUL-terminated copies of keys and the array of pointers C takes.
class Keys {
 public:
  explicit Keys(const std::vector<std::string>& keys) {
    ptrs_.reserve(keys.size());
    for (const std::string& k : keys) {
      if (k.find('\0') != std::string::npos) (void)c_string(k);  // throws
      ptrs_.push_back(k.c_str());
    }
  }
  const char* const* data() const noexcept { return ptrs_.data(); }
  size_t size() const noexcept { return ptrs_.size(); }

 private:
  std::vector<const char*> ptrs_;
};

struct StoreFree {
  void operator()(dc_store* s) const noexcept { dc_store_free(s); }
};
struct RpcFree {
  void operator()(dc_rpc* r) const noexcept { dc_rpc_free(r); }
};
struct GuardFree {
  void operator()(dc_store_timeout_guard* g) const noexcept { dc_store_timeout_guard_free(g); }
};

}  // namespace detail

// ---------------------------------------------------------------------------
// Work
// ---------------------------------------------------------------------------

class Work;
class WorkView;

/// A done-callback: runs once with a view of the completed work.
using WorkCallback = std::function<void(const WorkView&)>;

/// The error of a failed work: DC_OK and "" when it has not failed.
struct WorkError {
  dc_status status = DC_OK;
  std::string message;
};

namespace detail {
inline void work_callback_trampoline(const dc_work* work, void* user_data) noexcept;
}

/// A borrowed view of a dc_work (a callback's argument, or a Work): every
/// query and completion call, none of the ownership. Valid while the work
/// handle it came from is.
class WorkView {
 public:
  WorkView() noexcept = default;
  explicit WorkView(const dc_work* work) noexcept : ptr_(work) {}
  /// The C handle (borrowed).
  const dc_work* native_handle() const noexcept { return ptr_; }
  explicit operator bool() const noexcept { return ptr_ != nullptr; }

  /// Blocks until the work completes, for at most `timeout` (kDefault: the
  /// work's own timeout, or forever without one). Returns if it succeeded;
  /// throws its error (every time it is waited on), or TimeoutError
  /// "Operation timed out!".
  void wait(Timeout timeout = kDefault) const { distcore::check(dc_work_wait(ptr_, timeout.ms())); }
  /// Whether the work has completed (successfully or not). Never blocks.
  bool is_completed() const {
    bool out = false;
    distcore::check(dc_work_is_completed(ptr_, &out));
    return out;
  }
  /// Whether the work completed without an error (false while pending).
  bool is_success() const {
    bool out = false;
    distcore::check(dc_work_is_success(ptr_, &out));
    return out;
  }
  /// The result bytes of a completed work. Throws the work's error if it
  /// failed, NotSupported without a result, InvalidState while pending.
  std::string result() const {
    detail::Buf b;
    distcore::check(dc_work_result(ptr_, b.out()));
    return b.str();
  }
  /// result() as bytes.
  std::vector<uint8_t> result_bytes() const {
    detail::Buf b;
    distcore::check(dc_work_result(ptr_, b.out()));
    return b.vec();
  }
  /// The error of a failed work (status DC_OK when it has not failed).
  WorkError error() const {
    WorkError e;
    detail::Buf b;
    distcore::check(dc_work_error(ptr_, &e.status, b.out()));
    e.message = b.str();
    return e;
  }
  /// Throws the work's error if it failed; returns otherwise (also while pending).
  void throw_if_failed() const {
    WorkError e = error();
    if (e.status != DC_OK) throw_error(e.status, e.message);
  }
  /// Fails a pending work with DC_ERR_ABORTED ("Work aborted"); releases an
  /// async store operation's connection. A completed work is left as is.
  void abort() const { distcore::check(dc_work_abort(ptr_)); }
  /// Completes the work successfully; waiters wake and callbacks run on this
  /// thread. InvalidState if it had already completed.
  void finish() const { distcore::check(dc_work_finish(ptr_, DC_OK, nullptr)); }
  /// Completes the work as failed with `status` and `message` (empty: the
  /// status's description); DC_OK completes it successfully.
  void finish(dc_status status, std::string_view message = {}) const {
    std::string m(message);
    distcore::check(dc_work_finish(ptr_, status, m.empty() ? nullptr : m.c_str()));
  }
  /// finish(status, message), then throws that error (c10d's finishAndThrow).
  void finish_and_throw(dc_status status, std::string_view message = {}) const {
    std::string m(message);
    distcore::check(dc_work_finish_and_throw(ptr_, status, m.empty() ? nullptr : m.c_str()));
  }
  /// Completes the work successfully with a copy of `result` as its result.
  void finish_with_result(bytes_view result) const {
    distcore::check(dc_work_finish_with_result(ptr_, result.u8(), result.size()));
  }
  /// finish_with_result from (pointer, length).
  void finish_with_result(const void* data, size_t len) const { finish_with_result(bytes_view(data, len)); }
  /// Waits for device streams: CPU works have none (returns at once).
  void synchronize() const { distcore::check(dc_work_synchronize(ptr_)); }
  /// The rank a receive work got its data from (NotSupported for other
  /// works, InvalidState before it is known).
  int32_t source_rank() const {
    int32_t out = -1;
    distcore::check(dc_work_source_rank(ptr_, &out));
    return out;
  }
  /// Records the rank a receive work got its data from.
  void set_source_rank(int32_t rank) const { distcore::check(dc_work_set_source_rank(ptr_, rank)); }
  /// Time from creation to completion (InvalidState while pending).
  std::chrono::duration<double> duration() const {
    double s = 0;
    distcore::check(dc_work_duration(ptr_, &s));
    return std::chrono::duration<double>(s);
  }
  /// The process-wide sequence number, increasing with creation.
  uint64_t sequence_number() const {
    uint64_t out = 0;
    distcore::check(dc_work_sequence_number(ptr_, &out));
    return out;
  }
  /// The rank the work was created with (-1 for a future work).
  int32_t rank() const {
    int32_t out = -1;
    distcore::check(dc_work_rank(ptr_, &out));
    return out;
  }
  /// The op type (c10d's OpType).
  dc_op_type op_type() const {
    dc_op_type out = DC_OP_TYPE_UNKNOWN;
    distcore::check(dc_work_op_type(ptr_, &out));
    return out;
  }
  /// The timeout the work was created with (zero: none).
  std::chrono::milliseconds timeout() const {
    int64_t ms = 0;
    distcore::check(dc_work_timeout(ptr_, &ms));
    return std::chrono::milliseconds(ms);
  }
  /// An eventfd that becomes readable once the work completes, for
  /// poll/epoll: do not read or close it; it lives as long as the work.
  int fd() const {
    int out = -1;
    distcore::check(dc_work_fd(ptr_, &out));
    return out;
  }
  /// Runs `callback` once when the work completes: on the thread that
  /// completes it (a distcore thread for async store calls and RPC), or at
  /// once on this thread if it already has. The std::function is kept on
  /// the heap and freed right after it runs. It must not throw (exceptions
  /// are caught and dropped). A work that never completes (a Work you
  /// create and free unfinished) never runs, nor frees, its callbacks.
  void add_done_callback(WorkCallback callback) const {
    auto fn = std::make_unique<WorkCallback>(std::move(callback));
    distcore::check(dc_work_add_done_callback(ptr_, &detail::work_callback_trampoline, fn.get()));
    fn.release();  // owned by the callback now: it frees it when it runs
  }
  /// add_done_callback(callback).
  void then(WorkCallback callback) const { add_done_callback(std::move(callback)); }

 protected:
  const dc_work* ptr_ = nullptr;
};

namespace detail {
inline void work_callback_trampoline(const dc_work* work, void* user_data) noexcept {
  std::unique_ptr<WorkCallback> fn(static_cast<WorkCallback*>(user_data));
  try {
    if (*fn) (*fn)(WorkView(work));
  } catch (...) {
    // A callback cannot report to anyone: never let it cross the C boundary.
  }
}
}  // namespace detail

/// The completion handle of an asynchronous operation (c10d's Work), owning
/// its dc_work (freed in the destructor; the operation itself goes on,
/// except that an async store operation with no callback is released).
/// Move-only; every WorkView method applies.
class Work : public WorkView {
 public:
  /// An empty handle.
  Work() noexcept = default;
  /// Takes ownership of `work`.
  explicit Work(dc_work* work) noexcept : WorkView(work) {}
  /// A pending work of `rank` performing `op_type` (dc_work_new): with a
  /// `profiling_title`, the profiler hooks run now and at finish; `timeout`
  /// kDefault means none, otherwise it is the default of wait().
  Work(int32_t rank, dc_op_type op_type, std::optional<std::string_view> profiling_title = std::nullopt,
       Timeout timeout = kDefault) {
    std::optional<std::string> title;
    if (profiling_title) title.emplace(*profiling_title);
    dc_work* w = nullptr;
    distcore::check(dc_work_new(rank, op_type, title ? title->c_str() : nullptr, timeout.ms(), &w));
    ptr_ = w;
  }
  /// A pending work wrapping a future (rank -1, op type UNKNOWN), completed
  /// with finish_with_result() or finish() (dc_work_new_future).
  static Work future() {
    dc_work* w = nullptr;
    distcore::check(dc_work_new_future(&w));
    return Work(w);
  }
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;
  Work(Work&& other) noexcept : WorkView(other.release()) {}
  Work& operator=(Work&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  ~Work() { dc_work_free(native_handle()); }
  /// The C handle (still owned).
  dc_work* native_handle() const noexcept { return const_cast<dc_work*>(ptr_); }
  /// Gives up ownership: the caller frees the handle with dc_work_free.
  dc_work* release() noexcept {
    dc_work* w = native_handle();
    ptr_ = nullptr;
    return w;
  }
  /// Frees the current handle and takes `work`.
  void reset(dc_work* work = nullptr) noexcept {
    dc_work* old = native_handle();
    ptr_ = work;
    dc_work_free(old);
  }
  /// A borrowed view (valid while this Work owns the handle).
  WorkView view() const noexcept { return WorkView(ptr_); }
};

// ---------------------------------------------------------------------------
// Stores
// ---------------------------------------------------------------------------

/// A scoped store timeout (c10d's StoreTimeoutGuard): the destructor
/// restores the timeout the store had before. Move-only.
class StoreTimeoutGuard {
 public:
  StoreTimeoutGuard() noexcept = default;
  /// Takes ownership of `guard`.
  explicit StoreTimeoutGuard(dc_store_timeout_guard* guard) noexcept : handle_(guard) {}
  /// The C handle (still owned).
  dc_store_timeout_guard* native_handle() const noexcept { return handle_.get(); }
  /// Gives up ownership: the caller frees it with dc_store_timeout_guard_free.
  dc_store_timeout_guard* release() noexcept { return handle_.release(); }
  /// Restores the timeout now.
  void reset() noexcept { handle_.reset(); }
  explicit operator bool() const noexcept { return handle_ != nullptr; }

 private:
  std::unique_ptr<dc_store_timeout_guard, detail::GuardFree> handle_;
};

/// A handle on a store (HashStore, FileStore, PrefixStore or TCPStore) with
/// every dc_store_* operation. Thread-safe: one handle may be used from many
/// threads, and a call blocked in one does not hold up the others.
/// Move-only; clone() makes a new handle on the same store.
class Store {
 public:
  /// An empty handle (calls throw InvalidArgument).
  Store() noexcept = default;
  /// Takes ownership of `store`.
  explicit Store(dc_store* store) noexcept : handle_(store) {}
  Store(Store&&) noexcept = default;
  Store& operator=(Store&&) noexcept = default;
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;
  virtual ~Store() = default;

  /// The C handle (still owned).
  dc_store* native_handle() const noexcept { return handle_.get(); }
  /// Gives up ownership: the caller frees the handle with dc_store_free.
  dc_store* release() noexcept { return handle_.release(); }
  explicit operator bool() const noexcept { return handle_ != nullptr; }

  /// A new handle on the same store (c10d's clone; for a TCPStore, a new
  /// connection).
  Store clone() const {
    dc_store* s = nullptr;
    distcore::check(dc_store_clone(native_handle(), &s));
    return Store(s);
  }

  /// Sets `key` to `value`, waking the waiters of `key`.
  void set(std::string_view key, bytes_view value) const {
    distcore::check(dc_store_set(native_handle(), detail::c_string(key).c_str(), value.u8(), value.size()));
  }
  void set(std::string_view key, const void* data, size_t len) const { set(key, bytes_view(data, len)); }
  /// The value of `key`, waiting up to the store's timeout for it
  /// (TimeoutError "wait timeout after Nms, keys: key").
  std::string get(std::string_view key) const {
    detail::Buf b;
    distcore::check(dc_store_get(native_handle(), detail::c_string(key).c_str(), b.out()));
    return b.str();
  }
  /// Adds `delta` to the integer at `key` (a missing key is 0); returns the
  /// new value.
  int64_t add(std::string_view key, int64_t delta) const {
    int64_t out = 0;
    distcore::check(dc_store_add(native_handle(), detail::c_string(key).c_str(), delta, &out));
    return out;
  }
  /// Replaces the value of `key` with `desired` if it equals `expected` (a
  /// missing key matches an empty `expected`); returns the value now stored
  /// (or `expected` when the key is missing and `expected` is not empty).
  std::string compare_set(std::string_view key, bytes_view expected, bytes_view desired) const {
    detail::Buf b;
    distcore::check(dc_store_compare_set(native_handle(), detail::c_string(key).c_str(), expected.u8(), expected.size(), desired.u8(),
                               desired.size(), b.out()));
    return b.str();
  }
  /// Deletes `key`; returns whether it existed. Queues are not touched.
  bool delete_key(std::string_view key) const {
    bool out = false;
    distcore::check(dc_store_delete_key(native_handle(), detail::c_string(key).c_str(), &out));
    return out;
  }
  /// Whether all `keys` exist (as values or non-empty queues), without waiting.
  bool check(const std::vector<std::string>& keys) const {
    detail::Keys k(keys);
    bool out = false;
    distcore::check(dc_store_check(native_handle(), k.data(), k.size(), &out));
    return out;
  }
  /// Blocks until all `keys` exist, for at most `timeout` (kDefault: the
  /// store's timeout). TimeoutError after it.
  void wait(const std::vector<std::string>& keys, Timeout timeout = kDefault) const {
    detail::Keys k(keys);
    distcore::check(dc_store_wait(native_handle(), k.data(), k.size(), timeout.ms()));
  }
  /// The number of keys holding values (queues are not counted).
  int64_t num_keys() const {
    int64_t out = 0;
    distcore::check(dc_store_num_keys(native_handle(), &out));
    return out;
  }
  /// Appends `value` to the value of `key` (creating it).
  void append(std::string_view key, bytes_view value) const {
    distcore::check(dc_store_append(native_handle(), detail::c_string(key).c_str(), value.u8(), value.size()));
  }
  void append(std::string_view key, const void* data, size_t len) const { append(key, bytes_view(data, len)); }
  /// The values of `keys`, in order, waiting up to the store's timeout for all.
  std::vector<std::string> multi_get(const std::vector<std::string>& keys) const {
    detail::Keys k(keys);
    struct Bufs {
      std::vector<dc_buf> v;
      ~Bufs() {
        for (dc_buf& b : v) dc_buf_free(&b);
      }
    } bufs;
    bufs.v.assign(keys.size(), dc_buf{});
    distcore::check(dc_store_multi_get(native_handle(), k.data(), k.size(), bufs.v.data()));
    std::vector<std::string> out;
    out.reserve(bufs.v.size());
    for (const dc_buf& b : bufs.v) {
      out.emplace_back(b.len ? std::string(reinterpret_cast<const char*>(b.data), b.len) : std::string());
    }
    return out;
  }
  /// Sets `keys[i]` to `values[i]` (InvalidArgument if the sizes differ).
  void multi_set(const std::vector<std::string>& keys, const std::vector<std::string>& values) const {
    if (keys.size() != values.size()) {
      throw InvalidArgument("multi_set: " + std::to_string(keys.size()) + " keys but " +
                            std::to_string(values.size()) + " values");
    }
    detail::Keys k(keys);
    std::vector<const uint8_t*> ptrs;
    std::vector<size_t> lens;
    ptrs.reserve(values.size());
    lens.reserve(values.size());
    for (const std::string& v : values) {
      ptrs.push_back(reinterpret_cast<const uint8_t*>(v.data()));
      lens.push_back(v.size());
    }
    distcore::check(dc_store_multi_set(native_handle(), k.data(), ptrs.data(), lens.data(), k.size()));
  }
  /// Pushes `value` onto the back of the queue `key`, waking one waiter.
  void queue_push(std::string_view key, bytes_view value) const {
    distcore::check(dc_store_queue_push(native_handle(), detail::c_string(key).c_str(), value.u8(), value.size()));
  }
  void queue_push(std::string_view key, const void* data, size_t len) const {
    queue_push(key, bytes_view(data, len));
  }
  /// Pops the front of the queue `key`. Blocking: waits up to the store's
  /// timeout (TimeoutError); not blocking: an empty queue throws QueueEmpty.
  std::string queue_pop(std::string_view key, bool block = true) const {
    detail::Buf b;
    distcore::check(dc_store_queue_pop(native_handle(), detail::c_string(key).c_str(), block, b.out()));
    return b.str();
  }
  /// A non-blocking pop: std::nullopt when the queue is empty.
  std::optional<std::string> try_queue_pop(std::string_view key) const {
    detail::Buf b;
    dc_status s = dc_store_queue_pop(native_handle(), detail::c_string(key).c_str(), false, b.out());
    if (s == DC_ERR_QUEUE_EMPTY) return std::nullopt;
    distcore::check(s);
    return b.str();
  }
  /// The number of elements in the queue `key`.
  int64_t queue_len(std::string_view key) const {
    int64_t out = 0;
    distcore::check(dc_store_queue_len(native_handle(), detail::c_string(key).c_str(), &out));
    return out;
  }
  /// Every key holding a value.
  std::vector<std::string> list_keys() const {
    detail::BufArray a;
    distcore::check(dc_store_list_keys(native_handle(), a.out()));
    return a.strings();
  }
  /// Since 1.4. The keys holding a value that start with `prefix`.
  std::vector<std::string> list_prefix(std::string_view prefix) const {
    detail::BufArray a;
    distcore::check(dc_store_list_prefix(native_handle(), detail::c_string(prefix).c_str(), a.out()));
    return a.strings();
  }
  /// Since 1.4. Deletes every key starting with `prefix`; returns how many
  /// values it deleted. See dc_store_delete_prefix (which stores delete
  /// queues too, and which in one step).
  int64_t delete_prefix(std::string_view prefix) const {
    int64_t out = 0;
    distcore::check(dc_store_delete_prefix(native_handle(), detail::c_string(prefix).c_str(), &out));
    return out;
  }
  /// Blocks until `world_size` callers have entered the barrier `key`, for
  /// at most `timeout` (kDefault: the store's timeout).
  void barrier(std::string_view key, int32_t world_size, Timeout timeout = kDefault) const {
    distcore::check(dc_store_barrier(native_handle(), detail::c_string(key).c_str(), world_size, timeout.ms()));
  }
  /// The store's default timeout (zero: forever).
  std::chrono::milliseconds timeout() const {
    int64_t ms = 0;
    distcore::check(dc_store_get_timeout(native_handle(), &ms));
    return std::chrono::milliseconds(ms);
  }
  /// Sets the store's default timeout (kForever or a positive duration;
  /// kDefault is InvalidArgument).
  void set_timeout(Timeout timeout) const { distcore::check(dc_store_set_timeout(native_handle(), timeout.ms())); }
  /// Sets the store's timeout until the returned guard is destroyed, which
  /// restores the previous one.
  [[nodiscard]] StoreTimeoutGuard timeout_guard(Timeout timeout) const {
    dc_store_timeout_guard* g = nullptr;
    distcore::check(dc_store_timeout_guard_new(native_handle(), timeout.ms(), &g));
    return StoreTimeoutGuard(g);
  }

  /// native_handle() in the background: the work's result() is the value. On a
  /// TCPStore the work completes (and callbacks run) on distcore's async
  /// thread; on a HashStore on the thread whose change satisfies it (or the
  /// timer thread on a timeout); on a FileStore on a thread of its own.
  /// Destroying the Work (with no callback) or abort() releases the operation.
  [[nodiscard]] Work get_async(std::string_view key) const {
    dc_work* w = nullptr;
    distcore::check(dc_store_get_async(native_handle(), detail::c_string(key).c_str(), &w));
    return Work(w);
  }
  /// wait() in the background; the work completes when the keys exist.
  [[nodiscard]] Work wait_async(const std::vector<std::string>& keys, Timeout timeout = kDefault) const {
    detail::Keys k(keys);
    dc_work* w = nullptr;
    distcore::check(dc_store_wait_async(native_handle(), k.data(), k.size(), timeout.ms(), &w));
    return Work(w);
  }
  /// A blocking queue_pop() in the background; the work's result() is the element.
  [[nodiscard]] Work queue_pop_async(std::string_view key) const {
    dc_work* w = nullptr;
    distcore::check(dc_store_queue_pop_async(native_handle(), detail::c_string(key).c_str(), &w));
    return Work(w);
  }
  /// barrier() in the background; the work completes when the barrier releases.
  [[nodiscard]] Work barrier_async(std::string_view key, int32_t world_size, Timeout timeout = kDefault) const {
    dc_work* w = nullptr;
    distcore::check(dc_store_barrier_async(native_handle(), detail::c_string(key).c_str(), world_size, timeout.ms(), &w));
    return Work(w);
  }

 protected:
  std::unique_ptr<dc_store, detail::StoreFree> handle_;
};

/// An in-process store (c10d's HashStore), shared by every thread using the
/// handle or its clones. Default timeout 300 s.
class HashStore : public Store {
 public:
  /// A new, empty store.
  HashStore() {
    dc_store* s = nullptr;
    distcore::check(dc_hash_store_new(&s));
    handle_.reset(s);
  }
};

/// A store in a file shared by processes on this host or a shared
/// filesystem, in PyTorch's FileStore format.
class FileStore : public Store {
 public:
  /// Opens (creating it if needed) the store at `path`; `world_size` < 0:
  /// none, else the file is removed when `world_size` handles have closed.
  /// IoError for a path that cannot be opened, InvalidArgument for a file
  /// that is not a FileStore.
  explicit FileStore(std::string_view path, int32_t world_size = -1) {
    dc_store* s = nullptr;
    distcore::check(dc_file_store_new(detail::c_string(path).c_str(), world_size, &s));
    handle_.reset(s);
  }
};

/// A view of `store` where every key `k` is `prefix + "/" + k` (c10d's
/// PrefixStore). Keeps the underlying store alive.
class PrefixStore : public Store {
 public:
  PrefixStore(std::string_view prefix, const Store& store) {
    dc_store* s = nullptr;
    distcore::check(dc_prefix_store_new(detail::c_string(prefix).c_str(), store.native_handle(), &s));
    handle_.reset(s);
  }
};

namespace detail {
/// The options of open_session (`group` must outlive them).
inline dc_session_options session_options(const std::string& group, int32_t rank, int32_t world_size,
                                          uint64_t incarnation, int64_t ttl_ms, bool recoverable) {
  dc_session_options o;
  distcore::check(dc_session_options_init(&o, sizeof o));
  o.group = group.c_str();
  o.rank = rank;
  o.world_size = world_size;
  o.incarnation = incarnation;
  o.ttl_ms = ttl_ms;
  o.recoverable = recoverable;
  return o;
}
}  // namespace detail

/// A store whose keys live in an etcd v3 cluster (3.4 or newer), under a
/// job's prefix. See dc_etcd_store_new.
class EtcdStore : public Store {
 public:
  /// On the members `endpoints` ("host:port"), under `prefix`, every call
  /// bounded by `timeout_ms` (none: the library's default; 0: forever).
  explicit EtcdStore(const std::vector<std::string>& endpoints, std::string_view prefix = "/distcore",
                     std::optional<int64_t> timeout_ms = std::nullopt) {
    dc_etcd_store_options o;
    distcore::check(dc_etcd_store_options_init(&o, sizeof o));
    std::vector<const char*> hosts;
    for (const std::string& e : endpoints) hosts.push_back(e.c_str());
    std::string p(prefix);
    o.endpoints = hosts.data();
    o.num_endpoints = hosts.size();
    o.prefix = p.c_str();
    if (timeout_ms) o.timeout_ms = *timeout_ms;
    dc_store* s = nullptr;
    distcore::check(dc_etcd_store_new(&o, &s));
    handle_.reset(s);
  }
  /// Takes ownership of an EtcdStore handle.
  explicit EtcdStore(dc_store* store) noexcept : Store(store) {}
  /// Since 1.4. Opens a liveness session of this process, an etcd lease
  /// the library renews (docs/liveness.md, "On etcd"): when another member
  /// of `group` fails, blocked and later calls throw PeerFailedError
  /// naming it. See dc_etcd_store_open_session.
  void open_session(const std::string& group, int32_t rank, int32_t world_size = -1,
                    uint64_t incarnation = 0, int64_t ttl_ms = 0) const {
    dc_session_options o = detail::session_options(group, rank, world_size, incarnation, ttl_ms, false);
    distcore::check(dc_etcd_store_open_session(native_handle(), &o));
  }
  /// Since 1.4. Closes the handle's session gracefully.
  void close_session() const { distcore::check(dc_etcd_store_close_session(native_handle())); }
  /// Since 1.4. Ends the handle's session with this process's own error.
  void report_error(const std::string& message) const {
    distcore::check(dc_etcd_store_report_error(native_handle(), message.c_str()));
  }
  /// Since 1.4. A view whose writes put their keys on the session's etcd
  /// lease. See dc_etcd_store_leased.
  EtcdStore leased() const {
    dc_store* s = nullptr;
    distcore::check(dc_etcd_store_leased(native_handle(), &s));
    return EtcdStore(s);
  }
};

namespace detail {

/// Points an options struct's secret and TLS fields (dc_tcp_store_options,
/// dc_rpc_options) at these strings (empty: none); paths with a NUL
/// inside are InvalidArgument.
template <class Options>
void set_guards(Options& o, const std::string& secret, const std::string& cert, const std::string& key,
                const std::string& ca, const std::string& client_ca, const std::string& server_name) {
  o.secret = secret.empty() ? nullptr : reinterpret_cast<const uint8_t*>(secret.data());
  o.secret_len = secret.size();
  const char** fields[] = {&o.tls_cert_file, &o.tls_key_file, &o.tls_ca_file, &o.tls_client_ca_file,
                           &o.tls_server_name};
  const std::string* texts[] = {&cert, &key, &ca, &client_ca, &server_name};
  for (size_t i = 0; i < 5; ++i) {
    (void)c_string(*texts[i]);  // no NUL inside
    *fields[i] = texts[i]->empty() ? nullptr : texts[i]->c_str();
  }
}

}  // namespace detail

/// Options of a TCPStore (torch.distributed.TCPStore's arguments); the
/// defaults are those of dc_tcp_store_options_init.
namespace detail {
/// The C defaults of an options struct, read once from its _init function
/// (the one place the numbers live).
template <class Options>
const Options& c_defaults(dc_status (*init)(Options*, size_t)) {
  static const Options defaults = [init] {
    Options o;
    distcore::check(init(&o, sizeof o));
    return o;
  }();
  return defaults;
}
inline const dc_tcp_store_options& tcp_defaults() { return c_defaults(dc_tcp_store_options_init); }
inline const dc_rpc_options& rpc_defaults() { return c_defaults(dc_rpc_options_init); }
}  // namespace detail

struct TCPStoreOptions {
  /// Host to connect to (a name, an IPv4 or IPv6 literal).
  std::string host = detail::tcp_defaults().host;
  /// Port; for a server 0 picks a free one (TCPStore::port()).
  uint16_t port = detail::tcp_defaults().port;
  /// Start a server in this process (PyTorch's is_master).
  bool is_server = detail::tcp_defaults().is_server;
  /// Number of store handles in the job, server included; -1: unknown.
  int32_t world_size = detail::tcp_defaults().world_size;
  /// Count this handle in `init/`; the server then waits for world_size.
  bool wait_for_workers = detail::tcp_defaults().wait_for_workers;
  /// Timeout of connecting and of every call (kForever: none; kDefault: the
  /// library's default, 300 s).
  Timeout timeout = Timeout::from_c(detail::tcp_defaults().timeout_ms);
  /// Share one server among handles of this process on the same port.
  bool multi_tenant = detail::tcp_defaults().multi_tenant;
  /// Serve on this already-listening socket; -1: bind a new one. With
  /// is_server, distcore owns the fd from the TCPStore constructor on,
  /// whatever its outcome. Ignored by clients.
  int master_listen_fd = detail::tcp_defaults().master_listen_fd;
  /// Listen only on this IP address; empty: every interface.
  std::string bind_address;
  /// Largest value the server accepts, in bytes; 0: 64 MiB.
  uint64_t max_value_size = detail::tcp_defaults().max_value_size;
  /// The shared secret (any bytes); empty: no authentication. A server
  /// requires clients to prove they hold it, a client proves it and
  /// requires the server to (PermissionDenied otherwise). Never sent.
  std::string secret;
  /// Server: networks clients may connect from, "10.0.0.0/8,::1"; empty: any.
  std::string allow;
  /// Server with a secret: networks whose clients need not authenticate.
  std::string allow_unauthenticated;
  /// Server quotas; 0: none. A write past one throws QuotaExceeded, except
  /// set, multi_set and queue_push, which have no reply: their refusal
  /// throws QuotaExceeded from a later call of the handle (the next one
  /// that only reads, or the one after a write), and the write is not made.
  uint64_t max_connections = detail::tcp_defaults().max_connections;
  uint64_t max_keys = detail::tcp_defaults().max_keys;
  uint64_t max_stored_bytes = detail::tcp_defaults().max_stored_bytes;
  /// TLS, as paths of PEM files; empty: none (files that do not go
  /// together, or cannot be read, are InvalidArgument). A certificate chain
  /// (its own certificate first) and its private key, given together: a
  /// server serves TLS with them (clients in clear only from
  /// allow_unauthenticated; others get PermissionDenied), a client presents
  /// them to servers that verify clients.
  std::string tls_cert_file;
  std::string tls_key_file;
  /// Client (a server's own handle included): connect over TLS trusting
  /// these CA certificates; empty: in clear. A server they do not vouch for
  /// is PermissionDenied.
  std::string tls_ca_file;
  /// Server with tls_cert_file: require client certificates from these CAs
  /// (mutual TLS).
  std::string tls_client_ca_file;
  /// Client: check the server's certificate against this name (DNS name or
  /// IP address) instead of host.
  std::string tls_server_name;

  /// The C options (pointing into this object): dc_tcp_store_options_init,
  /// then every field.
  dc_tcp_store_options to_c() const {
    dc_tcp_store_options o;
    distcore::check(dc_tcp_store_options_init(&o, sizeof o));
    for (const std::string* text : {&host, &bind_address, &allow, &allow_unauthenticated}) {
      (void)detail::c_string(*text);  // no NUL inside
    }
    o.host = host.c_str();
    o.port = port;
    o.is_server = is_server;
    o.world_size = world_size;
    o.wait_for_workers = wait_for_workers;
    if (!timeout.is_default()) o.timeout_ms = timeout.ms();
    o.multi_tenant = multi_tenant;
    o.master_listen_fd = master_listen_fd;
    o.bind_address = bind_address.empty() ? nullptr : bind_address.c_str();
    o.max_value_size = max_value_size;
    detail::set_guards(o, secret, tls_cert_file, tls_key_file, tls_ca_file, tls_client_ca_file, tls_server_name);
    o.allow = allow.empty() ? nullptr : allow.c_str();
    o.allow_unauthenticated = allow_unauthenticated.empty() ? nullptr : allow_unauthenticated.c_str();
    o.max_connections = max_connections;
    o.max_keys = max_keys;
    o.max_stored_bytes = max_stored_bytes;
    return o;
  }
};

/// One operation's latency statistics on a TCPStore handle.
struct ClientCounter {
  std::string op;
  uint64_t count = 0;
  double mean_ms = 0;
  double variance_ms = 0;
};

/// A TCPStore handle (and, with is_server, its server): see dc_tcp_store_new
/// for what it promises about threads, time, limits and recovery.
class TCPStore : public Store {
 public:
  /// Starts the server if `options.is_server` and connects (retrying until
  /// the timeout: NetworkError); with a world size and wait_for_workers the
  /// server blocks until every worker joined (TimeoutError).
  explicit TCPStore(const TCPStoreOptions& options) {
    dc_tcp_store_options o;
    try {
      o = options.to_c();
    } catch (...) {
      // The fd is distcore's whatever the outcome: closed on this one too,
      // by the library (dc_tcp_store_new takes it before refusing the NULL
      // out pointer), so this header needs no POSIX declaration.
      if (options.is_server && options.master_listen_fd >= 0) {
        dc_tcp_store_options closing;
        if (dc_tcp_store_options_init(&closing, sizeof closing) == DC_OK) {
          closing.is_server = true;
          closing.master_listen_fd = options.master_listen_fd;
          (void)dc_tcp_store_new(&closing, nullptr);
        }
      }
      throw;
    }
    dc_store* s = nullptr;
    distcore::check(dc_tcp_store_new(&o, &s));
    handle_.reset(s);
  }
  /// Takes ownership of `store`, a TCPStore handle.
  explicit TCPStore(dc_store* store) noexcept : Store(store) {}
  /// A new handle (a new connection) on the same server.
  TCPStore clone() const {
    dc_store* s = nullptr;
    distcore::check(dc_store_clone(native_handle(), &s));
    return TCPStore(s);
  }
  /// The port of the server (the chosen one when a server asked for 0).
  uint16_t port() const {
    uint16_t out = 0;
    distcore::check(dc_tcp_store_port(native_handle(), &out));
    return out;
  }
  /// Counts this handle in `init/` and, on the server, blocks until the
  /// world size is reached. Does nothing without a world size.
  void wait_for_workers() const { distcore::check(dc_tcp_store_wait_for_workers(native_handle())); }
  /// Since 1.4. Opens a liveness session of this process (rank `rank` of
  /// `group`; `world_size` -1: unknown; `incarnation` 0: a fresh one;
  /// `ttl_ms` 0: no TTL, only the connection tells):
  /// from then on, when another member fails, every blocked and later call
  /// of this handle throws PeerFailedError at once, naming it
  /// (docs/liveness.md). See dc_tcp_store_open_session.
  void open_session(const std::string& group, int32_t rank, int32_t world_size = -1,
                    uint64_t incarnation = 0, int64_t ttl_ms = 0, bool recoverable = false) const {
    dc_session_options o = detail::session_options(group, rank, world_size, incarnation, ttl_ms, recoverable);
    distcore::check(dc_tcp_store_open_session(native_handle(), &o));
  }
  /// Since 1.4. A recoverable group's membership at one epoch.
  struct Members {
    uint64_t epoch = 0;
    std::vector<dc_member> members;  ///< by rank
  };
  /// Since 1.4. The membership of this handle's recoverable group. See
  /// dc_tcp_store_members.
  Members members() const {
    Members out;
    size_t n = 0;
    distcore::check(dc_tcp_store_members(native_handle(), &out.epoch, nullptr, 0, &n));
    for (;;) {
      out.members.assign(n, dc_member{});
      size_t total = 0;
      distcore::check(dc_tcp_store_members(native_handle(), &out.epoch, out.members.data(), out.members.size(), &total));
      if (total <= out.members.size()) {
        out.members.resize(total);
        return out;
      }
      n = total;
    }
  }
  /// Since 1.4. A Work that completes once the membership of this handle's
  /// recoverable group has passed `epoch`. See dc_tcp_store_watch_members.
  Work watch_members(uint64_t epoch) const {
    dc_work* w = nullptr;
    distcore::check(dc_tcp_store_watch_members(native_handle(), epoch, &w));
    return Work(w);
  }
  /// Since 1.4. Closes the handle's session gracefully.
  void close_session() const { distcore::check(dc_tcp_store_close_session(native_handle())); }
  /// Since 1.4. Ends the handle's session with this process's own error,
  /// which the other members receive as PeerFailedError.
  void report_error(const std::string& message) const {
    distcore::check(dc_tcp_store_report_error(native_handle(), message.c_str()));
  }
  /// Since 1.4. A view of this handle whose writes tie their keys to the
  /// handle's session: the server deletes them when the session ends,
  /// however it ends. It shares the handle's connections and session. See
  /// dc_tcp_store_leased.
  TCPStore leased() const {
    dc_store* s = nullptr;
    distcore::check(dc_tcp_store_leased(native_handle(), &s));
    return TCPStore(s);
  }
  /// Per-operation latency counters of this handle.
  std::vector<ClientCounter> counters() const {
    size_t n = 0;
    distcore::check(dc_tcp_store_counters(native_handle(), nullptr, 0, &n));
    std::vector<dc_client_counter> raw;
    for (;;) {
      raw.assign(n, dc_client_counter{});
      size_t total = 0;
      distcore::check(dc_tcp_store_counters(native_handle(), raw.data(), raw.size(), &total));
      if (total <= raw.size()) {
        raw.resize(total);
        break;
      }
      n = total;  // more operations ran meanwhile
    }
    std::vector<ClientCounter> out;
    out.reserve(raw.size());
    for (const dc_client_counter& c : raw) {
      out.push_back(ClientCounter{c.op ? c.op : "", c.count, c.mean_ms, c.variance_ms});
    }
    return out;
  }
  /// The load of the server this handle runs (InvalidArgument for a handle
  /// that runs no server).
  dc_server_stats server_stats() const {
    dc_server_stats s{};
    s.struct_size = sizeof s;
    distcore::check(dc_tcp_store_server_stats(native_handle(), &s));
    return s;
  }
  /// The metrics of the server this handle runs, in Prometheus's text
  /// format (InvalidArgument for a handle that runs no server).
  std::string server_metrics() const {
    detail::Buf b;
    distcore::check(dc_tcp_store_server_metrics(native_handle(), b.out()));
    return b.str();
  }
};

// ---------------------------------------------------------------------------
// torchelastic helpers
// ---------------------------------------------------------------------------

namespace elastic {

/// Blocks until `world_size` members entered the barrier `key_prefix`
/// (usable once per prefix), with the store's timeout set to `timeout`
/// meanwhile (kDefault: keep the store's).
inline void barrier(const Store& store, int32_t world_size, std::string_view key_prefix,
                    Timeout timeout = kDefault) {
  distcore::check(dc_elastic_barrier(store.native_handle(), world_size, detail::c_string(key_prefix).c_str(), timeout.ms()));
}

/// barrier() that, on a timeout, names the ranks that never arrived
/// (waiting up to `trace_timeout` for the first) in its TimeoutError.
inline void barrier_traced(const Store& store, int32_t world_size, std::string_view key_prefix, Timeout timeout,
                           int32_t rank, Timeout trace_timeout) {
  distcore::check(dc_elastic_barrier_traced(store.native_handle(), world_size, detail::c_string(key_prefix).c_str(), timeout.ms(), rank,
                                  trace_timeout.ms()));
}

/// Publishes `data` as `<key_prefix><rank>` and returns every rank's data
/// in rank order; the store's timeout is `timeout` meanwhile.
inline std::vector<std::string> synchronize(const Store& store, bytes_view data, int32_t rank, int32_t world_size,
                                            std::string_view key_prefix, Timeout timeout = kDefault) {
  detail::BufArray a;
  distcore::check(dc_elastic_synchronize(store.native_handle(), data.u8(), data.size(), rank, world_size,
                               detail::c_string(key_prefix).c_str(), timeout.ms(), a.out()));
  return a.strings();
}

/// The values of `<prefix>0` .. `<prefix><world_size-1>` (waiting for each),
/// then checks in to `<prefix>/finished`; rank 0 waits for every rank.
inline std::vector<std::string> get_all(const Store& store, int32_t rank, std::string_view prefix,
                                        int32_t world_size) {
  detail::BufArray a;
  distcore::check(dc_elastic_get_all(store.native_handle(), rank, detail::c_string(prefix).c_str(), world_size, a.out()));
  return a.strings();
}

}  // namespace elastic

// ---------------------------------------------------------------------------
// RPC and RRefs
// ---------------------------------------------------------------------------

class RRef;

/// A borrowed view of a dc_rref (a registered function's argument, or an
/// RRef): every query, none of the ownership.
class RRefView {
 public:
  RRefView() noexcept = default;
  explicit RRefView(const dc_rref* rref) noexcept : ptr_(rref) {}
  /// The C handle (borrowed).
  const dc_rref* native_handle() const noexcept { return ptr_; }
  explicit operator bool() const noexcept { return ptr_ != nullptr; }

  /// The value: fetched from the owner (blocking up to `timeout`; kDefault:
  /// the RPC timeout), or local on the owner. Throws the RRef's creation
  /// error (RemoteError when its function failed).
  std::string to_here(Timeout timeout = kDefault) const {
    detail::Buf b;
    distcore::check(dc_rref_to_here(ptr_, timeout.ms(), b.out()));
    return b.str();
  }
  /// The value of an RRef this worker owns; InvalidState on a user.
  std::string local_value() const {
    detail::Buf b;
    distcore::check(dc_rref_local_value(ptr_, b.out()));
    return b.str();
  }
  /// The owner's worker id.
  int32_t owner_id() const {
    int32_t out = -1;
    distcore::check(dc_rref_owner_id(ptr_, &out));
    return out;
  }
  /// The owner's worker name.
  std::string owner_name() const {
    detail::Buf b;
    distcore::check(dc_rref_owner_name(ptr_, b.out()));
    return b.str();
  }
  /// Whether this handle is on the owner.
  bool is_owner() const {
    bool out = false;
    distcore::check(dc_rref_is_owner(ptr_, &out));
    return out;
  }
  /// Whether the owner has confirmed this reference (true on the owner).
  bool confirmed_by_owner() const {
    bool out = false;
    distcore::check(dc_rref_confirmed_by_owner(ptr_, &out));
    return out;
  }
  /// A new owning handle on the same reference (not a new fork): keep an
  /// RRef a function received beyond the call.
  inline RRef clone() const;

 protected:
  const dc_rref* ptr_ = nullptr;
};

/// An owning remote reference (dc_rref, freed in the destructor: the last
/// handle of a user's fork tells the owner). Move-only; every RRefView
/// method applies, and it converts to an RRefView to pass to calls.
class RRef : public RRefView {
 public:
  RRef() noexcept = default;
  /// Takes ownership of `rref`.
  explicit RRef(dc_rref* rref) noexcept : RRefView(rref) {}
  RRef(const RRef&) = delete;
  RRef& operator=(const RRef&) = delete;
  RRef(RRef&& other) noexcept : RRefView(other.release()) {}
  RRef& operator=(RRef&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  ~RRef() { dc_rref_free(native_handle()); }
  /// The C handle (still owned).
  dc_rref* native_handle() const noexcept { return const_cast<dc_rref*>(ptr_); }
  /// Gives up ownership: the caller frees it with dc_rref_free.
  dc_rref* release() noexcept {
    dc_rref* r = native_handle();
    ptr_ = nullptr;
    return r;
  }
  /// Frees the current handle and takes `rref`.
  void reset(dc_rref* rref = nullptr) noexcept {
    dc_rref* old = native_handle();
    ptr_ = rref;
    dc_rref_free(old);
  }
  /// A borrowed view (valid while this RRef owns the handle).
  RRefView view() const noexcept { return RRefView(ptr_); }
};

inline RRef RRefView::clone() const {
  dc_rref* r = nullptr;
  distcore::check(dc_rref_clone(ptr_, &r));
  return RRef(r);
}

/// A function other workers call by name: the argument bytes, the RRefs
/// passed along (borrowed views, confirmed by their owners; clone() one to
/// keep it) and the caller's id; returns the result bytes. Runs on one of
/// the RPC worker threads (up to num_worker_threads calls at once, so it
/// must be thread-safe) and may call distcore, RPCs included. A thrown
/// distcore::Error reaches the caller as RemoteError with its message (as
/// does any std::exception's what()); no exception crosses into distcore.
using RpcFunction =
    std::function<std::string(std::string_view args, const std::vector<RRefView>& rrefs, int32_t caller_id)>;

/// Options of an Rpc; the defaults are those of dc_rpc_options_init.
struct RpcOptions {
  /// Threads running functions and RRef handlers.
  uint32_t num_worker_threads = detail::rpc_defaults().num_worker_threads;
  /// Default timeout of calls, remote(), to_here and control messages
  /// (kDefault: the library's, 60 s; kForever: none).
  Timeout rpc_timeout = Timeout::from_c(detail::rpc_defaults().rpc_timeout_ms);
  /// Address to listen on and advertise.
  std::string listen_address = detail::rpc_defaults().listen_address;
  /// Report leaked RRefs at graceful shutdown as a warning (true) or fail
  /// the shutdown with InvalidState listing them.
  bool ignore_rref_leak = detail::rpc_defaults().ignore_rref_leak;
  /// Functions registered before this worker becomes reachable (name, function).
  std::vector<std::pair<std::string, RpcFunction>> functions;
  /// The group's shared secret (any bytes; empty: none): every connection
  /// between workers authenticates with it before any message; a worker
  /// without it fails calls with PermissionDenied. The same on every worker.
  std::string secret;
  /// TLS between workers, as paths of PEM files (empty: none): this
  /// worker's certificate chain and key (valid for listen_address) and the
  /// CA certificates of the others', given together; tls_client_ca_file
  /// verifies connecting workers too; tls_server_name checks peers'
  /// certificates against that name instead of their addresses.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_ca_file;
  std::string tls_client_ca_file;
  std::string tls_server_name;
};

namespace detail {

struct RpcEntry {
  std::string name;
  RpcFunction function;
};

inline dc_status rpc_trampoline(const uint8_t* args, size_t len, const dc_rref* const* rrefs, size_t num_rrefs,
                                int32_t caller_id, dc_rpc_reply* reply, void* user_data) noexcept {
  try {
    const RpcEntry* entry = static_cast<const RpcEntry*>(user_data);
    std::vector<RRefView> views;
    views.reserve(num_rrefs);
    for (size_t i = 0; i < num_rrefs; ++i) views.emplace_back(rrefs[i]);
    std::string_view in = len ? std::string_view(reinterpret_cast<const char*>(args), len) : std::string_view();
    std::string out = entry->function(in, views, caller_id);
    return dc_rpc_reply_set(reply, reinterpret_cast<const uint8_t*>(out.data()), out.size());
  } catch (const Error& e) {
    dc_rpc_reply_set_error(reply, e.what());
    return e.status() != DC_OK ? e.status() : DC_ERR_REMOTE;
  } catch (const std::exception& e) {
    dc_rpc_reply_set_error(reply, e.what());
    return DC_ERR_REMOTE;
  } catch (...) {
    dc_rpc_reply_set_error(reply, "unknown C++ exception");
    return DC_ERR_REMOTE;
  }
}

}  // namespace detail

/// A worker of an RPC group (dc_rpc). Owns its handle and the registered
/// functions, which it frees only after dc_rpc_free returned (no function
/// runs any more then). Thread-safe; move-only. Destroy it before the Store
/// it joined through. RRefs may outlive it (their calls then throw
/// ShutDown).
class Rpc {
 public:
  /// Joins an RPC group of `world_size` workers through `store` as `name`
  /// with id `rank`: blocks until every worker has joined (TimeoutError
  /// after the RPC timeout). `options.functions` are registered first.
  Rpc(const Store& store, std::string_view name, int32_t rank, int32_t world_size, RpcOptions options = {}) {
    dc_rpc_options o;
    distcore::check(dc_rpc_options_init(&o, sizeof o));
    o.num_worker_threads = options.num_worker_threads;
    if (!options.rpc_timeout.is_default()) o.rpc_timeout_ms = options.rpc_timeout.ms();
    (void)detail::c_string(options.listen_address);  // no NUL inside
    o.listen_address = options.listen_address.c_str();
    o.ignore_rref_leak = options.ignore_rref_leak;
    detail::set_guards(o, options.secret, options.tls_cert_file, options.tls_key_file, options.tls_ca_file,
                       options.tls_client_ca_file, options.tls_server_name);
    std::vector<dc_rpc_function_entry> entries;
    entries.reserve(options.functions.size());
    for (auto& f : options.functions) {
      functions_.push_back(
          std::make_unique<detail::RpcEntry>(detail::RpcEntry{detail::c_string(f.first), std::move(f.second)}));
      const detail::RpcEntry* e = functions_.back().get();
      entries.push_back(dc_rpc_function_entry{e->name.c_str(), &detail::rpc_trampoline,
                                              const_cast<detail::RpcEntry*>(e)});
    }
    o.functions = entries.data();
    o.num_functions = entries.size();
    dc_rpc* r = nullptr;
    distcore::check(dc_rpc_init(store.native_handle(), detail::c_string(name).c_str(), rank, world_size, &o, &r));
    handle_.reset(r);
  }
  Rpc(Rpc&&) noexcept = default;
  /// Frees this handle (stopping its worker) before taking `other`'s.
  Rpc& operator=(Rpc&& other) noexcept {
    if (this != &other) {
      handle_ = std::move(other.handle_);  // the old worker stops here ...
      functions_ = std::move(other.functions_);  // ... before its functions go
    }
    return *this;
  }
  Rpc(const Rpc&) = delete;
  Rpc& operator=(const Rpc&) = delete;
  /// Stops the worker (not gracefully, if shutdown() was not called) and
  /// frees it, then its functions.
  ~Rpc() { handle_.reset(); }

  /// The C handle (still owned).
  dc_rpc* native_handle() const noexcept { return handle_.get(); }
  /// Gives up ownership of the handle; the registered functions stay with
  /// this object, which must then outlive the handle.
  dc_rpc* release() noexcept { return handle_.release(); }

  /// Registers (or replaces) a function after init; calls may arrive before
  /// other workers see it: prefer RpcOptions::functions.
  void register_function(std::string_view name, RpcFunction function) {
    auto entry = std::make_unique<detail::RpcEntry>(detail::RpcEntry{detail::c_string(name), std::move(function)});
    functions_.reserve(functions_.size() + 1);
    distcore::check(dc_rpc_register_function(native_handle(), entry->name.c_str(), &detail::rpc_trampoline, entry.get()));
    functions_.push_back(std::move(entry));  // a replaced one stays: it may still be running
  }

  /// Calls `func` on worker `to` and returns its reply. Blocks; RemoteError
  /// with the remote message when the function fails there, TimeoutError
  /// after `timeout` (kDefault: the RPC timeout), NetworkError when the
  /// worker is unreachable, ShutDown after shutdown().
  std::string sync(std::string_view to, std::string_view func, bytes_view args = {},
                   const std::vector<RRefView>& rrefs = {}, Timeout timeout = kDefault) const {
    std::vector<const dc_rref*> r = raw(rrefs);
    detail::Buf b;
    distcore::check(dc_rpc_sync(native_handle(), detail::c_string(to).c_str(), detail::c_string(func).c_str(), args.u8(), args.size(), r.data(),
                      r.size(), timeout.ms(), b.out()));
    return b.str();
  }
  /// sync() without waiting: the work's result() is the reply.
  [[nodiscard]] Work async(std::string_view to, std::string_view func, bytes_view args = {},
                           const std::vector<RRefView>& rrefs = {}, Timeout timeout = kDefault) const {
    std::vector<const dc_rref*> r = raw(rrefs);
    dc_work* w = nullptr;
    distcore::check(dc_rpc_async(native_handle(), detail::c_string(to).c_str(), detail::c_string(func).c_str(), args.u8(), args.size(),
                       r.data(), r.size(), timeout.ms(), &w));
    return Work(w);
  }
  /// Runs `func` on worker `to`, keeping its result there, and returns an
  /// RRef to it; a failure is carried by the RRef (to_here reports it).
  [[nodiscard]] RRef remote(std::string_view to, std::string_view func, bytes_view args = {},
                            const std::vector<RRefView>& rrefs = {}, Timeout timeout = kDefault) const {
    std::vector<const dc_rref*> r = raw(rrefs);
    dc_rref* out = nullptr;
    distcore::check(dc_rpc_remote(native_handle(), detail::c_string(to).c_str(), detail::c_string(func).c_str(), args.u8(), args.size(),
                        r.data(), r.size(), timeout.ms(), &out));
    return RRef(out);
  }
  /// An RRef owned by this worker holding a copy of `value` (rpc.RRef(value)).
  [[nodiscard]] RRef rref(bytes_view value) const {
    dc_rref* out = nullptr;
    distcore::check(dc_rref_new(native_handle(), value.u8(), value.size(), &out));
    return RRef(out);
  }
  /// The id (rank) of the worker named `name`.
  int32_t worker_id(std::string_view name) const {
    int32_t out = -1;
    distcore::check(dc_rpc_worker_id(native_handle(), detail::c_string(name).c_str(), &out));
    return out;
  }
  /// This worker's name.
  std::string self_name() const {
    detail::Buf b;
    distcore::check(dc_rpc_self_name(native_handle(), b.out()));
    return b.str();
  }
  /// This worker's RRef counters (all zero once nothing is shared).
  dc_rref_debug_info debug_info() const {
    dc_rref_debug_info d{};
    d.struct_size = sizeof d;
    distcore::check(dc_rpc_debug_info(native_handle(), &d));
    return d;
  }
  /// Shuts this worker down. Graceful: blocks until every worker shuts down
  /// (through the store), settling every RRef; InvalidState listing leaked
  /// RRefs when ignore_rref_leak is false. Not graceful: stops at once.
  /// `timeout` kDefault: the RPC timeout.
  void shutdown(bool graceful = true, Timeout timeout = kDefault) const {
    distcore::check(dc_rpc_shutdown(native_handle(), graceful, timeout.ms()));
  }

 private:
  static std::vector<const dc_rref*> raw(const std::vector<RRefView>& rrefs) {
    std::vector<const dc_rref*> out;
    out.reserve(rrefs.size());
    for (const RRefView& r : rrefs) out.push_back(r.native_handle());
    return out;
  }
  // Declared first, destroyed last: the worker stops before its functions go.
  std::vector<std::unique_ptr<detail::RpcEntry>> functions_;
  std::unique_ptr<dc_rpc, detail::RpcFree> handle_;
};

// ---------------------------------------------------------------------------
// Logging and profiling
// ---------------------------------------------------------------------------

/// Receives one log line: level, target (the distcore module) and text,
/// valid during the call only.
using LogCallback = std::function<void(dc_log_level level, std::string_view target, std::string_view message)>;

namespace detail {

struct LogState {
  std::mutex mutex;
  std::unique_ptr<LogCallback> current;
};

// One per process (an inline function's static), never destroyed: distcore
// threads may still log while the program exits.
inline LogState& log_state() {
  static LogState* state = new LogState;
  return *state;
}

inline void log_trampoline(dc_log_level level, const char* target, const char* message, void* user_data) noexcept {
  try {
    (*static_cast<LogCallback*>(user_data))(level, target ? target : "", message ? message : "");
  } catch (...) {
    // Never across the C boundary.
  }
}

}  // namespace detail

/// Sends distcore's log lines at `level` or more severe to `callback`,
/// process-wide, replacing any previous one (which is freed once it is no
/// longer running). An empty `callback` sends lines to stderr again, at
/// `level`. The callback runs on whichever thread logs (possibly several at
/// once), must be thread-safe, return promptly and not call distcore.
/// Exceptions it throws are dropped. InvalidState when the process installed
/// a Rust `log` logger of its own.
inline void set_log_callback(dc_log_level level, LogCallback callback) {
  detail::LogState& state = detail::log_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  std::unique_ptr<LogCallback> next;
  if (callback) next = std::make_unique<LogCallback>(std::move(callback));
  distcore::check(dc_set_log_callback(level, next ? &detail::log_trampoline : nullptr, next.get()));
  state.current = std::move(next);  // the previous callback is no longer running
}

/// Sends log lines to stderr again, at `level` (default: warnings and errors).
inline void reset_log_callback(dc_log_level level = DC_LOG_LEVEL_WARN) { set_log_callback(level, nullptr); }

/// Profiler begin hook: a work titled `title` was created; returns a token
/// passed to the end hook. Runs on the creating thread.
using ProfilerBegin = std::function<uint64_t(std::string_view title)>;
/// Profiler end hook: the span begun with `token` ended. Runs once per begin.
using ProfilerEnd = std::function<void(std::string_view title, uint64_t token)>;

namespace detail {

struct ProfilerHooks {
  ProfilerBegin begin;
  ProfilerEnd end;
};

struct ProfilerState {
  std::mutex mutex;
  // Every hook pair ever installed: spans already begun end on the hooks
  // that began them, so none is freed before the process exits.
  std::vector<std::unique_ptr<ProfilerHooks>> hooks;
};

inline ProfilerState& profiler_state() {
  static ProfilerState* state = new ProfilerState;
  return *state;
}

inline uint64_t profiler_begin_trampoline(const char* title, void* user_data) noexcept {
  try {
    return static_cast<ProfilerHooks*>(user_data)->begin(title ? title : "");
  } catch (...) {
    return 0;
  }
}

inline void profiler_end_trampoline(const char* title, uint64_t token, void* user_data) noexcept {
  try {
    static_cast<ProfilerHooks*>(user_data)->end(title ? title : "", token);
  } catch (...) {
  }
}

}  // namespace detail

/// Installs process-wide profiler hooks: `begin` runs when a Work with a
/// profiling title is created, `end` once when it finishes (or is freed
/// unfinished). Both empty removes the hooks; one empty without the other is
/// InvalidArgument. Hooks are kept until the process exits (spans already
/// begun still end on the hooks that began them). They must not throw
/// (exceptions are dropped; a throwing begin yields token 0).
inline void set_profiler_hooks(ProfilerBegin begin, ProfilerEnd end) {
  if (!begin != !end) throw InvalidArgument("set_profiler_hooks: give both hooks, or neither");
  detail::ProfilerState& state = detail::profiler_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (!begin) {
    distcore::check(dc_set_profiler_hooks(nullptr, nullptr, nullptr));
    return;
  }
  state.hooks.push_back(std::make_unique<detail::ProfilerHooks>(detail::ProfilerHooks{std::move(begin), std::move(end)}));
  dc_status s = dc_set_profiler_hooks(&detail::profiler_begin_trampoline, &detail::profiler_end_trampoline,
                                      state.hooks.back().get());
  if (s != DC_OK) {
    std::string message = dc_last_error_message();
    state.hooks.pop_back();
    throw_error(s, message);
  }
}

/// Removes the profiler hooks.
inline void clear_profiler_hooks() { set_profiler_hooks(nullptr, nullptr); }

}  // namespace distcore

#endif  // DISTCORE_HPP
