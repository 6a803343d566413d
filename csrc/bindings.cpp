// bindings.cpp: the one Python module, trainpatterns._C. Each function here checks its plain
// arguments, releases the GIL and forwards to a kernel. Tensors never reach a kernel: the Python
// side (python/trainpatterns/_kernels/) turns them into addresses, counts and dtype tags. The one
// place that sees tensors is the optimizers' per-step check (common/tensor_watch.h), and there
// they stay opaque Python objects whose addresses torch's own exported reader returns.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cpu_kernels.h"
#include "common/params.h"
#include "common/tensor_watch.h"
#include "loader/prefetcher.h"
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
  // How the optimizers' per-step check reads tensors: torch's exported C functions, or Python.
  info["tensor_reader"] = tp::native_reader_in_use() ? "torch C functions" : "python";
  info["lazy_view_reader"] = tp::lazy_bits_in_use() ? "dispatch key set" : "Tensor.is_neg";
  info["version"] = TP_VERSION;
  return info;
}

// ---- loader: DLPack capsules of the prefetcher's batch views ----
// A capsule torch has consumed is renamed "used_dltensor" and owned by torch (its tensor's deleter
// releases the view); one never consumed still owns its view and releases it here.
void dlpack_capsule_destructor(PyObject* cap) {
  if (!PyCapsule_IsValid(cap, "dltensor")) return;
  auto* t = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
  if (t != nullptr && t->deleter != nullptr) t->deleter(t);
}

// One prefetcher source as Python describes it (python/trainpatterns/_kernels/loader.py): address,
// row bytes, DLPack type code and bits, row shape, name, file descriptor (-1: none), file end.
using SourceArgs = std::tuple<std::uintptr_t, int64_t, int, int, std::vector<int64_t>, std::string, int, int64_t>;

// The next batch as (seq, rows, [one capsule per source]), or None when none came within timeout.
py::object prefetcher_next(tp::loader::Prefetcher& p, double timeout_s) {
  tp::loader::TakenBatch b{};
  bool got;
  {
    py::gil_scoped_release release;
    got = p.next(timeout_s, &b);
  }
  if (!got) return py::none();
  const int n = static_cast<int>(p.num_sources());
  std::vector<DLManagedTensor*> views;
  for (int s = 0; s < n; ++s) views.push_back(p.export_view(b, s));
  py::list caps;
  for (int s = 0; s < n; ++s) {
    PyObject* cap = PyCapsule_New(views[s], "dltensor", dlpack_capsule_destructor);
    if (cap == nullptr) {
      for (int r = s; r < n; ++r) views[r]->deleter(views[r]);
      throw py::error_already_set();
    }
    caps.append(py::reinterpret_steal<py::object>(cap));
  }
  return py::make_tuple(b.seq, b.rows, caps);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "trainpatterns native kernels (see python/trainpatterns/_kernels/)";
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

  // Per-step plan checks (optimizers): tensors stay opaque Python objects, see tensor_watch.h.
  m.def("set_tensor_reader", &tp::set_tensor_reader, py::arg("functions"), py::arg("samples"), py::arg("handles"),
        py::arg("tensor_type"), py::arg("fallback"), py::arg("is_neg"), py::arg("key_sets"), py::arg("lazy_keys"),
        "Install how tensor metadata is read: torch's exported C functions (located and verified on the "
        "samples), else the Python fallback. Returns whether the native reader is in use.");
  m.def("data_ptrs", &tp::data_ptrs, py::arg("tensors"), "The data address of each tensor of a list.");
  m.def("read_tensor",
        [](py::handle t) -> py::object {
          tp::TensorFacts f;
          tp::TensorPlace p;
          if (!tp::read_facts(t.ptr(), &f) || !tp::read_place(t.ptr(), &p)) return py::none();
          return py::make_tuple(f.ptr, f.numel, f.dtype, f.contiguous, f.in_bounds, p.device_type, p.device_index,
                                p.lazy);
        },
        py::arg("tensor"),
        "What the installed reader reads of a tensor, in tensor_facts' layout; None if it cannot read it.");
  py::class_<tp::TensorWatch>(m, "TensorWatch")
      .def(py::init<const py::list&, const std::vector<int64_t>&, const py::list&, const py::list&>(),
           py::arg("params"), py::arg("active"), py::arg("grads"), py::arg("rows"))
      .def("refresh",
           [](tp::TensorWatch& w, const py::list& params, const py::object& grads) {
             return static_cast<int>(w.refresh(params, grads));
           },
           py::arg("params"), py::arg("grads") = py::none(),
           "0: the tables are valid as they are; 1: new gradient addresses written into the tables' "
           "host rows; 2: changed, nothing written (rebuild)");

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

  py::class_<tp::FinishGradParams>(m, "FinishGradParams")
      .def(py::init([](std::uintptr_t sumsq, std::uintptr_t inv_scale, float max_norm, std::uintptr_t norm,
                       std::uintptr_t skip, std::uintptr_t grad_mul) {
             return tp::FinishGradParams{as_ptr<const double>(sumsq), as_ptr<const float>(inv_scale), max_norm,
                                         as_ptr<float>(norm), as_ptr<float>(skip), as_ptr<float>(grad_mul)};
           }),
           py::kw_only(), py::arg("sumsq"), py::arg("inv_scale") = 0, py::arg("max_norm") = 0.0f,
           py::arg("norm") = 0, py::arg("skip") = 0, py::arg("grad_mul") = 0);

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
        [](const tp::FinishGradParams& p, int device, std::uintptr_t stream) {
          py::gil_scoped_release release;
          tp::cuda::finish_grad_control(p, device, stream);
        },
        py::arg("params"), py::arg("device"), py::arg("stream"),
        "CUDA: norm, skip flag and gradient multiplier computed on the device.");
#endif

  // Gradient-bucket kernels (csrc/comm).
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
        const tp::CpuKernels& k = tp::cpu_kernels();
        (pack ? k.bucket_pack : k.bucket_unpack)(p, num_threads);
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

  // The native prefetcher behind trainpatterns.data.PrefetchLoader (csrc/loader).
  py::class_<tp::loader::Prefetcher>(m, "Prefetcher")
      .def(py::init([](const std::vector<SourceArgs>& sources, int64_t num_rows, int64_t batch_size, int prefetch,
                       int num_threads, const std::vector<std::vector<std::uintptr_t>>& external,
                       py::object /*owners*/) {
             tp::loader::PrefetcherConfig cfg;
             for (const auto& [addr, row_bytes, code, bits, trailing, name, fd, file_end] : sources) {
               if (code < 0 || code > 255 || bits < 8 || bits > 64)
                 throw std::invalid_argument("a source has an invalid DLPack dtype");
               const DLDataType dt{static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
               cfg.sources.push_back({as_ptr<const uint8_t>(addr), row_bytes, dt, trailing, name,
                                      tp::loader::make_file_check(fd, file_end)});
             }
             for (const auto& slot : external) {
               std::vector<uint8_t*> bufs;
               for (std::uintptr_t a : slot) bufs.push_back(as_ptr<uint8_t>(a));
               cfg.external.push_back(std::move(bufs));
             }
             cfg.num_rows = num_rows;
             cfg.batch_size = batch_size;
             cfg.prefetch = prefetch;
             cfg.num_threads = num_threads;
             return std::make_unique<tp::loader::Prefetcher>(std::move(cfg));
           }),
           py::kw_only(), py::arg("sources"), py::arg("num_rows"), py::arg("batch_size"), py::arg("prefetch"),
           py::arg("num_threads"), py::arg("external"), py::arg("owners"),
           py::keep_alive<1, 8>(),  // owners (the arrays the addresses point into) outlive the threads
           "Start the gather threads. sources: (address, row bytes, DLPack type code, bits, row shape, name, "
           "file descriptor or -1, file position past the last row) per source, the descriptor of a "
           "memory-mapped file being duplicated so that its size is checked before every chunk; external: "
           "per slot, one buffer address per source (empty: the pool allocates its own memory).")
      .def("push_epoch",
           [](tp::loader::Prefetcher& p, py::array_t<int64_t, py::array::c_style> order, bool drop_last,
              int64_t first_batch) {
             if (order.ndim() != 1) throw std::invalid_argument("order must be a 1-D int64 array");
             const int64_t* data = order.data();
             const auto n = static_cast<size_t>(order.shape(0));
             py::gil_scoped_release release;
             return p.push_epoch(std::vector<int64_t>(data, data + n), drop_last, first_batch);
           },
           py::arg("order"), py::arg("drop_last"), py::arg("first_batch"),
           "Append one epoch's batches (rows in `order`); returns how many were appended.")
      .def("next", &prefetcher_next, py::arg("timeout"),
           "(seq, rows, capsules) of the next batch, or None after `timeout` seconds; raises the error "
           "of a failed gather.")
      .def("close", [](tp::loader::Prefetcher& p) {
             py::gil_scoped_release release;
             p.close();
           }, "Stop and join the threads (idempotent). Batches already handed out stay valid.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](tp::loader::Prefetcher& p, py::args) {
             py::gil_scoped_release release;
             p.close();
           })
      .def_property_readonly("closed", &tp::loader::Prefetcher::closed)
      .def_property_readonly("num_slots", &tp::loader::Prefetcher::num_slots)
      .def_property_readonly("slot_bytes", &tp::loader::Prefetcher::slot_bytes)
      .def_property_readonly("num_threads", &tp::loader::Prefetcher::num_threads)
      .def_property_readonly("pushed", &tp::loader::Prefetcher::pushed);
}
