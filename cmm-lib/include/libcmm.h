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
 * is ready, so poll/epoll/select work on it alongside ordinary descriptors. It is blocking
 * unless made non-blocking with fcntl(fd, F_SETFL, O_NONBLOCK) or SOCK_NONBLOCK: then reads
 * and writes with nothing to do fail at once with EAGAIN. (The descriptor only ever polls
 * readable; POLLOUT says nothing about buffer room.)
 *
 * Any descriptor may be passed: on one that is not a multi-socket (nor a listener given to
 * cmm_listen) every call below is the plain system call it wraps (labels read back as 0),
 * as in libcmm.
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
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int mc_socket_t;
#define CMM_FAILED   -1
#define CMM_DEFERRED -2

/* What the traffic intends (any combination). */
#define CMM_LABEL_ONDEMAND   0x4
#define CMM_LABEL_BACKGROUND 0x8
#define CMM_LABEL_SMALL      0x10
#define CMM_LABEL_LARGE      0x20
/* Which networks it may use (libcmm's later API): only Wi-Fi, only cellular; with
 * FALLBACK_ALLOWED another network is used when the named kind is not up (so
 * WIFI_PREFERRED = Wi-Fi when there is one, else whatever is). */
#define CMM_LABEL_WIFI_ONLY         0x10000
#define CMM_LABEL_THREEG_ONLY       0x20000
#define CMM_LABEL_FALLBACK_ALLOWED  0x100000
#define CMM_LABEL_WIFI_PREFERRED    (CMM_LABEL_WIFI_ONLY | CMM_LABEL_FALLBACK_ALLOWED)

typedef void (*resume_handler_t)(void *arg);
typedef int (*connection_event_cb_t)(mc_socket_t sock, unsigned long labels, void *arg);

/* An unconnected multi-socket. family: AF_INET or AF_INET6 (else EAFNOSUPPORT); type:
 * SOCK_STREAM, optionally | SOCK_NONBLOCK | SOCK_CLOEXEC (else EPROTONOSUPPORT). */
mc_socket_t cmm_socket(int family, int type, int protocol);

/* Connects to a cmm peer (a program that called cmm_listen), over every network that is up;
 * blocks until the first physical connection is made (ETIMEDOUT, ECONNREFUSED, ENETUNREACH
 * when none can be). label_up_cb/label_down_cb run, on a library thread, each time a physical
 * connection comes or goes, with the labels its network serves. Two API generations, one name:
 *   cmm_connect(sock, addr, addrlen)                       libcmm's final API (2010-2015)
 *   cmm_connect(sock, addr, addrlen, initial_labels, label_down_cb, label_up_cb, cb_arg)
 *                                                          the 2009 API
 * The macro below picks the function by the number of arguments; any other number does not
 * compile (cmm_connect_takes_3_or_7_arguments is undeclared). The parenthesised declaration
 * is the 7-argument function itself, also callable as (cmm_connect)(...). */
int (cmm_connect)(mc_socket_t sock, const struct sockaddr *addr, socklen_t addrlen,
                  unsigned long initial_labels, connection_event_cb_t label_down_cb,
                  connection_event_cb_t label_up_cb, void *cb_arg);
/* cmm_connect with no initial labels and no callbacks. */
int cmm_connect3(mc_socket_t sock, const struct sockaddr *addr, socklen_t addrlen);
#define CMM_CONNECT_PICK_(a1, a2, a3, a4, a5, a6, a7, name, ...) name
#define cmm_connect(...)                                                                      \
    CMM_CONNECT_PICK_(__VA_ARGS__, cmm_connect, cmm_connect_takes_3_or_7_arguments,           \
                      cmm_connect_takes_3_or_7_arguments, cmm_connect_takes_3_or_7_arguments, \
                      cmm_connect3, cmm_connect_takes_3_or_7_arguments,                       \
                      cmm_connect_takes_3_or_7_arguments)(__VA_ARGS__)

/* listen(2) on a bound TCP socket, which then accepts multi-sockets. Errors as listen(2).
 * From then on the descriptor polls readable exactly while a new multi-socket waits to be
 * accepted (the extra paths that join one already accepted do not count), so a
 * poll-then-cmm_accept loop works. It is no longer the kernel's socket itself: cmm_getsockname,
 * cmm_getsockopt and cmm_setsockopt on it reach the socket, plain calls do not; close it with
 * cmm_close. */
int cmm_listen(int listener_sock, int backlog);
/* The next multi-socket a peer connected; its address in addr (may be null). Blocks, unless
 * the listening descriptor is O_NONBLOCK: then EAGAIN when none waits. EINVAL when
 * listener_sock was not given to cmm_listen. */
mc_socket_t cmm_accept(int listener_sock, struct sockaddr *addr, socklen_t *addrlen);

/* Sends len bytes with labels: blocks for buffer room and for a network the labels fit (up to
 * the label policy's max_wait: then ETIMEDOUT, or the count taken so far). With a handler and
 * no fitting network: stores the thunk and returns CMM_DEFERRED. flags: MSG_DONTWAIT (as
 * O_NONBLOCK: EAGAIN when the buffer is full, CMM_DEFERRED when no network fits). Unlike
 * send(2) the bytes of one call are delivered with these labels, whatever network carries
 * them. */
ssize_t cmm_send(mc_socket_t sock, const void *buf, size_t len, int flags,
                 unsigned long labels, resume_handler_t handler, void *arg);
/* cmm_send without flags (write(2) on a descriptor that is not a multi-socket). */
ssize_t cmm_write(mc_socket_t sock, const void *buf, size_t len,
                  unsigned long labels, resume_handler_t handler, void *arg);
/* The buffers of count iovecs as one cmm_send (EINVAL: count beyond UIO_MAXIOV). */
int cmm_writev(mc_socket_t sock, const struct iovec *iov, int count,
               unsigned long labels, resume_handler_t handler, void *arg);
/* cmm_recv without flags (read(2) on a descriptor that is not a multi-socket). */
ssize_t cmm_read(mc_socket_t sock, void *buf, size_t count, unsigned long *recv_labels);
/* Reads up to count bytes, 0 at end of stream; the labels the sender gave them in
 * *recv_labels (may be null). One call returns bytes of one label set only, unless
 * MSG_WAITALL: then it waits for all count bytes (or the end of stream or an error) across
 * sends and labels, and *recv_labels is the first send's. MSG_PEEK returns bytes without
 * consuming them; MSG_DONTWAIT (or O_NONBLOCK) fails with EAGAIN when nothing is there. buf
 * may be uninitialised memory. */
ssize_t cmm_recv(mc_socket_t sock, void *buf, size_t count, int flags, unsigned long *recv_labels);
/* select(2) and poll(2): multi-sockets and ordinary descriptors mixed in one set. */
int cmm_select(int nfds, fd_set *readfds, fd_set *writefds, fd_set *exceptfds,
               struct timeval *timeout);
int cmm_poll(struct pollfd *fds, nfds_t nfds, int timeout);
/* SO_TYPE, SO_DOMAIN, SO_ERROR (0), SO_ACCEPTCONN (0), SO_RCVTIMEO/SO_SNDTIMEO, and the
 * options below as last set; others ENOPROTOOPT. */
int cmm_getsockopt(mc_socket_t sock, int level, int optname, void *optval, socklen_t *optlen);
/* SO_RCVTIMEO/SO_SNDTIMEO (a struct timeval; 0 = none, the default): a read waits at most
 * that long, then fails with EAGAIN; a send returns the count taken so far, or fails with
 * EAGAIN when it took none. SO_KEEPALIVE, SO_RCVBUF, SO_SNDBUF, SO_REUSEADDR, TCP_NODELAY are
 * stored and read back as set, but not yet applied to the physical sockets (which always use
 * keepalive and no delay); others ENOPROTOOPT. */
int cmm_setsockopt(mc_socket_t sock, int level, int optname, const void *optval, socklen_t optlen);
/* The peer's address, and the local address of a physical connection (ENOTCONN before
 * connect). */
int cmm_getpeername(mc_socket_t sock, struct sockaddr *addr, socklen_t *addrlen);
int cmm_getsockname(mc_socket_t sock, struct sockaddr *addr, socklen_t *addrlen);
/* 0 when a network the labels fit is up; else stores the thunk and returns CMM_DEFERRED, or
 * CMM_FAILED (ENETUNREACH) without a handler. */
int cmm_check_label(mc_socket_t sock, unsigned long labels, resume_handler_t fn, void *arg);
/* Back to the state right after connect: the physical connections are dropped, the next send
 * dials again and label_up_cb runs again. */
int cmm_reset(mc_socket_t sock);
/* Cancels the thunks stored for labels with handler (any, when null) and arg (any, when
 * null), calling deleter (may be null) on each argument; returns how many. */
int cmm_thunk_cancel(mc_socket_t sock, unsigned long labels, resume_handler_t handler,
                     void *arg, void (*deleter)(void *));
/* How long a send without a resume handler waits for a network that fits labels before it
 * fails with ETIMEDOUT (having sent nothing; or it returns the count sent before the wait
 * began): by default the label policy's max_wait (proxy.toml), unless set here for exactly
 * these labels. {-1, 0} means without end; a null ts to cmm_set_failure_timeout restores the
 * policy's. */
int cmm_get_failure_timeout(mc_socket_t sock, unsigned long labels, struct timespec *ts);
int cmm_set_failure_timeout(mc_socket_t sock, unsigned long labels, const struct timespec *ts);
/* SHUT_WR/SHUT_RDWR end the sending half once everything sent is delivered; SHUT_RD does
 * nothing. */
int cmm_shutdown(mc_socket_t sock, int how);
/* Closes a multi-socket (waiting, up to 10 s, until the peer has everything sent, so a program
 * may exit right after) or a listener. Stored thunks are dropped without running. */
int cmm_close(mc_socket_t sock);

#ifdef __cplusplus
}
#endif

#endif /* LIBCMM_H */
