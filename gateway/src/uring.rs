//! io_uring set-up: ring creation with the best flags the kernel accepts,
//! and the opcode probe the gateway needs.

use io_uring::{opcode, IoUring, Probe};

/// The setup flags that were accepted, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingFlavor {
    /// `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN` (Linux 6.1+).
    DeferTaskrun,
    /// `COOP_TASKRUN` (Linux 5.19+).
    CoopTaskrun,
    /// No optional flags.
    Plain,
}

/// Creates a ring, trying the cheapest completion modes first. Must be
/// called on the thread that will use the ring (`SINGLE_ISSUER`).
pub fn new_ring(entries: u32) -> std::io::Result<(IoUring, RingFlavor)> {
    let cq = entries.saturating_mul(4);
    if let Ok(r) = IoUring::builder()
        .setup_cqsize(cq)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(entries)
    {
        return Ok((r, RingFlavor::DeferTaskrun));
    }
    if let Ok(r) = IoUring::builder()
        .setup_cqsize(cq)
        .setup_coop_taskrun()
        .build(entries)
    {
        return Ok((r, RingFlavor::CoopTaskrun));
    }
    let r = IoUring::builder().setup_cqsize(cq).build(entries)?;
    Ok((r, RingFlavor::Plain))
}

/// Opcodes the data plane submits, with the name used in error messages.
pub const REQUIRED_OPCODES: &[(u8, &str)] = &[
    (opcode::AcceptMulti::CODE, "ACCEPT (multishot, Linux 5.19)"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::Shutdown::CODE, "SHUTDOWN (Linux 5.11)"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::Read::CODE, "READ"),
];

/// Checks that the kernel supports every opcode we use. Returns the names
/// of the missing ones.
pub fn missing_opcodes() -> std::io::Result<Vec<&'static str>> {
    let (ring, _) = new_ring(8)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    Ok(REQUIRED_OPCODES
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect())
}
