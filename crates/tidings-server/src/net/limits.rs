//! Connection counting, in total and per client IP: the accept loop's admission control.
//!
//! Concurrency: counters are taken by the accept loop (and by HTTP/2 streams) and released
//! when the connection or stream ends (a permit's Drop). The per-IP map holds only addresses
//! with open connections, so it cannot grow past the connection limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub struct ConnectionLimits {
    /// Atomics so a reload can change them; a lower limit refuses new connections only.
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total,
    PerIp,
}

/// Holds one connection's place; dropping it gives the place back.
pub struct ConnectionPermit {
    /// `None` once the place went to a `Placed` (`keep_with`), which gives it back instead.
    limits: Option<Arc<ConnectionLimits>>,
    ip: IpAddr,
}

/// What knows the address a place was taken for (a connection's context).
pub trait PeerIp {
    fn peer_ip(&self) -> IpAddr;
}

/// A connection's place kept together with what knows its address (its context), which
/// gives the place back when dropped. The permit alone keeps its own copy of the address
/// (32 bytes with the `Arc`); every connection's task holds its context anyway, so beside
/// it the place costs 8 bytes — what took the task's future under tokio's 896-byte cell
/// step (issue 17; `app/parked.rs`).
pub struct Placed<T: PeerIp> {
    held: T,
    /// An `Option` only to take it from the permit; 8 bytes still (the `Arc`'s niche).
    limits: Option<Arc<ConnectionLimits>>,
}

impl ConnectionLimits {
    /// `max_per_ip` 0 = unlimited.
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refused> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total.load(Ordering::Relaxed) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Total);
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        let max_per_ip = self.max_per_ip.load(Ordering::Relaxed);
        if max_per_ip > 0 && *n >= max_per_ip {
            if *n == 0 {
                per_ip.remove(&ip);
            }
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::PerIp);
        }
        *n += 1;
        Ok(ConnectionPermit {
            limits: Some(self.clone()),
            ip,
        })
    }

    fn release(&self, ip: IpAddr) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
        drop(per_ip);
        self.total.fetch_sub(1, Ordering::AcqRel);
    }

    /// New limits (a reload): connections already open stay.
    pub fn set_max(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl ConnectionPermit {
    /// Hands the place to `held`, which must know the same address (the connection's
    /// context): it is given back when the `Placed` is dropped.
    pub fn keep_with<T: PeerIp>(mut self, held: T) -> Placed<T> {
        debug_assert_eq!(held.peer_ip(), self.ip, "a place kept with another address");
        Placed {
            held,
            limits: self.limits.take(),
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some(limits) = self.limits.take() {
            limits.release(self.ip);
        }
    }
}

impl<T: PeerIp> std::ops::Deref for Placed<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.held
    }
}

impl<T: PeerIp> Drop for Placed<T> {
    fn drop(&mut self) {
        if let Some(limits) = &self.limits {
            limits.release(self.held.peer_ip());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_limits_hold_and_release() {
        let l = ConnectionLimits::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).err(), Some(Refused::PerIp));
        let _p3 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).err(), Some(Refused::Total));
        drop(p1);
        assert!(l.try_acquire(a).is_ok());
    }

    struct At(IpAddr);

    impl PeerIp for At {
        fn peer_ip(&self) -> IpAddr {
            self.0
        }
    }

    #[test]
    fn a_place_kept_with_its_address_is_given_back_when_dropped() {
        let l = ConnectionLimits::new(2, 1);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let placed = l.try_acquire(a).unwrap().keep_with(At(a));
        assert_eq!(l.try_acquire(a).err(), Some(Refused::PerIp));
        assert_eq!(l.open(), 1);
        drop(placed);
        assert_eq!(l.open(), 0);
        assert!(l.try_acquire(a).is_ok());
    }
}
