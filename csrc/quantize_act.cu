// Activation quantize on CUDA: signed codes with per-sample timestep-group parameters and the
// per-channel TCR reciprocal, computed exactly as tcaq_kernels/quant/primitives.py defines them:
//   q = clamp(rint((x * r_inv[c]) * s_inv[g]) + z[g], qmin, qmax),   g = group[sample]
// The two products use __fmul_rn so the compiler cannot contract them into an FMA (which would
// round once instead of twice and move codes at .5 boundaries), and __float2int_rn rounds half to
// even like torch.round. Parameters are read from device tables: no host sync, CUDA-graph safe.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace tcaq {

template <typename scalar_t>
__global__ void quantize_act_kernel(const scalar_t* __restrict__ x, const float* __restrict__ s_inv,
                                    const int32_t* __restrict__ zero, const int32_t* __restrict__ group,
                                    const float* __restrict__ r_inv, int8_t* __restrict__ out, int64_t numel,
                                    int64_t per_sample, int64_t channels, int64_t channel_stride, int qmin,
                                    int qmax) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int g = group[i / per_sample];
    float u = static_cast<float>(x[i]);
    if (r_inv != nullptr) u = __fmul_rn(u, r_inv[(i / channel_stride) % channels]);
    u = __fmul_rn(u, s_inv[g]);
    int q = __float2int_rn(u) + zero[g];
    q = q < qmin ? qmin : (q > qmax ? qmax : q);
    out[i] = static_cast<int8_t>(q);
  }
}

// x: [B, ...] contiguous; tables [G]; group [B] int32; r_inv [C] or undefined; channel_dim 1 (NCHW)
// or -1 (channels last). Writes into `out` (int8, same shape as x) and returns it.
at::Tensor quantize_act_out(const at::Tensor& x, const at::Tensor& s_inv, const at::Tensor& zero,
                            const at::Tensor& group, const c10::optional<at::Tensor>& r_inv, int64_t bits,
                            int64_t channel_dim, at::Tensor out) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "quantize_act: x must be a contiguous CUDA tensor");
  TORCH_CHECK(out.scalar_type() == at::kChar && out.sizes() == x.sizes() && out.is_contiguous(),
              "quantize_act: out must be a contiguous int8 tensor shaped like x");
  TORCH_CHECK(s_inv.scalar_type() == at::kFloat && zero.scalar_type() == at::kInt && group.scalar_type() == at::kInt,
              "quantize_act: s_inv float32, zero int32, group int32 expected");
  TORCH_CHECK(bits >= 2 && bits <= 8, "quantize_act: bits must be in [2, 8]");
  TORCH_CHECK(x.dim() >= 2 && group.numel() == x.size(0), "quantize_act: group needs one entry per sample");
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t dim = channel_dim < 0 ? channel_dim + x.dim() : channel_dim;
  const int64_t channels = x.size(dim);
  const int64_t channel_stride = x.stride(dim);
  const float* r_ptr = nullptr;
  if (r_inv.has_value() && r_inv->defined()) {
    TORCH_CHECK(r_inv->scalar_type() == at::kFloat && r_inv->numel() == channels && r_inv->is_contiguous(),
                "quantize_act: r_inv must be float32 with one entry per channel");
    r_ptr = r_inv->data_ptr<float>();
  }
  const int qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
  c10::cuda::CUDAGuard guard(x.device());
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 65535LL * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_act", [&] {
    quantize_act_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), s_inv.data_ptr<float>(), zero.data_ptr<int32_t>(), group.data_ptr<int32_t>(), r_ptr,
        out.data_ptr<int8_t>(), numel, numel / x.size(0), channels, channel_stride, qmin, qmax);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace tcaq
