// distcore::EtcdStore (distcore.hpp) against a real etcd member this test
// starts: the store, and its liveness sessions (docs/liveness.md, "On
// etcd"): a member's reported error fails another's blocked wait with
// PeerFailedError naming it; a closed member's leased key goes with it.
#include <distcore.hpp>

#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <chrono>
#include <string>
#include <thread>

#include "etcd_member.h"

int main() {
  char dir[] = "/tmp/distcore-etcd-cpp-XXXXXX", endpoint[64];
  CHECK(mkdtemp(dir) != nullptr);
  pid_t etcd = start_etcd(dir, endpoint, sizeof endpoint);
  std::optional<distcore::EtcdStore> a;
  for (int i = 0; i < 600 && !a; i++) {
    int status = 0;
    CHECK(waitpid(etcd, &status, WNOHANG) == 0);  // exited: not installed?
    try {
      a.emplace(std::vector<std::string>{endpoint}, "/cpp", 30000);
    } catch (const distcore::Error&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  CHECK(a.has_value());
  distcore::EtcdStore b({endpoint}, "/cpp", 30000);
  a->set("k", "v");
  CHECK(b.get("k") == "v");

  a->open_session("g/", 2);
  a->leased().set("g/addr/2", "x");
  CHECK(b.check({"g/addr/2"}));
  a->close_session();
  CHECK(!b.check({"g/addr/2"}));

  a->open_session("g/", 0);
  b.open_session("g/", 1);
  std::thread reporter([&b] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    b.report_error("loss is NaN");
  });
  bool told = false;
  try {
    a->wait({"g/never"});
  } catch (const distcore::PeerFailedError& e) {
    told = std::string(e.what()).find("rank 1 of group 'g/'") != std::string::npos &&
           std::string(e.what()).find("loss is NaN") != std::string::npos;
  }
  reporter.join();
  CHECK(told);
  a->close_session();
  a.reset();

  kill(etcd, SIGKILL);
  CHECK(waitpid(etcd, nullptr, 0) == etcd);
  std::string rm = std::string("rm -rf ") + dir;
  CHECK(system(rm.c_str()) == 0);
  std::printf("test_cpp_etcd: ok\n");
  return 0;
}
