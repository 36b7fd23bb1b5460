/*
 * Storage fault injection for vtpmd's tests, loaded with LD_PRELOAD into a
 * real vtpmd process. While the file named by $VTPMD_FAULT_FILE contains
 * "write" (or "fsync"), write(2)/pwrite(2) (or fsync(2)/fdatasync(2)) on
 * any descriptor whose path contains "/TMP2-" or "/vtpmd-00." fails with
 * EIO: the state file vtpmd is writing breaks as a failing disk would
 * break it. With "rofs", creating such a file or writing to one fails
 * with EROFS, as on a file system the kernel remounted read-only under a
 * running process (errors=remount-ro), which a plain
 * `mount -o remount,ro` cannot do while files are open for writing.
 * Crashes at chosen points of a state write (the process kills itself
 * with SIGKILL): "tear" writes a random prefix of the record and dies,
 * "crash-before-sync" dies after the write and before fdatasync,
 * "crash-after-sync" dies after fdatasync, before vtpmd can answer.
 * Everything else passes through to libc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>

static int fault_armed(const char *what)
{
    const char *ctl = getenv("VTPMD_FAULT_FILE");
    char buf[64];
    ssize_t n;
    int fd;

    if (!ctl)
        return 0;
    fd = open(ctl, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    return strstr(buf, what) != NULL;
}

static int is_state_temp(int fd)
{
    char link[64], path[4096];
    ssize_t n;

    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof(path) - 1);
    if (n <= 0)
        return 0;
    path[n] = 0;
    return strstr(path, "/TMP2-") != NULL || strstr(path, "/vtpmd-00.") != NULL;
}

static void die_now(void)
{
    kill(getpid(), SIGKILL);
    for (;;)
        pause();
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off)
{
    static ssize_t (*real)(int, const void *, size_t, off_t);

    if (!real)
        real = dlsym(RTLD_NEXT, "pwrite64");
    if (is_state_temp(fd)) {
        if (count > 1 && fault_armed("tear")) {
            srand((unsigned)getpid() ^ (unsigned)off ^ (unsigned)count);
            real(fd, buf, 1 + (size_t)rand() % (count - 1), off);
            die_now();
        }
        if (fault_armed("write")) {
            errno = EIO;
            return -1;
        }
        if (fault_armed("rofs")) {
            errno = EROFS;
            return -1;
        }
    }
    return real(fd, buf, count, off);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t off)
{
    return pwrite64(fd, buf, count, off);
}

ssize_t write(int fd, const void *buf, size_t count)
{
    static ssize_t (*real)(int, const void *, size_t);

    if (!real)
        real = dlsym(RTLD_NEXT, "write");
    if (is_state_temp(fd) && fault_armed("write")) {
        errno = EIO;
        return -1;
    }
    return real(fd, buf, count);
}

int fsync(int fd)
{
    static int (*real)(int);

    if (!real)
        real = dlsym(RTLD_NEXT, "fsync");
    if (is_state_temp(fd) && fault_armed("fsync")) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}

int fdatasync(int fd)
{
    static int (*real)(int);
    int r;

    if (!real)
        real = dlsym(RTLD_NEXT, "fdatasync");
    if (is_state_temp(fd) && fault_armed("fsync")) {
        errno = EIO;
        return -1;
    }
    if (is_state_temp(fd) && fault_armed("crash-before-sync"))
        die_now();
    r = real(fd);
    if (is_state_temp(fd) && fault_armed("crash-after-sync"))
        die_now();
    return r;
}

static int refuse_create(const char *path, int flags)
{
    return path && strstr(path, "/TMP2-") &&
           (flags & (O_WRONLY | O_RDWR | O_CREAT)) && fault_armed("rofs");
}

int open64(const char *path, int flags, ...)
{
    static int (*real)(const char *, int, ...);
    mode_t mode = 0;
    va_list ap;

    if (!real)
        real = dlsym(RTLD_NEXT, "open64");
    va_start(ap, flags);
    if (flags & (O_CREAT | O_TMPFILE))
        mode = va_arg(ap, mode_t);
    va_end(ap);
    if (refuse_create(path, flags)) {
        errno = EROFS;
        return -1;
    }
    return real(path, flags, mode);
}

int open(const char *path, int flags, ...)
{
    static int (*real)(const char *, int, ...);
    mode_t mode = 0;
    va_list ap;

    if (!real)
        real = dlsym(RTLD_NEXT, "open");
    va_start(ap, flags);
    if (flags & (O_CREAT | O_TMPFILE))
        mode = va_arg(ap, mode_t);
    va_end(ap);
    if (refuse_create(path, flags)) {
        errno = EROFS;
        return -1;
    }
    return real(path, flags, mode);
}
