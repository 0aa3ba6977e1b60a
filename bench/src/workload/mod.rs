//! The workloads, one file each: what they send, what they check, what they report.

pub mod handoff;
pub mod locks;
pub mod requests;
pub mod session;
