// CPU build of all kernels for tests (see host_emulation.h): g++ -std=c++17 -shared -fPIC host_kernels.cpp
#include "host_emulation.h"

#include "../csrc/flow_warp.cu"
#include "../csrc/grid_sample_3d.cu"
#include "../csrc/sparse_motion.cu"
