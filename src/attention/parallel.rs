//! How CPU kernels fan work out: ORT's intra-op pool inside a session (see `ort_abi`), scoped
//! std threads in tests and benches, or serially.

/// Runs `task(i)` for every `i in 0..n`, possibly concurrently, returning when all are done.
pub trait ParallelFor: Sync {
    fn for_each(&self, n: usize, task: &(dyn Fn(usize) + Sync));
}

/// Runs tasks one after another on the calling thread.
pub struct Serial;

impl ParallelFor for Serial {
    fn for_each(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(task);
    }
}

/// Splits tasks over `threads` scoped std threads pulling from a shared counter.
pub struct ThreadScope(pub usize);

impl ParallelFor for ThreadScope {
    fn for_each(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let threads = self.0.clamp(1, n.max(1));
        if threads == 1 {
            return Serial.for_each(n, task);
        }
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    task(i);
                });
            }
        });
    }
}
