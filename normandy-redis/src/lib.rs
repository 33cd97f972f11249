//! The Redis connection shared by Normandy's Redis backends (`normandy-registry-redis`,
//! `normandy-store-redis`): one server or a Redis Cluster, chosen by configuration, behind one
//! connection type, so the code above it is written once.
//!
//! # Layout
//! - [`target`]: [`RedisTarget`] — where to connect: one server (`redis://host:port/db`) or a
//!   cluster (`redis+cluster://h1:p1,h2:p2`, or a list of node URLs), and connecting.
//! - [`conn`]: [`RedisConn`] — a reconnecting connection to one server, a dedicated one, or a
//!   cluster connection (which follows `MOVED`/`ASK` and resharding); it implements
//!   [`redis::aio::ConnectionLike`], plus the few operations that differ on a cluster
//!   (scanning every primary, sending commands of several slots).
//! - [`mod@slot`]: hash slots — a key's slot (CRC16 of its hash tag, as the server computes it) and,
//!   for every slot, a short hash tag that lands in it.
//!
//! # On a cluster
//! A script or a pipeline may only touch keys of one slot. The backends keep each session's
//! keys under one hash tag and route each script by its first key; commands about several
//! sessions go out one per slot ([`RedisConn::query_each`]), and `SCAN` visits every primary
//! ([`RedisConn::scan_match`]).

pub mod conn;
pub mod slot;
pub mod target;

pub use conn::RedisConn;
pub use slot::{slot, slot_tag};
pub use target::{ConnectOptions, RedisTarget};
