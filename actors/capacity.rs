//! The pipeline's bounded memory: a record bound and a byte bound. Every
//! record read takes a share of both, held by its acknowledgement handle
//! until it is settled or dropped; when either bound is full, the sources
//! pause (backpressure).

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The two bounds (`buffer.capacity` records, `buffer.capacity_bytes` bytes).
pub struct Capacity {
    records: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    record_limit: usize,
    byte_limit: usize,
}

/// One record's share of the capacity: one unit of the record bound and
/// its size in bytes. Both return when it is dropped, so the bounds cannot
/// leak, even through a crashing actor.
#[derive(Debug)]
pub struct Reserved {
    pub(crate) _record: OwnedSemaphorePermit,
    pub(crate) _bytes: OwnedSemaphorePermit,
}

impl Capacity {
    pub fn new(record_limit: usize, byte_limit: usize) -> Capacity {
        Capacity {
            records: Arc::new(Semaphore::new(record_limit)),
            bytes: Arc::new(Semaphore::new(byte_limit)),
            record_limit,
            byte_limit,
        }
    }

    /// Records read and not yet durable or dropped.
    pub fn in_flight(&self) -> usize {
        self.record_limit - self.records.available_permits()
    }

    /// The bytes those records hold.
    pub fn in_flight_bytes(&self) -> usize {
        self.byte_limit - self.bytes.available_permits()
    }

    /// A share for a record of `bytes`, if both bounds have room now.
    pub fn try_reserve(&self, bytes: usize) -> Option<Reserved> {
        let record = self.records.clone().try_acquire_owned().ok()?;
        let bytes = self.bytes.clone().try_acquire_many_owned(self.byte_permits(bytes)).ok()?;
        Some(Reserved { _record: record, _bytes: bytes })
    }

    /// The same, waiting until both bounds have room (backpressure).
    pub async fn reserve(&self, bytes: usize) -> Reserved {
        let record = self.records.clone().acquire_owned().await.expect("the semaphore is never closed");
        let bytes = self
            .bytes
            .clone()
            .acquire_many_owned(self.byte_permits(bytes))
            .await
            .expect("the semaphore is never closed");
        Reserved { _record: record, _bytes: bytes }
    }

    /// A record counts at least one byte, and at most the whole byte bound
    /// (a larger one still passes, alone).
    fn byte_permits(&self, bytes: usize) -> u32 {
        bytes.clamp(1, self.byte_limit) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::Capacity;

    #[test]
    fn a_share_holds_one_record_and_its_bytes_until_dropped() {
        let capacity = Capacity::new(2, 100);
        let first = capacity.try_reserve(60).expect("room for the first");
        assert_eq!((capacity.in_flight(), capacity.in_flight_bytes()), (1, 60));
        assert!(capacity.try_reserve(50).is_none(), "60 + 50 bytes is over the byte bound");
        let second = capacity.try_reserve(40).expect("60 + 40 fits");
        assert!(capacity.try_reserve(0).is_none(), "2 records is the record bound");
        drop((first, second));
        assert_eq!((capacity.in_flight(), capacity.in_flight_bytes()), (0, 0));
    }

    #[test]
    fn a_record_larger_than_the_byte_bound_passes_alone_and_an_empty_one_counts_a_byte() {
        let capacity = Capacity::new(3, 100);
        let large = capacity.try_reserve(1_000).expect("a large record passes when the bound is empty");
        assert_eq!(capacity.in_flight_bytes(), 100);
        assert!(capacity.try_reserve(1).is_none());
        drop(large);
        let _empty = capacity.try_reserve(0).expect("room");
        assert_eq!(capacity.in_flight_bytes(), 1);
    }
}
