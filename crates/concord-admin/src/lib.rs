//! Broker administration for Concord: the RabbitMQ definitions that make the broker enforce
//! what the policy promises — one user per system that may publish only its own changes and read
//! only its own inbox, a router user, an operator user, and the topology with its arguments —
//! and a client of the RabbitMQ management HTTP API to load them (and to read the broker's
//! state).
//!
//! This crate must never hold a plaintext password in the definitions it writes (only the hashes
//! RabbitMQ stores), never grant a system user more than its own routing keys, inbox and
//! dead-letter queue, and never talk AMQP (that is `concord-amqp`'s).

pub mod definitions;
pub mod management;
pub mod password;
pub mod scratch;
