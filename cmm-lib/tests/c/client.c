/* A libcmm client, run in the lab against server.c. In order:
 *   1. connect; label_up runs for each network's connection;
 *   2. ONDEMAND and BACKGROUND messages, answered with the labels they arrived with;
 *   3. Wi-Fi is cut (the command in $CMM_CUT): a BACKGROUND send with a thunk is deferred;
 *      two more thunks are stored and cancelled (the deleter runs on each argument);
 *   4. Wi-Fi returns ($CMM_RESTORE): the thunk runs on a library thread; the main thread waits
 *      with cmm_select over the thunk's pipe and the multi-socket mixed, resends, and waits for
 *      the answer with cmm_poll;
 *   5. cmm_reset: the next send reconnects and label_up runs again;
 *   6. getpeername/getsockopt, bad descriptors (EBADF), close.
 * Prints "ok" at the end; any failure exits non-zero with the reason. */
#include <arpa/inet.h>
#include <errno.h>
#include <libcmm.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client_util.h"

static atomic_int ups, downs;
static int thunk_pipe[2];

static int on_up(mc_socket_t s, unsigned long labels, void *arg) {
    (void)s;
    if (arg != (void *)&ups) FAIL("callback argument");
    atomic_fetch_add(&ups, 1);
    printf("label_up 0x%lx\n", labels);
    fflush(stdout);
    return 0;
}

static int on_down(mc_socket_t s, unsigned long labels, void *arg) {
    (void)s; (void)arg;
    atomic_fetch_add(&downs, 1);
    printf("label_down 0x%lx\n", labels);
    fflush(stdout);
    return 0;
}

struct resume { int id; };

/* The deferred send's thunk: it owns its argument, tells the main thread, frees it. */
static void resume_send(void *arg) {
    struct resume *r = arg;
    char c = (char)r->id;
    if (write(thunk_pipe[1], &c, 1) != 1) FAIL("pipe");
    free(r);
}

int main(int argc, char **argv) {
    if (argc < 3) FAIL("usage: client SERVER_IP PORT");
    if (pipe(thunk_pipe) != 0) FAIL("pipe");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);

    /* 1. Connect. */
    mc_socket_t s = cmm_socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) FAIL("cmm_socket");
    if (cmm_connect(s, (struct sockaddr *)&a, sizeof a, CMM_LABEL_ONDEMAND, on_down, on_up, &ups) != 0)
        FAIL("cmm_connect");
    wait_until(&ups, 2, "label_up calls (one per network)");

    /* 2. Labelled messages; the server answers with the labels they came with. */
    send_message(s, 5, CMM_LABEL_ONDEMAND);
    expect_reply(s, 5, CMM_LABEL_ONDEMAND);
    send_message(s, 200000, CMM_LABEL_BACKGROUND);
    expect_reply(s, 200000, CMM_LABEL_BACKGROUND);
    if (cmm_send(s, "", 0, 0, CMM_LABEL_ONDEMAND | CMM_LABEL_BACKGROUND, NULL, NULL) != -1 || errno != EINVAL)
        FAIL("conflicting labels must be EINVAL");

    /* 3. Wi-Fi goes: background may not use the metered cell, so it is deferred. */
    if (system(getenv("CMM_CUT")) != 0) FAIL("cut command");
    wait_until(&downs, 1, "label_down after the cut");
    struct resume *r = malloc(sizeof *r);
    r->id = 7;
    uint32_t hdr = htonl(3000);
    ssize_t d = cmm_send(s, &hdr, 4, 0, CMM_LABEL_BACKGROUND, resume_send, r);
    if (d != CMM_DEFERRED) FAIL("background send with Wi-Fi down gave %zd, wanted CMM_DEFERRED", d);
    printf("deferred\n");
    fflush(stdout);
    /* r now belongs to the thunk. Two more thunks, cancelled: the deleter gets each argument. */
    if (cmm_check_label(s, CMM_LABEL_BACKGROUND, never_runs, malloc(8)) != CMM_DEFERRED) FAIL("check_label 1");
    if (cmm_check_label(s, CMM_LABEL_BACKGROUND, never_runs, malloc(8)) != CMM_DEFERRED) FAIL("check_label 2");
    if (cmm_check_label(s, CMM_LABEL_ONDEMAND, NULL, NULL) != 0) FAIL("ondemand should be ready on cell");
    int n = cmm_thunk_cancel(s, CMM_LABEL_BACKGROUND, never_runs, NULL, deleter);
    if (n != 2 || atomic_load(&deleted) != 2) FAIL("thunk_cancel returned %d, deleter ran %d times", n, atomic_load(&deleted));

    /* 4. Wi-Fi returns; the thunk runs. Wait on the pipe and the multi-socket together. */
    if (system(getenv("CMM_RESTORE")) != 0) FAIL("restore command");
    fd_set rs;
    FD_ZERO(&rs);
    FD_SET(thunk_pipe[0], &rs);
    FD_SET(s, &rs);
    struct timeval tv = {.tv_sec = 60};
    int ready = cmm_select((s > thunk_pipe[0] ? s : thunk_pipe[0]) + 1, &rs, NULL, NULL, &tv);
    if (ready < 1 || !FD_ISSET(thunk_pipe[0], &rs)) FAIL("select: the thunk did not run (%d)", ready);
    char id;
    if (read(thunk_pipe[0], &id, 1) != 1 || id != 7) FAIL("thunk message");
    printf("thunk ran\n");
    fflush(stdout);
    send_message(s, 3000, CMM_LABEL_BACKGROUND);
    struct pollfd p[2] = {{.fd = s, .events = POLLIN}, {.fd = thunk_pipe[0], .events = POLLIN}};
    if (cmm_poll(p, 2, 60000) < 1 || !(p[0].revents & POLLIN)) FAIL("poll: no answer");
    expect_reply(s, 3000, CMM_LABEL_BACKGROUND);

    /* 5. Reset: every connection goes; the next send reconnects and label_up runs again. */
    int before = atomic_load(&ups);
    if (cmm_reset(s) != 0) FAIL("reset");
    send_message(s, 11, CMM_LABEL_ONDEMAND);
    expect_reply(s, 11, CMM_LABEL_ONDEMAND);
    wait_until(&ups, before + 1, "label_up after reset");

    /* 6. Socket calls and errors. */
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    if (cmm_getpeername(s, (struct sockaddr *)&peer, &plen) != 0 || peer.sin_addr.s_addr != a.sin_addr.s_addr)
        FAIL("getpeername");
    int type = 0;
    socklen_t tlen = sizeof type;
    if (cmm_getsockopt(s, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 || type != SOCK_STREAM) FAIL("getsockopt");
    int nodelay = 1;
    if (cmm_setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &nodelay, sizeof nodelay) != 0) FAIL("setsockopt");
    if (cmm_send(-1, "x", 1, 0, 0, NULL, NULL) != -1 || errno != EBADF) FAIL("bad descriptor must be EBADF");
    if (cmm_close(s) != 0) FAIL("close");
    if (cmm_close(s) != -1 || errno != EBADF) FAIL("double close must be EBADF");
    close(thunk_pipe[0]);
    close(thunk_pipe[1]);
    printf("ok\n");
    return 0;
}
