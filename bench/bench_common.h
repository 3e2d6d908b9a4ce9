// Paired timing for the benchmarks: the baseline and the variant run back to
// back in each iteration (alternating which goes first), so that drift of the
// machine hits both alike; the medians of both, of their difference and of
// their ratio are reported as counters.
#pragma once

#include <algorithm>
#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <flexmodel/flex_model.h>

namespace flexmodel::bench {

inline double seconds_of(const std::function<void()>& work) {
  const auto start = std::chrono::steady_clock::now();
  work();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

inline double median(std::vector<double> values) {
  std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
  return values[values.size() / 2];
}

class Paired {
 public:
  // Times one baseline run and one variant run.
  void run(const std::function<void()>& baseline, const std::function<void()>& variant) {
    if (baseline_first_) {
      baseline_.push_back(seconds_of(baseline));
      variant_.push_back(seconds_of(variant));
    } else {
      variant_.push_back(seconds_of(variant));
      baseline_.push_back(seconds_of(baseline));
    }
    baseline_first_ = !baseline_first_;
  }

  void report(benchmark::State& state, double scale, const std::string& unit) const {
    std::vector<double> difference(baseline_.size()), ratio(baseline_.size());
    for (std::size_t i = 0; i < baseline_.size(); ++i) {
      difference[i] = variant_[i] - baseline_[i];
      ratio[i] = variant_[i] / baseline_[i];
    }
    state.counters["baseline_" + unit] = median(baseline_) * scale;
    state.counters["variant_" + unit] = median(variant_) * scale;
    state.counters["added_" + unit] = median(difference) * scale;
    state.counters["added_pct"] = (median(ratio) - 1.0) * 100.0;
  }

 private:
  std::vector<double> baseline_, variant_;
  bool baseline_first_ = true;
};

// Times a pair for every iteration of `state`; `reset` runs untimed after each
// pair (clearing the output map, so memory does not grow with the iterations).
template <class Baseline, class Variant, class Reset>
Paired measure_pairs(benchmark::State& state, Baseline&& baseline, Variant&& variant, Reset&& reset) {
  Paired paired;
  for (auto _ : state) {
    paired.run(baseline, variant);
    state.PauseTiming();
    reset();
    state.ResumeTiming();
  }
  return paired;
}

// The GPT benchmarks' 24 retrieval hooks: every attention and MLP output.
inline void hook_attention_and_mlp(FlexModelBase& fm) {
  fm.create_hook_group("attn", "layers.*.attn");
  fm.create_hook_group("mlp", "layers.*.mlp");
}

}  // namespace flexmodel::bench
