// A real redis-server for the L2 tests: 127.0.0.1, a free port, no
// persistence (--save "" --appendonly no), its own temp dir, started and
// stopped by the test. Tests skip when redis-server is not installed (CI's
// tools/setup.sh installs it). Stop (SIGKILL), pause (SIGSTOP), resume and
// restart on the same port are the fault injections.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "attention_echo/l2_store.hpp"

extern char** environ;

namespace attention_echo::testing {

// The first redis-server on PATH, or "".
inline std::string find_redis_server() {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/usr/local/bin";
  for (std::size_t start = 0; start <= dirs.size();) {
    const std::size_t end = std::min(dirs.find(':', start), dirs.size());
    const std::filesystem::path candidate = std::filesystem::path(dirs.substr(start, end - start)) / "redis-server";
    if (access(candidate.c_str(), X_OK) == 0) return candidate.string();
    start = end + 1;
  }
  return "";
}

// A port nothing listens on now (the kernel's pick for an ephemeral bind).
inline int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

inline bool accepts_connections(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  close(fd);
  return ok;
}

// Runs a program to completion (posix_spawn: safe in a threaded process),
// its stdout and stderr into a temp file; returns its exit status (-1 when
// it did not exit) and what it printed.
struct ProgramRun {
  int status = -1;
  std::string output;
};
inline ProgramRun run_program(const std::vector<std::string>& args, const std::vector<std::string>& extra_env = {}) {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<std::string> env_strings(extra_env);
  for (char** e = environ; *e; ++e) env_strings.emplace_back(*e);
  std::vector<char*> envp;
  for (std::string& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  char log[] = "/tmp/ae_child_XXXXXX";
  const int fd = mkstemp(log);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fd, 1);
  posix_spawn_file_actions_adddup2(&actions, fd, 2);
  ProgramRun run;
  pid_t pid = 0;
  int status = 0;
  if (posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data()) == 0 && waitpid(pid, &status, 0) == pid &&
      WIFEXITED(status))
    run.status = WEXITSTATUS(status);
  posix_spawn_file_actions_destroy(&actions);
  close(fd);
  std::ifstream in(log);
  run.output.assign(std::istreambuf_iterator<char>(in), {});
  std::filesystem::remove(log);
  return run;
}

class RedisServer {
 public:
  RedisServer() : binary_(find_redis_server()) {
    if (binary_.empty()) return;
    char dir[] = "/tmp/ae_redis_XXXXXX";
    if (mkdtemp(dir) == nullptr) return;
    dir_ = dir;
    port_ = free_port();
    start();
  }
  ~RedisServer() {
    stop();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  bool running() const { return pid_ > 0; }
  int port() const { return port_; }
  // Deadlines far above any lookup's time by default: tests of what the
  // store does must not depend on the machine's load (sanitizers, ctest -j);
  // the deadline tests set theirs.
  static constexpr const char* kPatient = "deadline_ms=5000&write_timeout_ms=5000";
  std::string url(const std::string& options = kPatient) const {
    return "redis://127.0.0.1:" + std::to_string(port_) + (options.empty() ? "" : "?" + options);
  }

  // Starts (again) on the same port; true once it accepts connections.
  bool start() {
    if (pid_ > 0) return true;
    const std::vector<std::string> args{binary_, "--port", std::to_string(port_), "--bind", "127.0.0.1",
                                        "--save", "", "--appendonly", "no", "--dir", dir_,
                                        "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru",
                                        "--loglevel", "warning", "--logfile", dir_ + "/redis.log"};
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, binary_.c_str(), nullptr, nullptr, argv.data(), environ) != 0) {
      pid_ = 0;
      return false;
    }
    for (int i = 0; i < 500; ++i) {  // up to 5 s
      if (accepts_connections(port_)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    stop();
    return false;
  }
  // Kills it (no clean shutdown: a crash as far as clients can tell).
  void stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGCONT);
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = 0;
  }
  void pause() { kill(pid_, SIGSTOP); }
  void resume() { kill(pid_, SIGCONT); }

 private:
  std::string binary_;
  std::string dir_;
  int port_ = 0;
  pid_t pid_ = 0;
};

// Whether the library was built with Redis (AE_REDIS).
inline bool redis_built() {
  try {
    connect_redis(L2Options{});
    return true;
  } catch (const std::runtime_error&) {
    return false;
  }
}

#define AE_REQUIRE_REDIS(server)                                                                  \
  do {                                                                                            \
    if (!::attention_echo::testing::redis_built()) GTEST_SKIP() << "built without Redis (AE_REDIS=OFF)"; \
    if (!(server).running()) GTEST_SKIP() << "no redis-server (tools/setup.sh installs it)";      \
  } while (0)

// Every key the server holds (redis-cli, installed beside redis-server).
inline std::vector<std::string> keys_of(const RedisServer& server) {
  const std::string cli = std::filesystem::path(find_redis_server()).parent_path() / "redis-cli";
  const std::string command = cli + " -p " + std::to_string(server.port()) + " --scan --pattern 'ae:*'";
  std::vector<std::string> keys;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char line[4096];
    while (fgets(line, sizeof line, pipe)) {
      std::string key(line);
      while (!key.empty() && (key.back() == '\n' || key.back() == '\r')) key.pop_back();
      if (!key.empty()) keys.push_back(key);
    }
    pclose(pipe);
  }
  return keys;
}

inline bool put_one(L2Store& store, const std::string& key, const std::string& value) {
  const L2Write write{key, value};
  return store.put({&write, 1}) == 1;
}

}  // namespace attention_echo::testing
