// Forced-included (-include) by a FASTDROPOUT_GLIBC_2_28 build: references to the symbols
// that glibc re-versioned after 2.28 are bound to their old versions, which every newer
// glibc still exports, so that a wheel built on a newer system loads on glibc 2.28
// (manylinux_2_28: RHEL/Rocky/Alma 8 and later).  x86-64 only (its base version is 2.2.5).
// pthread_once, __pthread_key_create and arc4random are defined in glibc_compat.cpp instead
// (static libstdc++ references them too).
#if defined(__linux__) && defined(__x86_64__)
__asm__(".symver log,log@GLIBC_2.2.5");                  // GLIBC_2.29 otherwise
__asm__(".symver dladdr,dladdr@GLIBC_2.2.5");            // GLIBC_2.34 otherwise (moved into libc)
#endif
