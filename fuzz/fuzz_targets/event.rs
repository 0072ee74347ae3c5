//! The event decoder and validator on arbitrary bytes: never a panic, and
//! whatever passes survives a round trip through its canonical event.
#![no_main]

#[path = "../../src/domain/mod.rs"]
#[allow(dead_code)]
mod domain;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(transaction) = domain::event::parse_event(data) {
        let id = transaction.id.to_string();
        let event = domain::event::TransactionEvent::of(&transaction, &id);
        let bytes = serde_json::to_vec(&event).expect("an event serialises");
        let again = domain::event::parse_event(&bytes).expect("a canonical event parses");
        assert_eq!(again.id, transaction.id);
        assert_eq!(again.amount, transaction.amount);
        assert_eq!(again.timestamp, transaction.timestamp);
        assert_eq!(again.side, transaction.side);
    }
});
