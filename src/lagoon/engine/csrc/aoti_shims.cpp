// C shims of Lagoon's ops for AOTInductor packages (lagoon.engine.aoti_step): a package compiled with
// `aot_inductor.custom_ops_to_c_shims` calls `aoti_torch_cpu_<op>(handles..., &out)` directly instead
// of its proxy executor, which looks the op up, boxes every argument into IValues from a JSON
// description and unboxes the result on each of a decode step's ~100+ calls.
//
// Each shim calls the op through a typed (unboxed) dispatcher handle found once, so the kernels stay
// private to their own files and an op's registration remains the one source of truth. The
// signatures follow inductor's codegen (cpp_wrapper_cpu.py, generate_c_shim_extern_kernel_alloc):
// tensors as AtenTensorHandle, `int` as int64_t, `float` as double, the result as a new handle
// written through the last argument. aoti_step.SHIMS holds the same declarations: keep them equal.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

namespace {

using torch::aot_inductor::new_tensor_handle;
using torch::aot_inductor::tensor_handle_to_tensor_pointer;
using T = at::Tensor;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline const T& t(AtenTensorHandle h) { return *tensor_handle_to_tensor_pointer(h); }

}  // namespace

extern "C" {

AOTITorchError aoti_torch_cpu_q4_matvec(AtenTensorHandle x, AtenTensorHandle packed, int64_t n, int64_t isa,
                                        AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = find<T(const T&, const T&, int64_t, int64_t)>("lagoon::q4_matvec");
    *ret = new_tensor_handle(op.call(t(x), t(packed), n, isa));
  });
}

AOTITorchError aoti_torch_cpu_i8_matvec(AtenTensorHandle x, AtenTensorHandle packed, int64_t n, int64_t isa,
                                        AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = find<T(const T&, const T&, int64_t, int64_t)>("lagoon::i8_matvec");
    *ret = new_tensor_handle(op.call(t(x), t(packed), n, isa));
  });
}

AOTITorchError aoti_torch_cpu_q4_moe_matvec(AtenTensorHandle x, AtenTensorHandle packed, AtenTensorHandle ids,
                                            int64_t n, int64_t isa, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = find<T(const T&, const T&, const T&, int64_t, int64_t)>("lagoon::q4_moe_matvec");
    *ret = new_tensor_handle(op.call(t(x), t(packed), t(ids), n, isa));
  });
}

AOTITorchError aoti_torch_cpu_i8_moe_matvec(AtenTensorHandle x, AtenTensorHandle packed, AtenTensorHandle ids,
                                            int64_t n, int64_t isa, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = find<T(const T&, const T&, const T&, int64_t, int64_t)>("lagoon::i8_moe_matvec");
    *ret = new_tensor_handle(op.call(t(x), t(packed), t(ids), n, isa));
  });
}

AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                               AtenTensorHandle slots, AtenTensorHandle pos, double scale,
                                               int64_t isa, AtenTensorHandle* ret) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op =
        find<T(const T&, const T&, const T&, const T&, const T&, double, int64_t)>("lagoon::decode_attention");
    *ret = new_tensor_handle(op.call(t(q), t(k), t(v), t(slots), t(pos), scale, isa));
  });
}

}  // extern "C"
