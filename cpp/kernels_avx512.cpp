// The avx512 backend: its primitives plus the shared kernel code.
#include "isa_avx512.hpp"

#define FD_ISA avx512
#define FD_ISA_NAME "avx512"
#include "kernels_impl.hpp"
