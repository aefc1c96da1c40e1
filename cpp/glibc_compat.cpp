// Definitions that keep a FASTDROPOUT_GLIBC_2_28 build (static libstdc++) free of symbols
// newer than glibc 2.28.  The static libstdc++ objects linked in reference a few functions
// at the versions of the build system's glibc; hidden definitions here take those
// references and forward to versions every glibc since 2.28 (or 2.25) exports.
#include <pthread.h>
#include <sys/random.h>

#include <cstddef>
#include <cstdint>

extern "C" {

// glibc 2.32's __libc_single_threaded, read by libstdc++'s inline code to skip atomic
// reference counting: here it always says "maybe multi-threaded", so the atomics are
// always used (correct everywhere).
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

// pthread_once and pthread_key_create moved into libc at GLIBC_2.34; the GLIBC_2.2.5
// versions remain.
int fd_pthread_once_old(pthread_once_t*, void (*)(void));
__asm__(".symver fd_pthread_once_old,pthread_once@GLIBC_2.2.5");
__attribute__((visibility("hidden"))) int pthread_once(pthread_once_t* once, void (*init)(void)) {
  return fd_pthread_once_old(once, init);
}

int fd_pthread_key_create_old(pthread_key_t*, void (*)(void*));
__asm__(".symver fd_pthread_key_create_old,pthread_key_create@GLIBC_2.2.5");
__attribute__((visibility("hidden"))) int __pthread_key_create(pthread_key_t* key, void (*destroy)(void*)) {
  return fd_pthread_key_create_old(key, destroy);
}

// glibc 2.36's arc4random, which libstdc++'s std::random_device prefers: getrandom (2.25).
__attribute__((visibility("hidden"))) uint32_t arc4random(void) {
  uint32_t v = 0;
  size_t got = 0;
  while (got < sizeof v) {
    const ssize_t n = getrandom(reinterpret_cast<char*>(&v) + got, sizeof v - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  return v;
}

}  // extern "C"
