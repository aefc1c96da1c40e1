// The neon backend (AArch64): its primitives plus the shared kernel code.
#include "isa_neon.hpp"

#define FD_ISA neon
#define FD_ISA_NAME "neon"
#include "kernels_impl.hpp"
