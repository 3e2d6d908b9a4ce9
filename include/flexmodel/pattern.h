// Selects module names. The default is a glob over dotted names: `*` matches
// within one component, `**` matches any number of components. flex_model's
// substring match is available as Pattern::substring.
#pragma once

#include <string>
#include <string_view>

namespace flexmodel {

// How files and tools name the root module, whose name in named_modules() is
// empty; accepted wherever a module name or pattern is.
inline constexpr std::string_view kRootName = "(root)";
// Between a module's name and one of its values in a value hook point's name
// (`layers.0.attn::softmax.0`); `::` never occurs in a module name.
inline constexpr std::string_view kValueSeparator = "::";

class Pattern {
 public:
  enum class Kind { glob, substring, exact };

  Pattern(std::string text) : text_(std::move(text)) {}  // NOLINT: a string is a glob
  Pattern(const char* text) : text_(text) {}             // NOLINT

  static Pattern glob(std::string text) { return Pattern(std::move(text), Kind::glob); }
  static Pattern substring(std::string text) { return Pattern(std::move(text), Kind::substring); }
  static Pattern exact(std::string text) { return Pattern(std::move(text), Kind::exact); }

  bool matches(std::string_view name) const;
  // Whether the pattern can match more than one name (a glob with * or ?, a
  // substring); one that cannot names a module exactly.
  bool is_wildcard() const;
  const std::string& text() const { return text_; }
  Kind kind() const { return kind_; }
  // "glob 'layers.*.mlp'" for messages.
  std::string describe() const;

 private:
  Pattern(std::string text, Kind kind) : text_(std::move(text)), kind_(kind) {}

  std::string text_;
  Kind kind_ = Kind::glob;
};

}  // namespace flexmodel
