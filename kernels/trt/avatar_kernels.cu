// nvcc build of the shared kernel sources plus host launchers for the TensorRT plugins. The .cu files are included
// (not copied) so the plugin and the NVRTC path of the PyTorch front end always run identical device code.
#include "avatar_kernels.h"

#include "../csrc/flow_warp.cu"
#include "../csrc/grid_sample_3d.cu"
#include "../csrc/sparse_motion.cu"

namespace avatar_engine {
namespace {

constexpr int kBlock = 256;             // matches __launch_bounds__(256) in the kernels
constexpr long long kMaxBlocks = 1 << 20;  // the kernels loop grid-stride beyond this

unsigned int blocksFor(long long threads) {
  long long blocks = (threads + kBlock - 1) / kBlock;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

}  // namespace

cudaError_t launchGridSample3d(Storage storage, void const* input, void const* grid, void* output, int B, int C, int D,
                               int H, int W, int Do, int Ho, int Wo, cudaStream_t stream) {
  long long const threads = static_cast<long long>(B) * Do * Ho * Wo;
  if (threads == 0) return cudaSuccess;
  unsigned int const blocks = blocksFor(threads);
  switch (storage) {
    case Storage::kFloat:
      avatar_grid_sample_3d_f32<<<blocks, kBlock, 0, stream>>>(static_cast<float const*>(input),
                                                               static_cast<float const*>(grid),
                                                               static_cast<float*>(output), B, C, D, H, W, Do, Ho, Wo);
      break;
    case Storage::kHalf:
      avatar_grid_sample_3d_f16<<<blocks, kBlock, 0, stream>>>(
          static_cast<avatar::Half const*>(input), static_cast<avatar::Half const*>(grid),
          static_cast<avatar::Half*>(output), B, C, D, H, W, Do, Ho, Wo);
      break;
    case Storage::kBFloat16:
      avatar_grid_sample_3d_bf16<<<blocks, kBlock, 0, stream>>>(
          static_cast<avatar::BFloat16 const*>(input), static_cast<avatar::BFloat16 const*>(grid),
          static_cast<avatar::BFloat16*>(output), B, C, D, H, W, Do, Ho, Wo);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launchFlowWarp(Storage storage, void const* feature, void const* maskLogits, float const* kpDriving,
                           float const* kpSource, void* out, void* deformation, int B, int C, int Df, int Hf, int Wf,
                           int K, int D, int H, int W, cudaStream_t stream) {
  long long const threads = static_cast<long long>(B) * D * H * W;
  if (threads == 0) return cudaSuccess;
  unsigned int const blocks = blocksFor(threads);
  switch (storage) {
    case Storage::kFloat:
      avatar_flow_warp_f32<<<blocks, kBlock, 0, stream>>>(
          static_cast<float const*>(feature), static_cast<float const*>(maskLogits), kpDriving, kpSource,
          static_cast<float*>(out), static_cast<float*>(deformation), B, C, Df, Hf, Wf, K, D, H, W);
      break;
    case Storage::kHalf:
      avatar_flow_warp_f16<<<blocks, kBlock, 0, stream>>>(
          static_cast<avatar::Half const*>(feature), static_cast<avatar::Half const*>(maskLogits), kpDriving,
          kpSource, static_cast<avatar::Half*>(out), static_cast<avatar::Half*>(deformation), B, C, Df, Hf, Wf, K, D,
          H, W);
      break;
    case Storage::kBFloat16:
      avatar_flow_warp_bf16<<<blocks, kBlock, 0, stream>>>(
          static_cast<avatar::BFloat16 const*>(feature), static_cast<avatar::BFloat16 const*>(maskLogits), kpDriving,
          kpSource, static_cast<avatar::BFloat16*>(out), static_cast<avatar::BFloat16*>(deformation), B, C, Df, Hf,
          Wf, K, D, H, W);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launchSparseMotion(Storage storage, void const* compressed, float const* kpDriving, float const* kpSource,
                               void* out, int B, int C, int K, int D, int H, int W, cudaStream_t stream) {
  long long const threads = static_cast<long long>(B) * (K + 1) * D * H * W;
  if (threads == 0) return cudaSuccess;
  unsigned int const blocks = blocksFor(threads);
  switch (storage) {
    case Storage::kFloat:
      avatar_sparse_motion_f32<<<blocks, kBlock, 0, stream>>>(static_cast<float const*>(compressed), kpDriving,
                                                              kpSource, static_cast<float*>(out), B, C, K, D, H, W);
      break;
    case Storage::kHalf:
      avatar_sparse_motion_f16<<<blocks, kBlock, 0, stream>>>(static_cast<avatar::Half const*>(compressed),
                                                              kpDriving, kpSource, static_cast<avatar::Half*>(out), B,
                                                              C, K, D, H, W);
      break;
    case Storage::kBFloat16:
      avatar_sparse_motion_bf16<<<blocks, kBlock, 0, stream>>>(static_cast<avatar::BFloat16 const*>(compressed),
                                                               kpDriving, kpSource,
                                                               static_cast<avatar::BFloat16*>(out), B, C, K, D, H, W);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace avatar_engine
