// Contract check of the TensorRT plugin library without a GPU or libnvinfer: loads the built
// libavatar_engine_trt_plugins.so the way IPluginRegistry::loadLibrary does (dlopen, getCreators, setLoggerFinder)
// and drives every plugin through the calls TensorRT makes before enqueue: identity, capability interfaces, output
// counts, types and symbolic shapes, format negotiation, shape checks (with their logged errors), clone and attach.
// Shapes go through a small constant-folding stand-in for TensorRT's expression builder (the header interfaces are
// implemented against their apiv:: virtual tables), so the plugins' own shape arithmetic is what is checked.
//
//   cmake --build build --target avatar_trt_contract   (kernels/CMakeLists.txt; needs the TensorRT headers)
//   build/kernels/avatar_trt_contract build/kernels/libavatar_engine_trt_plugins.so  -> "ok: N checks", exit 0; failures on stderr, exit 1
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <deque>
#include <initializer_list>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

int gChecks = 0;
int gFailures = 0;

void check(bool ok, std::string const& what) {
  ++gChecks;
  if (!ok) {
    ++gFailures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// A constant dimension: the value behind IDimensionExpr, as TensorRT's builder would fold it.
class ConstantImpl final : public apiv::VDimensionExpr {
 public:
  explicit ConstantImpl(int64_t value) : mValue(value) {}
  bool isConstant() const override { return true; }
  int64_t getConstantValue() const override { return mValue; }
  bool isSizeTensor() const override { return false; }

 private:
  int64_t mValue;
};

class Dimension final : public IDimensionExpr {
 public:
  explicit Dimension(apiv::VDimensionExpr* impl) { mImpl = impl; }
};

class BuilderImpl final : public apiv::VExprBuilder {
 public:
  IDimensionExpr const* constant(int64_t value) override {
    mImpls.emplace_back(value);
    mExprs.emplace_back(&mImpls.back());
    return &mExprs.back();
  }
  IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
    int64_t x = a.getConstantValue();
    int64_t y = b.getConstantValue();
    switch (op) {
      case DimensionOperation::kSUM:
        return constant(x + y);
      case DimensionOperation::kPROD:
        return constant(x * y);
      case DimensionOperation::kSUB:
        return constant(x - y);
      default:
        check(false, "unexpected DimensionOperation " + std::to_string(static_cast<int>(op)));
        return constant(-1);
    }
  }
  IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
    check(false, "declareSizeTensor called");
    return nullptr;
  }

 private:
  std::deque<ConstantImpl> mImpls;  // deques: pointers handed out stay valid
  std::deque<Dimension> mExprs;
};

class Builder final : public IExprBuilder {
 public:
  explicit Builder(apiv::VExprBuilder* impl) { mImpl = impl; }
};

class RecordingLogger final : public ILogger {
 public:
  void log(Severity severity, AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kERROR) messages.emplace_back(msg);
  }
  std::vector<std::string> messages;
};

class Finder final : public ILoggerFinder {
 public:
  ILogger* findLogger() override { return &logger; }
  RecordingLogger logger;
};

using Shape = std::vector<int64_t>;

DimsExprs exprs(IExprBuilder& builder, Shape const& shape) {
  DimsExprs d{};
  d.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) d.d[i] = builder.constant(shape[i]);
  return d;
}

PluginTensorDesc desc(Shape const& shape, DataType type) {
  PluginTensorDesc d{};
  d.dims.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) d.dims.d[i] = shape[i];
  d.type = type;
  d.format = TensorFormat::kLINEAR;
  d.scale = 1.0F;
  return d;
}

// One plugin's I/O contract: shapes of a consistent call, which inputs are keypoints, and the output shapes.
struct Case {
  char const* name;
  std::vector<Shape> inputs;
  std::vector<bool> keypoints;  // per input
  std::vector<Shape> outputs;
  int badInput;  // an input whose shape is then broken (one spatial axis of size 1, or a batch mismatch)
  Shape badShape;
};

std::string shapeText(Shape const& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

void checkPlugin(IPluginCreatorV3One* creator, Case const& c, Finder& finder) {
  std::string const name = c.name;
  check(std::string(creator->getPluginVersion()) == "1", name + ": creator version");
  check(std::string(creator->getPluginNamespace()) == "avatar_engine", name + ": creator namespace");
  check(creator->getFieldNames() != nullptr && creator->getFieldNames()->nbFields == 0, name + ": no fields");
  PluginField ignored{"unknown_attribute", nullptr, PluginFieldType::kINT32, 0};
  PluginFieldCollection fields{1, &ignored};
  IPluginV3* plugin = creator->createPlugin(c.name, &fields, TensorRTPhase::kBUILD);
  check(plugin != nullptr, name + ": createPlugin ignores unknown fields");
  if (plugin == nullptr) return;
  auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  check(core && build && runtime, name + ": core, build and runtime interfaces");
  if (!(core && build && runtime)) return;
  check(name == core->getPluginName() && std::string(core->getPluginNamespace()) == "avatar_engine" &&
            std::string(core->getPluginVersion()) == "1",
        name + ": plugin identity");

  int32_t const nIn = static_cast<int32_t>(c.inputs.size());
  int32_t const nOut = static_cast<int32_t>(c.outputs.size());
  check(build->getNbOutputs() == nOut, name + ": getNbOutputs");

  for (DataType volume : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16}) {
    std::vector<DataType> in(nIn), out(nOut, DataType::kINT8);
    for (int32_t i = 0; i < nIn; ++i) in[i] = c.keypoints[i] ? DataType::kFLOAT : volume;
    check(build->getOutputDataTypes(out.data(), nOut, in.data(), nIn) == 0, name + ": getOutputDataTypes");
    for (DataType t : out) check(t == volume, name + ": outputs take the volume type");

    // every position accepts the consistent combination; a wrong type or layout anywhere is refused
    std::vector<DynamicPluginTensorDesc> io(nIn + nOut);
    for (int32_t i = 0; i < nIn + nOut; ++i) {
      bool kp = i < nIn && c.keypoints[i];
      io[i].desc = desc(i < nIn ? c.inputs[i] : c.outputs[i - nIn], kp ? DataType::kFLOAT : volume);
    }
    for (int32_t pos = 0; pos < nIn + nOut; ++pos) {
      check(build->supportsFormatCombination(pos, io.data(), nIn, nOut), name + ": accepts position " +
                                                                              std::to_string(pos));
      PluginTensorDesc const saved = io[pos].desc;
      io[pos].desc.format = TensorFormat::kCHW32;
      check(!build->supportsFormatCombination(pos, io.data(), nIn, nOut), name + ": refuses a non-linear layout");
      io[pos].desc = saved;
      bool kp = pos < nIn && c.keypoints[pos];
      io[pos].desc.type = kp ? DataType::kHALF : DataType::kINT8;
      check(!build->supportsFormatCombination(pos, io.data(), nIn, nOut), name + ": refuses a wrong type");
      io[pos].desc = saved;
    }
    check(!build->supportsFormatCombination(nIn + nOut, io.data(), nIn, nOut), name + ": no extra position");
  }

  BuilderImpl builderImpl;
  Builder builder(&builderImpl);
  std::vector<DimsExprs> inExprs, outExprs(nOut);
  for (Shape const& s : c.inputs) inExprs.push_back(exprs(builder, s));
  check(build->getOutputShapes(inExprs.data(), nIn, nullptr, 0, outExprs.data(), nOut, builder) == 0,
        name + ": getOutputShapes");
  for (int32_t o = 0; o < nOut; ++o) {
    Shape got;
    for (int32_t i = 0; i < outExprs[o].nbDims; ++i) got.push_back(outExprs[o].d[i]->getConstantValue());
    check(got == c.outputs[o], name + ": output " + std::to_string(o) + " shape " + shapeText(got) + ", expected " +
                                   shapeText(c.outputs[o]));
  }

  std::vector<PluginTensorDesc> in, out;
  for (int32_t i = 0; i < nIn; ++i) in.push_back(desc(c.inputs[i], DataType::kFLOAT));
  for (Shape const& s : c.outputs) out.push_back(desc(s, DataType::kFLOAT));
  check(runtime->onShapeChange(in.data(), nIn, out.data(), nOut) == 0, name + ": consistent shapes accepted");
  finder.logger.messages.clear();
  in[c.badInput] = desc(c.badShape, DataType::kFLOAT);
  check(runtime->onShapeChange(in.data(), nIn, out.data(), nOut) != 0, name + ": inconsistent shapes refused");
  check(finder.logger.messages.size() == 1 && finder.logger.messages[0].rfind(name + ": ", 0) == 0,
        name + ": the refusal is logged under the plugin's name");

  IPluginV3* copy = runtime->attachToContext(nullptr);
  check(copy != nullptr && copy != plugin, name + ": attachToContext gives a new plugin");
  if (copy != nullptr) {
    auto* copyCore = static_cast<IPluginV3OneCore*>(copy->getCapabilityInterface(PluginCapabilityType::kCORE));
    check(copyCore && name == copyCore->getPluginName(), name + ": the copy has the same identity");
    delete copy;
  }
  PluginFieldCollection const* serial = runtime->getFieldsToSerialize();
  check(serial != nullptr && serial->nbFields == 0, name + ": nothing to serialize");
  delete plugin;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s libavatar_engine_trt_plugins.so\n", argv[0]);
    return 2;
  }
  void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    std::fprintf(stderr, "dlopen: %s\n", dlerror());
    return 1;
  }
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  using SetLoggerFinder = void (*)(ILoggerFinder*);
  auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
  auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder"));
  if (getCreators == nullptr || setLoggerFinder == nullptr) {
    std::fprintf(stderr, "the library must export getCreators and setLoggerFinder\n");
    return 1;
  }
  Finder finder;
  setLoggerFinder(&finder);

  // B=2, C=4 feature channels, K=3 keypoints, 5x6x7 volumes (distinct sizes so a swapped axis shows)
  std::vector<Case> const cases = {
      {"AvatarGridSample3D", {{2, 4, 5, 6, 7}, {2, 3, 8, 9, 3}}, {false, false}, {{2, 4, 3, 8, 9}}, 1,
       {1, 3, 8, 9, 3}},
      {"AvatarFlowWarp", {{2, 4, 6, 7, 8}, {2, 4, 5, 6, 7}, {2, 3, 3}, {2, 3, 3}}, {false, false, true, true},
       {{2, 4, 5, 6, 7}, {2, 5, 6, 7, 3}}, 1, {2, 4, 1, 6, 7}},
      {"AvatarMaskDeformation", {{2, 4, 5, 6, 7}, {2, 3, 3}, {2, 3, 3}}, {false, true, true}, {{2, 5, 6, 7, 3}}, 2,
       {2, 2, 3}},
      {"AvatarSparseMotion", {{2, 4, 5, 6, 7}, {2, 3, 3}, {2, 3, 3}}, {false, true, true}, {{2, 20, 5, 6, 7}}, 0,
       {2, 4, 5, 1, 7}},
  };
  int32_t count = 0;
  IPluginCreatorInterface* const* creators = getCreators(count);
  check(count == static_cast<int32_t>(cases.size()), "getCreators returns " + std::to_string(count) + " creators");
  for (Case const& c : cases) {
    IPluginCreatorV3One* found = nullptr;
    for (int32_t i = 0; i < count; ++i) {
      auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
      check(std::string(creators[i]->getInterfaceInfo().kind) == "PLUGIN CREATOR_V3ONE",
            "creator interface kind " + std::string(creators[i]->getInterfaceInfo().kind));
      if (std::string(creator->getPluginName()) == c.name) found = creator;
    }
    check(found != nullptr, std::string(c.name) + ": creator exported");
    if (found != nullptr) checkPlugin(found, c, finder);
  }
  std::printf("%s: %d checks, %d failed (TensorRT headers %d.%d.%d)\n", gFailures ? "FAILED" : "ok", gChecks,
              gFailures, NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, NV_TENSORRT_PATCH);
  return gFailures ? 1 : 0;
}
