/* A libcmm echo server for the conformance suite: accepts multi-sockets, one thread each,
 * and sends every piece it reads straight back with the labels it arrived with. */
#include <arpa/inet.h>
#include <errno.h>
#include <libcmm.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *echo(void *arg) {
    mc_socket_t s = (mc_socket_t)(intptr_t)arg;
    char buf[65536];
    for (;;) {
        unsigned long labels = 0;
        ssize_t n = cmm_recv(s, buf, sizeof buf, 0, &labels);
        if (n <= 0) break;
        if (cmm_send(s, buf, (size_t)n, 0, labels, NULL, NULL) != n) break;
    }
    cmm_close(s);
    return NULL;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7200;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) != 0 || cmm_listen(l, 16) != 0) {
        fprintf(stderr, "echo_server: cannot listen: %s\n", strerror(errno));
        return 1;
    }
    printf("listening on %d\n", port);
    fflush(stdout);
    for (;;) {
        mc_socket_t s = cmm_accept(l, NULL, NULL);
        if (s < 0) continue;
        pthread_t t;
        if (pthread_create(&t, NULL, echo, (void *)(intptr_t)s) == 0) pthread_detach(t);
    }
}
