/*
 * libcmm.h — intentional networking: the cmm C API (libcmm.so, libcmm.a).
 *
 * A multi-socket (mc_socket_t) spans every network at once. Each send carries labels saying
 * what the traffic intends (a person is waiting: CMM_LABEL_ONDEMAND; it can wait:
 * CMM_LABEL_BACKGROUND; CMM_LABEL_SMALL, CMM_LABEL_LARGE), and goes out on a network those
 * labels choose. When none fits, a send or check given a resume handler returns CMM_DEFERRED
 * and the handler runs, on a library thread, once a matching network is up; it then owns its
 * argument (otherwise the caller keeps it).
 *
 * An mc_socket_t is a real file descriptor that polls readable when data (or end of stream)
 * is ready, so poll/epoll/select work on it alongside ordinary descriptors.
 *
 * Failures return -1 (CMM_FAILED) and set errno; an unknown descriptor gives EBADF.
 * The library never raises SIGPIPE: a peer that vanished is an error on the path, not a signal
 * that kills the program.
 *
 * Networks may all go at once: the multi-socket stays, everything a send accepted is delivered
 * once a network is back, and blocked calls wait (within their timeouts). When the peer itself
 * is gone — every path closed or reset by it and every redial refused, on every network that is
 * up, or a restarted peer that no longer knows the session — reads return what had arrived,
 * then fail with ECONNRESET, and sends fail with ECONNRESET, within about a second or two.
 * Build and link: see cmm-lib/README.md (pkg-config --cflags --libs libcmm).
 */
#ifndef LIBCMM_H
#define LIBCMM_H

#include <poll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int mc_socket_t;
#define CMM_FAILED   -1
#define CMM_DEFERRED -2
#define CMM_LABEL_ONDEMAND   0x4
#define CMM_LABEL_BACKGROUND 0x8
#define CMM_LABEL_SMALL      0x10
#define CMM_LABEL_LARGE      0x20
typedef void (*resume_handler_t)(void *arg);
typedef int (*connection_event_cb_t)(mc_socket_t sock, unsigned long labels, void *arg);

mc_socket_t cmm_socket(int family, int type, int protocol);
int cmm_connect(mc_socket_t sock, const struct sockaddr *addr, socklen_t addrlen,
                unsigned long initial_labels, connection_event_cb_t label_down_cb,
                connection_event_cb_t label_up_cb, void *cb_arg);
int cmm_listen(int listener_sock, int backlog);
mc_socket_t cmm_accept(int listener_sock, struct sockaddr *addr, socklen_t *addrlen);
ssize_t cmm_send(mc_socket_t sock, const void *buf, size_t len, int flags,
                 unsigned long labels, resume_handler_t handler, void *arg);
ssize_t cmm_write(mc_socket_t sock, const void *buf, size_t len,
                  unsigned long labels, resume_handler_t handler, void *arg);
int cmm_writev(mc_socket_t sock, const struct iovec *iov, int count,
               unsigned long labels, resume_handler_t handler, void *arg);
ssize_t cmm_read(mc_socket_t sock, void *buf, size_t count, unsigned long *recv_labels);
ssize_t cmm_recv(mc_socket_t sock, void *buf, size_t count, int flags, unsigned long *recv_labels);
int cmm_select(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds,
               struct timeval *timeout);
int cmm_poll(struct pollfd *fds, nfds_t nfds, int timeout);
int cmm_getsockopt(mc_socket_t sock, int level, int optname, void *optval, socklen_t *optlen);
int cmm_setsockopt(mc_socket_t sock, int level, int optname, const void *optval, socklen_t optlen);
int cmm_getpeername(mc_socket_t sock, struct sockaddr *addr, socklen_t *addrlen);
int cmm_getsockname(mc_socket_t sock, struct sockaddr *addr, socklen_t *addrlen);
int cmm_check_label(mc_socket_t sock, unsigned long labels, resume_handler_t fn, void *arg);
int cmm_reset(mc_socket_t sock);
int cmm_thunk_cancel(mc_socket_t sock, unsigned long labels, resume_handler_t handler,
                     void *arg, void (*deleter)(void *));
int cmm_shutdown(mc_socket_t sock, int how);
int cmm_close(mc_socket_t sock);

#ifdef __cplusplus
}
#endif

#endif /* LIBCMM_H */
