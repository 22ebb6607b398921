/* libcmm conformance: one behaviour a socket programmer relies on per case, each against the
 * echo server, each under an alarm so that a missing feature fails rather than hangs.
 * Usage: conformance CASE SERVER_IP PORT. Prints "ok CASE" and exits 0 when the case holds. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <libcmm.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FAIL(...) do { fprintf(stderr, "conformance: " __VA_ARGS__); fprintf(stderr, " (errno %d: %s)\n", errno, strerror(errno)); exit(1); } while (0)

static struct sockaddr_in server;

/* Connects with libcmm's final, 3-argument cmm_connect. */
static mc_socket_t connect_echo(void) {
    mc_socket_t s = cmm_socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) FAIL("cmm_socket");
    if (cmm_connect(s, (struct sockaddr *)&server, sizeof server) != 0) FAIL("cmm_connect");
    return s;
}

static void send_all(mc_socket_t s, const char *msg, unsigned long labels) {
    size_t n = strlen(msg);
    if (cmm_send(s, msg, n, 0, labels, NULL, NULL) != (ssize_t)n) FAIL("cmm_send %s", msg);
}

static void wait_readable(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (cmm_poll(&p, 1, 20000) != 1 || !(p.revents & POLLIN)) FAIL("not readable in 20 s");
}

/* MSG_WAITALL waits for the whole count across sends and labels; the first send's labels. */
static void waitall(void) {
    mc_socket_t s = connect_echo();
    send_all(s, "aaa", CMM_LABEL_ONDEMAND);
    send_all(s, "bbbb", CMM_LABEL_SMALL);
    send_all(s, "cc", CMM_LABEL_ONDEMAND);
    char *buf = malloc(9); /* uninitialised on purpose */
    unsigned long labels = 0;
    ssize_t n = cmm_recv(s, buf, 9, MSG_WAITALL, &labels);
    if (n != 9 || memcmp(buf, "aaabbbbcc", 9) != 0) FAIL("MSG_WAITALL gave %zd bytes", n);
    if (labels != CMM_LABEL_ONDEMAND) FAIL("labels 0x%lx, not the first send's", labels);
    free(buf);
    cmm_close(s);
}

/* MSG_PEEK returns bytes without consuming them; the descriptor stays readable meanwhile. */
static void peek(void) {
    mc_socket_t s = connect_echo();
    send_all(s, "hello", CMM_LABEL_ONDEMAND);
    char buf[16];
    unsigned long labels = 0;
    ssize_t n = cmm_recv(s, buf, 5, MSG_PEEK | MSG_WAITALL, &labels);
    if (n <= 0 || memcmp(buf, "hello", (size_t)n) != 0) FAIL("MSG_PEEK gave %zd", n);
    if (labels != CMM_LABEL_ONDEMAND) FAIL("peek labels 0x%lx", labels);
    wait_readable(s);
    size_t got = 0;
    while (got < 5) {
        n = cmm_recv(s, buf + got, 5 - got, 0, &labels);
        if (n <= 0) FAIL("recv after peek");
        got += (size_t)n;
    }
    if (memcmp(buf, "hello", 5) != 0) FAIL("the peeked bytes were not read again");
    if (cmm_recv(s, buf, sizeof buf, MSG_DONTWAIT, NULL) != -1 || errno != EAGAIN) FAIL("more than was sent");
    cmm_close(s);
}

/* O_NONBLOCK set with fcntl: a read with nothing to do fails with EAGAIN at once. */
static void nonblock(void) {
    mc_socket_t s = connect_echo();
    int flags = fcntl(s, F_GETFL);
    if (flags < 0 || fcntl(s, F_SETFL, flags | O_NONBLOCK) != 0) FAIL("fcntl");
    char buf[16];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (cmm_recv(s, buf, sizeof buf, 0, NULL) != -1 || (errno != EAGAIN && errno != EWOULDBLOCK))
        FAIL("a non-blocking read with nothing to read did not fail with EAGAIN");
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (t1.tv_sec - t0.tv_sec > 1) FAIL("the non-blocking read waited");
    send_all(s, "x", CMM_LABEL_ONDEMAND);
    wait_readable(s);
    if (cmm_read(s, buf, sizeof buf, NULL) != 1) FAIL("read after poll");
    cmm_close(s);
}

static double since(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
}

/* SO_RCVTIMEO and SO_SNDTIMEO: a blocked call gives up with EAGAIN (or the count taken) after
 * the timeout; the values read back as set; 0 means none. */
static void timeouts(void) {
    mc_socket_t s = connect_echo();
    struct timeval tv = {.tv_sec = 0, .tv_usec = 300000}, back = {0};
    socklen_t len = sizeof back;
    if (cmm_setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) FAIL("set SO_RCVTIMEO");
    if (cmm_getsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &back, &len) != 0 || back.tv_usec != 300000 || back.tv_sec != 0)
        FAIL("SO_RCVTIMEO reads back as %ld.%06ld", (long)back.tv_sec, (long)back.tv_usec);
    char buf[16];
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (cmm_recv(s, buf, sizeof buf, 0, NULL) != -1 || (errno != EAGAIN && errno != EWOULDBLOCK))
        FAIL("a read with nothing to read did not time out with EAGAIN");
    double waited = since(&t0);
    if (waited < 0.25 || waited > 10) FAIL("the read timed out after %.3f s, not 0.3 s", waited);
    /* The peer echoes what it gets but nobody reads here: buffers fill, then a send times out. */
    tv.tv_usec = 500000;
    if (cmm_setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0) FAIL("set SO_SNDTIMEO");
    size_t chunk = 1 << 20;
    char *big = calloc(1, chunk);
    int timed_out = 0;
    for (int i = 0; i < 400 && !timed_out; i++) {
        ssize_t n = cmm_send(s, big, chunk, 0, CMM_LABEL_SMALL, NULL, NULL);
        if (n == -1 && (errno == EAGAIN || errno == EWOULDBLOCK)) timed_out = 1;
        else if (n >= 0 && (size_t)n < chunk) timed_out = 1;
        else if (n != (ssize_t)chunk) FAIL("send");
    }
    if (!timed_out) FAIL("400 MiB went out without a send timing out");
    free(big);
    cmm_close(s);
}

/* On descriptors that are not multi-sockets the calls are the plain system calls. */
static void plainfd(void) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) FAIL("socketpair");
    unsigned long labels = 99;
    char buf[16];
    if (cmm_send(sv[0], "ping", 4, 0, CMM_LABEL_ONDEMAND, NULL, NULL) != 4) FAIL("cmm_send on a plain socket");
    if (cmm_recv(sv[1], buf, 4, MSG_WAITALL, &labels) != 4) FAIL("cmm_recv on a plain socket");
    if (memcmp(buf, "ping", 4) != 0 || labels != 0) FAIL("plain recv gave labels 0x%lx", labels);
    int type = 0;
    socklen_t len = sizeof type;
    if (cmm_getsockopt(sv[0], SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) FAIL("getsockopt");
    if (cmm_shutdown(sv[0], SHUT_WR) != 0) FAIL("shutdown");
    if (cmm_read(sv[1], buf, sizeof buf, &labels) != 0) FAIL("end of stream after shutdown");
    int p[2];
    if (pipe(p) != 0) FAIL("pipe");
    if (cmm_write(p[1], "pipe", 4, 0, NULL, NULL) != 4) FAIL("cmm_write on a pipe");
    if (cmm_read(p[0], buf, sizeof buf, &labels) != 4 || memcmp(buf, "pipe", 4) != 0) FAIL("cmm_read on a pipe");
    if (cmm_close(p[0]) != 0 || cmm_close(p[1]) != 0 || cmm_close(sv[0]) != 0 || cmm_close(sv[1]) != 0) FAIL("close");
    if (cmm_close(p[0]) != -1 || errno != EBADF) FAIL("a second close is not EBADF");
}

/* cmm_set_failure_timeout: a send no network can take fails after the timeout set for its
 * labels, not the policy's (background is kept off the metered cellular link, and
 * THREEG_ONLY keeps it off Wi-Fi). */
static void failtimeout(void) {
    mc_socket_t s = connect_echo();
    unsigned long nowhere = CMM_LABEL_BACKGROUND | CMM_LABEL_THREEG_ONLY;
    struct timespec def = {0}, one = {.tv_sec = 1, .tv_nsec = 0}, back = {0};
    if (cmm_get_failure_timeout(s, nowhere, &def) != 0) FAIL("get_failure_timeout");
    if (def.tv_sec < 2 && def.tv_sec != -1) FAIL("the policy's wait is only %ld s", (long)def.tv_sec);
    if (cmm_set_failure_timeout(s, nowhere, &one) != 0) FAIL("set_failure_timeout");
    if (cmm_get_failure_timeout(s, nowhere, &back) != 0 || back.tv_sec != 1 || back.tv_nsec != 0) FAIL("read back");
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (cmm_send(s, "x", 1, 0, nowhere, NULL, NULL) != -1 || errno != ETIMEDOUT)
        FAIL("a send no network can take did not fail with ETIMEDOUT");
    double waited = since(&t0);
    if (waited < 0.9 || waited > 10) FAIL("it failed after %.3f s, not 1 s", waited);
    struct timespec forever = {.tv_sec = -1, .tv_nsec = 0};
    if (cmm_set_failure_timeout(s, nowhere, &forever) != 0 || cmm_get_failure_timeout(s, nowhere, &back) != 0 || back.tv_sec != -1)
        FAIL("without end");
    if (cmm_set_failure_timeout(s, nowhere, NULL) != 0 || cmm_get_failure_timeout(s, nowhere, &back) != 0 ||
        back.tv_sec != def.tv_sec)
        FAIL("the policy's again");
    cmm_close(s);
}

/* The client of accept_poll.c: two multi-sockets, 3 s apart, each over every network. */
static void twoconnections(void) {
    mc_socket_t a = connect_echo();
    sleep(3);
    mc_socket_t b = connect_echo();
    sleep(2);
    cmm_close(a);
    cmm_close(b);
}

int main(int argc, char **argv) {
    if (argc < 4) FAIL("usage: conformance CASE SERVER_IP PORT");
    alarm(60);
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &server.sin_addr) != 1) FAIL("bad address %s", argv[2]);
    const char *c = argv[1];
    if (!strcmp(c, "waitall")) waitall();
    else if (!strcmp(c, "peek")) peek();
    else if (!strcmp(c, "nonblock")) nonblock();
    else if (!strcmp(c, "plainfd")) plainfd();
    else if (!strcmp(c, "timeouts")) timeouts();
    else if (!strcmp(c, "twoconnections")) twoconnections();
    else if (!strcmp(c, "failtimeout")) failtimeout();
    else FAIL("unknown case %s", c);
    printf("ok %s\n", c);
    return 0;
}
