// The CUDA runtime version the kernels were built with (nepenthe._C.cuda_version(), checked against
// torch.version.cuda when the "cuda" backend loads).
#include <cuda_runtime.h>

int nepenthe_cuda_runtime_version() { return CUDART_VERSION; }
