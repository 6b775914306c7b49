//! Poison-tolerant locking. A thread that panicked while holding a lock poisons it; with
//! `.lock().unwrap()` every later user panics too, and one bug takes the whole daemon down.
//! The data under our locks is kept consistent between statements (counters, tables, queues),
//! so the next user takes the lock anyway and goes on.
//!
//! ```
//! use enforcer::sync::LockOrRecover;
//! let m = std::sync::Mutex::new(1);
//! *m.lock_or_recover() += 1;
//! assert_eq!(*m.lock_or_recover(), 2);
//! ```
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// `lock_or_recover()`: `lock()` that takes over a poisoned lock instead of panicking.
pub trait LockOrRecover<T: ?Sized> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockOrRecover<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `read_or_recover()` / `write_or_recover()`: the same for an `RwLock`.
pub trait RwLockOrRecover<T: ?Sized> {
    fn read_or_recover(&self) -> RwLockReadGuard<'_, T>;
    fn write_or_recover(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockOrRecover<T> for RwLock<T> {
    fn read_or_recover(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_or_recover(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_poisoned_lock_is_taken_over() {
        let m = Arc::new(Mutex::new(vec![1]));
        let r = Arc::new(RwLock::new(1));
        let (m2, r2) = (m.clone(), r.clone());
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            let _w = r2.write().unwrap();
            panic!("poison both");
        })
        .join();
        assert!(m.is_poisoned() && r.is_poisoned());
        m.lock_or_recover().push(2);
        assert_eq!(*m.lock_or_recover(), vec![1, 2]);
        *r.write_or_recover() += 1;
        assert_eq!(*r.read_or_recover(), 2);
    }
}
