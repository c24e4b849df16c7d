// AttentionEcho: cross-request reuse of attention computation.
// The one header to include; see DESIGN.md for the picture.
#pragma once

#include "attention_echo/attention.hpp"
#include "attention_echo/bench.hpp"
#include "attention_echo/cache.hpp"
#include "attention_echo/config.hpp"
#include "attention_echo/llama.hpp"
#include "attention_echo/tensor.hpp"
#include "attention_echo/thread_pool.hpp"
