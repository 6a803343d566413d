// bindings.cpp: the one Python module, trainpatterns._C. Each function here checks its plain
// arguments, releases the GIL and forwards to a kernel. Tensors never reach this file: the Python
// side (python/trainpatterns/_kernels.py) turns them into addresses, counts and dtype tags.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cpu_kernels.h"
#include "common/params.h"
#include "comm/comm_kernels.h"
#ifdef TP_WITH_CUDA
#include "common/cuda_api.h"
#endif

namespace py = pybind11;
using tp::DType;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t addr) {
  return reinterpret_cast<T*>(addr);
}

void check_table(const tp::TensorTable& t) {
  if (t.n < 0) throw std::invalid_argument("TensorTable.n must be >= 0");
  if (t.n > 0 && (t.rows == nullptr || t.host_rows == nullptr || t.steps == nullptr))
    throw std::invalid_argument("TensorTable: rows, host_rows and steps must be set");
  const int d = static_cast<int>(t.dtype);
  if (d < 0 || d > 3) throw std::invalid_argument("TensorTable: unknown dtype tag " + std::to_string(d));
  if (t.master && t.dtype != DType::BFloat16 && t.dtype != DType::Float16)
    throw std::invalid_argument("TensorTable: master weights need float16 or bfloat16 parameters");
}

#ifndef TP_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "trainpatterns was built without CUDA kernels (nvcc was not found at build time); "
      "reinstall with nvcc on PATH or use CPU tensors");
}
#endif

// One entry point per optimizer: device < 0 runs the CPU kernel, otherwise the CUDA one.
template <typename Params, typename CpuFn, typename CudaFn>
void run_step(const tp::TensorTable& t, const Params& hp, const tp::GradControl& gc, int num_threads,
              int device, std::uintptr_t stream, CpuFn cpu, CudaFn cuda_fn) {
  check_table(t);
  if (t.n == 0) return;
  py::gil_scoped_release release;
  if (device < 0) {
    cpu(t, hp, gc, num_threads);
    return;
  }
#ifdef TP_WITH_CUDA
  cuda_fn(t, hp, gc, device, stream);
#else
  (void)cuda_fn;
  (void)stream;
  no_cuda();
#endif
}

#ifdef TP_WITH_CUDA
#define TP_CUDA_FN(name) &tp::cuda::name
#else
#define TP_CUDA_FN(name) nullptr
#endif

py::dict build_info() {
  py::dict info;
  const tp::CpuKernels& k = tp::cpu_kernels();
  info["simd"] = k.isa;
  info["openmp"] = tp::cpu_openmp();
#ifdef TP_HAVE_X86_ISAS
  info["simd_compiled"] = std::vector<std::string>{"scalar", "avx2", "avx512"};
#else
  info["simd_compiled"] = std::vector<std::string>{"scalar"};
#endif
#ifdef TP_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = tp::cuda::compiled_archs();
  info["cuda_runtime_version"] = tp::cuda::runtime_version();
  info["cuda_devices"] = tp::cuda::device_count();
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_runtime_version"] = 0;
  info["cuda_devices"] = 0;
#endif
  info["version"] = TP_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "trainpatterns native kernels (see python/trainpatterns/_kernels.py)";
  m.def("build_info", &build_info, "What this module was compiled with and what it found at run time.");

  py::enum_<DType>(m, "DType")
      .value("float32", DType::Float32)
      .value("float16", DType::Float16)
      .value("bfloat16", DType::BFloat16)
      .value("float64", DType::Float64);

  py::class_<tp::TensorTable>(m, "TensorTable")
      .def(py::init([](std::uintptr_t rows, std::uintptr_t host_rows, int64_t n, int64_t total,
                       std::uintptr_t steps, DType dtype, bool master) {
             return tp::TensorTable{as_ptr<const int64_t>(rows), as_ptr<const int64_t>(host_rows), n,
                                    total, as_ptr<float>(steps), dtype, master ? 1 : 0};
           }),
           py::kw_only(), py::arg("rows"), py::arg("host_rows"), py::arg("n"), py::arg("total"),
           py::arg("steps"), py::arg("dtype"), py::arg("master") = false)
      .def_readonly("n", &tp::TensorTable::n)
      .def_readonly("total", &tp::TensorTable::total);

  py::class_<tp::GradControl>(m, "GradControl")
      .def(py::init([](double grad_mul, std::uintptr_t grad_mul_dev, std::uintptr_t skip_dev) {
             return tp::GradControl{grad_mul, as_ptr<const float>(grad_mul_dev), as_ptr<const float>(skip_dev)};
           }),
           py::kw_only(), py::arg("grad_mul") = 1.0, py::arg("grad_mul_dev") = 0, py::arg("skip_dev") = 0);

  py::class_<tp::AdamParams>(m, "AdamParams")
      .def(py::init([](double lr, std::uintptr_t lr_dev, double beta1, double beta2, double eps,
                       double weight_decay, bool decoupled, bool amsgrad, bool maximize) {
             return tp::AdamParams{lr, as_ptr<const float>(lr_dev), beta1, beta2, eps, weight_decay,
                                   decoupled, amsgrad, maximize};
           }),
           py::kw_only(), py::arg("lr"), py::arg("lr_dev") = 0, py::arg("beta1"), py::arg("beta2"),
           py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("amsgrad") = false,
           py::arg("maximize") = false);

  py::class_<tp::SgdParams>(m, "SgdParams")
      .def(py::init([](double lr, std::uintptr_t lr_dev, double momentum, double dampening,
                       double weight_decay, bool nesterov, bool maximize) {
             return tp::SgdParams{lr, as_ptr<const float>(lr_dev), momentum, dampening, weight_decay,
                                  nesterov, maximize};
           }),
           py::kw_only(), py::arg("lr"), py::arg("lr_dev") = 0, py::arg("momentum") = 0.0,
           py::arg("dampening") = 0.0, py::arg("weight_decay") = 0.0, py::arg("nesterov") = false,
           py::arg("maximize") = false);

  py::class_<tp::AdagradParams>(m, "AdagradParams")
      .def(py::init([](double lr, std::uintptr_t lr_dev, double lr_decay, double weight_decay, double eps,
                       bool maximize) {
             return tp::AdagradParams{lr, as_ptr<const float>(lr_dev), lr_decay, weight_decay, eps, maximize};
           }),
           py::kw_only(), py::arg("lr"), py::arg("lr_dev") = 0, py::arg("lr_decay") = 0.0,
           py::arg("weight_decay") = 0.0, py::arg("eps") = 1e-10, py::arg("maximize") = false);

  m.def("adam_step",
        [](const tp::TensorTable& t, const tp::AdamParams& hp, const tp::GradControl& gc, int num_threads,
           int device, std::uintptr_t stream) {
          run_step(t, hp, gc, num_threads, device, stream, tp::cpu_kernels().adam_step, TP_CUDA_FN(adam_step));
        },
        py::arg("table"), py::arg("params"), py::arg("grad_control"), py::arg("num_threads"),
        py::arg("device") = -1, py::arg("stream") = 0,
        "Fused Adam/AdamW step over a tensor table; increments the per-tensor steps.");
  m.def("sgd_step",
        [](const tp::TensorTable& t, const tp::SgdParams& hp, const tp::GradControl& gc, int num_threads,
           int device, std::uintptr_t stream) {
          run_step(t, hp, gc, num_threads, device, stream, tp::cpu_kernels().sgd_step, TP_CUDA_FN(sgd_step));
        },
        py::arg("table"), py::arg("params"), py::arg("grad_control"), py::arg("num_threads"),
        py::arg("device") = -1, py::arg("stream") = 0,
        "Fused SGD step over a tensor table; a tensor whose step was 0 initialises its momentum buffer.");
  m.def("adagrad_step",
        [](const tp::TensorTable& t, const tp::AdagradParams& hp, const tp::GradControl& gc, int num_threads,
           int device, std::uintptr_t stream) {
          run_step(t, hp, gc, num_threads, device, stream, tp::cpu_kernels().adagrad_step,
                   TP_CUDA_FN(adagrad_step));
        },
        py::arg("table"), py::arg("params"), py::arg("grad_control"), py::arg("num_threads"),
        py::arg("device") = -1, py::arg("stream") = 0, "Fused Adagrad step over a tensor table.");

  m.def("grad_sumsq",
        [](const tp::TensorTable& t, int num_threads) {
          check_table(t);
          py::gil_scoped_release release;
          return t.n == 0 ? 0.0 : tp::cpu_kernels().grad_sumsq(t, num_threads);
        },
        py::arg("table"), py::arg("num_threads"),
        "CPU: sum of squares of all gradients in double; not finite iff a gradient is not finite.");

#ifdef TP_WITH_CUDA
  m.def("grad_sumsq_cuda",
        [](const tp::TensorTable& t, std::uintptr_t sumsq_dev, int device, std::uintptr_t stream) {
          check_table(t);
          if (t.n == 0) return;
          py::gil_scoped_release release;
          tp::cuda::grad_sumsq(t, as_ptr<double>(sumsq_dev), device, stream);
        },
        py::arg("table"), py::arg("sumsq_dev"), py::arg("device"), py::arg("stream"),
        "CUDA: adds the gradients' sum of squares to a device double, asynchronously.");
  m.def("finish_grad_control",
        [](std::uintptr_t sumsq_dev, float inv_scale, std::uintptr_t inv_scale_dev, float max_norm,
           std::uintptr_t norm_dev, std::uintptr_t skip_dev, std::uintptr_t grad_mul_dev, int device,
           std::uintptr_t stream) {
          py::gil_scoped_release release;
          tp::cuda::finish_grad_control(as_ptr<const double>(sumsq_dev), inv_scale,
                                        as_ptr<const float>(inv_scale_dev), max_norm, as_ptr<float>(norm_dev),
                                        as_ptr<float>(skip_dev), as_ptr<float>(grad_mul_dev), device, stream);
        },
        py::arg("sumsq_dev"), py::arg("inv_scale"), py::arg("inv_scale_dev"), py::arg("max_norm"),
        py::arg("norm_dev"), py::arg("skip_dev"), py::arg("grad_mul_dev"), py::arg("device"),
        py::arg("stream"), "CUDA: norm, skip flag and gradient multiplier computed on the device.");
#endif
  // ---- distributed (issue 5): gradient-bucket kernels (csrc/comm) ----
  py::class_<tp::BucketParams>(m, "BucketParams")
      .def(py::init([](std::uintptr_t rows, std::uintptr_t host_rows, int64_t n, int64_t total, DType dtype,
                       std::uintptr_t bucket, DType wire_dtype, double scale) {
             if (n < 0 || total < 0) throw std::invalid_argument("BucketParams: n and total must be >= 0");
             if (n > 0 && (rows == 0 || host_rows == 0 || bucket == 0))
               throw std::invalid_argument("BucketParams: rows, host_rows and bucket must be set");
             for (DType d : {dtype, wire_dtype}) {
               const int tag = static_cast<int>(d);
               if (tag < 0 || tag > 3) throw std::invalid_argument("BucketParams: unknown dtype tag " + std::to_string(tag));
             }
             return tp::BucketParams{tp::TensorTable{as_ptr<const int64_t>(rows), as_ptr<const int64_t>(host_rows), n,
                                                     total, nullptr, dtype, 0},
                                     as_ptr<void>(bucket), wire_dtype, scale};
           }),
           py::kw_only(), py::arg("rows"), py::arg("host_rows"), py::arg("n"), py::arg("total"), py::arg("dtype"),
           py::arg("bucket"), py::arg("wire_dtype"), py::arg("scale") = 1.0)
      .def_readwrite("scale", &tp::BucketParams::scale);
  auto bucket_op = [](bool pack) {
    return [pack](const tp::BucketParams& p, int num_threads, int device, std::uintptr_t stream) {
      if (p.tensors.n == 0) return;
      py::gil_scoped_release release;
      if (device < 0) {
        const tp::CommCpuKernels& k = tp::comm_cpu_kernels();
        (pack ? k.pack : k.unpack)(p, num_threads);
        return;
      }
#ifdef TP_WITH_CUDA
      (pack ? tp::cuda::bucket_pack : tp::cuda::bucket_unpack)(p, device, stream);
#else
      (void)stream;
      no_cuda();
#endif
    };
  };
  m.def("bucket_pack", bucket_op(true), py::arg("params"), py::arg("num_threads"), py::arg("device") = -1,
        py::arg("stream") = 0, "bucket[off_i + j] = wire(tensor_i[j] * scale); absent tensors pack as zeros.");
  m.def("bucket_unpack", bucket_op(false), py::arg("params"), py::arg("num_threads"), py::arg("device") = -1,
        py::arg("stream") = 0, "tensor_i[j] = dtype(bucket[off_i + j] * scale); absent tensors are skipped.");
}
