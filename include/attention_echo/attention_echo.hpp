// AttentionEcho: cross-request reuse of attention computation.
// The core library's one header (attention_echo); the inference engine built
// on it has its own, attention_echo/engine.hpp.
#pragma once

#include "attention_echo/attention.hpp"
#include "attention_echo/cache.hpp"
#include "attention_echo/config.hpp"
#include "attention_echo/tensor.hpp"
#include "attention_echo/thread_pool.hpp"
