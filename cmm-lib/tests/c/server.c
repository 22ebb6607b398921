/* A libcmm server: accepts one multi-socket and answers each message (4-byte length, then
 * the payload) with "got N bytes labelled 0xL", sent back with the labels it arrived with. */
#include <arpa/inet.h>
#include <errno.h>
#include <libcmm.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FAIL(...) do { fprintf(stderr, "server: " __VA_ARGS__); fprintf(stderr, " (errno %d: %s)\n", errno, strerror(errno)); exit(1); } while (0)

/* Reads exactly n bytes; returns 0 at a clean end of stream before any byte. */
static int read_full(mc_socket_t s, void *buf, size_t n, unsigned long *labels) {
    size_t got = 0;
    while (got < n) {
        unsigned long l = 0;
        ssize_t k = cmm_read(s, (char *)buf + got, n - got, &l);
        if (k == 0 && got == 0) return 0;
        if (k <= 0) FAIL("read");
        if (got > 0 && l != *labels) FAIL("labels changed within a message: %lx then %lx", *labels, l);
        *labels = l;
        got += (size_t)k;
    }
    return 1;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7100;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) != 0) FAIL("bind");
    if (cmm_listen(l, 16) != 0) FAIL("cmm_listen");
    printf("listening on %d\n", port);
    fflush(stdout);
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    mc_socket_t s = cmm_accept(l, (struct sockaddr *)&peer, &plen);
    if (s < 0) FAIL("cmm_accept");
    char ip[64];
    inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
    printf("accepted from %s\n", ip);
    fflush(stdout);
    for (;;) {
        uint32_t len;
        unsigned long labels = 0;
        if (!read_full(s, &len, 4, &labels)) break;
        len = ntohl(len);
        char *msg = malloc(len ? len : 1);
        if (!msg) FAIL("malloc");
        if (len && !read_full(s, msg, len, &labels)) FAIL("truncated message");
        free(msg);
        char reply[128];
        int n = snprintf(reply, sizeof reply, "got %u bytes labelled 0x%lx\n", len, labels);
        if (cmm_send(s, reply, (size_t)n, 0, labels, NULL, NULL) != n) FAIL("send");
        printf("%s", reply);
        fflush(stdout);
    }
    printf("end of stream\n");
    if (cmm_close(s) != 0) FAIL("close");
    if (cmm_close(l) != 0) FAIL("close listener");
    return 0;
}
