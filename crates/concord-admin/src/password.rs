//! Broker passwords: generated ones, and the hash RabbitMQ stores
//! (`rabbit_password_hashing_sha256`), so that definitions never hold a plaintext password.

use base64::Engine as _;
use rand::RngExt as _;
use sha2::{Digest, Sha256};

/// The hashing algorithm named in the definitions.
pub const HASHING_ALGORITHM: &str = "rabbit_password_hashing_sha256";

/// `base64(salt ‖ SHA-256(salt ‖ password))`, the form RabbitMQ stores and checks.
pub fn hash_with_salt(password: &str, salt: [u8; 4]) -> String {
    let digest = Sha256::new()
        .chain_update(salt)
        .chain_update(password.as_bytes())
        .finalize();
    let mut bytes = salt.to_vec();
    bytes.extend_from_slice(&digest);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The hash of `password` with a random salt.
pub fn hash(password: &str) -> String {
    hash_with_salt(password, rand::rng().random())
}

/// A new random password: 32 characters from `[A-Za-z0-9]` (about 190 bits).
pub fn generate() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32)
        .map(|_| {
            let i = rng.random_range(0..ALPHABET.len());
            char::from(ALPHABET.get(i).copied().unwrap_or(b'x'))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_salt_then_sha256_of_salt_and_password() {
        // RabbitMQ's own example: salt 908D C60A, password "test12".
        assert_eq!(
            hash_with_salt("test12", [0x90, 0x8D, 0xC6, 0x0A]),
            "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
        );
        let h = hash("secret");
        assert_eq!(h.len(), 48);
        assert_ne!(h, hash("secret"), "a random salt each time");
        let p = generate();
        assert_eq!(p.len(), 32);
        assert!(p.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(p, generate());
    }
}
