//! The supervised actix pipeline (contract §1), one file per actor:
//! KafkaReader, Buffer, PredictClient, DbWriter, DlqPublisher and CsvLoader.
//!
//! The actors arrive with the streaming-pipeline issue; the rules they apply
//! already live in `src/domain`, and the adapters they use in `src/`.
