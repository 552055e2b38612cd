// Host launchers for the fused warping kernels (kernels/csrc/*.cu), used by the TensorRT plugins.
// Implemented in avatar_kernels.cu, which compiles the very sources the PyTorch front end builds with NVRTC.
#pragma once

#include <cuda_runtime_api.h>

namespace avatar_engine {

// Element type shared by the volume inputs and outputs of one call; keypoints are always fp32.
enum class Storage : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// grid_sample(input [B,C,D,H,W], grid [B,Do,Ho,Wo,3]) -> output [B,C,Do,Ho,Wo]; trilinear, zeros, align_corners=0.
cudaError_t launchGridSample3d(Storage storage, void const* input, void const* grid, void* output, int B, int C, int D,
                               int H, int W, int Do, int Ho, int Wo, cudaStream_t stream);

// Softmax(mask_logits [B,K+1,D,H,W]) weighted motions -> deformation [B,D,H,W,3] (skipped when null), then
// out [B,C,D,H,W] = grid_sample(feature [B,C,Df,Hf,Wf], deformation).
cudaError_t launchFlowWarp(Storage storage, void const* feature, void const* maskLogits, float const* kpDriving,
                           float const* kpSource, void* out, void* deformation, int B, int C, int Df, int Hf, int Wf,
                           int K, int D, int H, int W, cudaStream_t stream);

// Hourglass input [B,(K+1)*(C+1),D,H,W] of compressed [B,C,D,H,W] and keypoints [B,K,3].
cudaError_t launchSparseMotion(Storage storage, void const* compressed, float const* kpDriving, float const* kpSource,
                               void* out, int B, int C, int K, int D, int H, int W, cudaStream_t stream);

}  // namespace avatar_engine
