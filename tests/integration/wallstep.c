/* Steps the wall clock of the process it is preloaded into (tests only).
 *
 * CLOCK_REALTIME, gettimeofday() and time() are shifted by the number of
 * seconds written in the file named by WALLSTEP_FILE (re-read every 50 ms of
 * steady time); every other clock is left alone. libfaketime would do, but it
 * deadlocks in Envoy's tcmalloc at start-up; this shim calls the kernel
 * directly and never allocates. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long offset_s;
static long long next_read_ns;

static int raw_clock(clockid_t id, struct timespec *ts) {
    return (int)syscall(SYS_clock_gettime, id, ts);
}

static void refresh(void) {
    struct timespec now;
    raw_clock(CLOCK_MONOTONIC, &now);
    long long ns = (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
    if (ns < __atomic_load_n(&next_read_ns, __ATOMIC_RELAXED)) return;
    __atomic_store_n(&next_read_ns, ns + 50000000LL, __ATOMIC_RELAXED);
    const char *path = getenv("WALLSTEP_FILE");
    if (!path) return;
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY);
    if (fd < 0) return;
    char buf[32] = {0};
    long n = syscall(SYS_read, fd, buf, sizeof buf - 1);
    syscall(SYS_close, fd);
    if (n > 0) __atomic_store_n(&offset_s, strtoll(buf, NULL, 10), __ATOMIC_RELAXED);
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    int rc = raw_clock(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        refresh();
        ts->tv_sec += __atomic_load_n(&offset_s, __ATOMIC_RELAXED);
    }
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    (void)tz;
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    if (rc == 0 && tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
