//! Per-thread reuse of the kernel's scratch buffers.
//!
//! Each task allocates a few hundred KiB of tiles and packs. Fresh from the allocator, the
//! large ones are new pages (glibc maps buffers of 128 KiB and more, and trims freed heap), and
//! their page faults took 7–16 % of the AMX kernel's time at S = 4096 (one thread: 101k → 92k
//! TSC cycles per key block with glibc told not to map or trim; with this stash, 2 heads run
//! in turn with and without it: best 165.8 against 139.7 GFLOP/s, median 76–77 against 70 on a
//! busy host). A buffer a task drops goes to a small stash of its thread instead, and the next
//! task there takes it back: at most [`STASH_BYTES`] per thread, buffers up to
//! [`MAX_BUF_BYTES`] (the pre-split K/V packs of a large problem are freed as usual).

use std::cell::RefCell;
use std::sync::OnceLock;

/// Bytes a thread keeps for reuse, all buffers together.
const STASH_BYTES: usize = 4 << 20;
/// Larger buffers are not kept.
const MAX_BUF_BYTES: usize = 1 << 20;

/// One thread's spare buffers of one element type.
pub struct Stash<T> {
    bufs: Vec<Vec<T>>,
    bytes: usize,
}

impl<T> Stash<T> {
    const fn new() -> Stash<T> {
        Stash {
            bufs: Vec::new(),
            bytes: 0,
        }
    }

    /// The smallest spare buffer that holds `len` elements without growing.
    fn take(&mut self, len: usize) -> Option<Vec<T>> {
        let i = (0..self.bufs.len())
            .filter(|&i| self.bufs[i].capacity() >= len)
            .min_by_key(|&i| self.bufs[i].capacity())?;
        let v = self.bufs.swap_remove(i);
        self.bytes -= v.capacity() * size_of::<T>();
        Some(v)
    }

    fn give(&mut self, v: Vec<T>) {
        let bytes = v.capacity() * size_of::<T>();
        if bytes > 0 && bytes <= MAX_BUF_BYTES && self.bytes + bytes <= STASH_BYTES {
            self.bytes += bytes;
            self.bufs.push(v);
        }
    }
}

/// Element types with a per-thread stash.
pub trait Stashed: Copy + 'static {
    /// What [`reused`] fills buffers with when poisoning: a NaN, so that a read of an element
    /// nobody wrote shows up in the results.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 paths only
    const POISON: Self;
    /// Runs `f` on this thread's stash; `None` while the thread is being torn down.
    fn with_stash<R>(f: impl FnOnce(&mut Stash<Self>) -> R) -> Option<R>;
}

macro_rules! stashed {
    ($t:ty, $name:ident, $poison:expr) => {
        thread_local!(static $name: RefCell<Stash<$t>> = const { RefCell::new(Stash::new()) });
        impl Stashed for $t {
            const POISON: $t = $poison;
            fn with_stash<R>(f: impl FnOnce(&mut Stash<$t>) -> R) -> Option<R> {
                $name
                    .try_with(|s| s.try_borrow_mut().ok().map(|mut s| f(&mut s)))
                    .ok()
                    .flatten()
            }
        }
    };
}
stashed!(f32, F32_STASH, f32::NAN);
// 0xFFFF is a NaN as bf16 and as f16.
stashed!(u16, U16_STASH, 0xFFFF);

/// `len` copies of `value`, in a spare buffer of this thread when one is large enough.
pub fn filled<T: Stashed>(len: usize, value: T) -> Vec<T> {
    match T::with_stash(|s| s.take(len)).flatten() {
        Some(mut v) => {
            v.clear();
            v.resize(len, value);
            v
        }
        None => vec![value; len],
    }
}

/// Whether [`reused`] poisons its buffers: in debug builds, and where
/// `FLASH_ORT_POISON_SCRATCH=1` (the project's test command sets it, so the optimized test
/// runs check too that no kernel reads an element it did not write).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 paths only
fn poison() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    cfg!(debug_assertions)
        || *ON
            .get_or_init(|| std::env::var_os("FLASH_ORT_POISON_SCRATCH").is_some_and(|v| v == "1"))
}

/// `len` elements for a buffer whose every element is written before it is read: a spare
/// buffer of this thread when one is large enough, holding whatever it held (no pass over
/// it: zero-filling the tiles and packs took 7 % of a call at S = 256), or a new one of
/// `value`s. Filled with [`Stashed::POISON`] instead where [`poison`] says so.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 paths only
pub fn reused<T: Stashed>(len: usize, value: T) -> Vec<T> {
    let mut v = match T::with_stash(|s| s.take(len)).flatten() {
        Some(mut v) => {
            // Shortens, or writes `value` only past what the buffer held.
            v.resize(len, value);
            v
        }
        None => vec![value; len],
    };
    if poison() {
        v.fill(T::POISON);
    }
    v
}

/// Keeps `v` for reuse on this thread, or frees it.
pub fn recycle<T: Stashed>(v: Vec<T>) {
    if v.capacity() > 0 {
        // Dropped here when the stash is full, too large or gone.
        T::with_stash(|s| s.give(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_filled_and_the_stash_is_bounded() {
        let v = filled(1000, 7.0f32);
        assert!(v.len() == 1000 && v.iter().all(|&x| x == 7.0));
        let ptr = v.as_ptr();
        recycle(v);
        // The same allocation again, refilled.
        let w = filled(900, 0.0f32);
        assert_eq!(w.as_ptr(), ptr);
        assert!(w.len() == 900 && w.iter().all(|&x| x == 0.0));
        recycle(w);
        // Reused as it is (or poisoned), also when longer than before.
        let r = reused(950, 1.0f32);
        assert_eq!((r.as_ptr(), r.len()), (ptr, 950));
        if poison() {
            assert!(r.iter().all(|x| x.is_nan()));
        } else {
            assert!(r[..900].iter().all(|&x| x == 0.0) && r[900..].iter().all(|&x| x == 1.0));
        }
        recycle(r);
        // Too large to keep, and a full stash keeps nothing more.
        recycle(vec![0u16; MAX_BUF_BYTES / 2 + 1]);
        assert_eq!(U16_STASH.with(|s| s.borrow().bufs.len()), 0);
        for _ in 0..(STASH_BYTES / MAX_BUF_BYTES + 2) {
            recycle(vec![0u16; MAX_BUF_BYTES / 2]);
        }
        U16_STASH.with(|s| {
            let s = s.borrow();
            assert!(s.bytes <= STASH_BYTES);
            assert_eq!(s.bufs.len(), STASH_BYTES / MAX_BUF_BYTES);
        });
    }
}
