/* libcmm conformance, the listening side: the descriptor given to cmm_listen polls readable
 * exactly when a multi-socket waits to be accepted — not for the extra paths that join one
 * already accepted — so the usual poll-then-cmm_accept loop works, non-blocking too.
 * Usage: accept_poll PORT; the client connects twice, 3 s apart. Prints "ok accept_poll". */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <libcmm.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FAIL(...) do { fprintf(stderr, "accept_poll: " __VA_ARGS__); fprintf(stderr, " (errno %d: %s)\n", errno, strerror(errno)); exit(1); } while (0)

static int readable(int fd, int ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n = cmm_poll(&p, 1, ms);
    if (n < 0) FAIL("poll");
    return n == 1 && (p.revents & POLLIN);
}

int main(int argc, char **argv) {
    alarm(60);
    int port = argc > 1 ? atoi(argv[1]) : 7201;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) != 0) FAIL("bind");
    if (cmm_listen(l, 16) != 0) FAIL("cmm_listen");
    if (fcntl(l, F_SETFL, fcntl(l, F_GETFL) | O_NONBLOCK) != 0) FAIL("fcntl");
    struct sockaddr_in bound;
    socklen_t blen = sizeof bound;
    if (cmm_getsockname(l, (struct sockaddr *)&bound, &blen) != 0 || ntohs(bound.sin_port) != port) FAIL("getsockname");
    if (readable(l, 0)) FAIL("readable before any client");
    if (cmm_accept(l, NULL, NULL) != -1 || errno != EAGAIN) FAIL("a non-blocking accept with nobody waiting");
    printf("listening on %d\n", port);
    fflush(stdout);
    mc_socket_t s[2];
    for (int i = 0; i < 2; i++) {
        if (!readable(l, 30000)) FAIL("not readable when client %d connected", i + 1);
        s[i] = cmm_accept(l, NULL, NULL);
        if (s[i] < 0) FAIL("accept %d", i + 1);
        /* The client's other network joins this multi-socket now: not a new one to accept. */
        if (readable(l, 1500)) FAIL("readable after accept %d with nobody new waiting", i + 1);
        if (cmm_accept(l, NULL, NULL) != -1 || errno != EAGAIN) FAIL("accepted a path as a multi-socket");
    }
    for (int i = 0; i < 2; i++) cmm_close(s[i]);
    cmm_close(l);
    printf("ok accept_poll\n");
    return 0;
}
