// The avx2 backend: its primitives plus the shared kernel code.
#include "isa_avx2.hpp"

#define FD_ISA avx2
#define FD_ISA_NAME "avx2"
#include "kernels_impl.hpp"
