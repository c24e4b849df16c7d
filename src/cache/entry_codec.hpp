// An entry's binary form, shared by snapshot files (one per entry in the
// body) and the values of the shared L2 store (l2_entries.hpp). Defined in
// snapshot.cpp. read_entry checks every size against the shapes the entry
// claims and lets each tier validate its payload, so what it returns can be
// handed to the kernels; it throws std::runtime_error (through the reader's
// fail) on anything else.
#pragma once

#include "core/binary_writer.hpp"
#include "cache/entry.hpp"
#include "cache/tier.hpp"
#include "core/binary_reader.hpp"

namespace attention_echo::cache {

void write_entry(BinaryWriter& w, const Entry& e, const TierSet& tiers);
Entry read_entry(BinaryReader& r, int hash_dim, const TierSet& tiers);

}  // namespace attention_echo::cache
