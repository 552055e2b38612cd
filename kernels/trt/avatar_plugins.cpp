// TensorRT IPluginV3 plugins for the avatar engine's fused warping kernels (TensorRT >= 10).
//
//   AvatarGridSample3D  (version "1", namespace "avatar_engine")  input, grid                          -> out
//   AvatarFlowWarp      (version "1", namespace "avatar_engine")  feature, mask_logits, kp_d, kp_s     -> out, deformation
//   AvatarMaskDeformation (version "1", namespace "avatar_engine") mask_logits, kp_d, kp_s             -> deformation
//   AvatarSparseMotion  (version "1", namespace "avatar_engine")  compressed, kp_d, kp_s               -> out
//
// The I/O contract (shapes, dtypes, attributes, ONNX node form) is in kernels/README.md. The plugins have no
// attributes: the math is fixed (trilinear, zeros padding, align_corners=0, heatmap variance 0.01), so nothing needs
// serialising. Load the library with IPluginRegistry::loadLibrary / trtexec --dynamicPlugins: it exports
// getCreators() and setLoggerFinder().
#include <NvInferRuntime.h>

#include <cstdint>
#include <exception>
#include <mutex>
#include <new>
#include <string>

#include "avatar_kernels.h"

namespace avatar_engine {
namespace {

using namespace nvinfer1;

constexpr char const* kNamespace = "avatar_engine";
constexpr char const* kVersion = "1";

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder = nullptr;

void logError(std::string const& message) noexcept {
  try {
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr) {
      logger->log(ILogger::Severity::kERROR, message.c_str());
    }
  } catch (...) {
    // Logging must never throw across the TensorRT ABI.
  }
}

bool isVolumeType(DataType type) {
  return type == DataType::kFLOAT || type == DataType::kHALF || type == DataType::kBF16;
}

bool toStorage(DataType type, Storage& storage) {
  switch (type) {
    case DataType::kFLOAT:
      storage = Storage::kFloat;
      return true;
    case DataType::kHALF:
      storage = Storage::kHalf;
      return true;
    case DataType::kBF16:
      storage = Storage::kBFloat16;
      return true;
    default:
      return false;
  }
}

int dim(PluginTensorDesc const& desc, int index) { return static_cast<int>(desc.dims.d[index]); }

PluginFieldCollection const* emptyFields() {
  static PluginFieldCollection const collection{0, nullptr};
  return &collection;
}

// Boilerplate shared by the three plugins: identity, capabilities, cloning, no tactics, no serialised fields.
// Subclasses provide the I/O contract (counts, types, shapes, checks) and enqueue.
class AvatarPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  explicit AvatarPlugin(char const* name) : mName(name) {}

  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE:
        return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD:
        return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME:
        return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }

  AsciiChar const* getPluginName() const noexcept override { return mName; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t nbOutputs) noexcept override {
    return nbInputs == nbIO(true) && nbOutputs == nbIO(false) ? 0 : -1;
  }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbInputs != nbIO(true) || nbOutputs != nbIO(false)) return -1;
    for (int32_t i = 0; i < nbOutputs; ++i) outputTypes[i] = inputTypes[0];  // outputs follow the volume dtype
    return 0;
  }

  int32_t getNbOutputs() const noexcept override { return nbIO(false); }

  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override {
    if (nbInputs != nbIO(true) || nbOutputs != nbIO(false)) return -1;
    std::string problem = checkShapes(in, out);
    if (!problem.empty()) {
      logError(std::string(mName) + ": " + problem);
      return -1;
    }
    return 0;
  }

  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return emptyFields(); }

 protected:
  // Number of inputs (true) or outputs (false).
  virtual int32_t nbIO(bool inputs) const noexcept = 0;
  // Empty when the resolved shapes are consistent, else a message naming the problem.
  virtual std::string checkShapes(PluginTensorDesc const* in, PluginTensorDesc const* out) const = 0;

  // Volume tensors share the type of input 0; keypoint tensors are fp32; everything is linear (row-major).
  static bool formatIs(DynamicPluginTensorDesc const* inOut, int32_t pos, bool keypoints) {
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    if (keypoints) return desc.type == DataType::kFLOAT;
    return pos == 0 ? isVolumeType(desc.type) : desc.type == inOut[0].desc.type;
  }

  static int32_t report(char const* name, cudaError_t status) {
    if (status == cudaSuccess) return 0;
    logError(std::string(name) + ": kernel launch failed: " + cudaGetErrorString(status));
    return -1;
  }

  char const* mName;
};

class GridSample3DPlugin final : public AvatarPlugin {
 public:
  GridSample3DPlugin() : AvatarPlugin("AvatarGridSample3D") {}
  IPluginV3* clone() noexcept override { return new (std::nothrow) GridSample3DPlugin(*this); }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder&) noexcept override {
    if (nbInputs != 2 || nbOutputs != 1 || inputs[0].nbDims != 5 || inputs[1].nbDims != 5) return -1;
    outputs[0].nbDims = 5;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = inputs[0].d[1];
    outputs[0].d[2] = inputs[1].d[1];
    outputs[0].d[3] = inputs[1].d[2];
    outputs[0].d[4] = inputs[1].d[3];
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t, int32_t) noexcept override {
    return pos <= 2 && formatIs(inOut, pos, false);
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    Storage storage;
    if (!toStorage(inputDesc[0].type, storage)) return -1;
    PluginTensorDesc const& in = inputDesc[0];
    PluginTensorDesc const& out = outputDesc[0];
    return report(mName, launchGridSample3d(storage, inputs[0], inputs[1], outputs[0], dim(in, 0), dim(in, 1),
                                            dim(in, 2), dim(in, 3), dim(in, 4), dim(out, 2), dim(out, 3),
                                            dim(out, 4), stream));
  }

 protected:
  int32_t nbIO(bool inputs) const noexcept override { return inputs ? 2 : 1; }
  std::string checkShapes(PluginTensorDesc const* in, PluginTensorDesc const*) const override {
    if (in[0].dims.nbDims != 5) return "input must be 5-D [B, C, D, H, W]";
    if (in[1].dims.nbDims != 5 || in[1].dims.d[4] != 3 || in[1].dims.d[0] != in[0].dims.d[0]) {
      return "grid must be [B, Do, Ho, Wo, 3] with the input's batch";
    }
    return {};
  }
};

class FlowWarpPlugin final : public AvatarPlugin {
 public:
  FlowWarpPlugin() : AvatarPlugin("AvatarFlowWarp") {}
  IPluginV3* clone() noexcept override { return new (std::nothrow) FlowWarpPlugin(*this); }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override {
    if (nbInputs != 4 || nbOutputs != 2 || inputs[0].nbDims != 5 || inputs[1].nbDims != 5) return -1;
    DimsExprs const& feature = inputs[0];
    DimsExprs const& mask = inputs[1];
    outputs[0].nbDims = 5;  // warped feature [B, C, D, H, W]
    outputs[0].d[0] = mask.d[0];
    outputs[0].d[1] = feature.d[1];
    outputs[0].d[2] = mask.d[2];
    outputs[0].d[3] = mask.d[3];
    outputs[0].d[4] = mask.d[4];
    outputs[1].nbDims = 5;  // deformation [B, D, H, W, 3]
    outputs[1].d[0] = mask.d[0];
    outputs[1].d[1] = mask.d[2];
    outputs[1].d[2] = mask.d[3];
    outputs[1].d[3] = mask.d[4];
    outputs[1].d[4] = exprBuilder.constant(3);
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t, int32_t) noexcept override {
    // 0 feature, 1 mask_logits, 2 kp_driving, 3 kp_source | 4 out, 5 deformation
    return pos <= 5 && formatIs(inOut, pos, pos == 2 || pos == 3);
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    Storage storage;
    if (!toStorage(inputDesc[0].type, storage)) return -1;
    PluginTensorDesc const& feature = inputDesc[0];
    PluginTensorDesc const& mask = inputDesc[1];
    return report(mName, launchFlowWarp(storage, inputs[0], inputs[1], static_cast<float const*>(inputs[2]),
                                        static_cast<float const*>(inputs[3]), outputs[0], outputs[1],
                                        dim(mask, 0), dim(feature, 1), dim(feature, 2), dim(feature, 3),
                                        dim(feature, 4), dim(mask, 1) - 1, dim(mask, 2), dim(mask, 3), dim(mask, 4),
                                        stream));
  }

 protected:
  int32_t nbIO(bool inputs) const noexcept override { return inputs ? 4 : 2; }
  std::string checkShapes(PluginTensorDesc const* in, PluginTensorDesc const*) const override {
    Dims const& feature = in[0].dims;
    Dims const& mask = in[1].dims;
    if (feature.nbDims != 5 || mask.nbDims != 5) return "feature and mask_logits must be 5-D";
    if (feature.d[0] != mask.d[0]) return "feature and mask_logits batch differ";
    for (int i = 2; i < 5; ++i) {
      if (mask.d[i] < 2) return "mask_logits needs at least 2 voxels per spatial axis";
    }
    for (int k = 2; k < 4; ++k) {
      Dims const& kp = in[k].dims;
      if (kp.nbDims != 3 || kp.d[0] != mask.d[0] || kp.d[2] != 3 || kp.d[1] + 1 != mask.d[1]) {
        return "keypoints must be [B, K, 3] with K + 1 == mask_logits channels";
      }
    }
    return {};
  }
};

class MaskDeformationPlugin final : public AvatarPlugin {
 public:
  MaskDeformationPlugin() : AvatarPlugin("AvatarMaskDeformation") {}
  IPluginV3* clone() noexcept override { return new (std::nothrow) MaskDeformationPlugin(*this); }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override {
    if (nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 5) return -1;
    DimsExprs const& mask = inputs[0];
    outputs[0].nbDims = 5;  // deformation [B, D, H, W, 3]
    outputs[0].d[0] = mask.d[0];
    outputs[0].d[1] = mask.d[2];
    outputs[0].d[2] = mask.d[3];
    outputs[0].d[3] = mask.d[4];
    outputs[0].d[4] = exprBuilder.constant(3);
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t, int32_t) noexcept override {
    // 0 mask_logits, 1 kp_driving, 2 kp_source | 3 deformation
    return pos <= 3 && formatIs(inOut, pos, pos == 1 || pos == 2);
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    Storage storage;
    if (!toStorage(inputDesc[0].type, storage)) return -1;
    PluginTensorDesc const& mask = inputDesc[0];
    // The flow-warp kernel with no feature channels computes only the deformation.
    return report(mName, launchFlowWarp(storage, nullptr, inputs[0], static_cast<float const*>(inputs[1]),
                                        static_cast<float const*>(inputs[2]), nullptr, outputs[0], dim(mask, 0), 0, 1,
                                        1, 1, dim(mask, 1) - 1, dim(mask, 2), dim(mask, 3), dim(mask, 4), stream));
  }

 protected:
  int32_t nbIO(bool inputs) const noexcept override { return inputs ? 3 : 1; }
  std::string checkShapes(PluginTensorDesc const* in, PluginTensorDesc const*) const override {
    Dims const& mask = in[0].dims;
    if (mask.nbDims != 5) return "mask_logits must be 5-D [B, K+1, D, H, W]";
    for (int i = 2; i < 5; ++i) {
      if (mask.d[i] < 2) return "mask_logits needs at least 2 voxels per spatial axis";
    }
    for (int k = 1; k < 3; ++k) {
      Dims const& kp = in[k].dims;
      if (kp.nbDims != 3 || kp.d[0] != mask.d[0] || kp.d[2] != 3 || kp.d[1] + 1 != mask.d[1]) {
        return "keypoints must be [B, K, 3] with K + 1 == mask_logits channels";
      }
    }
    return {};
  }
};

class SparseMotionPlugin final : public AvatarPlugin {
 public:
  SparseMotionPlugin() : AvatarPlugin("AvatarSparseMotion") {}
  IPluginV3* clone() noexcept override { return new (std::nothrow) SparseMotionPlugin(*this); }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override {
    if (nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 5 || inputs[1].nbDims != 3) return -1;
    DimsExprs const& compressed = inputs[0];
    IDimensionExpr const* one = exprBuilder.constant(1);
    IDimensionExpr const* motions = exprBuilder.operation(DimensionOperation::kSUM, *inputs[1].d[1], *one);
    IDimensionExpr const* perMotion = exprBuilder.operation(DimensionOperation::kSUM, *compressed.d[1], *one);
    outputs[0].nbDims = 5;  // [B, (K+1)*(C+1), D, H, W]
    outputs[0].d[0] = compressed.d[0];
    outputs[0].d[1] = exprBuilder.operation(DimensionOperation::kPROD, *motions, *perMotion);
    outputs[0].d[2] = compressed.d[2];
    outputs[0].d[3] = compressed.d[3];
    outputs[0].d[4] = compressed.d[4];
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t, int32_t) noexcept override {
    // 0 compressed, 1 kp_driving, 2 kp_source | 3 out
    return pos <= 3 && formatIs(inOut, pos, pos == 1 || pos == 2);
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    Storage storage;
    if (!toStorage(inputDesc[0].type, storage)) return -1;
    PluginTensorDesc const& c = inputDesc[0];
    return report(mName, launchSparseMotion(storage, inputs[0], static_cast<float const*>(inputs[1]),
                                            static_cast<float const*>(inputs[2]), outputs[0], dim(c, 0), dim(c, 1),
                                            dim(inputDesc[1], 1), dim(c, 2), dim(c, 3), dim(c, 4), stream));
  }

 protected:
  int32_t nbIO(bool inputs) const noexcept override { return inputs ? 3 : 1; }
  std::string checkShapes(PluginTensorDesc const* in, PluginTensorDesc const*) const override {
    Dims const& c = in[0].dims;
    if (c.nbDims != 5) return "compressed must be 5-D [B, C, D, H, W]";
    for (int i = 2; i < 5; ++i) {
      if (c.d[i] < 2) return "compressed needs at least 2 voxels per spatial axis";
    }
    for (int k = 1; k < 3; ++k) {
      Dims const& kp = in[k].dims;
      if (kp.nbDims != 3 || kp.d[0] != c.d[0] || kp.d[2] != 3 || kp.d[1] != in[1].dims.d[1]) {
        return "keypoints must both be [B, K, 3]";
      }
    }
    return {};
  }
};

// One creator per plugin. The plugins take no fields; fields TensorRT or the ONNX parser pass along (for example
// from extra node attributes) are ignored rather than rejected, so adding an attribute later stays compatible.
template <typename Plugin>
class AvatarCreator final : public IPluginCreatorV3One {
 public:
  explicit AvatarCreator(char const* name) : mName(name) {}

  IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const*, TensorRTPhase) noexcept override {
    try {
      return new Plugin();
    } catch (std::exception const& error) {
      logError(std::string(mName) + ": " + error.what());
    } catch (...) {
      logError(std::string(mName) + ": plugin creation failed");
    }
    return nullptr;
  }

  PluginFieldCollection const* getFieldNames() noexcept override { return emptyFields(); }
  AsciiChar const* getPluginName() const noexcept override { return mName; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  char const* mName;
};

}  // namespace
}  // namespace avatar_engine

extern "C" {

// Entry points of a TensorRT plugin library (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins).
__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(avatar_engine::gLoggerMutex);
  avatar_engine::gLoggerFinder = finder;
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static avatar_engine::AvatarCreator<avatar_engine::GridSample3DPlugin> gridSample("AvatarGridSample3D");
  static avatar_engine::AvatarCreator<avatar_engine::FlowWarpPlugin> flowWarp("AvatarFlowWarp");
  static avatar_engine::AvatarCreator<avatar_engine::MaskDeformationPlugin> maskDeformation("AvatarMaskDeformation");
  static avatar_engine::AvatarCreator<avatar_engine::SparseMotionPlugin> sparseMotion("AvatarSparseMotion");
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&gridSample, &flowWarp, &maskDeformation,
                                                                &sparseMotion};
  nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
  return creators;
}

}  // extern "C"
