/* A libcmm client that lives through total outages, run in the lab against server.c.
 * $CMM_ROUNDS times (default 5), on one multi-socket:
 *   1. an ONDEMAND message and a BACKGROUND|LARGE cmm_writev, each answered by the server with
 *      the labels it arrived with;
 *   2. every uplink is cut ($CMM_CUT); once label_down has run for each connection,
 *      cmm_check_label fails without a thunk and defers with one; cmm_thunk_cancel runs the
 *      deleter;
 *   3. a BACKGROUND cmm_send with a resume handler is deferred; after 0 to 4.5 s the uplinks return
 *      ($CMM_RESTORE); the handler runs on a library thread and sends the message itself, which
 *      must return the full length — and the server must answer it (cmm_poll, 30 s).
 * Prints "round N ok" per round and "ok" at the end; any failure exits non-zero with the reason. */
#include <arpa/inet.h>
#include <errno.h>
#include <libcmm.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client_util.h"

static atomic_int ups, downs, resumed;
static atomic_long resumed_sent;

static int on_up(mc_socket_t s, unsigned long labels, void *arg) {
    (void)s; (void)labels; (void)arg;
    atomic_fetch_add(&ups, 1);
    return 0;
}

static int on_down(mc_socket_t s, unsigned long labels, void *arg) {
    (void)s; (void)labels; (void)arg;
    atomic_fetch_add(&downs, 1);
    return 0;
}

/* The deferred message: the handler sends it itself, from the library's thread. */
struct resume {
    mc_socket_t sock;
    size_t len;
};

static void resume_send(void *arg) {
    struct resume *r = arg;
    char *buf = malloc(r->len + 4);
    uint32_t n = htonl((uint32_t)r->len);
    memcpy(buf, &n, 4);
    memset(buf + 4, 'r', r->len);
    ssize_t sent = cmm_send(r->sock, buf, r->len + 4, 0, CMM_LABEL_BACKGROUND, NULL, NULL);
    atomic_store(&resumed_sent, (long)sent);
    atomic_fetch_add(&resumed, 1);
    free(buf);
    free(r);
}

/* Waits (cmm_poll) for the answer to a message, then checks it. */
static void await_reply(mc_socket_t s, size_t len, unsigned long labels, int wait_ms) {
    struct pollfd p = {.fd = s, .events = POLLIN};
    if (cmm_poll(&p, 1, wait_ms) < 1 || !(p.revents & POLLIN))
        FAIL("no answer to the %zu-byte message labelled 0x%lx within %d ms", len, labels, wait_ms);
    expect_reply(s, len, labels);
}

int main(int argc, char **argv) {
    if (argc < 3) FAIL("usage: outage_client SERVER_IP PORT");
    int rounds = getenv("CMM_ROUNDS") ? atoi(getenv("CMM_ROUNDS")) : 5;
    int paths = getenv("CMM_PATHS") ? atoi(getenv("CMM_PATHS")) : 2;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);

    mc_socket_t s = cmm_socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) FAIL("cmm_socket");
    if (cmm_connect(s, (struct sockaddr *)&a, sizeof a, CMM_LABEL_ONDEMAND, on_down, on_up, NULL) != 0)
        FAIL("cmm_connect");
    wait_until(&ups, paths, "label_up calls (one per network)");

    for (int round = 1; round <= rounds; round++) {
        /* 1. Labelled messages. */
        send_message(s, 5, CMM_LABEL_ONDEMAND);
        await_reply(s, 5, CMM_LABEL_ONDEMAND, 30000);
        send_message(s, 100000, CMM_LABEL_BACKGROUND | CMM_LABEL_LARGE);
        await_reply(s, 100000, CMM_LABEL_BACKGROUND | CMM_LABEL_LARGE, 30000);

        /* 2. Every network goes. */
        int downs_before = atomic_load(&downs);
        if (system(getenv("CMM_CUT")) != 0) FAIL("cut command");
        wait_until(&downs, downs_before + paths, "label_down for every connection");
        if (cmm_check_label(s, CMM_LABEL_ONDEMAND, NULL, NULL) != CMM_FAILED)
            FAIL("check_label without a thunk and no network must be CMM_FAILED");
        if (cmm_check_label(s, CMM_LABEL_ONDEMAND, never_runs, malloc(8)) != CMM_DEFERRED)
            FAIL("check_label with a thunk and no network must be CMM_DEFERRED");
        int deleted_before = atomic_load(&deleted);
        int n = cmm_thunk_cancel(s, CMM_LABEL_ONDEMAND, never_runs, NULL, deleter);
        if (n != 1 || atomic_load(&deleted) != deleted_before + 1)
            FAIL("thunk_cancel returned %d, deleter ran %d times", n, atomic_load(&deleted) - deleted_before);

        /* 3. A deferred send; the networks return; its handler sends the message. */
        struct resume *r = malloc(sizeof *r);
        r->sock = s;
        r->len = 3000 + (size_t)round;
        size_t len = r->len;
        int resumed_before = atomic_load(&resumed);
        uint32_t hdr = htonl(3000);
        ssize_t d = cmm_send(s, &hdr, 4, 0, CMM_LABEL_BACKGROUND, resume_send, r);
        if (d != CMM_DEFERRED) FAIL("background send with no network gave %zd, wanted CMM_DEFERRED", d);
        /* Outages of different lengths: the server's idle probes of its old paths, and its
         * trouble timeouts, fall before or after the networks return. */
        usleep((useconds_t)(round % 4) * 1500 * 1000);
        if (system(getenv("CMM_RESTORE")) != 0) FAIL("restore command");
        wait_until(&resumed, resumed_before + 1, "the resume handler");
        if (atomic_load(&resumed_sent) != (long)(len + 4))
            FAIL("the handler's send returned %ld, wanted %zu", atomic_load(&resumed_sent), len + 4);
        await_reply(s, len, CMM_LABEL_BACKGROUND, 30000);
        /* Both networks back before the next round's cut. */
        wait_until(&ups, atomic_load(&downs) + paths, "label_up for every network");
        printf("round %d ok\n", round);
        fflush(stdout);
    }
    if (cmm_close(s) != 0) FAIL("close");
    printf("ok\n");
    return 0;
}
