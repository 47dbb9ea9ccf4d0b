//! Fixed-capacity byte buffers that the kernel may read or write while an
//! io_uring operation is in flight.
//!
//! A [`Buf`] is a linear buffer: bytes live in `head..tail`, free space is
//! `tail..capacity`. Receives write into the free space, sends read from the
//! filled part. The memory is a heap allocation that never moves or changes
//! size for the life of the buffer, so a pointer handed to the kernel stays
//! valid until the operation completes.
//!
//! The owner must respect one rule, which [`crate::session`] enforces: while
//! the kernel writes into the free space, [`Buf::compact`] must not be called
//! (it would move the bytes under the kernel's feet); while the kernel reads
//! the filled part, only [`Buf::commit`] (appending) is allowed, never
//! `compact` or `consume`. Slices are only ever created over exactly the range
//! the caller asked for, never over the whole allocation, so Rust references
//! never alias memory the kernel is using.

use std::ptr::NonNull;

/// A fixed-capacity linear byte buffer with a stable address.
pub struct Buf {
    ptr: NonNull<u8>,
    cap: usize,
    head: usize,
    tail: usize,
}

// SAFETY: `Buf` owns its allocation exclusively (like `Box<[u8]>`); moving it
// to another thread moves that ownership.
unsafe impl Send for Buf {}

impl Buf {
    /// Allocates a zeroed buffer of `cap` bytes (none for `cap` 0).
    pub fn new(cap: usize) -> Self {
        if cap == 0 {
            return Self {
                ptr: NonNull::dangling(),
                cap: 0,
                head: 0,
                tail: 0,
            };
        }
        let boxed: Box<[u8]> = vec![0u8; cap].into_boxed_slice();
        let raw = Box::into_raw(boxed) as *mut u8;
        // SAFETY: `Box::into_raw` never returns null.
        let ptr = unsafe { NonNull::new_unchecked(raw) };
        Self {
            ptr,
            cap,
            head: 0,
            tail: 0,
        }
    }

    /// Total capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Number of filled bytes.
    pub fn len(&self) -> usize {
        self.tail - self.head
    }

    /// Whether no bytes are filled.
    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// Free bytes at the end (what a receive can fill without compaction).
    pub fn spare_len(&self) -> usize {
        self.cap - self.tail
    }

    /// Free bytes in total (what is available after a compaction).
    pub fn free_len(&self) -> usize {
        self.cap - self.len()
    }

    /// The filled bytes.
    pub fn filled(&self) -> &[u8] {
        // SAFETY: `head..tail` is inside the allocation and initialised (the
        // allocation is zeroed at creation), and the returned shared borrow is
        // tied to `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(self.head), self.len()) }
    }

    /// The filled bytes, mutably (rustls decrypts and deframes in place).
    pub fn filled_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `filled`, and `&mut self` guarantees exclusivity among
        // Rust references; the kernel only ever writes the spare range.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.head), self.len()) }
    }

    /// The free space at the end, mutably.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        // SAFETY: `tail..cap` is inside the allocation and initialised.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.tail), self.spare_len())
        }
    }

    /// Raw pointer and length of the free space, for a kernel receive.
    pub fn spare_raw(&mut self) -> (*mut u8, usize) {
        // SAFETY: `tail <= cap`, so the pointer is within or one past the
        // allocation.
        (
            unsafe { self.ptr.as_ptr().add(self.tail) },
            self.spare_len(),
        )
    }

    /// Raw pointer and length of the filled bytes, for a kernel send.
    pub fn filled_raw(&self) -> (*const u8, usize) {
        // SAFETY: `head <= cap`.
        (unsafe { self.ptr.as_ptr().add(self.head) }, self.len())
    }

    /// Marks `n` bytes of the free space as filled.
    pub fn commit(&mut self, n: usize) {
        debug_assert!(n <= self.spare_len());
        self.tail += n.min(self.spare_len());
    }

    /// Drops `n` bytes from the front of the filled part. The free space at
    /// the end does not move (a receive may be writing there); call
    /// [`Buf::compact`] when no receive is in flight to reclaim the front.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.head += n.min(self.len());
    }

    /// Moves the filled bytes to the start so all free space is contiguous.
    pub fn compact(&mut self) {
        if self.head == 0 {
            return;
        }
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
            return;
        }
        let len = self.len();
        // SAFETY: source and destination are inside the allocation;
        // `ptr::copy` handles overlap.
        unsafe {
            std::ptr::copy(self.ptr.as_ptr().add(self.head), self.ptr.as_ptr(), len);
        }
        self.head = 0;
        self.tail = len;
    }

    /// Appends as much of `data` as fits (compacting first if that helps);
    /// returns how many bytes were taken. The caller must know that no
    /// kernel operation is using this buffer.
    pub fn push_compacting(&mut self, data: &[u8]) -> usize {
        if self.spare_len() < data.len() {
            self.compact();
        }
        let n = data.len().min(self.spare_len());
        self.spare_mut()[..n].copy_from_slice(&data[..n]);
        self.commit(n);
        n
    }

    /// Replaces the allocation with one of `cap` bytes (at least the filled
    /// length), keeping the filled bytes at the front. Only while no
    /// operation uses the buffer: the address changes.
    pub fn resize(&mut self, cap: usize) {
        let mut new = Buf::new(cap.max(self.len()));
        let n = self.len();
        new.spare_mut()[..n].copy_from_slice(self.filled());
        new.commit(n);
        *self = new;
    }

    /// Forgets all filled bytes.
    pub fn clear(&mut self) {
        self.head = 0;
        self.tail = 0;
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.cap == 0 {
            return;
        }
        let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.cap);
        // SAFETY: the pointer came from `Box::<[u8]>::into_raw` with exactly
        // this length, and is dropped once.
        drop(unsafe { Box::from_raw(slice) });
    }
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buf")
            .field("cap", &self.cap)
            .field("head", &self.head)
            .field("tail", &self.tail)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_consume_compact() {
        let mut b = Buf::new(8);
        assert_eq!(b.spare_len(), 8);
        b.spare_mut()[..5].copy_from_slice(b"hello");
        b.commit(5);
        assert_eq!(b.filled(), b"hello");
        b.consume(2);
        assert_eq!(b.filled(), b"llo");
        assert_eq!(b.spare_len(), 3);
        assert_eq!(b.free_len(), 5);
        b.compact();
        assert_eq!(b.filled(), b"llo");
        assert_eq!(b.spare_len(), 5);
        b.consume(3);
        assert!(b.is_empty());
        assert_eq!(b.spare_len(), 5, "consume never moves the free space");
        b.compact();
        assert_eq!(b.spare_len(), 8, "compacting an empty buffer rewinds it");
    }

    #[test]
    fn resize_keeps_the_filled_bytes() {
        let mut b = Buf::new(4);
        b.push_compacting(b"abcd");
        b.consume(1);
        b.resize(16);
        assert_eq!(b.filled(), b"bcd");
        assert_eq!(b.capacity(), 16);
        assert_eq!(b.spare_len(), 13);
        b.resize(1);
        assert_eq!(b.filled(), b"bcd", "never smaller than the filled bytes");
        assert_eq!(b.capacity(), 3);
    }

    #[test]
    fn zero_capacity_allocates_nothing() {
        let mut b = Buf::new(0);
        assert_eq!(b.spare_len(), 0);
        assert!(b.filled().is_empty());
        assert_eq!(b.push_compacting(b"x"), 0);
    }

    #[test]
    fn push_compacting_takes_what_fits() {
        let mut b = Buf::new(4);
        assert_eq!(b.push_compacting(b"abc"), 3);
        b.consume(2);
        assert_eq!(b.push_compacting(b"defg"), 3);
        assert_eq!(b.filled(), b"cdef");
        assert_eq!(b.push_compacting(b"x"), 0);
    }
}
