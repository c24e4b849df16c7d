// Built instead of redis_store.cpp when hiredis is not found or AE_REDIS is
// OFF: the rest of the library works without a shared store.
#include <stdexcept>

#include "attention_echo/l2_store.hpp"

namespace attention_echo {

std::shared_ptr<L2Store> connect_redis(const L2Options&) {
  throw std::runtime_error("store_url: this build of AttentionEcho has no Redis support (AE_REDIS=OFF or hiredis not found)");
}

}  // namespace attention_echo
