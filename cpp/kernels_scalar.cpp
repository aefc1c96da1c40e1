// The scalar backend: its primitives plus the shared kernel code.
#include "isa_scalar.hpp"

#define FD_ISA scalar
#define FD_ISA_NAME "scalar"
#include "kernels_impl.hpp"
