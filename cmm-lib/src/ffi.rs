//! The C ABI: the functions `include/libcmm.h` declares, for programs written against libcmm.
//!
//! - An `mc_socket_t` is a real file descriptor (an eventfd) that polls readable whenever the
//!   multi-socket has data, end of stream or an error to report, so an application's own
//!   poll/epoll/select loops work, and `cmm_select`/`cmm_poll` are the system calls themselves,
//!   taking multi-sockets and ordinary descriptors mixed in the same sets.
//! - Calls block like socket calls (a send waits for a network up to the label policy's maximum
//!   wait), except that a send or check with a resume handler returns `CMM_DEFERRED` at once
//!   when no network fits; the thunk then runs on a library thread when one does, and owns its
//!   argument. Otherwise the caller keeps the argument. `MSG_DONTWAIT`, or `O_NONBLOCK` set on
//!   the descriptor with fcntl (or `SOCK_NONBLOCK`), makes a call non-blocking (`EAGAIN`).
//!   Reads honour `MSG_PEEK` and `MSG_WAITALL` and write the application's buffer only through
//!   its pointer (it may be uninitialised).
//! - On a descriptor that is not a multi-socket (nor a listener given to `cmm_listen`) each
//!   call is the plain system call, as in libcmm; labels read back as 0.
//! - Failures return -1 (`CMM_FAILED`) and set `errno` as socket calls do; an unknown descriptor
//!   is `EBADF`. No panic crosses the boundary: one becomes `EIO`.
//! - The library runs its own tokio runtime and network scout, started on first use; the
//!   configuration is found as for the proxy (`$CMM_CONFIG`, `/etc/cmm/proxy.toml`, defaults).
//!   `RUST_LOG=debug` logs what it does to standard error.
//!
//! This is the only module with `unsafe`: pointers from C, and the few system calls that need
//! it. Each block says why it is sound.

#![allow(unsafe_code, non_camel_case_types)]

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use libc::{
    c_int, c_ulong, c_void, fd_set, iovec, nfds_t, pollfd, size_t, sockaddr, socklen_t, ssize_t, timeval,
};
use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::connector::Connector;
use crate::listener::Listener;
use crate::multisocket::{Callback, Callbacks, Check, MultiSocket, PathEvent, TrySend};
use crate::thunk::Thunk;
use cmm_policy::{Config, Labels};
use cmm_scout::Scout;

/// A multi-socket descriptor.
pub type mc_socket_t = c_int;
/// A thunk's handler.
pub type resume_handler_t = Option<unsafe extern "C" fn(arg: *mut c_void)>;
/// A `label_up`/`label_down` callback.
pub type connection_event_cb_t =
    Option<unsafe extern "C" fn(sock: mc_socket_t, labels: c_ulong, arg: *mut c_void) -> c_int>;
/// A real network failure.
pub const CMM_FAILED: c_int = -1;
/// No network fits: the thunk was stored.
pub const CMM_DEFERRED: c_int = -2;

/// A C pointer handed back to C later, never dereferenced here.
#[derive(Clone, Copy)]
struct SendPtr(*mut c_void);

// SAFETY: the pointer is only carried and given back to the C code that supplied it; this
// library never dereferences it. libcmm's contract makes its owner responsible for thread use.
unsafe impl Send for SendPtr {}
// SAFETY: as above: never dereferenced here.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole Send wrapper, not the raw field).
    fn get(self) -> *mut c_void {
        self.0
    }
}

struct Lib {
    runtime: tokio::runtime::Runtime,
    /// For connecting sockets: the real networks.
    connector: Connector,
    /// For listeners: the accepting side never dials, so it needs no scout.
    server: Connector,
}

fn lib() -> Result<&'static Lib, Errno> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // RUST_LOG=debug says what the library does and why, on standard error.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .try_init();
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("libcmm")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))?;
        let config = Config::discover(None).unwrap_or_else(|e| {
            eprintln!("libcmm: {e}; using built-in defaults");
            Config::default()
        });
        let policy = Arc::new(config.policy.clone());
        let timeout = config.proxy.connect_timeout;
        let scout = {
            let _enter = runtime.enter();
            block(Scout::discover(&config, "libcmm")).unwrap_or_else(|e| {
                eprintln!("libcmm: cannot watch networks ({e}); no network will be seen");
                Scout::manual(vec![])
            })
        };
        let connector = Connector::new(scout, policy.clone(), timeout);
        let server = Connector::new(Scout::manual(vec![]), policy, timeout);
        Ok(Lib { runtime, connector, server })
    })
    .as_ref()
    .map_err(|e| {
        eprintln!("libcmm: {e}");
        Errno::EIO
    })
}

/// Runs a future to completion on the calling thread, parking it meanwhile. Unlike a runtime's
/// `block_on` this works on any thread, a library thread running a thunk included; the callers
/// enter the library's runtime first, and its own threads drive the I/O.
fn block<F: Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// Bytes a `MSG_PEEK` took out of the multi-socket, served again by the next reads.
struct Peeked {
    data: Vec<u8>,
    pos: usize,
    labels: Labels,
}

/// What makes a multi-socket's descriptor (an eventfd) poll readable: the session's own
/// readability, or bytes a `MSG_PEEK` holds. The counter is 1 exactly while either is true.
struct Readiness {
    efd: EventFd,
    state: Mutex<ReadyState>,
}

#[derive(Default)]
struct ReadyState {
    /// The counter is 1.
    signalled: bool,
    /// The session has data, end of stream or an error to report.
    session: bool,
    peeked: Option<Peeked>,
}

impl Readiness {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings the counter in line with `st` (held locked by the caller).
    fn sync(&self, st: &mut ReadyState) {
        let want = st.session || st.peeked.is_some();
        if want && !st.signalled {
            let _ = self.efd.write(1);
            st.signalled = true;
        } else if !want && st.signalled {
            // The counter is 1, so this read of a possibly blocking eventfd returns at once.
            let _ = self.efd.read();
            st.signalled = false;
        }
    }
}

struct Entry {
    ready: Arc<Readiness>,
    family: c_int,
    sock: Mutex<Option<MultiSocket>>,
    options: Mutex<HashMap<(c_int, c_int), c_int>>,
    /// SO_RCVTIMEO and SO_SNDTIMEO (None: wait as long as it takes).
    timeouts: Mutex<Timeouts>,
}

/// A multi-socket's receive and send timeouts.
#[derive(Clone, Copy, Default)]
struct Timeouts {
    recv: Option<std::time::Duration>,
    send: Option<std::time::Duration>,
}

impl Entry {
    fn timeouts(&self) -> Timeouts {
        *self.timeouts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn connected(&self) -> Result<MultiSocket, Errno> {
        self.sock.lock().unwrap_or_else(PoisonError::into_inner).clone().ok_or(Errno::ENOTCONN)
    }

    /// Whether the application made the descriptor non-blocking (`fcntl(F_SETFL, O_NONBLOCK)`
    /// or `SOCK_NONBLOCK`): calls with nothing to do then fail with `EAGAIN` at once.
    fn nonblocking(&self) -> bool {
        // SAFETY: F_GETFL on the eventfd this entry owns; no memory is passed.
        let flags = unsafe { libc::fcntl(self.ready.efd.as_raw_fd(), libc::F_GETFL) };
        flags >= 0 && flags & libc::O_NONBLOCK != 0
    }

    /// Makes the descriptor readable exactly while the socket is (data, end of stream, or an
    /// error to report) or a peek holds bytes, from now on.
    fn attach(&self, ms: MultiSocket) {
        let ready = self.ready.clone();
        ms.set_readable_hook(Arc::new(move |readable| {
            let mut st = ready.lock();
            st.session = readable;
            ready.sync(&mut st);
        }));
        *self.sock.lock().unwrap_or_else(PoisonError::into_inner) = Some(ms);
    }
}

fn table() -> &'static Mutex<HashMap<c_int, Arc<Entry>>> {
    static T: OnceLock<Mutex<HashMap<c_int, Arc<Entry>>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A descriptor given to `cmm_listen`. Its number now names an eventfd readable exactly while
/// a new multi-socket waits to be accepted; the listening socket itself is `socket`, the
/// library's own descriptor of it.
struct CListener {
    listener: Listener,
    socket: c_int,
}

impl CListener {
    fn nonblocking(&self, fd: c_int) -> bool {
        // SAFETY: F_GETFL on the application's descriptor; no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        flags >= 0 && flags & libc::O_NONBLOCK != 0
    }
}

fn listeners() -> &'static Mutex<HashMap<c_int, Arc<CListener>>> {
    static L: OnceLock<Mutex<HashMap<c_int, Arc<CListener>>>> = OnceLock::new();
    L.get_or_init(|| Mutex::new(HashMap::new()))
}

fn listener(fd: c_int) -> Option<Arc<CListener>> {
    listeners().lock().unwrap_or_else(PoisonError::into_inner).get(&fd).cloned()
}

fn entry(fd: c_int) -> Result<Arc<Entry>, Errno> {
    table().lock().unwrap_or_else(PoisonError::into_inner).get(&fd).cloned().ok_or(Errno::EBADF)
}

/// Whether `fd` is one of ours (a multi-socket or a listener given to `cmm_listen`): calls on
/// any other descriptor are the plain system calls, as in libcmm.
fn is_ours(fd: c_int) -> bool {
    table().lock().unwrap_or_else(PoisonError::into_inner).contains_key(&fd)
        || listeners().lock().unwrap_or_else(PoisonError::into_inner).contains_key(&fd)
}

/// A system call's result: -1 sets `errno` already, so it passes through `guard` unchanged.
fn syscall<R: Copy + PartialOrd + Default>(r: R) -> Result<R, Errno> {
    if r < R::default() { Err(Errno::last()) } else { Ok(r) }
}

fn new_entry(family: c_int) -> Result<c_int, Errno> {
    // Blocking unless the application says otherwise (fcntl or SOCK_NONBLOCK): the flag is
    // the application's, read back on every call; the library's own reads never block (see
    // `Readiness::sync`).
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?;
    let fd = efd.as_raw_fd();
    let e = Arc::new(Entry {
        ready: Arc::new(Readiness { efd, state: Mutex::new(ReadyState::default()) }),
        family,
        sock: Mutex::new(None),
        options: Mutex::new(HashMap::new()),
        timeouts: Mutex::new(Timeouts::default()),
    });
    table().lock().unwrap_or_else(PoisonError::into_inner).insert(fd, e);
    Ok(fd)
}

/// Runs `f`; a panic becomes `EIO`, an error sets `errno`; both return `fail`.
fn guard<R: Copy>(fail: R, f: impl FnOnce() -> Result<R, Errno>) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            e.set();
            fail
        }
        Err(_) => {
            Errno::EIO.set();
            fail
        }
    }
}

fn errno_of(e: &io::Error) -> Errno {
    if let Some(code) = e.raw_os_error() {
        return Errno::from_raw(code);
    }
    match e.kind() {
        io::ErrorKind::TimedOut => Errno::ETIMEDOUT,
        io::ErrorKind::WouldBlock => Errno::EAGAIN,
        io::ErrorKind::ConnectionRefused => Errno::ECONNREFUSED,
        io::ErrorKind::ConnectionAborted => Errno::ECONNABORTED,
        io::ErrorKind::ConnectionReset => Errno::ECONNRESET,
        io::ErrorKind::BrokenPipe => Errno::EPIPE,
        io::ErrorKind::NotConnected => Errno::ENOTCONN,
        io::ErrorKind::NetworkUnreachable => Errno::ENETUNREACH,
        io::ErrorKind::HostUnreachable => Errno::EHOSTUNREACH,
        io::ErrorKind::PermissionDenied => Errno::EACCES,
        io::ErrorKind::InvalidInput => Errno::EINVAL,
        _ => Errno::EIO,
    }
}

fn labels_of(bits: c_ulong) -> Result<Labels, Errno> {
    u32::try_from(bits).ok().and_then(|b| Labels::from_bits(b).ok()).ok_or(Errno::EINVAL)
}

/// Reads a socket address from C.
///
/// # Safety
/// `addr` must point to `len` readable bytes (or be null).
unsafe fn read_sockaddr(addr: *const sockaddr, len: socklen_t) -> Result<SocketAddr, Errno> {
    if addr.is_null() {
        return Err(Errno::EFAULT);
    }
    let len = len as usize;
    // SAFETY: the caller gives `len` readable bytes; each read below is within them (checked)
    // and unaligned reads are used, since C may pass any buffer.
    unsafe {
        if len < std::mem::size_of::<libc::sa_family_t>() {
            return Err(Errno::EINVAL);
        }
        let family = std::ptr::read_unaligned(addr as *const libc::sa_family_t);
        match c_int::from(family) {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                let a = std::ptr::read_unaligned(addr as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                let a = std::ptr::read_unaligned(addr as *const libc::sockaddr_in6);
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            libc::AF_INET | libc::AF_INET6 => Err(Errno::EINVAL),
            _ => Err(Errno::EAFNOSUPPORT),
        }
    }
}

/// Writes a socket address to C, truncated to the room given, and stores its full length.
///
/// # Safety
/// `addr` must point to `*len` writable bytes and `len` to a writable `socklen_t` (both may
/// be null, when the caller does not want the address).
unsafe fn write_sockaddr(sa: SocketAddr, addr: *mut sockaddr, len: *mut socklen_t) -> Result<(), Errno> {
    if addr.is_null() || len.is_null() {
        return Ok(());
    }
    let s = socket2::SockAddr::from(sa);
    // SAFETY: `len` is writable and readable per the contract; at most `*len` bytes are
    // copied into `addr`, from a `SockAddr` of `s.len()` valid bytes.
    unsafe {
        let room = *len as usize;
        let n = room.min(s.len() as usize);
        std::ptr::copy_nonoverlapping(s.as_ptr() as *const u8, addr as *mut u8, n);
        *len = s.len();
    }
    Ok(())
}

struct CThunk {
    handler: unsafe extern "C" fn(*mut c_void),
    arg: SendPtr,
}

fn run_c_thunk(arg: Box<dyn Any + Send>) {
    if let Ok(t) = arg.downcast::<CThunk>() {
        let arg = t.arg;
        // SAFETY: the handler and argument are what the application gave with the deferred
        // call; libcmm's contract is that the handler may be called with that argument once.
        unsafe { (t.handler)(arg.get()) }
    }
}

fn c_thunk(handler: resume_handler_t, arg: *mut c_void) -> Option<Thunk> {
    handler.map(|h| Thunk::new(run_c_thunk, CThunk { handler: h, arg: SendPtr(arg) }))
}

fn c_callback(fd: c_int, cb: connection_event_cb_t, arg: *mut c_void) -> Option<Callback> {
    let f = cb?;
    let arg = SendPtr(arg);
    Some(Arc::new(move |e: &PathEvent| {
        // SAFETY: the callback and argument are what the application gave to cmm_connect, to
        // be called whenever a physical connection comes or goes.
        unsafe {
            f(fd, c_ulong::from(e.labels.bits()), arg.get());
        }
    }))
}

// ---------------------------------------------------------------------------------------------
// The API

/// Creates an unconnected multi-socket.
#[unsafe(no_mangle)]
pub extern "C" fn cmm_socket(family: c_int, kind: c_int, protocol: c_int) -> mc_socket_t {
    guard(CMM_FAILED, || {
        if family != libc::AF_INET && family != libc::AF_INET6 {
            return Err(Errno::EAFNOSUPPORT);
        }
        if kind & !(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) != libc::SOCK_STREAM {
            return Err(Errno::EPROTONOSUPPORT);
        }
        if protocol != 0 && protocol != libc::IPPROTO_TCP {
            return Err(Errno::EPROTONOSUPPORT);
        }
        let fd = new_entry(family)?;
        if kind & libc::SOCK_NONBLOCK != 0 {
            // SAFETY: F_SETFL on the eventfd just made; no memory is passed.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        }
        Ok(fd)
    })
}

/// Connects a multi-socket to a cmm peer.
///
/// # Safety
/// `addr` must point to `addrlen` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_connect(
    sock: mc_socket_t,
    addr: *const sockaddr,
    addrlen: socklen_t,
    initial_labels: c_ulong,
    label_down_cb: connection_event_cb_t,
    label_up_cb: connection_event_cb_t,
    cb_arg: *mut c_void,
) -> c_int {
    guard(CMM_FAILED, || {
        if !is_ours(sock) {
            // SAFETY: connect(2) with the caller's address, under its contract.
            return syscall(unsafe { libc::connect(sock, addr, addrlen) });
        }
        let e = entry(sock)?;
        if e.sock.lock().unwrap_or_else(PoisonError::into_inner).is_some() {
            return Err(Errno::EISCONN);
        }
        // SAFETY: per this function's contract.
        let remote = unsafe { read_sockaddr(addr, addrlen)? };
        if remote.is_ipv4() != (e.family == libc::AF_INET) {
            return Err(Errno::EAFNOSUPPORT);
        }
        let labels = labels_of(initial_labels)?;
        let callbacks = Callbacks {
            label_up: c_callback(sock, label_up_cb, cb_arg),
            label_down: c_callback(sock, label_down_cb, cb_arg),
        };
        let lib = lib()?;
        let _enter = lib.runtime.enter();
        let ms = block(MultiSocket::connect(&lib.connector, remote, labels, callbacks))
            .map_err(|e| errno_of(&e))?;
        e.attach(ms);
        Ok(0)
    })
}

/// libcmm's final `cmm_connect(sock, addr, addrlen)`: no initial labels, no callbacks. The
/// header's `cmm_connect` macro calls this one for three arguments.
///
/// # Safety
/// `addr` must point to `addrlen` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_connect3(sock: mc_socket_t, addr: *const sockaddr, addrlen: socklen_t) -> c_int {
    // SAFETY: same contract as cmm_connect.
    unsafe { cmm_connect(sock, addr, addrlen, 0, None, None, std::ptr::null_mut()) }
}

/// Makes a bound TCP socket a cmm listener.
#[unsafe(no_mangle)]
pub extern "C" fn cmm_listen(listener_sock: c_int, backlog: c_int) -> c_int {
    guard(CMM_FAILED, || {
        if listeners().lock().unwrap_or_else(PoisonError::into_inner).contains_key(&listener_sock) {
            return Ok(0);
        }
        // SAFETY: listen(2) on a descriptor the caller owns; a bad one gives EBADF/ENOTSOCK.
        if unsafe { libc::listen(listener_sock, backlog) } != 0 {
            return Err(Errno::last());
        }
        // The application's file status flags (O_NONBLOCK), before the library's duplicate,
        // which shares them, is made non-blocking.
        // SAFETY: F_GETFL on the caller's descriptor; no memory is passed.
        let flags = unsafe { libc::fcntl(listener_sock, libc::F_GETFL) };
        // SAFETY: dup(2) gives this library its own descriptor for the listening socket.
        let own = unsafe { libc::dup(listener_sock) };
        if own < 0 {
            return Err(Errno::last());
        }
        // SAFETY: `own` is a fresh descriptor of a listening TCP socket, owned from here on.
        let std_listener = unsafe { std::net::TcpListener::from_raw_fd(own) };
        std_listener.set_nonblocking(true).map_err(|e| errno_of(&e))?;
        let lib = lib()?;
        let _enter = lib.runtime.enter();
        let tokio_listener = tokio::net::TcpListener::from_std(std_listener).map_err(|e| errno_of(&e))?;
        // The application's descriptor becomes an eventfd that polls readable exactly while a
        // new multi-socket waits (the kernel's listening socket is readable for every path,
        // and this library takes those at once), keeping its file status flags (O_NONBLOCK).
        let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?;
        // SAFETY: dup2(2) onto the caller's own descriptor number, which the library keeps a
        // duplicate of (`own`); the eventfd stays open through `efd` too.
        if unsafe { libc::dup2(efd.as_raw_fd(), listener_sock) } < 0 {
            return Err(Errno::last());
        }
        if flags >= 0 && flags & libc::O_NONBLOCK != 0 {
            // SAFETY: F_SETFL on the descriptor just made an eventfd; no memory is passed.
            unsafe { libc::fcntl(listener_sock, libc::F_SETFL, libc::O_NONBLOCK) };
        }
        let l = Listener::from_tcp(tokio_listener, lib.server.clone()).map_err(|e| errno_of(&e))?;
        let hook_ready = Arc::new(Readiness { efd, state: Mutex::new(ReadyState::default()) });
        l.set_waiting_hook(Arc::new(move |waiting| {
            let mut st = hook_ready.lock();
            st.session = waiting;
            hook_ready.sync(&mut st);
        }));
        let cl = CListener { listener: l, socket: own };
        listeners().lock().unwrap_or_else(PoisonError::into_inner).insert(listener_sock, Arc::new(cl));
        Ok(0)
    })
}

/// Accepts a multi-socket on a socket given to `cmm_listen`.
///
/// # Safety
/// `addr` must point to `*addrlen` writable bytes, or both may be null.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_accept(
    listener_sock: c_int,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> mc_socket_t {
    guard(CMM_FAILED, || {
        let l = listener(listener_sock).ok_or(Errno::EINVAL)?;
        let ms = if l.nonblocking(listener_sock) {
            l.listener.try_accept().ok_or(Errno::EAGAIN)?
        } else {
            let lib = lib()?;
            let _enter = lib.runtime.enter();
            block(l.listener.accept()).map_err(|e| errno_of(&e))?
        };
        let family = match ms.peer_addr() {
            Some(SocketAddr::V6(_)) => libc::AF_INET6,
            _ => libc::AF_INET,
        };
        let fd = new_entry(family)?;
        if let Some(peer) = ms.peer_addr() {
            // SAFETY: per this function's contract.
            unsafe { write_sockaddr(peer, addr, addrlen)? };
        }
        entry(fd)?.attach(ms);
        Ok(fd)
    })
}

fn send_impl(
    sock: mc_socket_t,
    data: &[u8],
    flags: c_int,
    labels: c_ulong,
    handler: resume_handler_t,
    arg: *mut c_void,
) -> Result<ssize_t, Errno> {
    if !is_ours(sock) {
        // SAFETY: send(2) of the caller's bytes; MSG_NOSIGNAL as for multi-sockets.
        return syscall(unsafe {
            libc::send(sock, data.as_ptr() as *const c_void, data.len(), flags | libc::MSG_NOSIGNAL)
        });
    }
    let e = entry(sock)?;
    let ms = e.connected()?;
    let labels = labels_of(labels)?;
    if handler.is_some() {
        match ms.check_label(labels, c_thunk(handler, arg)) {
            Check::Deferred => return Ok(CMM_DEFERRED as ssize_t),
            Check::Ready | Check::Failed => {}
        }
    }
    if flags & libc::MSG_DONTWAIT != 0 || e.nonblocking() {
        return match ms.try_send(data, labels, None) {
            TrySend::Sent(n) => Ok(n as ssize_t),
            TrySend::Deferred => Ok(CMM_DEFERRED as ssize_t),
            TrySend::Failed(err) => Err(errno_of(&err)),
        };
    }
    let lib = lib()?;
    let _enter = lib.runtime.enter();
    let sent = match e.timeouts().send {
        Some(t) => block(ms.send_within(data, labels, t)),
        None => block(ms.send(data, labels)),
    };
    sent.map(|n| n as ssize_t).map_err(|e| errno_of(&e))
}

/// Sends with labels; `CMM_DEFERRED` (thunk stored) when a handler is given and no network fits.
///
/// # Safety
/// `buf` must point to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_send(
    sock: mc_socket_t,
    buf: *const c_void,
    len: size_t,
    flags: c_int,
    labels: c_ulong,
    handler: resume_handler_t,
    arg: *mut c_void,
) -> ssize_t {
    guard(CMM_FAILED as ssize_t, || {
        if buf.is_null() && len > 0 {
            return Err(Errno::EFAULT);
        }
        // SAFETY: per this function's contract (an empty slice for a null, empty buffer).
        let data =
            if len == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(buf as *const u8, len) } };
        send_impl(sock, data, flags, labels, handler, arg)
    })
}

/// `cmm_send` without flags.
///
/// # Safety
/// `buf` must point to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_write(
    sock: mc_socket_t,
    buf: *const c_void,
    len: size_t,
    labels: c_ulong,
    handler: resume_handler_t,
    arg: *mut c_void,
) -> ssize_t {
    if !is_ours(sock) {
        // SAFETY: write(2) of the caller's buffer, under its contract.
        return guard(CMM_FAILED as ssize_t, || syscall(unsafe { libc::write(sock, buf, len) }));
    }
    // SAFETY: same contract as cmm_send.
    unsafe { cmm_send(sock, buf, len, 0, labels, handler, arg) }
}

/// Sends the buffers of an iovec array as one labelled send.
///
/// # Safety
/// `iov` must point to `count` iovecs, each to `iov_len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_writev(
    sock: mc_socket_t,
    iov: *const iovec,
    count: c_int,
    labels: c_ulong,
    handler: resume_handler_t,
    arg: *mut c_void,
) -> c_int {
    guard(CMM_FAILED, || {
        if !(0..=libc::UIO_MAXIOV).contains(&count) {
            return Err(Errno::EINVAL);
        }
        if iov.is_null() && count > 0 {
            return Err(Errno::EFAULT);
        }
        if !is_ours(sock) {
            // SAFETY: writev(2) of the caller's iovecs, under its contract.
            return syscall(unsafe { libc::writev(sock, iov, count) })
                .map(|n| c_int::try_from(n).unwrap_or(c_int::MAX));
        }
        let mut data = Vec::new();
        for i in 0..count as usize {
            // SAFETY: per this function's contract, iov[0..count] are valid iovecs.
            let v = unsafe { &*iov.add(i) };
            if v.iov_len > 0 {
                if v.iov_base.is_null() {
                    return Err(Errno::EFAULT);
                }
                // SAFETY: per the contract, each iovec points to iov_len readable bytes.
                data.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                });
            }
        }
        let n = send_impl(sock, &data, 0, labels, handler, arg)?;
        Ok(c_int::try_from(n).unwrap_or(c_int::MAX))
    })
}

/// Received bytes go through this buffer (at most this much per piece), so the application's
/// buffer may be uninitialised memory: it is only ever written through its pointer.
const RECV_PIECE: usize = 64 * 1024;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One piece into `buf` (`len` > 0 writable bytes): what a peek holds first, else from the
/// multi-socket (waiting unless `nonblocking`). `peek` leaves the bytes to be read again.
///
/// # Safety
/// `buf` must point to `len` writable bytes.
unsafe fn recv_piece(
    e: &Entry,
    ms: &MultiSocket,
    buf: *mut u8,
    len: usize,
    peek: bool,
    nonblocking: bool,
) -> Result<(usize, Labels), Errno> {
    {
        let mut st = e.ready.lock();
        if let Some(p) = st.peeked.as_mut() {
            let n = len.min(p.data.len() - p.pos);
            // SAFETY: `buf` has `len` >= n writable bytes; the source is the peek's own.
            unsafe { std::ptr::copy_nonoverlapping(p.data.as_ptr().add(p.pos), buf, n) };
            let labels = p.labels;
            if !peek {
                p.pos += n;
                if p.pos == p.data.len() {
                    st.peeked = None;
                    e.ready.sync(&mut st);
                }
            }
            return Ok((n, labels));
        }
    }
    let take = len.min(RECV_PIECE);
    let got = SCRATCH.with(|cell| {
        let mut own = Vec::new();
        let mut borrowed = cell.try_borrow_mut();
        let scratch = match borrowed.as_mut() {
            Ok(v) => &mut **v,
            Err(_) => &mut own,
        };
        if scratch.len() < take {
            scratch.resize(take, 0);
        }
        let r = if nonblocking {
            ms.try_recv(&mut scratch[..take])
        } else {
            let lib = lib()?;
            let _enter = lib.runtime.enter();
            match e.timeouts().recv {
                // recv takes bytes only when they are there, so giving up its wait loses none.
                Some(t) => block(tokio::time::timeout(t, ms.recv(&mut scratch[..take])))
                    .unwrap_or_else(|_| Err(io::Error::from(io::ErrorKind::WouldBlock))),
                None => block(ms.recv(&mut scratch[..take])),
            }
        };
        let (n, labels) = r.map_err(|e| errno_of(&e))?;
        // SAFETY: `buf` has `len` >= take >= n writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(scratch.as_ptr(), buf, n) };
        if peek && n > 0 {
            let mut st = e.ready.lock();
            st.peeked = Some(Peeked { data: scratch[..n].to_vec(), pos: 0, labels });
            e.ready.sync(&mut st);
        }
        Ok::<_, Errno>((n, labels))
    })?;
    Ok(got)
}

/// recv for a multi-socket: `MSG_DONTWAIT` (or `O_NONBLOCK`), `MSG_PEEK`, `MSG_WAITALL`.
///
/// # Safety
/// `buf` must point to `count` writable bytes (initialised or not); `recv_labels` to a
/// writable c_ulong or be null.
unsafe fn recv_impl(
    sock: mc_socket_t,
    buf: *mut u8,
    count: usize,
    flags: c_int,
    recv_labels: *mut c_ulong,
) -> Result<ssize_t, Errno> {
    if !is_ours(sock) {
        if !recv_labels.is_null() {
            // SAFETY: a non-null `recv_labels` is writable (the caller's contract).
            unsafe { *recv_labels = 0 };
        }
        // SAFETY: recv(2) into the caller's buffer, under its contract.
        return syscall(unsafe { libc::recv(sock, buf as *mut c_void, count, flags) });
    }
    let e = entry(sock)?;
    let ms = e.connected()?;
    let nonblocking = flags & libc::MSG_DONTWAIT != 0 || e.nonblocking();
    let peek = flags & libc::MSG_PEEK != 0;
    let wait_all = flags & libc::MSG_WAITALL != 0 && !peek && !nonblocking;
    let mut got = 0usize;
    let mut first: Option<Labels> = None;
    loop {
        // SAFETY: buf[got..count] is writable, per this function's contract.
        let r = unsafe { recv_piece(&e, &ms, buf.add(got), count - got, peek, nonblocking) };
        match r {
            Ok((n, labels)) => {
                first.get_or_insert(labels);
                got += n;
                if n == 0 || !wait_all || got == count {
                    break;
                }
            }
            // What was read is returned; the error comes again on the next call.
            Err(_) if got > 0 => break,
            Err(err) => return Err(err),
        }
        if count == 0 {
            break;
        }
    }
    if !recv_labels.is_null() {
        // SAFETY: a non-null `recv_labels` points to a writable c_ulong (the caller's contract).
        unsafe { *recv_labels = c_ulong::from(first.unwrap_or(Labels::NONE).bits()) };
    }
    Ok(got as ssize_t)
}

/// Reads, returning the labels the sender used through `recv_labels` (may be null).
///
/// # Safety
/// `buf` must point to `count` writable bytes; `recv_labels` to a writable `unsigned long`
/// or be null.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_read(
    sock: mc_socket_t,
    buf: *mut c_void,
    count: size_t,
    recv_labels: *mut c_ulong,
) -> ssize_t {
    if !is_ours(sock) {
        if !recv_labels.is_null() {
            // SAFETY: a non-null `recv_labels` is writable (the caller's contract).
            unsafe { *recv_labels = 0 };
        }
        // SAFETY: read(2) into the caller's buffer, under its contract.
        return guard(CMM_FAILED as ssize_t, || syscall(unsafe { libc::read(sock, buf, count) }));
    }
    // SAFETY: same contract as cmm_recv.
    unsafe { cmm_recv(sock, buf, count, 0, recv_labels) }
}

/// `cmm_read` with flags (`MSG_DONTWAIT`, `MSG_PEEK`, `MSG_WAITALL`).
///
/// # Safety
/// As `cmm_read`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_recv(
    sock: mc_socket_t,
    buf: *mut c_void,
    count: size_t,
    flags: c_int,
    recv_labels: *mut c_ulong,
) -> ssize_t {
    guard(CMM_FAILED as ssize_t, || {
        if buf.is_null() && count > 0 {
            return Err(Errno::EFAULT);
        }
        // SAFETY: per this function's contract; only written through the pointer.
        unsafe { recv_impl(sock, buf as *mut u8, count, flags, recv_labels) }
    })
}

/// select(2): multi-sockets are descriptors, so they mix with any others.
///
/// # Safety
/// As select(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_select(
    nfds: c_int,
    readfds: *mut fd_set,
    writefds: *mut fd_set,
    exceptfds: *mut fd_set,
    timeout: *mut timeval,
) -> c_int {
    // SAFETY: the arguments go unchanged to select(2), under the caller's contract for it.
    unsafe { libc::select(nfds, readfds, writefds, exceptfds, timeout) }
}

/// poll(2): multi-sockets are descriptors, so they mix with any others.
///
/// # Safety
/// As poll(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_poll(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> c_int {
    // SAFETY: the arguments go unchanged to poll(2), under the caller's contract for it.
    unsafe { libc::poll(fds, nfds, timeout) }
}

/// Options kept per multi-socket (the physical connections always use keepalive and no delay).
const STORED_OPTIONS: &[(c_int, c_int)] = &[
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
];

/// Reads an option: SO_TYPE, SO_DOMAIN, SO_ERROR, SO_ACCEPTCONN, and those set before.
///
/// # Safety
/// `optval` must point to `*optlen` writable bytes and `optlen` to a writable `socklen_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_getsockopt(
    sock: mc_socket_t,
    level: c_int,
    optname: c_int,
    optval: *mut c_void,
    optlen: *mut socklen_t,
) -> c_int {
    guard(CMM_FAILED, || {
        if !is_ours(sock) {
            // SAFETY: getsockopt(2) under the caller's contract.
            return syscall(unsafe { libc::getsockopt(sock, level, optname, optval, optlen) });
        }
        if let Some(l) = listener(sock) {
            // SAFETY: getsockopt(2) on the listening socket itself, under the caller's contract.
            return syscall(unsafe { libc::getsockopt(l.socket, level, optname, optval, optlen) });
        }
        let e = entry(sock)?;
        if let (libc::SOL_SOCKET, libc::SO_RCVTIMEO | libc::SO_SNDTIMEO) = (level, optname) {
            let t = e.timeouts();
            let d = if optname == libc::SO_RCVTIMEO { t.recv } else { t.send };
            let d = d.unwrap_or_default();
            let tv = timeval {
                tv_sec: d.as_secs() as libc::time_t,
                tv_usec: d.subsec_micros() as libc::suseconds_t,
            };
            if optval.is_null() || optlen.is_null() {
                return Err(Errno::EFAULT);
            }
            // SAFETY: per this function's contract; at most *optlen bytes are written.
            unsafe {
                let n = (*optlen as usize).min(std::mem::size_of::<timeval>());
                std::ptr::copy_nonoverlapping(&tv as *const timeval as *const u8, optval as *mut u8, n);
                *optlen = std::mem::size_of::<timeval>() as socklen_t;
            }
            return Ok(0);
        }
        let value = match (level, optname) {
            (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_STREAM,
            (libc::SOL_SOCKET, libc::SO_DOMAIN) => e.family,
            (libc::SOL_SOCKET, libc::SO_ERROR) | (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => 0,
            key if STORED_OPTIONS.contains(&key) => {
                let default = c_int::from(matches!(key.1, libc::SO_KEEPALIVE | libc::TCP_NODELAY));
                *e.options.lock().unwrap_or_else(PoisonError::into_inner).get(&key).unwrap_or(&default)
            }
            _ => return Err(Errno::ENOPROTOOPT),
        };
        if optval.is_null() || optlen.is_null() {
            return Err(Errno::EFAULT);
        }
        // SAFETY: per this function's contract; at most *optlen bytes are written.
        unsafe {
            let room = *optlen as usize;
            let bytes = value.to_ne_bytes();
            let n = room.min(bytes.len());
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), optval as *mut u8, n);
            *optlen = bytes.len() as socklen_t;
        }
        Ok(0)
    })
}

/// Stores an option for `cmm_getsockopt` (SO_KEEPALIVE, SO_RCVBUF, SO_SNDBUF, SO_REUSEADDR,
/// TCP_NODELAY); others are `ENOPROTOOPT`.
///
/// # Safety
/// `optval` must point to `optlen` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_setsockopt(
    sock: mc_socket_t,
    level: c_int,
    optname: c_int,
    optval: *const c_void,
    optlen: socklen_t,
) -> c_int {
    guard(CMM_FAILED, || {
        if !is_ours(sock) {
            // SAFETY: setsockopt(2) under the caller's contract.
            return syscall(unsafe { libc::setsockopt(sock, level, optname, optval, optlen) });
        }
        if let Some(l) = listener(sock) {
            // SAFETY: setsockopt(2) on the listening socket itself, under the caller's contract.
            return syscall(unsafe { libc::setsockopt(l.socket, level, optname, optval, optlen) });
        }
        let e = entry(sock)?;
        if let (libc::SOL_SOCKET, libc::SO_RCVTIMEO | libc::SO_SNDTIMEO) = (level, optname) {
            if optval.is_null() || (optlen as usize) < std::mem::size_of::<timeval>() {
                return Err(Errno::EINVAL);
            }
            // SAFETY: per this function's contract, optval holds a timeval.
            let tv = unsafe { std::ptr::read_unaligned(optval as *const timeval) };
            if tv.tv_sec < 0 || !(0..1_000_000).contains(&tv.tv_usec) {
                return Err(Errno::EDOM);
            }
            let d = std::time::Duration::from_secs(tv.tv_sec as u64)
                + std::time::Duration::from_micros(tv.tv_usec as u64);
            let d = (!d.is_zero()).then_some(d);
            let mut t = e.timeouts.lock().unwrap_or_else(PoisonError::into_inner);
            if optname == libc::SO_RCVTIMEO {
                t.recv = d;
            } else {
                t.send = d;
            }
            return Ok(0);
        }
        if !STORED_OPTIONS.contains(&(level, optname)) {
            return Err(Errno::ENOPROTOOPT);
        }
        if optval.is_null() || (optlen as usize) < std::mem::size_of::<c_int>() {
            return Err(Errno::EINVAL);
        }
        // SAFETY: per this function's contract, optval holds at least an int.
        let v = unsafe { std::ptr::read_unaligned(optval as *const c_int) };
        e.options.lock().unwrap_or_else(PoisonError::into_inner).insert((level, optname), v);
        Ok(0)
    })
}

/// The peer's address.
///
/// # Safety
/// `addr` must point to `*addrlen` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_getpeername(
    sock: mc_socket_t,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> c_int {
    guard(CMM_FAILED, || {
        if !is_ours(sock) {
            // SAFETY: getpeername(2) under the caller's contract.
            return syscall(unsafe { libc::getpeername(sock, addr, addrlen) });
        }
        let peer = entry(sock)?.connected()?.peer_addr().ok_or(Errno::ENOTCONN)?;
        if addr.is_null() || addrlen.is_null() {
            return Err(Errno::EFAULT);
        }
        // SAFETY: per this function's contract.
        unsafe { write_sockaddr(peer, addr, addrlen)? };
        Ok(0)
    })
}

/// The local address of a physical connection.
///
/// # Safety
/// `addr` must point to `*addrlen` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_getsockname(
    sock: mc_socket_t,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> c_int {
    guard(CMM_FAILED, || {
        if !is_ours(sock) {
            // SAFETY: getsockname(2) under the caller's contract.
            return syscall(unsafe { libc::getsockname(sock, addr, addrlen) });
        }
        if let Some(l) = listener(sock) {
            // SAFETY: getsockname(2) on the listening socket itself, under the caller's contract.
            return syscall(unsafe { libc::getsockname(l.socket, addr, addrlen) });
        }
        let local = entry(sock)?.connected()?.local_addr().ok_or(Errno::ENOTCONN)?;
        if addr.is_null() || addrlen.is_null() {
            return Err(Errno::EFAULT);
        }
        // SAFETY: per this function's contract.
        unsafe { write_sockaddr(local, addr, addrlen)? };
        Ok(0)
    })
}

/// 0 when a network that fits `labels` is up; else stores the thunk (`CMM_DEFERRED`), or
/// `CMM_FAILED` without one.
#[unsafe(no_mangle)]
pub extern "C" fn cmm_check_label(
    sock: mc_socket_t,
    labels: c_ulong,
    handler: resume_handler_t,
    arg: *mut c_void,
) -> c_int {
    guard(CMM_FAILED, || {
        let ms = entry(sock)?.connected()?;
        let labels = labels_of(labels)?;
        Ok(match ms.check_label(labels, c_thunk(handler, arg)) {
            Check::Ready => 0,
            Check::Deferred => CMM_DEFERRED,
            Check::Failed => {
                Errno::ENETUNREACH.set();
                CMM_FAILED
            }
        })
    })
}

/// Back to the state right after connect: the next send dials again and runs label_up.
#[unsafe(no_mangle)]
pub extern "C" fn cmm_reset(sock: mc_socket_t) -> c_int {
    guard(CMM_FAILED, || {
        entry(sock)?.connected()?.reset();
        Ok(0)
    })
}

/// Cancels the thunks stored for `labels` with `handler` (any, if null) and `arg` (any, if
/// null), calling `deleter` on each argument; returns how many.
#[unsafe(no_mangle)]
pub extern "C" fn cmm_thunk_cancel(
    sock: mc_socket_t,
    labels: c_ulong,
    handler: resume_handler_t,
    arg: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut c_void)>,
) -> c_int {
    guard(CMM_FAILED, || {
        let ms = entry(sock)?.connected()?;
        let labels = labels_of(labels)?;
        let want = handler.map(|h| h as usize);
        let n = ms.thunk_cancel_matching(
            labels,
            |t| {
                t.arg().downcast_ref::<CThunk>().is_some_and(|c| {
                    want.is_none_or(|h| c.handler as usize == h) && (arg.is_null() || c.arg.get() == arg)
                })
            },
            |a| {
                if let (Some(d), Ok(c)) = (deleter, a.downcast::<CThunk>()) {
                    let arg = c.arg;
                    // SAFETY: the deleter the application gave, on an argument it stored.
                    unsafe { d(arg.get()) }
                }
            },
        );
        Ok(c_int::try_from(n).unwrap_or(c_int::MAX))
    })
}

/// A failure timeout meaning "wait as long as it takes" (libcmm's `{-1, 0}`): ten years, far
/// enough to be forever and near enough that no deadline computed from it overflows.
const FOREVER: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);

/// How long a send without a thunk waits for a network that fits `labels` before failing
/// (`{-1, 0}`: without end). The label policy's `max_wait` unless set.
///
/// # Safety
/// `ts` must point to a writable `struct timespec`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_get_failure_timeout(
    sock: mc_socket_t,
    labels: c_ulong,
    ts: *mut libc::timespec,
) -> c_int {
    guard(CMM_FAILED, || {
        let ms = entry(sock)?.connected()?;
        let d = ms.failure_timeout(labels_of(labels)?);
        if ts.is_null() {
            return Err(Errno::EFAULT);
        }
        let v = if d >= FOREVER {
            libc::timespec { tv_sec: -1, tv_nsec: 0 }
        } else {
            libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long }
        };
        // SAFETY: `ts` is writable, per this function's contract (checked non-null).
        unsafe { std::ptr::write_unaligned(ts, v) };
        Ok(0)
    })
}

/// Sets how long a send without a thunk waits for a network that fits exactly `labels`
/// (`{-1, 0}`: without end; null: the policy's again).
///
/// # Safety
/// `ts` must point to a readable `struct timespec`, or be null.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cmm_set_failure_timeout(
    sock: mc_socket_t,
    labels: c_ulong,
    ts: *const libc::timespec,
) -> c_int {
    guard(CMM_FAILED, || {
        let ms = entry(sock)?.connected()?;
        let labels = labels_of(labels)?;
        let wait = if ts.is_null() {
            None
        } else {
            // SAFETY: a non-null `ts` is readable, per this function's contract.
            let t = unsafe { std::ptr::read_unaligned(ts) };
            if t.tv_sec < 0 {
                Some(FOREVER)
            } else if !(0..1_000_000_000).contains(&t.tv_nsec) {
                return Err(Errno::EINVAL);
            } else {
                Some(std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32).min(FOREVER))
            }
        };
        ms.set_failure_timeout(labels, wait);
        Ok(0)
    })
}

/// Shuts down sending (`SHUT_WR`, `SHUT_RDWR`); `SHUT_RD` does nothing.
#[unsafe(no_mangle)]
pub extern "C" fn cmm_shutdown(sock: mc_socket_t, how: c_int) -> c_int {
    guard(CMM_FAILED, || {
        if !is_ours(sock) {
            // SAFETY: shutdown(2) of the caller's descriptor; no memory is passed.
            return syscall(unsafe { libc::shutdown(sock, how) });
        }
        let ms = entry(sock)?.connected()?;
        match how {
            libc::SHUT_RD => Ok(0),
            libc::SHUT_WR | libc::SHUT_RDWR => ms.shutdown().map(|_| 0).map_err(|e| errno_of(&e)),
            _ => Err(Errno::EINVAL),
        }
    })
}

/// Closes a multi-socket or a listener given to `cmm_listen`. A multi-socket's close waits
/// until the peer has everything sent (up to 10 s), like a lingering close, so a program may
/// exit right after it. Thunks still stored are dropped without running: cancel them first if
/// their arguments need freeing.
#[unsafe(no_mangle)]
pub extern "C" fn cmm_close(sock: mc_socket_t) -> c_int {
    guard(CMM_FAILED, || {
        if let Some(l) = listeners().lock().unwrap_or_else(PoisonError::into_inner).remove(&sock) {
            l.listener.set_waiting_hook(Arc::new(|_| {}));
            drop(l);
            // SAFETY: close(2) on the application's own listening descriptor, as it asked.
            unsafe { libc::close(sock) };
            return Ok(0);
        }
        let Some(e) = table().lock().unwrap_or_else(PoisonError::into_inner).remove(&sock) else {
            // SAFETY: close(2) of a descriptor that is not ours, as the application asked.
            return syscall(unsafe { libc::close(sock) });
        };
        let ms = e.sock.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(ms) = ms {
            // The hook holds the descriptor's eventfd: let it go, so the descriptor is closed
            // now (a second close is then EBADF from close(2) itself).
            ms.set_readable_hook(Arc::new(|_| {}));
            let lib = lib()?;
            let _enter = lib.runtime.enter();
            block(ms.close());
        }
        drop(e);
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins every exported function to the signature `include/libcmm.h` declares; the header is
    /// pinned to the same signatures by `tests/c/header_check.c`. A change on either side stops
    /// one of them from compiling.
    #[test]
    fn signatures_match_the_header() {
        type Cb = connection_event_cb_t;
        type Rh = resume_handler_t;
        let _: unsafe extern "C" fn(c_int, c_int, c_int) -> mc_socket_t = cmm_socket;
        let _: unsafe extern "C" fn(
            mc_socket_t,
            *const sockaddr,
            socklen_t,
            c_ulong,
            Cb,
            Cb,
            *mut c_void,
        ) -> c_int = cmm_connect;
        let _: unsafe extern "C" fn(mc_socket_t, *const sockaddr, socklen_t) -> c_int = cmm_connect3;
        let _: unsafe extern "C" fn(c_int, c_int) -> c_int = cmm_listen;
        let _: unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> mc_socket_t = cmm_accept;
        let _: unsafe extern "C" fn(
            mc_socket_t,
            *const c_void,
            size_t,
            c_int,
            c_ulong,
            Rh,
            *mut c_void,
        ) -> ssize_t = cmm_send;
        let _: unsafe extern "C" fn(mc_socket_t, *const c_void, size_t, c_ulong, Rh, *mut c_void) -> ssize_t =
            cmm_write;
        let _: unsafe extern "C" fn(mc_socket_t, *const iovec, c_int, c_ulong, Rh, *mut c_void) -> c_int =
            cmm_writev;
        let _: unsafe extern "C" fn(mc_socket_t, *mut c_void, size_t, *mut c_ulong) -> ssize_t = cmm_read;
        let _: unsafe extern "C" fn(mc_socket_t, *mut c_void, size_t, c_int, *mut c_ulong) -> ssize_t =
            cmm_recv;
        let _: unsafe extern "C" fn(c_int, *mut fd_set, *mut fd_set, *mut fd_set, *mut timeval) -> c_int =
            cmm_select;
        let _: unsafe extern "C" fn(*mut pollfd, nfds_t, c_int) -> c_int = cmm_poll;
        let _: unsafe extern "C" fn(mc_socket_t, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int =
            cmm_getsockopt;
        let _: unsafe extern "C" fn(mc_socket_t, c_int, c_int, *const c_void, socklen_t) -> c_int =
            cmm_setsockopt;
        let _: unsafe extern "C" fn(mc_socket_t, *mut sockaddr, *mut socklen_t) -> c_int = cmm_getpeername;
        let _: unsafe extern "C" fn(mc_socket_t, *mut sockaddr, *mut socklen_t) -> c_int = cmm_getsockname;
        let _: unsafe extern "C" fn(mc_socket_t, c_ulong, Rh, *mut c_void) -> c_int = cmm_check_label;
        let _: unsafe extern "C" fn(mc_socket_t) -> c_int = cmm_reset;
        let _: unsafe extern "C" fn(
            mc_socket_t,
            c_ulong,
            Rh,
            *mut c_void,
            Option<unsafe extern "C" fn(*mut c_void)>,
        ) -> c_int = cmm_thunk_cancel;
        let _: unsafe extern "C" fn(mc_socket_t, c_ulong, *mut libc::timespec) -> c_int =
            cmm_get_failure_timeout;
        let _: unsafe extern "C" fn(mc_socket_t, c_ulong, *const libc::timespec) -> c_int =
            cmm_set_failure_timeout;
        let _: unsafe extern "C" fn(mc_socket_t, c_int) -> c_int = cmm_shutdown;
        let _: unsafe extern "C" fn(mc_socket_t) -> c_int = cmm_close;
        assert_eq!((CMM_FAILED, CMM_DEFERRED), (-1, -2));
    }

    #[test]
    fn bad_descriptors_and_arguments_are_errors_not_crashes() {
        let mut buf = [0u8; 4];
        // SAFETY: valid buffers; the descriptor is unknown.
        let n =
            unsafe { cmm_read(987_654, buf.as_mut_ptr() as *mut c_void, buf.len(), std::ptr::null_mut()) };
        assert_eq!((n, Errno::last()), (-1, Errno::EBADF));
        assert_eq!((cmm_close(987_654), Errno::last()), (-1, Errno::EBADF));
        assert_eq!(
            (cmm_socket(libc::AF_UNIX, libc::SOCK_STREAM, 0), Errno::last()),
            (-1, Errno::EAFNOSUPPORT)
        );
        assert_eq!(
            (cmm_socket(libc::AF_INET, libc::SOCK_DGRAM, 0), Errno::last()),
            (-1, Errno::EPROTONOSUPPORT)
        );
        let s = cmm_socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(s >= 0);
        // Not connected yet.
        // SAFETY: valid buffer.
        let n = unsafe { cmm_send(s, buf.as_ptr() as *const c_void, 4, 0, 0, None, std::ptr::null_mut()) };
        assert_eq!((n, Errno::last()), (-1, Errno::ENOTCONN));
        // A null address.
        // SAFETY: null is handled before any read.
        let r = unsafe { cmm_connect(s, std::ptr::null(), 0, 0, None, None, std::ptr::null_mut()) };
        assert_eq!((r, Errno::last()), (-1, Errno::EFAULT));
        let mut v: c_int = 0;
        let mut len = std::mem::size_of::<c_int>() as socklen_t;
        // SAFETY: valid out-pointers.
        let r = unsafe {
            cmm_getsockopt(s, libc::SOL_SOCKET, libc::SO_TYPE, &mut v as *mut c_int as *mut c_void, &mut len)
        };
        assert_eq!((r, v), (0, libc::SOCK_STREAM));
        assert_eq!(cmm_close(s), 0);
    }
}
