// Built against an installed flexmodel: hooks a plain model and checks one capture.
#include <flexmodel/flexmodel.h>
#include <flexmodel/hooks/editing.h>

struct TinyImpl : torch::nn::Module {
  TinyImpl() { fc = register_module("fc", flexmodel::nn::Linear(3, 2)); }
  torch::Tensor forward(const torch::Tensor& x) { return fc(x) * 2; }
  flexmodel::nn::Linear fc{nullptr};
};
FLEX_MODULE(Tiny);

int main() {
  Tiny tiny;
  flexmodel::FlexModel fm(tiny);
  fm.register_forward_hook(flexmodel::HookFunction("fc", {}, flexmodel::hooks::scale(1.0)));
  auto x = torch::ones({1, 3});
  auto out = fm.forward(x);
  bool ok = torch::allclose(fm.outputs().at("fc")[0] * 2, out);
  return ok ? 0 : 1;
}
