// Warp shuffles and votes for the emulated build, with CUDA's `width` semantics (sub-warp segments). Every lane
// of the warp must take part (full-warp masks); see emu_runtime.h.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu/emu_runtime.h"

namespace vera_emu::detail {

inline void check_width(int width) {
  if (width < 1 || width > warpSize || (width & (width - 1)) != 0)
    fail("shuffle width " + std::to_string(width) + " is not a power of two in [1, 32]");
}

template <typename T>
T shuffle(WarpOp op, unsigned mask, T var, int src_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "shuffles move trivially copyable values of 8 bytes or less");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_exchange(op, mask, bits, src_lane);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace vera_emu::detail

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  using namespace vera_emu::detail;
  check_width(width);
  const int lane = static_cast<int>(lane_id());
  return shuffle(WarpOp::kShfl, mask, var, (lane & ~(width - 1)) + (src_lane & (width - 1)));
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace vera_emu::detail;
  check_width(width);
  const int lane = static_cast<int>(lane_id());
  const bool inside = static_cast<unsigned>(lane & (width - 1)) >= delta;
  return shuffle(WarpOp::kShflUp, mask, var, inside ? lane - static_cast<int>(delta) : lane);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace vera_emu::detail;
  check_width(width);
  const int lane = static_cast<int>(lane_id());
  const bool inside = static_cast<unsigned>(lane & (width - 1)) + delta < static_cast<unsigned>(width);
  return shuffle(WarpOp::kShflDown, mask, var, inside ? lane + static_cast<int>(delta) : lane);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  using namespace vera_emu::detail;
  check_width(width);
  const int lane = static_cast<int>(lane_id());
  const int src = lane ^ (lane_mask & 31);
  // CUDA: a lane may read from its own or an earlier width-segment, never from a later one (it keeps its value).
  const bool later_segment = (src & ~(width - 1)) > (lane & ~(width - 1));
  return shuffle(WarpOp::kShflXor, mask, var, later_segment ? lane : src);
}

inline unsigned __ballot_sync(unsigned mask, int pred) { return vera_emu::detail::warp_ballot(mask, pred != 0) & mask; }
inline int __any_sync(unsigned mask, int pred) { return (vera_emu::detail::warp_ballot(mask, pred != 0) & mask) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  const unsigned lanes = mask & vera_emu::detail::warp_lanes_mask();
  return (vera_emu::detail::warp_ballot(mask, pred != 0) & lanes) == lanes;
}
// Without divergence modelling every existing lane is active.
inline unsigned __activemask() { return vera_emu::detail::warp_lanes_mask(); }
