/* Pins libcmm.h to the API's exact signatures: any drift is a compile error (-Werror).
 * The Rust side is pinned to the same signatures in cmm-lib/src/ffi.rs (signatures test). */
#include <libcmm.h>
#include <errno.h>
#include <stddef.h>

static int errno_check_ebadf(void) { return errno == EBADF ? 0 : 1; }

_Static_assert(CMM_FAILED == -1, "CMM_FAILED");
_Static_assert(CMM_DEFERRED == -2, "CMM_DEFERRED");
_Static_assert(CMM_LABEL_ONDEMAND == 0x4, "ONDEMAND");
_Static_assert(CMM_LABEL_BACKGROUND == 0x8, "BACKGROUND");
_Static_assert(CMM_LABEL_SMALL == 0x10, "SMALL");
_Static_assert(CMM_LABEL_LARGE == 0x20, "LARGE");
_Static_assert(CMM_LABEL_WIFI_ONLY == 0x10000, "WIFI_ONLY");
_Static_assert(CMM_LABEL_THREEG_ONLY == 0x20000, "THREEG_ONLY");
_Static_assert(CMM_LABEL_FALLBACK_ALLOWED == 0x100000, "FALLBACK_ALLOWED");
_Static_assert(CMM_LABEL_WIFI_PREFERRED == 0x110000, "WIFI_PREFERRED");
_Static_assert(sizeof(mc_socket_t) == sizeof(int), "mc_socket_t is an int");

/* Both API generations of cmm_connect compile from one name (never called here). */
int connect_final(mc_socket_t s, const struct sockaddr *a, socklen_t n);
int connect_final(mc_socket_t s, const struct sockaddr *a, socklen_t n) { return cmm_connect(s, a, n); }
int connect_seed(mc_socket_t s, const struct sockaddr *a, socklen_t n);
int connect_seed(mc_socket_t s, const struct sockaddr *a, socklen_t n) {
    return cmm_connect(s, a, n, CMM_LABEL_ONDEMAND, NULL, NULL, NULL);
}

static mc_socket_t (*p_socket)(int, int, int) = cmm_socket;
static int (*p_connect)(mc_socket_t, const struct sockaddr *, socklen_t, unsigned long,
                        connection_event_cb_t, connection_event_cb_t, void *) = cmm_connect;
static int (*p_connect3)(mc_socket_t, const struct sockaddr *, socklen_t) = cmm_connect3;
static int (*p_listen)(int, int) = cmm_listen;
static mc_socket_t (*p_accept)(int, struct sockaddr *, socklen_t *) = cmm_accept;
static ssize_t (*p_send)(mc_socket_t, const void *, size_t, int, unsigned long, resume_handler_t, void *) = cmm_send;
static ssize_t (*p_write)(mc_socket_t, const void *, size_t, unsigned long, resume_handler_t, void *) = cmm_write;
static int (*p_writev)(mc_socket_t, const struct iovec *, int, unsigned long, resume_handler_t, void *) = cmm_writev;
static ssize_t (*p_read)(mc_socket_t, void *, size_t, unsigned long *) = cmm_read;
static ssize_t (*p_recv)(mc_socket_t, void *, size_t, int, unsigned long *) = cmm_recv;
static int (*p_select)(int, fd_set *, fd_set *, fd_set *, struct timeval *) = cmm_select;
static int (*p_poll)(struct pollfd *, nfds_t, int) = cmm_poll;
static int (*p_getsockopt)(mc_socket_t, int, int, void *, socklen_t *) = cmm_getsockopt;
static int (*p_setsockopt)(mc_socket_t, int, int, const void *, socklen_t) = cmm_setsockopt;
static int (*p_getpeername)(mc_socket_t, struct sockaddr *, socklen_t *) = cmm_getpeername;
static int (*p_getsockname)(mc_socket_t, struct sockaddr *, socklen_t *) = cmm_getsockname;
static int (*p_check_label)(mc_socket_t, unsigned long, resume_handler_t, void *) = cmm_check_label;
static int (*p_reset)(mc_socket_t) = cmm_reset;
static int (*p_thunk_cancel)(mc_socket_t, unsigned long, resume_handler_t, void *, void (*)(void *)) = cmm_thunk_cancel;
static int (*p_get_failure_timeout)(mc_socket_t, unsigned long, struct timespec *) = cmm_get_failure_timeout;
static int (*p_set_failure_timeout)(mc_socket_t, unsigned long, const struct timespec *) = cmm_set_failure_timeout;
static int (*p_shutdown)(mc_socket_t, int) = cmm_shutdown;
static int (*p_close)(mc_socket_t) = cmm_close;

int main(void) {
    /* Linked, not only compiled: every symbol must exist in the library. */
    void *all[] = {p_socket, p_connect, p_connect3, p_listen, p_accept, p_send, p_write, p_writev, p_read,
                   p_recv, p_select, p_poll, p_getsockopt, p_setsockopt, p_getpeername,
                   p_getsockname, p_check_label, p_reset, p_thunk_cancel, p_get_failure_timeout,
                   p_set_failure_timeout, p_shutdown, p_close};
    for (unsigned i = 0; i < sizeof all / sizeof all[0]; i++)
        if (!all[i]) return 1;
    /* A bad descriptor is EBADF, not a crash. */
    char b[4];
    if (cmm_read(12345, b, sizeof b, 0) != -1 || errno_check_ebadf() != 0) return 2;
    return 0;
}
