//! Broker administration and operation for Concord: the RabbitMQ definitions that make the
//! broker enforce what the policy promises — one user per system that may publish only its own
//! changes and read only its own inbox, a router user, an operator user, and the topology with
//! its arguments — a client of the RabbitMQ management HTTP API to load them and to read the
//! broker's state, and the operator's day-two work behind the `concord` CLI:
//!
//! - [`status`]: per system its inbox and dead letters, the router's queues, consumers and lag,
//!   and what needs attention (`concord status`);
//! - [`dead_letter`] and [`redrive`]: dead letters decoded, and moved back where they came from
//!   — a system's inbox as the router, the router's input as the source system — never
//!   anywhere else (`concord dlq list|show|redrive`);
//! - [`pause`]: stop and resume delivering to one system through its user's read permission
//!   (`concord pause|resume`).
//!
//! This crate must never hold a plaintext password in the definitions it writes (only the hashes
//! RabbitMQ stores), never grant a system user more than its own routing keys, inbox and
//! dead-letter queue, never move a dead letter to another system than the one it was for, and
//! never use lapin (AMQP goes through `concord-amqp`). Decisions and formatting are pure
//! functions; the functions that talk to the broker only gather and act.

pub mod dead_letter;
pub mod definitions;
pub mod management;
pub mod password;
pub mod pause;
pub mod redrive;
pub mod scratch;
pub mod status;
