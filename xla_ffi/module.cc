// The Python extension cgspn_jax._gspn_ffi: the FFI handlers as capsules, keyed by platform and
// target name, for jax.ffi.register_ffi_target; and what was compiled in.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "gspn.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_gspn_ffi, m) {
  m.def("registrations", []() {
    nb::dict platforms;
    nb::dict cpu;
    cpu["cgspn_gspn_fwd"] = Capsule(GspnFwdCpu);
    cpu["cgspn_gspn_bwd"] = Capsule(GspnBwdCpu);
    platforms["cpu"] = cpu;
#ifdef CGSPN_WITH_CUDA
    nb::dict cuda;
    cuda["cgspn_gspn_fwd"] = Capsule(GspnFwdCuda);
    cuda["cgspn_gspn_bwd"] = Capsule(GspnBwdCuda);
    platforms["CUDA"] = cuda;
#endif
    return platforms;
  });
  m.def("build_info", []() {
    nb::dict info;
    info["cpu_kernel"] = true;
#ifdef CGSPN_WITH_CUDA
    info["cuda_kernel"] = true;
    info["cuda_architectures"] = std::string(CGSPN_CUDA_ARCHITECTURES);
    info["cuda_max_line_length"] = cgspn::kCudaMaxLineLength;
#else
    info["cuda_kernel"] = false;
    info["cuda_architectures"] = std::string();
    info["cuda_max_line_length"] = 0;
#endif
    return info;
  });
}
