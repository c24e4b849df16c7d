// AttentionEcho's inference engine (the attention_echo_engine library): a
// Llama-architecture model, its loaders and tokenizer, and the serving
// module that decides how each prompt reuses earlier work.
#pragma once

#include "attention_echo/attention_echo.hpp"
#include "attention_echo/llama.hpp"
#include "attention_echo/serving.hpp"
