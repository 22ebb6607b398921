/* What the lab's C clients share: failing with the reason, waiting on a counter, the
 * length-prefixed messages server.c answers, and checking its answers. */
#ifndef CMM_TEST_CLIENT_UTIL_H
#define CMM_TEST_CLIENT_UTIL_H

#include <arpa/inet.h>
#include <errno.h>
#include <libcmm.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FAIL(...) do { fprintf(stderr, "client: " __VA_ARGS__); fprintf(stderr, " (errno %d: %s)\n", errno, strerror(errno)); exit(1); } while (0)

/* How many stored arguments the deleter freed. */
static atomic_int deleted;

static void never_runs(void *arg) { (void)arg; FAIL("a cancelled thunk ran"); }
static void deleter(void *arg) { atomic_fetch_add(&deleted, 1); free(arg); }

static void wait_until(atomic_int *v, int at_least, const char *what) {
    for (int i = 0; i < 1200 && atomic_load(v) < at_least; i++) usleep(50 * 1000);
    if (atomic_load(v) < at_least) FAIL("%s: %d, wanted %d", what, atomic_load(v), at_least);
}

static void send_message(mc_socket_t s, size_t len, unsigned long labels) {
    char *buf = malloc(len + 4);
    uint32_t n = htonl((uint32_t)len);
    memcpy(buf, &n, 4);
    memset(buf + 4, 'x', len);
    /* Header and payload as two iovecs: one labelled send. */
    struct iovec iov[2] = {{buf, 4}, {buf + 4, len}};
    int sent = cmm_writev(s, iov, 2, labels, NULL, NULL);
    if (sent != (int)(len + 4)) FAIL("writev sent %d of %zu", sent, len + 4);
    free(buf);
}

static void expect_reply(mc_socket_t s, size_t len, unsigned long labels) {
    char line[128];
    size_t got = 0;
    unsigned long l = 0;
    while (got == 0 || line[got - 1] != '\n') {
        ssize_t k = cmm_read(s, line + got, 1, &l);
        if (k != 1) FAIL("read reply");
        got++;
        if (got == sizeof line) FAIL("reply too long");
    }
    line[got] = 0;
    char want[128];
    snprintf(want, sizeof want, "got %zu bytes labelled 0x%lx\n", len, labels);
    if (strcmp(line, want) != 0) FAIL("reply %s, wanted %s", line, want);
    if (l != labels) FAIL("reply labelled 0x%lx, wanted 0x%lx", l, labels);
    printf("%s", line);
    fflush(stdout);
}

#endif
