//! The reference model's categories and its deterministic "prediction".
//!
//! The seed system's FastAPI server answered `CATEGORIES[hash(uuid.UUID(id)) % 15]`.
//! On 64-bit CPython, `hash(UUID)` is `hash(uuid.int)`, and the hash of a
//! non-negative integer is the integer modulo the Mersenne prime 2^61 - 1.
//! Computing the same thing here lets the Rust server answer byte for byte
//! what the Python one did, and lets tests know the expected category of
//! every id without calling any server.

use uuid::Uuid;

/// The categories, in the seed server's order (the order matters: it is the
/// index space of the hash).
pub const CATEGORIES: [&str; 15] = [
    "Rent",
    "Salary Income",
    "Food",
    "Restaurant",
    "Client Expenses",
    "Transportation",
    "Utilities",
    "Entertainment",
    "Healthcare",
    "Shopping",
    "Travel",
    "Education",
    "Insurance",
    "Investment",
    "Subscriptions",
];

/// The reference model's version string, as the seed server reported it.
pub const REFERENCE_MODEL_VERSION: &str = "v1.0.0";

const PY_HASH_MODULUS: u128 = (1 << 61) - 1;

/// CPython's `hash(uuid.UUID(id))` on a 64-bit build.
pub fn python_uuid_hash(id: Uuid) -> u64 {
    // For a non-negative int, CPython reduces modulo 2^61 - 1; the special
    // case -1 -> -2 cannot arise for non-negative values.
    (id.as_u128() % PY_HASH_MODULUS) as u64
}

/// The category the reference model gives `id`.
pub fn reference_category(id: Uuid) -> &'static str {
    shifted_category(id, 0)
}

/// The category a reference model shifted by `shift` gives `id`: the index
/// `(hash(id) + shift) mod 15`. Shift 0 is the seed's model; another shift
/// stands for another model version whose every answer is known, so tests
/// can check each category of each version exactly.
pub fn shifted_category(id: Uuid, shift: u64) -> &'static str {
    let count = CATEGORIES.len() as u64;
    CATEGORIES[((python_uuid_hash(id) % count + shift % count) % count) as usize]
}

/// The reference model's confidence for `id`: deterministic, in [0.5, 1.0],
/// so that replays store the same value.
pub fn reference_confidence(id: Uuid) -> f64 {
    let bits = (id.as_u128() >> 64) as u64 ^ id.as_u128() as u64;
    0.5 + (bits % 501) as f64 / 1000.0
}

/// Known answers computed with CPython 3.11 (`CATEGORIES[hash(uuid.UUID(i)) % 15]`),
/// shared by the unit tests and the reference server's integration tests.
pub const CPYTHON_VECTORS: [(&str, &str); 27] = [
    ("b9fa6684-502b-4695-8f92-247432ba610d", "Transportation"),
    ("00000000-0000-0000-0000-000000000000", "Rent"),
    ("ffffffff-ffff-ffff-ffff-ffffffffffff", "Restaurant"),
    ("e15d1546-4798-54fb-b2ff-35d10197b1b9", "Client Expenses"),
    ("ba20d233-56d8-5d75-935d-510547a97fc6", "Healthcare"),
    ("cf975780-197c-546a-a21b-8543593f4ce0", "Education"),
    ("6513270e-269e-0d37-f2a7-4de452e6b438", "Salary Income"),
    ("d23f0824-128b-2f33-0c5c-7fd0a6a3a450", "Salary Income"),
    ("9531985d-5d9d-c9f8-1818-e811892f902b", "Salary Income"),
    ("36f675cc-81e7-4ef5-e8e2-5d940ed90475", "Food"),
    ("6b0d549b-6f03-675a-1600-a35a099950d8", "Client Expenses"),
    ("8d116ece-1738-f7d9-3d9c-172411e20b8f", "Insurance"),
    ("90c192cf-d3ac-94af-0f21-ddb66cad4a26", "Utilities"),
    ("a170b338-3926-3059-f28c-105d1fb17c23", "Education"),
    ("0fd630f1-f29d-0da9-953f-48f1a09f76b5", "Insurance"),
    ("0cb1e29c-658c-da14-95e6-0af593bd04cf", "Client Expenses"),
    ("8e81973e-0bec-d7b0-3898-d190f9ebdacc", "Education"),
    ("6b4cb242-4a23-d596-2217-beaddbc496cb", "Investment"),
    ("92276658-1e27-a1c0-8a6a-63ec24ede6a4", "Entertainment"),
    ("ae97ba94-d0ed-a82f-8f6d-05584ef8aa38", "Salary Income"),
    ("923a7369-94e3-bf91-1a61-dbe22e44158b", "Rent"),
    ("18f135d2-5f55-7203-3018-50c5a38fd547", "Food"),
    ("907a70c3-1012-f037-b64c-e4228c38fb29", "Healthcare"),
    ("7f150524-34b9-b5df-9e77-69b10f4205b4", "Client Expenses"),
    ("00000000-0000-0000-1fff-ffffffffffff", "Rent"),
    ("00000000-0000-0000-5fff-fffffffffffd", "Rent"),
    ("00000000-0000-0000-1fff-fffffffffffe", "Rent"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn python_vectors() -> impl Iterator<Item = (Uuid, &'static str)> {
        CPYTHON_VECTORS.iter().map(|(id, category)| (Uuid::parse_str(id).unwrap(), *category))
    }

    #[test]
    fn categories_match_cpython_hash() {
        for (id, expected) in python_vectors() {
            assert_eq!(reference_category(id), expected, "id {id}");
        }
    }

    #[test]
    fn a_shift_moves_every_category_by_that_many_places() {
        for (id, category) in python_vectors() {
            let index = CATEGORIES.iter().position(|c| *c == category).unwrap();
            assert_eq!(shifted_category(id, 0), category);
            assert_eq!(shifted_category(id, 3), CATEGORIES[(index + 3) % 15]);
            assert_eq!(shifted_category(id, 15), category, "a full turn is the seed's model");
            assert_eq!(shifted_category(id, u64::MAX), CATEGORIES[(index + (u64::MAX % 15) as usize) % 15]);
        }
    }

    #[test]
    fn confidence_is_deterministic_and_in_range() {
        for (id, _) in python_vectors() {
            let confidence = reference_confidence(id);
            assert!((0.5..=1.0).contains(&confidence), "{confidence}");
            assert_eq!(confidence, reference_confidence(id));
        }
    }
}
