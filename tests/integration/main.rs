//! Integration tests against the real local stack (`make up`).
