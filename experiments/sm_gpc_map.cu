// Which SMs share a GPC, from where thread-block clusters land: a cluster's blocks always run in
// one GPC, so SMs that ever host blocks of one cluster are in the same GPC. The question behind
// it (docs/kernel_notes.md, v28): under the TMA forward's relaxed line barrier the blocks of 16
// particular SMs (%smid 0-3, 16-17, 48-51, 124-125, 128-131 at 8 x 1152 x 128 x 128) finished
// 6-23% after the rest; do they share GPCs? %smid alone does not say.
// Standalone; on the GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/smgpc experiments/sm_gpc_map.cu && /tmp/smgpc [SMs...]
// It launches clusters of each size that fits (16 where the non-portable size is allowed, 8, 4),
// one block per SM (shared memory over half an SM's), several times with different grid sizes,
// joins SMs that shared a cluster (union-find) and prints each group with its SM count.
// SM ids given as arguments are marked in the groups.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <vector>

#include "cuda_check.h"

__global__ void WhereAmI(unsigned* out) {
  if (threadIdx.x != 0) return;
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  out[blockIdx.x] = sm;
  // Hold the SM a while, so that every cluster of the grid is resident at once where it fits.
  const long long t0 = clock64();
  while (clock64() - t0 < 2000000) {
  }
}

struct Groups {
  std::vector<int> parent;
  explicit Groups(int n) : parent(n) { std::iota(parent.begin(), parent.end(), 0); }
  int Find(int a) { return parent[a] == a ? a : parent[a] = Find(parent[a]); }
  void Join(int a, int b) { parent[Find(a)] = Find(b); }
};

int main(int argc, char** argv) {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const size_t smem = prop.sharedMemPerMultiprocessor / 2 + 1024;  // one block per SM
  CHECK(cudaFuncSetAttribute(WhereAmI, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  cudaFuncSetAttribute(WhereAmI, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  cudaGetLastError();
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(32);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  const int max_id = 1024, max_blocks = 4 * sms;
  Groups groups(max_id);
  std::vector<int> seen(max_id, 0);
  unsigned* dev = nullptr;
  CHECK(cudaMalloc(&dev, sizeof(unsigned) * max_blocks));
  std::vector<unsigned> host(max_blocks);
  std::printf("%s, %d SMs\n", prop.name, sms);
  for (int cluster : {16, 8, 4}) {
    attr.val.clusterDim.x = unsigned(cluster);
    cfg.gridDim = dim3(unsigned(cluster));
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, WhereAmI, &cfg) != cudaSuccess || n == 0) {
      cudaGetLastError();
      std::printf("clusters of %d: do not fit\n", cluster);
      continue;
    }
    std::printf("clusters of %d: %d resident\n", cluster, n);
    // Grids of 1 cluster to 4 waves, each several times: clusters land on different GPCs.
    for (int rep = 0; rep < 6; ++rep) {
      for (int blocks = cluster; blocks <= max_blocks; blocks += cluster * (1 + rep % 3)) {
        cfg.gridDim = dim3(unsigned(blocks));
        CHECK(cudaLaunchKernelEx(&cfg, WhereAmI, dev));
        CHECK(cudaDeviceSynchronize());
        CHECK(cudaMemcpy(host.data(), dev, sizeof(unsigned) * blocks, cudaMemcpyDeviceToHost));
        for (int b = 0; b < blocks; ++b) {
          const int sm = int(host[b]), first = int(host[b - b % cluster]);  // its cluster's first
          if (sm >= max_id || first >= max_id) continue;
          seen[sm] = 1;
          groups.Join(sm, first);
        }
      }
    }
  }
  CHECK(cudaFree(dev));
  std::vector<int> marked(max_id, 0);
  for (int i = 1; i < argc; ++i) {
    const int sm = std::atoi(argv[i]);
    if (sm >= 0 && sm < max_id) marked[sm] = 1;
  }
  std::vector<std::vector<int>> out;
  for (int root = 0; root < max_id; ++root) {
    std::vector<int> members;
    for (int sm = 0; sm < max_id; ++sm)
      if (seen[sm] && groups.Find(sm) == root) members.push_back(sm);
    if (!members.empty()) out.push_back(members);
  }
  std::sort(out.begin(), out.end());
  for (const auto& members : out) {
    int n_marked = 0;
    for (int sm : members) n_marked += marked[sm];
    std::printf("group of %zu SMs (%d marked):", members.size(), n_marked);
    for (int sm : members) std::printf(" %d%s", sm, marked[sm] ? "*" : "");
    std::printf("\n");
  }
  return 0;
}
