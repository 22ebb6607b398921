//! [`Thunk`]s: operations deferred until a network that fits their labels appears.
//!
//! As in libcmm, a thunk is a handler and its argument. When a call cannot go out now (no
//! network fits its labels) it stores the thunk and returns `Deferred`; the thunk runs, on a
//! library thread, once a matching network is up. Whoever stored it then owns the argument
//! through the handler. `thunk_cancel` removes matching thunks and gives each argument to a
//! deleter, returning how many were cancelled.

use std::any::Any;
use std::fmt;

use cmm_policy::Labels;

/// A thunk's handler: it receives the argument it was stored with.
pub type Handler = fn(Box<dyn Any + Send>);

/// A handler and its argument, run when a matching network appears.
pub struct Thunk {
    handler: Handler,
    arg: Box<dyn Any + Send>,
}

impl fmt::Debug for Thunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Thunk")
            .field("handler", &(self.handler as usize as *const ()))
            .finish_non_exhaustive()
    }
}

impl Thunk {
    /// A thunk that will call `handler(Box::new(arg))`.
    pub fn new<A: Any + Send>(handler: Handler, arg: A) -> Thunk {
        Thunk { handler, arg: Box::new(arg) }
    }

    /// Whether this thunk's handler is `handler` (compared by address, as libcmm does).
    pub fn has_handler(&self, handler: Handler) -> bool {
        self.handler as usize == handler as usize
    }

    /// The argument, for matching (the C API compares argument pointers).
    pub fn arg(&self) -> &(dyn Any + Send) {
        &*self.arg
    }

    /// Runs the handler with the argument.
    pub fn run(self) {
        (self.handler)(self.arg)
    }

    /// Gives up the argument without running the handler.
    pub fn into_arg(self) -> Box<dyn Any + Send> {
        self.arg
    }
}

/// Stored thunks of one multi-socket, with the labels each waits for.
#[derive(Default, Debug)]
pub struct Thunks {
    stored: Vec<(Labels, Thunk)>,
}

impl Thunks {
    /// Stores a thunk waiting for `labels`.
    pub fn push(&mut self, labels: Labels, thunk: Thunk) {
        self.stored.push((labels, thunk));
    }

    /// How many are stored.
    pub fn len(&self) -> usize {
        self.stored.len()
    }

    /// Whether none is stored.
    pub fn is_empty(&self) -> bool {
        self.stored.is_empty()
    }

    /// Takes the thunks whose labels `ready` says can go now, in the order they were stored.
    pub fn take_ready(&mut self, mut ready: impl FnMut(Labels) -> bool) -> Vec<Thunk> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for (l, t) in self.stored.drain(..) {
            if ready(l) { out.push(t) } else { keep.push((l, t)) }
        }
        self.stored = keep;
        out
    }

    /// Removes the thunks stored for exactly `labels` that `matches` accepts, giving each
    /// argument to `deleter`; returns how many.
    pub fn cancel(
        &mut self,
        labels: Labels,
        mut matches: impl FnMut(&Thunk) -> bool,
        mut deleter: impl FnMut(Box<dyn Any + Send>),
    ) -> usize {
        let mut n = 0;
        let mut keep = Vec::new();
        for (l, t) in self.stored.drain(..) {
            if l == labels && matches(&t) {
                n += 1;
                deleter(t.into_arg());
            } else {
                keep.push((l, t));
            }
        }
        self.stored = keep;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static RAN: AtomicUsize = AtomicUsize::new(0);

    fn count(arg: Box<dyn Any + Send>) {
        let n = arg.downcast::<usize>().map(|b| *b).unwrap_or(0);
        RAN.fetch_add(n, Ordering::SeqCst);
    }

    fn other(_: Box<dyn Any + Send>) {}

    #[test]
    fn ready_thunks_run_and_cancel_matches_handler_and_labels() {
        let mut t = Thunks::default();
        t.push(Labels::BACKGROUND, Thunk::new(count, 5usize));
        t.push(Labels::ONDEMAND, Thunk::new(count, 7usize));
        t.push(Labels::BACKGROUND, Thunk::new(other, 1usize));
        let ready = t.take_ready(|l| l == Labels::ONDEMAND);
        assert_eq!(ready.len(), 1);
        for th in ready {
            th.run();
        }
        assert_eq!(RAN.load(Ordering::SeqCst), 7);
        let mut deleted = Vec::new();
        let n = t.cancel(
            Labels::BACKGROUND,
            |th| th.has_handler(count),
            |arg| deleted.push(*arg.downcast::<usize>().unwrap()),
        );
        assert_eq!(n, 1);
        assert_eq!(deleted, vec![5]);
        assert_eq!(t.len(), 1, "the other handler's thunk stays");
        assert_eq!(t.cancel(Labels::ONDEMAND, |_| true, |_| {}), 0);
    }
}
