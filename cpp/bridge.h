// bridge.h: the C++ side of the cxx bridge declared in src/cuda/mod.rs. Validates a call, picks
// the kernel for (head size, dtype), launches on the caller's stream. Throws std::runtime_error
// (cxx turns it into Err); never allocates device memory, never synchronizes.
#pragma once

#include <cstdint>

#include "rust/cxx.h"

namespace flash_ort {

struct AttnArgs;
struct AttnPlan;
struct ConcatArgs;

AttnPlan plan_attention(const AttnArgs& args);
void launch_attention(const AttnArgs& args);
void launch_concat(const ConcatArgs& args);

}  // namespace flash_ort
